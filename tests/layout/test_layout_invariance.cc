// Layout invariance under mpirun: an MoE model trained with some parallel layout must
// produce the gradients and the loss sequence of the same model on one rank with the same
// seed and global batch.
//
//   mpirun -np N test_layout_invariance --tp T --ep E [--etp X] [--device cpu|cuda] [--zero1 1] [--sp 1]
//
// With --device cuda every rank uses its node's GPU (ranks may share one: collectives go
// over MPI, staged through host memory); without a visible GPU the run reports itself
// skipped.
//
// Every rank also computes the single-rank reference itself (the model is small), so no
// result is shipped between runs. Checked:
//   - after the first step's backward and reductions, every parameter's gradient (experts
//     compared block by block against the reference's full stacks) within
//     1e-5 x the tensor's largest reference gradient: only the summation order differs
//     (micro-batches added in another grouping, rows of one expert in one GEMM);
//   - the loss of each of 20 AdamW steps within 1e-5 (observed: identical).
// With --precision bf16 both models train in BF16 (bf16 GEMM operands, fp32 master state).
// Their fp32 sums still differ only in order, but an order difference that moves a value
// across a bf16 rounding boundary changes that operand by up to 2^-9 relative, and the
// change propagates: the gradients are then compared within 1e-2 of each tensor's largest
// (measured: 1e-3 with tp, where the row-parallel partial sums are added in another order,
// 2e-7 without), the losses within 5e-4 relative (measured: up to 6e-5 over 20 steps) and
// the gradient norms within 2e-3 relative (measured: up to 7e-4, at the last step with tp);
// the measured differences are printed.
// With --recompute selective|full the parallel model recomputes activations in the
// backward, its tensor-parallel and expert exchanges included; with --attention fused both
// models run attention on the fused kernel. The bounds stay the same.
// With --sdmoe 1 both models train with SD-MoE, each refreshed by its own spectral service,
// and every local expert's bases (whole, also where --etp > 1 splits the experts) are
// compared with the reference's (within 1e-3 rad), the spectral metrics too (within 1e-4),
// and the jobs counted.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "core/check.h"
#include "core/rng.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "model/sdmoe.h"
#include "model/spectral_service.h"
#include "parallel/communicator.h"
#include "parallel/gradient_sync.h"

namespace {

using namespace sdmoe;

constexpr int kGlobalBatch = 16, kMicroBatch = 2, kSteps = 20;

ModelSpec test_spec() {
  ModelSpec s;
  s.vocab_size = 96;
  s.seq_len = 12;
  s.dim = 32;
  s.layers = 3;
  s.heads = 4;
  s.ffn_dim = 48;
  s.moe.num_experts = 8;
  s.moe.top_k = 2;
  s.moe.expert_ffn_dim = 24;
  s.moe.shared_expert_ffn_dim = 16;
  s.moe.first_dense_layers = 1;
  s.moe.aux_loss_coef = 0.05;
  s.moe.z_loss_coef = 0.01;
  return s;
}

// Sequence g of step `step`: seq_len + 1 tokens, a pure function of (step, g). A random
// start, then a fixed successor rule, so that the model has something to learn in 20 steps.
void sequence(const ModelSpec& spec, int step, int g, int32_t* out) {
  const uint64_t v = uint64_t(spec.vocab_size);
  out[0] = int32_t(random_bits(11, uint64_t(step) * kGlobalBatch + g, 0) % v);
  for (int i = 1; i <= spec.seq_len; ++i) out[i] = int32_t((uint64_t(out[i - 1]) * 5 + 1) % v);
}

OptimizerSpec test_optimizer() {
  OptimizerSpec o;
  o.lr = 3e-3;
  o.min_lr = 3e-4;
  o.warmup_steps = 3;
  o.total_steps = kSteps;
  o.weight_decay = 0.1;
  o.grad_clip = 0.5;  // low enough to clip: the global norm must be right
  return o;
}

// One step over sequences [first, first + count) of the global batch, in micro-batches.
// With `sync`, the last micro-batch's backward reduces its gradient buckets as they finish.
double accumulate(GptModel& model, int step, int first, int count, double loss_scale, double* tokens_out,
                  GradientSync* sync = nullptr) {
  const ModelSpec& spec = model.spec();
  std::vector<int32_t> tokens(kMicroBatch * (spec.seq_len + 1));
  double loss_sum = 0.0;
  for (int m = 0; m < count / kMicroBatch; ++m) {
    for (int b = 0; b < kMicroBatch; ++b) sequence(spec, step, first + m * kMicroBatch + b, &tokens[b * (spec.seq_len + 1)]);
    if (sync && m == count / kMicroBatch - 1) sync->expect_backward();
    MicroBatchStats s = model.forward_backward(tokens.data(), loss_scale);
    loss_sum += s.loss_sum;
    *tokens_out += double(s.tokens);
  }
  return loss_sum;
}

std::vector<float> host(Backend& be, const Tensor& t) {
  std::vector<float> v(t.numel());
  be.copy_to_host(t, v.data());
  return v;
}

// ZeRO-1 under BF16 all-gathers the weights' working copy (bf16) after each step, and
// the fp32 master's blocks owned by other ranks only at gather_master(). Checked after the
// last step: the bf16 gather moved half the bytes of the fp32 one; the master was stale
// before gather_master() and, after it, rounds to the working copy bit for bit (a stale
// block would round to the weights of an earlier step). Returns the failures.
int check_master_gather(Backend& be, GptModel& model, GradientSync& sync, const ProcessGroups& groups, bool bf16,
                        double working_bytes, int rank) {
  if (!bf16) {
    if (sync.master_stale()) {
      std::fprintf(stderr, "rank %d: the fp32 master is stale in FP32\n", rank);
      return 1;
    }
    return 0;
  }
  int failures = 0;
  const bool gathers = working_bytes > 0;
  if (sync.master_stale() != gathers) {
    std::fprintf(stderr, "rank %d: master stale %d after a step whose gather moved %.0f bytes\n", rank,
                 int(sync.master_stale()), working_bytes);
    ++failures;
  }
  groups.dp->reset_bytes_sent();
  groups.edp->reset_bytes_sent();
  sync.gather_master();
  const double master_bytes = double(groups.dp->bytes_sent() + groups.edp->bytes_sent());
  if (!(working_bytes == 0.5 * master_bytes)) {
    std::fprintf(stderr, "rank %d: the bf16 working-copy gather moved %.0f bytes, the fp32 master gather %.0f\n", rank,
                 working_bytes, master_bytes);
    ++failures;
  }
  Buffer rounded(be, size_t(model.params().numel()) * dtype_size(DType::BF16));
  const Tensor rounded_flat(rounded.data(), DType::BF16, model.params().device, {model.params().numel()});
  be.cast(model.params(), rounded_flat);
  std::vector<uint16_t> want(size_t(model.params().numel())), got(want.size());
  be.copy_to_host(rounded_flat, want.data());
  be.copy_to_host(model.operand_weights(), got.data());
  int64_t differ = 0;
  for (size_t i = 0; i < want.size(); ++i) differ += want[i] != got[i];
  if (differ > 0) {
    std::fprintf(stderr, "rank %d: after gather_master, %ld of %zu master weights do not round to the working copy\n",
                 rank, (long)differ, want.size());
    ++failures;
  }
  return failures;
}

int run(int argc, char** argv) {
  int tp = 1, ep = 1, etp = 1;
  bool cuda = false, zero1 = false, sequence_parallel = false, bf16 = false;
  // The parallel model may recompute (its collectives then run again in the backward);
  // the reference never does.
  Recompute recompute = Recompute::NONE;
  bool fused = false;  // --attention fused: the parallel model's attention on the fused kernel
  // Small gradient buckets, so that every layout reduces several of them during the backward.
  int64_t bucket_elements = 4096;
  // SD-MoE on both models: --sdmoe 1 [--basis 0|1 (per expert, layer shared)] [--solver 0|1
  // (exact, subspace iteration)], refreshed every kRefresh steps.
  bool use_sdmoe = false;
  SdmoeSpec sdmoe_spec;
  sdmoe_spec.enabled = true;
  sdmoe_spec.rank = 4;
  sdmoe_spec.refresh_interval = 4;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--sdmoe")) use_sdmoe = std::atoi(argv[i + 1]) != 0;
    else if (!std::strcmp(argv[i], "--basis"))
      sdmoe_spec.basis = std::atoi(argv[i + 1]) ? SdmoeBasis::LAYER_SHARED : SdmoeBasis::PER_EXPERT;
    else if (!std::strcmp(argv[i], "--solver"))
      sdmoe_spec.solver = std::atoi(argv[i + 1]) ? SdmoeSolver::SUBSPACE_ITERATION : SdmoeSolver::EXACT;
  }
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tp")) tp = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--ep")) ep = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--etp")) etp = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--device")) cuda = !std::strcmp(argv[i + 1], "cuda");
    else if (!std::strcmp(argv[i], "--zero1")) zero1 = std::atoi(argv[i + 1]) != 0;
    else if (!std::strcmp(argv[i], "--sp")) sequence_parallel = std::atoi(argv[i + 1]) != 0;
    else if (!std::strcmp(argv[i], "--bucket")) bucket_elements = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--precision")) bf16 = !std::strcmp(argv[i + 1], "bf16");
    else if (!std::strcmp(argv[i], "--attention")) fused = !std::strcmp(argv[i + 1], "fused");
    else if (!std::strcmp(argv[i], "--recompute"))
      recompute = !std::strcmp(argv[i + 1], "full")        ? Recompute::FULL
                  : !std::strcmp(argv[i + 1], "selective") ? Recompute::SELECTIVE
                                                           : Recompute::NONE;
  }
  int world = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const ModelSpec spec = test_spec();
  const ParallelDims dims = ParallelDims::make(world, tp, ep, etp, spec.moe.num_experts);
  if (cuda && cuda_device_count() == 0) {
    if (rank == 0) std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  int local_rank = 0;
  {
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_free(&node);
  }
  auto be = cuda ? make_cuda_backend(local_rank % cuda_device_count()) : make_cpu_backend(1);
  ProcessGroups groups = make_process_groups(dims, *be);
  const int per_rank = kGlobalBatch / dims.dp;
  SDMOE_ASSERT(per_rank % kMicroBatch == 0, "layout {} does not divide the global batch", dims.describe());
  const double loss_scale = 1.0 / double(kGlobalBatch / kMicroBatch);

  const PrecisionPolicy policy = PrecisionPolicy::of(bf16 ? Precision::BF16 : Precision::FP32);
  const double grad_tol = bf16 ? 1e-2 : 1e-5, loss_tol = bf16 ? 5e-4 : 1e-5, norm_tol = bf16 ? 2e-3 : 1e-5;
  // The reference runs the same attention kernel (fused against unfused is a unit test's
  // comparison, in F64) and never recomputes.
  GptModel reference(spec, *be, policy, kMicroBatch, {}, ModelExecution{Recompute::NONE, fused});
  GptModel parallel(spec, *be, policy, kMicroBatch, placement_for(groups, zero1, sequence_parallel),
                    ModelExecution{recompute, fused});
  reference.init_parameters(5);
  parallel.init_parameters(5);
  GradientSync sync(parallel.params(), parallel.grads(), parallel.registry().tp_sharded_begin(),
                    parallel.registry().expert_begin(), groups, *be,
                    GradientSyncOptions{zero1, !use_sdmoe, sequence_parallel, bucket_elements,
                                        parallel.gradient_ready_ranges(), parallel.operand_weights()});
  parallel.set_backward_hook([&sync](int stage) { sync.backward_stage_done(stage); });
  const std::vector<ElementRange>& owned = sync.owned();
  std::unique_ptr<SpectralDecomposition> ref_sd, par_sd;
  std::unique_ptr<SpectralService> ref_service, par_service;
  if (use_sdmoe) {
    ref_sd = std::make_unique<SpectralDecomposition>(*be, DType::F32, reference.registry(), sdmoe_spec);
    par_sd = std::make_unique<SpectralDecomposition>(*be, DType::F32, parallel.registry(), sdmoe_spec,
                                                     dims.etp > 1 ? groups.etp : nullptr);
    ref_service = std::make_unique<SpectralService>(*ref_sd, reference.registry(), reference.params(),
                                                    reference.grads(), std::vector<int>{}, nullptr, nullptr);
    par_service = std::make_unique<SpectralService>(*par_sd, parallel.registry(), parallel.params(), parallel.grads(),
                                                    std::vector<int>{}, groups.edp, groups.ep, nullptr,
                                                    dims.etp > 1 ? groups.etp : nullptr);
  }
  AdamW ref_opt(reference, test_optimizer(), {}, ref_sd.get()), par_opt(parallel, test_optimizer(), owned, par_sd.get());
  int failures = 0;
  double worst_angle = 0.0, worst_metric = 0.0;
  // Every local expert's bases against the single-rank model's bases of the same global
  // expert, and the jobs: each computed once per group of ranks holding the same experts.
  auto refresh_both = [&](int64_t step) {
    const RefreshReport ref_report = ref_service->refresh(step, ref_opt.first_moments());
    const RefreshReport par_report = par_service->refresh(step, par_opt.first_moments());
    const int k = sdmoe_spec.rank;
    std::vector<float> rb(ref_sd->bases().numel()), pb(par_sd->bases().numel());
    be->copy_to_host(ref_sd->bases(), rb.data());
    be->copy_to_host(par_sd->bases(), pb.data());
    for (size_t ti = 0; ti < par_sd->targets().size(); ++ti) {
      const SpectralTarget &pt = par_sd->targets()[ti], &rt = ref_sd->targets()[ti];
      for (int p = 0; p < pt.bases; ++p) {
        const int64_t global = pt.bases > 1 ? pt.first_expert + p : 0;
        auto rows = [&](const std::vector<float>& v, int64_t at, int64_t len) {
          return std::vector<double>(v.begin() + at, v.begin() + at + k * len);
        };
        // Bases are whole on every rank, also where etp splits the matrices.
        const int64_t m = pt.m_full, n = pt.n_full;
        if (m != rt.m || n != rt.n) {
          std::fprintf(stderr, "rank %d: target %zu has whole bases %ldx%ld, the reference %ldx%ld\n", rank, ti, (long)m,
                       (long)n, (long)rt.m, (long)rt.n);
          ++failures;
          continue;
        }
        const double au = SpectralService::largest_principal_angle(rows(pb, pt.ut_offset + p * k * m, m),
                                                                   rows(rb, rt.ut_offset + global * k * m, m), k, m);
        const double av = SpectralService::largest_principal_angle(rows(pb, pt.vt_offset + p * k * n, n),
                                                                   rows(rb, rt.vt_offset + global * k * n, n), k, n);
        worst_angle = std::max({worst_angle, au, av});
        if (!(au < 1e-3 && av < 1e-3)) {
          std::fprintf(stderr, "rank %d step %ld: %s bases of layer %d expert %ld differ from one rank's by %.2e / %.2e rad\n",
                       rank, (long)step, sdmoe_matrix_name(pt.matrix), pt.layer, (long)global, au, av);
          ++failures;
        }
      }
    }
    // The spectral metrics (every expert of a layer, gathered over ep) match too: they
    // depend on the bases and on metric bases seeded and warm-started per global expert.
    if (par_report.metrics.size() != ref_report.metrics.size()) {
      std::fprintf(stderr, "rank %d step %ld: %zu metric rows, the reference %zu\n", rank, (long)step,
                   par_report.metrics.size(), ref_report.metrics.size());
      ++failures;
    } else {
      for (size_t i = 0; i < par_report.metrics.size(); ++i) {
        const SpectralMetrics &a = par_report.metrics[i], &b = ref_report.metrics[i];
        const double pairs[][2] = {{a.overlap_left, b.overlap_left},
                                   {a.overlap_right, b.overlap_right},
                                   {a.tail_overlap_left, b.tail_overlap_left},
                                   {a.tail_overlap_right, b.tail_overlap_right},
                                   {a.grad_overlap_left, b.grad_overlap_left},
                                   {a.grad_overlap_right, b.grad_overlap_right}};
        for (const auto& [x, y] : pairs) {
          const double diff = std::isnan(y) ? (std::isnan(x) ? 0.0 : 1.0) : std::fabs(x - y);
          worst_metric = std::max(worst_metric, std::isnan(diff) ? 1.0 : diff);
          if (!(diff <= 1e-4)) {
            std::fprintf(stderr, "rank %d step %ld: layer %d %s metrics differ from one rank's by %.2e\n", rank,
                         (long)step, a.layer, sdmoe_matrix_name(a.matrix), diff);
            ++failures;
          }
        }
      }
    }
    // One rank's jobs: the reference computes every job of the model once.
    std::vector<double> jobs{double(par_report.jobs_computed)};
    groups.world->all_reduce_host(jobs, ReduceOp::SUM);
    const double replica_groups = double(dims.world) / groups.edp->size();
    // Per-expert jobs run once in each replica group (which holds 1/replica_groups of the
    // experts); layer jobs once in the world.
    if (jobs[0] != double(ref_report.jobs_computed)) {
      std::fprintf(stderr, "rank %d step %ld: %g jobs over the world (%g replica groups), one rank computes %ld\n", rank,
                   (long)step, jobs[0], replica_groups, (long)ref_report.jobs_computed);
      ++failures;
    }
  };
  if (use_sdmoe) refresh_both(0);

  double worst_grad = 0.0, worst_loss = 0.0;
  for (int step = 0; step < kSteps; ++step) {
    reference.zero_grads();
    parallel.zero_grads();
    double ref_tokens = 0.0;
    const double ref_loss = accumulate(reference, step, 0, kGlobalBatch, loss_scale, &ref_tokens) / ref_tokens;
    std::vector<double> sums{0.0, 0.0};
    sums[0] = accumulate(parallel, step, groups.dp->rank() * per_rank, per_rank, loss_scale, &sums[1], &sync);
    const int launched_early = sync.launched_during_backward();
    const double grad_norm = sync.reduce();
    // The buckets before the embedding's must go out while the backward still runs.
    if (step == 0 && sync.buckets().size() > 1 && launched_early == 0) {
      std::fprintf(stderr, "rank %d: none of %zu gradient buckets was launched during the backward\n", rank,
                   sync.buckets().size());
      ++failures;
    }
    groups.dp->all_reduce_host(sums, ReduceOp::SUM);
    const double par_loss = sums[0] / sums[1];

    if (step == 0) {
      const ParamRegistry& par_reg = parallel.registry();
      for (size_t id = 0; id < par_reg.specs().size(); ++id) {
        const ParamSpec& ps = par_reg.spec(int(id));
        const std::vector<float> want_all = host(*be, reference.grad(int(id))), got = host(*be, parallel.grad(int(id)));
        double scale = 0.0;
        for (float w : want_all) scale = std::max(scale, double(std::fabs(w)));
        const double tol = grad_tol * scale + 1e-9;
        int64_t bad = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          // Only what this rank owns holds reduced gradients (with ZeRO-1: its shards).
          const int64_t at = ps.offset + int64_t(i);
          if (!std::any_of(owned.begin(), owned.end(), [&](const ElementRange& r) { return r.begin <= at && at < r.end; }))
            continue;
          const double err = std::fabs(double(got[i]) - double(want_all[ps.logical_index(int64_t(i))]));
          worst_grad = std::max(worst_grad, err / std::max(scale, 1e-30));
          if (!(err <= tol)) ++bad;
        }
        if (bad > 0) {
          std::fprintf(stderr, "rank %d: gradient of %s: %ld of %zu elements differ beyond %.2e\n", rank,
                       ps.name.c_str(), (long)bad, got.size(), tol);
          ++failures;
        }
      }
    }
    const OptimizerStepResult r = ref_opt.step(step);
    const OptimizerStepResult p = par_opt.step(step, grad_norm);
    reference.weights_changed();
    parallel.weights_changed(owned);
    groups.dp->reset_bytes_sent();
    groups.edp->reset_bytes_sent();
    sync.after_update();
    const double gathered_bytes = double(groups.dp->bytes_sent() + groups.edp->bytes_sent());
    if (step == kSteps - 1) failures += check_master_gather(*be, parallel, sync, groups, bf16, gathered_bytes, rank);
    if (use_sdmoe && par_service->due(step + 1)) refresh_both(step + 1);
    worst_loss = std::max(worst_loss, std::fabs(ref_loss - par_loss));
    if (!(std::fabs(ref_loss - par_loss) <= (bf16 ? loss_tol * ref_loss : loss_tol)) ||
        !(std::fabs(r.grad_norm - p.grad_norm) <= norm_tol * r.grad_norm)) {
      std::fprintf(stderr, "rank %d step %d: loss %.8f vs %.8f, grad norm %.8f vs %.8f\n", rank, step, par_loss,
                   ref_loss, p.grad_norm, r.grad_norm);
      ++failures;
    }
    if (step == kSteps - 1 && !(ref_loss < 0.95 * std::log(double(spec.vocab_size)))) {
      std::fprintf(stderr, "rank %d: the reference did not train (loss %.4f)\n", rank, ref_loss);
      ++failures;
    }
  }
  const std::string sdmoe_summary =
      use_sdmoe ? fmt::format(", worst basis angle {:.2e} rad, worst metric difference {:.2e}", worst_angle, worst_metric)
                : "";
  std::vector<double> all{double(failures), worst_grad, worst_loss};
  groups.world->all_reduce_host(all, ReduceOp::MAX);
  if (rank == 0)
    std::printf("%s: %s%s%s%s; worst gradient difference %.2e of the tensor's largest, worst loss difference %.2e over %d steps%s\n",
                all[0] == 0 ? "PASS" : "FAIL", dims.describe().c_str(), bf16 ? " in BF16" : "",
                fmt::format("{}{}", recompute == Recompute::FULL        ? " with full recomputation"
                                    : recompute == Recompute::SELECTIVE ? " with selective recomputation"
                                                                        : "",
                            fused ? " with fused attention" : "")
                    .c_str(),
                use_sdmoe ? " with SD-MoE" : "", all[1], all[2], kSteps, sdmoe_summary.c_str());
  return all[0] == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  sdmoe::MpiRuntime mpi(&argc, &argv);
  try {
    return run(argc, argv);
  } catch (const sdmoe::Error& e) {
    std::fprintf(stderr, "test_layout_invariance: error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return 2;
}
