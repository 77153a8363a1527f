// Moves routed token rows to the ranks that hold their experts and back: the expert-
// parallel half of an MoE layer. The layer itself routes, permutes tokens by expert and
// runs the experts; between those phases the dispatcher
//   1. exchanges counts: each rank tells every peer how many rows it sends to each of the
//      peer's experts (host, one small all-to-all);
//   2. dispatches: all-to-all of the rows (blocks of contiguous experts per peer, since
//      the rows are sorted by global expert id), then a permutation from source-major
//      ([source rank][local expert]) to expert-major ([local expert][source rank]) so that
//      each local expert's rows are contiguous for one grouped GEMM;
//   3. combines: the inverse permutation and the all-to-all back.
// Experts are sharded in contiguous blocks: rank r of the ep group holds experts
// [r * E/ep, (r+1) * E/ep). With ep = 1 it is the local dispatcher: no communication, and
// the expert-major layout is the sorted layout itself. That path is the oracle for the
// all-to-all one.
#pragma once
#include <memory>
#include <span>
#include <vector>

#include "core/buffer.h"
#include "parallel/communicator.h"

namespace sdmoe {

class TokenDispatcher {
 public:
  // One micro-batch's routing as the count exchange agreed it: what that micro-batch's
  // dispatch and combine move. One per micro-batch in flight (its index buffers are its
  // own); the dispatcher itself keeps only per-call staging.
  class Routing {
   public:
    // Rows this rank's expert parts process, and where each local expert's rows start in
    // the expert-major layout ([local_experts + 1] offsets).
    int64_t received_rows() const { return local_offsets_.back(); }
    const std::vector<int64_t>& local_expert_offsets() const { return local_offsets_; }
    int64_t sent_rows() const { return sent_rows_; }

   private:
    friend class TokenDispatcher;
    // Rows arrive in blocks [peer][local expert] (counts[p * El + j]); the expert-major
    // order is [local expert][peer]. The two device index tensors of one stage.
    struct Permutation {
      std::vector<int64_t> rows_per_peer, expert_offsets;
      int64_t rows = 0;
      Tensor to_expert_major, to_peer_major;  // I32 [rows] each
      Buffer index;
      int64_t capacity = 0;
    };
    int64_t sent_rows_ = 0;
    std::vector<int64_t> send_rows_per_peer_;  // [ep] rows this rank sends in the ep exchange
    Permutation ep_, etp_;
    std::vector<int64_t> local_offsets_{0};   // [local_experts + 1]
  };

  // ep_group / etp_group null means a group of one. With expert tensor parallelism (etp)
  // each expert's hidden units are split over the etp group: after the ep exchange the
  // etp ranks all-gather their rows (every part of an expert sees every row) and, on the
  // way back, sum their partial outputs and return each rank its own rows.
  TokenDispatcher(std::shared_ptr<Communicator> ep_group, std::shared_ptr<Communicator> etp_group, Backend& backend,
                  int num_experts);

  int ep_size() const { return ep_size_; }
  int ep_rank() const { return ep_rank_; }
  int etp_size() const { return etp_size_; }
  int etp_rank() const { return etp_rank_; }
  int local_experts() const { return local_experts_; }
  int first_local_expert() const { return ep_rank_ * local_experts_; }
  bool local_only() const { return ep_size_ == 1 && etp_size_ == 1; }

  // Phase 1. rows_per_expert[e] (e over all E experts) is how many of this rank's rows,
  // sorted by expert, go to expert e. Collective over the ep (and etp) group. Fills
  // `routing` (reusing its buffers).
  void exchange_counts(Routing& routing, std::span<const int64_t> rows_per_expert);
  // Phase 2: sorted [sent_rows, W] -> expert_major [received_rows, W]. Collective.
  void dispatch(const Routing& routing, const Tensor& sorted, const Tensor& expert_major);
  // Phase 3: expert_major [received_rows, W] -> sorted [sent_rows, W]; with etp the rows
  // hold partial sums, added up over the etp group here. Collective.
  void combine(const Routing& routing, const Tensor& expert_major, const Tensor& sorted);

  // One micro-batch at a time, in a routing the dispatcher holds itself.
  void exchange_counts(std::span<const int64_t> rows_per_expert) { exchange_counts(own_, rows_per_expert); }
  int64_t received_rows() const { return own_.received_rows(); }
  const std::vector<int64_t>& local_expert_offsets() const { return own_.local_expert_offsets(); }
  int64_t sent_rows() const { return own_.sent_rows(); }
  void dispatch(const Tensor& sorted, const Tensor& expert_major) { dispatch(own_, sorted, expert_major); }
  void combine(const Tensor& expert_major, const Tensor& sorted) { combine(own_, expert_major, sorted); }

 private:
  void build(Routing::Permutation& perm, const std::vector<int64_t>& counts, int peers);
  // Scratch carved per call from staging the dispatcher keeps: [rows, width] tensors of
  // the dtype, sized for `routing`.
  Tensor scratch(const Routing& routing, int slot, int64_t rows, int64_t width, DType dtype);

  std::shared_ptr<Communicator> ep_group_, etp_group_;
  Backend& backend_;
  int num_experts_, ep_size_ = 1, ep_rank_ = 0, etp_size_ = 1, etp_rank_ = 0, local_experts_;
  Routing own_;
  Buffer staging_;
  int64_t staging_capacity_ = 0;
};

}  // namespace sdmoe
