// Parallel degrees and where each rank sits on every axis.
//
// The dense part of the model (attention, dense MLP, embedding, head) is laid out as
// tp x dp = world; the MoE part as etp x ep x edp = world ("parallel folding": the expert
// axes need not line up with the dense ones). Ranks are numbered with the tensor axis
// fastest, as in Megatron-LM:
//   dense:  rank = dp_rank * tp + tp_rank
//   MoE:    rank = (edp_rank * ep + ep_rank) * etp + etp_rank
// so a tp (or etp) group is a run of consecutive ranks, which a launcher that fills one
// node before the next places inside a node.
#pragma once
#include <string>

namespace sdmoe {

struct ParallelDims {
  int world = 1;
  int tp = 1, dp = 1;            // dense: tp x dp = world
  int etp = 1, ep = 1, edp = 1;  // MoE: etp x ep x edp = world

  // Checks the degrees against the world size and the model and derives dp and edp.
  // `num_experts` is 0 for a dense model. Throws sdmoe::Error with a one-line message
  // that depends only on its arguments, so every rank reports the same error before any
  // collective.
  static ParallelDims make(int world, int tp, int ep, int etp, int num_experts);
  // Every rank a data-parallel replica.
  static ParallelDims data_parallel(int world) { return make(world, 1, 1, 1, 0); }

  int tp_rank(int rank) const { return rank % tp; }
  int dp_rank(int rank) const { return rank / tp; }
  int etp_rank(int rank) const { return rank % etp; }
  int ep_rank(int rank) const { return (rank / etp) % ep; }
  int edp_rank(int rank) const { return rank / (etp * ep); }

  // "tp 2 x dp 4 | etp 1 x ep 4 x edp 2"
  std::string describe() const;
};

}  // namespace sdmoe
