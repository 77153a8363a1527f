// The spectral service: every T steps it computes new top-k bases for every SD-MoE target
// and installs them (W_eff unchanged), and measures how much the experts overlap.
//
// Jobs. PER_EXPERT: one job per (layer, matrix, expert). LAYER_SHARED: one basis job per
// (layer, matrix) on the experts' summed Gram matrices (sum_e W_e W_e^T for U, sum_e
// W_e^T W_e for V, summed over the ep group), then one metrics job per expert. A job is
// owned by one rank of the group of ranks that hold the same experts (the expert-data-
// parallel group, times the etp group when experts are split over etp: each of those
// ranks gathers the whole experts first): job j goes to its rank j mod size. The owner writes its results into a
// zeroed exchange buffer and one sum over the group shares them, so every job runs exactly
// once per replica group (jobs_computed() counts them) and the result does not depend on
// who computed it. The queue is built per refresh; the work runs on the service's
// backend ops between two training steps (see docs/sdmoe.md for what async adds).
//
// Solvers: EXACT is a symmetric eigendecomposition (LAPACK syevd on CPU, cuSOLVER syevd on
// GPU) of a Gram matrix: per matrix the smaller side's W^T W or W W^T, whose top-k
// eigenvectors are that side's top-k singular vectors, the other side's basis being the
// orthonormalised image (about half the time of a thin gesdd on the expert shapes);
// LAYER_SHARED the summed Grams. SUBSPACE_ITERATION runs a few
// rounds of Vt <- orth(Ut W), Ut <- orth(Vt W^T) from the previous bases (orth: CholeskyQR
// twice, batched on the device). The metrics' bases of the tails and gradients are found
// by subspace iteration in either mode, warm-started from the previous refresh's.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/sdmoe.h"
#include "parallel/communicator.h"

namespace sdmoe {

// Per MoE layer and matrix type, at one refresh. Overlaps are the mean over expert pairs
// i != j of |U_i^T U_j|_F^2 / k (0: no shared direction, 1: the same subspace).
struct SpectralMetrics {
  int layer = 0;
  SdmoeMatrix matrix = SdmoeMatrix::GATE;
  double overlap_left = 0, overlap_right = 0;            // top-k of W_eff
  double tail_overlap_left = 0, tail_overlap_right = 0;  // top-k of W_U
  double grad_overlap_left = 0, grad_overlap_right = 0;  // top-k of the last gradient (NaN at step 0)
  double router_alignment = 0;  // mean |Vt_e r_e|^2 over experts, r_e the unit router row (gate/up; NaN for down)
  // Whether the gradient overlaps and the router alignment apply (gradients exist after
  // step 0; a router alignment for gate and up of a layer with a router). Where they do
  // not, the values are NaN and printed as "-"; a NaN where they apply is a real one.
  bool has_gradients = false, has_router = false;
};

struct RefreshReport {
  int64_t step = 0;              // the step whose parameters the bases come from
  int64_t staleness = 0;         // steps between that snapshot and the install
  double compute_seconds = 0, comm_seconds = 0;
  double blocking_seconds = 0;   // async: what the training step waited for (join, install, metrics)
  int64_t jobs_computed = 0;     // by this rank at this refresh
  std::vector<SpectralMetrics> metrics;
};

class SpectralService {
 public:
  // params/grads: the model's flat buffers; router_ids: the router parameter of each MoE
  // layer, by layer index (-1 where none). replicas: ranks holding the same experts
  // (null: this rank alone); ep: the expert-parallel group (null: all experts here).
  // worker_backend: where the solvers run; null: the decomposition's backend. For async
  // refreshes on a GPU it must be a second backend on the same device (its own stream and
  // handles); a CPU backend may be shared (its ops keep no state). etp: the expert-tensor-
  // parallel group when the experts are split over it; the service then all-gathers whole
  // experts over it at each refresh and deals the jobs over the replicas' etp groups too.
  SpectralService(SpectralDecomposition& sd, const ParamRegistry& registry, Tensor params, Tensor grads,
                  std::vector<int> router_ids, std::shared_ptr<Communicator> replicas,
                  std::shared_ptr<Communicator> ep, Backend* worker_backend = nullptr,
                  std::shared_ptr<Communicator> etp = nullptr);
  ~SpectralService();
  // New bases from the current parameters, installed now; `m` are the optimizer's first
  // moments (carried into the new split). step 0 skips the gradient metrics.
  RefreshReport refresh(int64_t step, const Tensor& m);
  // Whether the boundary after `step` steps refreshes.
  bool due(int64_t steps_done) const {
    return steps_done > 0 && steps_done % sd_.spec().refresh_interval == 0;
  }
  int64_t jobs_computed() const { return jobs_total_; }
  // The decomposition's bases were restored from a checkpoint: later refreshes warm-start
  // from them.
  void bases_restored() { installed_ = true; }

  // Asynchronous refresh (PER_EXPERT): start_async snapshots the experts' parameters and
  // gradients after `step` steps and computes this rank's jobs on a worker thread while
  // training continues; finish_async, called at a later step boundary by every rank at the
  // same step, waits for the worker, shares the results, installs them and measures. The
  // staleness is the number of steps between the two.
  // with_gradients false: the gradients of `step` are not at hand (right after a resume),
  // so this refresh reports no gradient-subspace metrics.
  void start_async(int64_t step, bool with_gradients = true);
  RefreshReport finish_async(int64_t step, const Tensor& m);
  bool async_pending() const;

  // The largest principal angle (radians) between the row spaces of two k x L bases
  // (host, row-major, orthonormal rows).
  static double largest_principal_angle(const std::vector<double>& a, const std::vector<double>& b, int k,
                                        int64_t length);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  SpectralDecomposition& sd_;
  int64_t jobs_total_ = 0;
  bool installed_ = false;  // bases exist to warm-start from
};

}  // namespace sdmoe
