// The training loop of sdmoe_pretrain.
#pragma once
#include "model/spectral_service.h"
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "launcher/config.h"
#include "parallel/communicator.h"

namespace sdmoe {

// What one optimizer step produced, as logged on rank 0.
struct StepRecord {
  int64_t step = 0;
  double loss = 0.0;        // mean cross-entropy over the global batch
  double lr = 0.0, grad_norm = 0.0;
  double aux_loss = 0.0, z_loss = 0.0;  // per micro-batch mean, summed over MoE layers
  double tokens_per_second = 0.0, model_flops = 0.0, peak_fraction = 0.0;
  // Rank 0's wall time of the step and of its phases: the micro-batches' forward and
  // backward (with the gradient reductions that overlap them), the rest of the gradient
  // reduction with the optimizer step, and the SD-MoE refresh or the install of an
  // asynchronous one (0 at other steps).
  double step_seconds = 0.0, forward_backward_seconds = 0.0, optimizer_seconds = 0.0, refresh_seconds = 0.0;
  // Of the two phases above, the seconds rank 0 spent inside collectives and the waits of
  // asynchronous ones: communication not overlapped with compute. On NCCL a collective
  // returns once queued, so this counts host-side waits only, not the GPU's.
  double forward_backward_comm_seconds = 0.0, optimizer_comm_seconds = 0.0;
  std::vector<double> min_load, max_load;  // per MoE layer
  std::vector<std::vector<double>> expert_load;  // per MoE layer, each expert's share of routed rows
  double val_loss = -1.0;   // < 0 when no validation ran this step
  // Bytes in this rank's Buffers on the training device (parameters, gradients, optimizer
  // and SD-MoE state, activations, scratch): now, and the most so far.
  int64_t buffer_bytes = 0, buffer_peak_bytes = 0;
  // Bytes of this rank's activation buffers (what training.recompute decides).
  int64_t activation_bytes = 0;
  // Bytes rank 0 sent in this step per communication group ("dp", "ep", ...; groups with
  // the same ranks are one communicator and share one entry, named "dp=edp" and so on).
  std::vector<std::pair<std::string, uint64_t>> bytes_sent;
  // At an SD-MoE refresh: its metrics per MoE layer and matrix, and its time.
  std::vector<SpectralMetrics> spectral;
  double spectral_compute_seconds = 0.0, spectral_comm_seconds = 0.0;
  // Each rank's compute time of the step (its wall time less the time it spent inside
  // collectives, where it waits for the others): the spread over the ranks and the slowest.
  double compute_seconds_min = 0.0, compute_seconds_median = 0.0, compute_seconds_max = 0.0;
  int slowest_rank = 0;
};

// The backend the config asks for: CUDA (this rank's local GPU), CPU, or AUTO (CUDA when a
// device is visible). CPU threads default to this node's cores divided by its ranks.
std::unique_ptr<Backend> make_backend(const config::Run& run, const MpiRuntime& mpi);

// The first agreement of a run, before anything else touches MPI: `error` is this rank's
// argument or config error (empty when it has none). Every rank must have loaded the
// same resolved config, or the later collectives would not match (a config file that
// differs between nodes). False, after each rank that can say why printed one line as
// `tool: error: ...`, when any rank failed or the configs differ.
bool agree_on_config(const MpiRuntime& mpi, const char* tool, const std::string& error, const config::Run& run);

// Runs the configured job on this rank. Returns the process exit code. Every rank checks
// the configuration and data and agrees on any error before the first collective; a
// failing rank prints one line and all ranks return 2.
int run_pretrain(const config::Run& run, const MpiRuntime& mpi, const std::function<void(const StepRecord&)>& on_step = {});

// Loads the parameters of the configured checkpoint (checkpoint.load, or checkpoint.dir's
// latest) under the configured layout and prints the mean loss and perplexity of
// training.eval_batches micro-batches of `split` ("train" or "validation"): the sequences
// training validates on, so the figure matches the training log's val_loss at that step.
// dump_tokens: also write the evaluated token windows there (docs/usage.md).
int run_eval(const config::Run& run, const MpiRuntime& mpi, const std::string& split,
             const std::string& dump_tokens = "");

}  // namespace sdmoe
