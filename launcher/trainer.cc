#include "launcher/trainer.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <tuple>

#include "core/cpu/cpu_backend.h"
#include "data/bpe_tokenizer.h"
#include "data/sequence_loader.h"
#include "data/token_dataset.h"
#include "launcher/checkpoint.h"
#include "launcher/metrics_log.h"
#include "launcher/tensorboard_writer.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "model/sdmoe.h"
#include "model/spectral_service.h"
#include "parallel/gradient_sync.h"
#include "parallel/watchdog.h"

namespace sdmoe {
namespace {

// SIGTERM, SIGINT or SIGUSR1 (Slurm's notice before preemption or the time limit, a
// Ctrl-C): the step in progress finishes, a checkpoint is written and the run exits 0. A
// second SIGTERM or SIGINT while that is under way (a save or a step that does not end)
// exits at once: the user means it.
volatile std::sig_atomic_t stop_signal = 0;
extern "C" void on_stop_signal(int signal) {
  if (stop_signal != 0 && signal != SIGUSR1) {
    // Only async-signal-safe calls here: write(2) and _exit.
    static const char message[] =
        "sdmoe_pretrain: second stop signal while the first was being handled: exiting now; the last complete "
        "checkpoint is kept\n";
    [[maybe_unused]] const ssize_t written = write(STDERR_FILENO, message, sizeof(message) - 1);
    _exit(128 + signal);
  }
  stop_signal = signal;
}

void install_stop_handlers() {
  struct sigaction action = {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGUSR1, &action, nullptr);
}

struct Job {
  ModelSpec model;
  PrecisionPolicy precision;
  Recompute recompute = Recompute::NONE;
  bool fused_attention = false;
  OptimizerSpec optimizer;
  SdmoeSpec sdmoe;
  int micro_batch = 0, accumulation = 0;
  // The training and validation datasets with their blend weights (one each without a blend).
  std::vector<data::BlendSource> train, validation;
  std::string resume_from;  // checkpoint to start from; empty: a fresh start
};

// Everything that can be wrong with the input, checked on this rank without any
// collective. Throws sdmoe::Error.
Job check_job(const config::Run& run, int dp) {
  Job job;
  job.model = model_spec_from(run.model());
  job.model.validate();
  const config::Training& t = run.training();
  // AUTO is resolved once the backend exists (agree_on_setup).
  job.precision = PrecisionPolicy::of(t.precision() == config::Training::BF16 ? Precision::BF16 : Precision::FP32);
  job.recompute = t.recompute() == config::Training::FULL        ? Recompute::FULL
                  : t.recompute() == config::Training::SELECTIVE ? Recompute::SELECTIVE
                                                                 : Recompute::NONE;
  job.fused_attention = t.attention() == config::Training::FUSED;
  if (t.steps() < 0) fail("training.steps must be >= 0");
  if (t.micro_batch_size() <= 0) fail("training.micro_batch_size must be positive");
  if (t.global_batch_size() % (t.micro_batch_size() * dp) != 0)
    fail("training.global_batch_size ({}) must be a multiple of micro_batch_size ({}) x data-parallel ranks ({})",
         t.global_batch_size(), t.micro_batch_size(), dp);
  if (t.global_batch_size() <= 0) fail("training.global_batch_size must be positive");
  if (t.log_interval() <= 0) fail("training.log_interval must be positive");
  if (t.eval_interval() < 0) fail("training.eval_interval must be >= 0 (0 turns validation off)");
  if (!(run.parallel().timeout_s() > 0))
    fail("parallel.timeout_s must be a positive number of seconds, got {}", run.parallel().timeout_s());
  if (!(run.parallel().straggler_factor() > 1))
    fail("parallel.straggler_factor must be above 1, got {}", run.parallel().straggler_factor());
  if (!(run.parallel().gradient_bucket_mb() >= 0))
    fail("parallel.gradient_bucket_mb must be >= 0 (0: one bucket per region), got {}",
         run.parallel().gradient_bucket_mb());
  // The validation set is the first eval_batches x micro_batch_size held-out sequences,
  // shared out over the data-parallel ranks, so every layout evaluates the same ones.
  if (t.eval_interval() > 0 && (t.eval_batches() <= 0 || t.eval_batches() % dp != 0))
    fail("training.eval_batches ({}) must be a positive multiple of the data-parallel ranks ({})", t.eval_batches(),
         dp);
  job.micro_batch = t.micro_batch_size();
  job.accumulation = t.global_batch_size() / (t.micro_batch_size() * dp);
  job.optimizer = optimizer_spec_from(run.optimizer(), t.steps());
  job.sdmoe = sdmoe_spec_from(run.sdmoe());
  job.sdmoe.validate(job.model);

  // The datasets: data.path, or each entry of data.blend with its weight.
  const config::Data& d = run.data();
  if (!d.path().empty() && d.blend_size() > 0) fail("set data.path or data.blend, not both");
  if (d.path().empty() && d.blend_size() == 0) fail("data.path is not set");
  std::vector<std::tuple<std::string, std::string, double>> sources;  // path, validation path, weight
  if (d.blend_size() == 0) sources.emplace_back(d.path(), d.validation_path(), 1.0);
  for (const config::Data::BlendEntry& b : d.blend()) {
    if (b.path().empty()) fail("data.blend: an entry has no path");
    if (!(b.weight() > 0)) fail("data.blend: {} has weight {}, must be positive", b.path(), b.weight());
    sources.emplace_back(b.path(), b.validation_path(), b.weight());
  }
  std::optional<data::BpeTokenizer> tokenizer;
  if (!d.tokenizer_dir().empty()) tokenizer = data::BpeTokenizer::load(d.tokenizer_dir());
  const int64_t window = int64_t(job.model.seq_len) + 1;
  for (const auto& [path, validation_path, weight] : sources) {
    std::shared_ptr<const data::TokenDataset> train, validation;
    if (data::is_megatron_dataset(path)) {
      if (tokenizer)
        fail("data.tokenizer_dir cannot be checked against a Megatron dataset ({} records no tokenizer); leave it empty", path);
      if (validation_path.empty() && !(d.validation_fraction() > 0 && d.validation_fraction() < 1))
        fail("data.validation_fraction ({}) must be in (0, 1)", d.validation_fraction());
      using Part = data::MegatronSelection::Part;
      auto open = [&](const std::string& p, Part part) {
        return std::make_shared<data::TokenDataset>(
            data::TokenDataset::open_megatron(p, {part, d.validation_fraction(), d.eod_token()}));
      };
      train = open(path, validation_path.empty() ? Part::TRAIN : Part::ALL);
      validation = validation_path.empty() ? open(path, Part::VALIDATION) : open(validation_path, Part::ALL);
    } else {
      if (!validation_path.empty()) fail("{}: validation_path is for Megatron datasets; an HDF5 file has its own split", path);
      train = std::make_shared<data::TokenDataset>(data::TokenDataset::open(path, "train"));
      validation = std::make_shared<data::TokenDataset>(data::TokenDataset::open(path, "validation"));
      if (tokenizer && (tokenizer->fingerprint() != train->tokenizer_fingerprint() || tokenizer->vocab_size() != train->vocab_size()))
        fail("{}: dataset was tokenized with a different vocabulary than {} (fingerprint {:016x} vs {:016x})", path,
             d.tokenizer_dir(), train->tokenizer_fingerprint(), tokenizer->fingerprint());
    }
    for (const auto* ds : {train.get(), validation.get()}) {
      if (ds->vocab_size() > job.model.vocab_size)
        fail("{}: dataset vocabulary ({}) is larger than model.vocab_size ({})", path, ds->vocab_size(),
             job.model.vocab_size);
      if (ds->num_tokens() < window) fail("{}: fewer than seq_len + 1 = {} tokens in a split", path, window);
    }
    job.train.push_back({train, weight});
    job.validation.push_back({validation, weight});
  }
  const config::Checkpoint& ck = run.checkpoint();
  if (ck.interval() < 0) fail("checkpoint.interval must be >= 0");
  if (ck.keep() < 0) fail("checkpoint.keep must be >= 0");
  if (!(ck.slab_mb() > 0)) fail("checkpoint.slab_mb must be positive");
  if (ck.interval() > 0 && ck.dir().empty()) fail("checkpoint.interval is set but checkpoint.dir is not");
  job.resume_from = Checkpointer::resume_path(ck);
  return job;
}


// The distinct communicators of the parallel axes, each with the names of the axes it
// serves. Axes of one rank carry no traffic and are left out.
std::vector<std::pair<std::string, Communicator*>> traffic_groups(const ProcessGroups& g) {
  std::vector<std::pair<std::string, Communicator*>> out;
  const std::pair<const char*, Communicator*> axes[] = {
      {"tp", g.tp.get()}, {"dp", g.dp.get()}, {"etp", g.etp.get()}, {"ep", g.ep.get()}, {"edp", g.edp.get()}};
  for (const auto& [name, comm] : axes) {
    if (comm->size() == 1) continue;
    auto same = std::find_if(out.begin(), out.end(), [&](const auto& e) { return e.second == comm; });
    if (same != out.end()) same->first += std::string("=") + name;
    else out.emplace_back(name, comm);
  }
  return out;
}

std::string bytes_summary(const StepRecord& r) {
  std::string s;
  for (const auto& [name, bytes] : r.bytes_sent) s += fmt::format(" {} {:.2f} MB", name, double(bytes) / 1e6);
  return s.empty() ? std::string() : " | sent" + s;
}

// "1h02m03s" and the like.
std::string duration_text(double seconds) {
  const int64_t s = int64_t(std::max(0.0, seconds) + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02d}m{:02d}s", s / 3600, (s / 60) % 60, s % 60);
  if (s >= 60) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

// The step's wall time and its phases on rank 0, each with the communication left exposed
// in it (time the rank spent inside collectives and their waits, not hidden behind
// compute); the refresh only at steps that have one.
std::string time_summary(const StepRecord& r) {
  std::string s = fmt::format("{:.3f} s: fwd+bwd {:.3f} (comm {:.3f}) opt {:.3f} (comm {:.3f})", r.step_seconds,
                              r.forward_backward_seconds, r.forward_backward_comm_seconds, r.optimizer_seconds,
                              r.optimizer_comm_seconds);
  if (r.refresh_seconds >= 0.0005) s += fmt::format(" refresh {:.3f}", r.refresh_seconds);
  return s;
}

std::string load_summary(const StepRecord& r) {
  std::string s;
  for (size_t l = 0; l < r.min_load.size(); ++l) s += fmt::format(" {:.2f}-{:.2f}", r.min_load[l], r.max_load[l]);
  return s;
}

}  // namespace

std::unique_ptr<Backend> make_backend(const config::Run& run, const MpiRuntime& mpi) {
  const bool want_cuda = run.device() == config::CUDA || (run.device() == config::AUTO && cuda_device_count() > 0);
  if (want_cuda) {
    const int count = cuda_device_count();
    if (count == 0) fail("device: CUDA requested but no CUDA device is visible");
    return make_cuda_backend(mpi.local_rank() % count);
  }
  int threads = run.threads();
  // More threads than this cannot help a rank and exhaust the OpenMP runtime.
  if (threads < 0 || threads > 1024)
    fail("threads must be 0 (this node's cores / its ranks) or 1 to 1024, got {}", threads);
  if (threads == 0) {
    const int cores = cpu_cores_available();
    threads = std::max(1, cores / std::max(1, mpi.local_size()));
  }
  return make_cpu_backend(threads);
}

ParallelDims check_parallel(const config::Run& run, int world) {
  const config::Parallel& p = run.parallel();
  const ModelSpec spec = model_spec_from(run.model());
  spec.validate();  // the layout checks below read the model's shape
  const ParallelDims dims = ParallelDims::make(world, p.tp(), p.ep(), p.etp(), spec.moe_layer_count() > 0 ? spec.moe.num_experts : 0);
  if (dims.etp > 1 && spec.moe.expert_ffn_dim % dims.etp != 0)
    fail("parallel.etp ({}) must divide model.moe.expert_ffn_dim ({})", dims.etp, spec.moe.expert_ffn_dim);
  if (dims.tp > 1) {
    if (spec.heads % dims.tp != 0) fail("parallel.tp ({}) must divide model.heads ({})", dims.tp, spec.heads);
    if (spec.vocab_size % dims.tp != 0)
      fail("parallel.tp ({}) must divide model.vocab_size ({})", dims.tp, spec.vocab_size);
    if (spec.ffn_dim % dims.tp != 0) fail("parallel.tp ({}) must divide model.ffn_dim ({})", dims.tp, spec.ffn_dim);
    if (spec.moe.shared_expert_ffn_dim % dims.tp != 0)
      fail("parallel.tp ({}) must divide model.moe.shared_expert_ffn_dim ({})", dims.tp, spec.moe.shared_expert_ffn_dim);
    const int64_t tokens = int64_t(run.training().micro_batch_size()) * spec.seq_len;
    if (tokens % dims.tp != 0)
      fail("parallel.tp ({}) must divide the tokens of a micro-batch ({} x {})", dims.tp,
           run.training().micro_batch_size(), spec.seq_len);
    if (p.zero1()) fail("parallel.zero1 is not supported with tensor parallelism yet (parallel.tp = {})", dims.tp);
  }
  return dims;
}

// Whether this rank could run its collectives over NCCL, and why not.
std::string nccl_unavailable_reason(const Backend& be, const MpiRuntime& mpi) {
  if (!nccl_compiled()) return "this binary was built without NCCL";
  if (be.device() != Device::CUDA) return "the device is not CUDA";
  if (mpi.local_size() > cuda_device_count())
    return fmt::format("{} ranks share {} GPU(s) on this node and NCCL needs one GPU per rank", mpi.local_size(),
                       cuda_device_count());
  return "";
}

// What every run needs before its first collective, agreed on by all ranks.
struct Setup {
  Job job;
  ParallelDims dims;
  std::unique_ptr<Backend> backend;
  CommBackend comm_kind = CommBackend::MPI;
  std::unique_ptr<JsonlMetrics> jsonl;  // world rank 0, when metrics.jsonl is set
  std::unique_ptr<TensorboardWriter> tensorboard;  // world rank 0, when metrics.tensorboard_dir is set
};

bool agree_on_config(const MpiRuntime& mpi, const char* tool, const std::string& error, const config::Run& run) {
  const bool failed = mpi.any_rank(!error.empty());
  std::string reason = error;
  if (reason.empty() && failed)
    reason = "another rank could not load its arguments or config (its message says why)";
  if (reason.empty() && !mpi.same_on_every_rank(resolved_config_text(run)))
    reason = "the ranks loaded different configs; is the config file the same on every node, and the command line "
             "too?";
  if (reason.empty()) return true;
  std::fprintf(stderr, "%s: error: %s\n", tool, reason.c_str());
  return false;
}

// Input checks on every rank, then one agreement so that no rank is left waiting. False
// (after every rank printed one line as `tool: error: ...`, the failing ones their
// reason) when any rank failed.
bool agree_on_setup(const config::Run& run, const MpiRuntime& mpi, const char* tool, Setup& setup) {
  std::string error, no_nccl = "not checked";
  const auto comm_choice = run.parallel().comm_backend();
  try {
    setup.dims = check_parallel(run, mpi.world_size());
    setup.job = check_job(run, setup.dims.dp);
    setup.backend = make_backend(run, mpi);
    if (run.training().precision() == config::Training::AUTO) {
      // Every rank decides alike on a homogeneous cluster; the config hash agreed on above
      // does not cover this choice, so ranks on different CPU kinds could differ (the
      // layout tests show BF16 and FP32 ranks would still compute compatible gradients,
      // but a run should be one precision): the agreement below compares it.
      const bool fast_bf16 =
          setup.backend->device() == Device::CPU && cpu_bf16_gemm_path() != Bf16GemmPath::WIDEN;
      setup.job.precision = PrecisionPolicy::of(fast_bf16 ? Precision::BF16 : Precision::FP32);
    }
    if (setup.job.fused_attention && !setup.backend->has_fused_attention())
      fail("training.attention FUSED is not available on the {} backend yet; use UNFUSED there",
           setup.backend->name());
    // The bf16 GEMM path is chosen now, so that a bad SDMOE_CPU_BF16_GEMM stops every rank here.
    if (setup.job.precision.mode == Precision::BF16 && setup.backend->device() == Device::CPU) cpu_bf16_gemm_path();
    no_nccl = nccl_unavailable_reason(*setup.backend, mpi);
    if (comm_choice == config::Parallel::NCCL && !no_nccl.empty()) fail("parallel.comm_backend NCCL: {}", no_nccl);
    if (mpi.world_rank() == 0 && !run.checkpoint().dir().empty())
      Checkpointer::check_writable(run.checkpoint().dir());
    if (mpi.world_rank() == 0 && !run.metrics().jsonl().empty())
      setup.jsonl = std::make_unique<JsonlMetrics>(run.metrics().jsonl());
    if (mpi.world_rank() == 0 && !run.metrics().tensorboard_dir().empty())
      setup.tensorboard = std::make_unique<TensorboardWriter>(run.metrics().tensorboard_dir());
  } catch (const Error& e) {
    error = e.what();
  }
  // AUTO picks NCCL only if every rank can; every rank must resume from the same
  // checkpoint (a checkpoint.dir that is not on a shared file system would split them).
  const bool failed = mpi.any_rank(!error.empty());
  const bool some_without_nccl = mpi.any_rank(!no_nccl.empty());
  if (!failed && !mpi.same_on_every_rank(setup.job.resume_from))
    error = fmt::format("the ranks disagree on the checkpoint to resume from (this rank: '{}'); is checkpoint.dir on a "
                        "file system every node sees?", setup.job.resume_from);
  if (!failed && error.empty() &&
      !mpi.same_on_every_rank(std::string(precision_name(setup.job.precision.mode))))
    error = fmt::format("training.precision AUTO resolved differently on the ranks (this rank: {}); the nodes' CPUs "
                        "differ: set FP32 or BF16 explicitly",
                        precision_name(setup.job.precision.mode));
  if (failed || !error.empty()) {
    if (error.empty()) error = "another rank's setup failed (its message says why)";
    std::fprintf(stderr, "%s: error: %s\n", tool, error.c_str());
    return false;
  }
  setup.comm_kind =
      comm_choice == config::Parallel::MPI || some_without_nccl ? CommBackend::MPI : CommBackend::NCCL;
  return true;
}

// One line on what the precision policy does on this backend.
std::string precision_summary(const PrecisionPolicy& policy, Backend& be, bool automatic) {
  const std::string chosen = automatic ? ", chosen by AUTO" : "";
  if (policy.mode == Precision::FP32)
    return "FP32 (every tensor fp32" + chosen +
           (automatic ? (be.device() == Device::CPU
                             ? ": " + cpu_bf16_gemm_reason()
                             : std::string(": on CUDA AUTO stays FP32 until the BF16 path has been measured on a "
                                           "GPU; set BF16 to use it"))
                      : std::string()) +
           ")";
  std::string gemm = "bf16 GEMM operands, fp32 accumulation";
  if (be.device() == Device::CPU) gemm += ": " + cpu_bf16_gemm_reason();
  else gemm += " on the tensor cores (cuBLASLt)";
  return "BF16 (" + gemm + "; fp32 master weights, gradients, optimizer state, norms, softmax, router and losses" +
         chosen + ")";
}

// Mean cross-entropy of `batches` micro-batches from the start of `loader`, shared out over
// the data-parallel ranks (so every layout evaluates the same sequences).
double evaluate(GptModel& model, data::SequenceLoader& loader, int micro_batch, int batches, Communicator& dp) {
  loader.set_position(0);
  std::vector<int32_t> tokens;
  std::vector<double> sums{0.0, 0.0};
  for (int i = 0; i < batches / dp.size(); ++i) {
    loader.next(micro_batch, tokens);
    MicroBatchStats s = model.forward_only(tokens.data());
    sums[0] += s.loss_sum;
    sums[1] += double(s.tokens);
    Watchdog::note_progress();
  }
  dp.all_reduce_host(sums, ReduceOp::SUM);
  return sums[0] / sums[1];
}

namespace {
// The whole model's parameters (each logical tensor once, whatever the layout), those a
// token uses (every routed expert tensor scaled by top_k / experts), and this rank's share.
struct ParameterCounts {
  int64_t total = 0, this_rank = 0;
  double active_per_token = 0.0;
};
ParameterCounts count_parameters(const ParamRegistry& registry, const ModelSpec& spec) {
  ParameterCounts c;
  for (const ParamSpec& ps : registry.specs()) {
    int64_t whole = 1;
    for (int64_t d : ps.logical_shape) whole *= d;
    c.total += whole;
    c.this_rank += ps.numel;
    c.active_per_token += ps.role == ParamRole::EXPERT && spec.moe.num_experts > 0
                              ? double(whole) * spec.moe.top_k / spec.moe.num_experts
                              : double(whole);
  }
  return c;
}
}  // namespace

int run_pretrain(const config::Run& run, const MpiRuntime& mpi, const std::function<void(const StepRecord&)>& on_step) {
  const bool root = mpi.world_rank() == 0;
  Setup setup;
  if (!agree_on_setup(run, mpi, "sdmoe_pretrain", setup)) return 2;
  Job& job = setup.job;
  const ParallelDims& dims = setup.dims;
  std::unique_ptr<Backend>& backend = setup.backend;
  const CommBackend comm_kind = setup.comm_kind;

  Backend& be = *backend;
  ProcessGroups groups = make_process_groups(dims, be, comm_kind);
  // Declared after the groups, so that it stops before they are destroyed.
  Watchdog watchdog(run.parallel().timeout_s(), mpi.world_rank(), host_name(), "sdmoe_pretrain");
  watch_groups(groups, watchdog);
  const std::vector<std::string> hosts = all_host_names();
  StragglerWatch stragglers(run.parallel().straggler_factor(), dims.world);
  GptModel model(job.model, be, job.precision, job.micro_batch,
                 placement_for(groups, run.parallel().zero1(), run.parallel().sequence_parallel()),
                 ModelExecution{job.recompute, job.fused_attention});
  model.init_parameters(run.training().seed());
  // ZeRO-1: this rank updates (and keeps moments for) its shard of each region only.
  const bool zero1 = run.parallel().zero1();
  // With SD-MoE, ZeRO-1 shards the dense optimizer state only: the expert matrices' split
  // needs whole matrices, so every expert replica keeps and updates its experts' state.
  GradientSyncOptions sync_options{zero1, !job.sdmoe.enabled, run.parallel().sequence_parallel(),
                                   int64_t(run.parallel().gradient_bucket_mb() * 1e6 / double(dtype_size(model.dtype()))),
                                   model.gradient_ready_ranges(), model.operand_weights()};
  GradientSync sync(model.params(), model.grads(), model.registry().tp_sharded_begin(), model.registry().expert_begin(),
                    groups, be, std::move(sync_options));
  model.set_backward_hook([&sync](int stage) { sync.backward_stage_done(stage); });
  std::unique_ptr<SpectralDecomposition> decomposition;
  std::unique_ptr<Backend> spectral_backend;
  std::unique_ptr<SpectralService> spectral;
  if (job.sdmoe.enabled) {
    // With experts split over etp the decomposition sums its thin products over the etp
    // group, and the service gathers whole experts over it at each refresh.
    const std::shared_ptr<Communicator> etp_group = dims.etp > 1 ? groups.etp : nullptr;
    decomposition = std::make_unique<SpectralDecomposition>(be, model.dtype(), model.registry(), job.sdmoe, etp_group);
    std::vector<int> routers(job.model.layers, -1);
    for (size_t id = 0; id < model.registry().specs().size(); ++id) {
      const ParamSpec& ps = model.registry().spec(int(id));
      int layer = -1;
      if (ps.role == ParamRole::ROUTER && std::sscanf(ps.name.c_str(), "layers.%d.", &layer) == 1) routers[layer] = int(id);
    }
    // Asynchronous refreshes on a GPU run their solvers on a second backend (own stream and
    // handles) on the same device; the CPU backend keeps no state and is shared.
    if (job.sdmoe.async && be.device() == Device::CUDA) spectral_backend = make_cuda_backend(be.device_ordinal());
    spectral = std::make_unique<SpectralService>(*decomposition, model.registry(), model.params(), model.grads(),
                                                 routers, groups.edp, groups.ep, spectral_backend.get(), etp_group);
  }
  AdamW optimizer(model, job.optimizer, sync.owned(), decomposition.get());
  data::SequenceLoader train_loader(job.train, job.model.seq_len, run.data().seed(), groups.dp->rank(), dims.dp);
  data::SequenceLoader val_loader(job.validation, job.model.seq_len, run.data().seed() + 1, groups.dp->rank(), dims.dp);

  // Utilisation is measured against the peak of the run's own precision.
  const bool bf16 = job.precision.mode == Precision::BF16;
  const double peak = (bf16 ? be.peak_bf16_flops() : be.peak_flops()) * dims.world;
  const int64_t tokens_per_step = int64_t(run.training().global_batch_size()) * job.model.seq_len;
  const double micro_batches = double(job.accumulation) * dims.dp;
  if (root) {
    std::printf("sdmoe_pretrain: %d rank(s), %s%s, collectives over %s, backend %s\n", dims.world,
                dims.describe().c_str(), run.parallel().sequence_parallel() && dims.tp > 1 ? " (sequence parallel)" : "",
                comm_kind == CommBackend::NCCL ? "NCCL" : "MPI", be.name().c_str());
    const ParameterCounts counts = count_parameters(model.registry(), job.model);
    std::printf("model: %s, %.2fM parameters in all, %.2fM active per token; this rank holds %.2fM; %.1f MFLOP "
                "per token\n",
                job.model.summary().c_str(), double(counts.total) / 1e6, counts.active_per_token / 1e6,
                double(counts.this_rank) / 1e6, job.model.train_flops_per_token() / 1e6);
    int64_t train_tokens = 0, validation_tokens = 0;
    for (const data::BlendSource& b : job.train) train_tokens += b.dataset->num_tokens();
    for (const data::BlendSource& b : job.validation) validation_tokens += b.dataset->num_tokens();
    std::printf("data: %s (%ld train / %ld validation tokens), %d micro-batch(es) of %d per rank per step\n",
                run.data().blend_size() > 0 ? fmt::format("blend of {} datasets", run.data().blend_size()).c_str()
                                            : run.data().path().c_str(),
                (long)train_tokens, (long)validation_tokens, job.accumulation, job.micro_batch);
    std::printf("optimizer state: %.1f MB per rank%s\n", 2.0 * double(optimizer.moment_elements()) * 4 / 1e6,
                zero1 ? (job.sdmoe.enabled ? " (ZeRO-1: dense state sharded over the data-parallel ranks; experts whole for SD-MoE)"
                               : " (ZeRO-1: sharded over the data-parallel ranks)")
                      : "");
    std::printf("precision: %s\n",
                precision_summary(job.precision, be, run.training().precision() == config::Training::AUTO).c_str());
    std::printf("activations: %.1f MB per rank, recompute %s (kept for the backward, its scratch and the output "
                "head's chunk)\n",
                double(model.activation_bytes()) / 1e6,
                config::Training::Recompute_Name(run.training().recompute()).c_str());
    std::printf("peak %s %.1f GFLOP/s (measured, all ranks)\nresolved config:\n%s",
                bf16 && be.device() == Device::CPU && cpu_bf16_gemm_path() != Bf16GemmPath::WIDEN
                    ? fmt::format("bf16 ({})", bf16_gemm_path_name(cpu_bf16_gemm_path())).c_str()
                    : "fp32",
                peak / 1e9, resolved_config_text(run).c_str());
    std::fflush(stdout);
  }
  auto print_spectral = [&](int64_t step, const RefreshReport& rep) {
    if (!root) return;
    std::printf("sdmoe refresh installed after step %ld (bases of step %ld, staleness %ld) | %.3f s compute, %.3f s "
                "communication%s, %ld jobs on rank 0\n",
                (long)step, (long)rep.step, (long)rep.staleness, rep.compute_seconds, rep.comm_seconds,
                rep.staleness > 0 ? fmt::format(", {:.3f} s blocking", rep.blocking_seconds).c_str() : "",
                (long)rep.jobs_computed);
    // A metric that does not apply (no gradients yet, no router alignment for down) is "-".
    auto value = [](bool applies, double v) { return applies ? fmt::format("{:.3f}", v) : std::string("-"); };
    for (const SpectralMetrics& m : rep.metrics)
      std::printf("  layer %d %-4s overlap U %.3f V %.3f | tail U %.3f V %.3f | grad U %s V %s | router %s\n", m.layer,
                  sdmoe_matrix_name(m.matrix), m.overlap_left, m.overlap_right, m.tail_overlap_left,
                  m.tail_overlap_right, value(m.has_gradients, m.grad_overlap_left).c_str(),
                  value(m.has_gradients, m.grad_overlap_right).c_str(),
                  value(m.has_router, m.router_alignment).c_str());
    std::fflush(stdout);
  };
  // With ZeRO-1 each replica keeps a distinct shard of the moments; SD-MoE keeps expert
  // state whole (see sync_options).
  Checkpointer checkpointer(run, model, &optimizer, decomposition.get(), groups,
                            MomentSharding{zero1 && dims.dp > 1, zero1 && !job.sdmoe.enabled && dims.edp > 1});
  int64_t first_step = 0;
  if (!job.resume_from.empty()) {
    const auto start = std::chrono::steady_clock::now();
    TrainingPosition position;
    try {
      position = checkpointer.load(job.resume_from);
    } catch (const Error& e) {
      std::fprintf(stderr, "sdmoe_pretrain: error: %s\n", e.what());
      return 2;
    }
    first_step = position.step;
    train_loader.set_position(position.data_position);
    if (spectral) spectral->bases_restored();
    if (root) {
      std::printf("resumed from %s: step %ld, %lu training samples consumed (%.2f s)\n", job.resume_from.c_str(),
                  (long)first_step, (unsigned long)position.data_position,
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      std::fflush(stdout);
    }
    // The uninterrupted run started this boundary's asynchronous refresh after saving.
    if (spectral && job.sdmoe.async && spectral->due(first_step)) spectral->start_async(first_step, false);
  }
  install_stop_handlers();
  if (spectral && job.resume_from.empty()) {
    // Initialisation splits each W with its own top-k bases (moments are still zero).
    const RefreshReport first = spectral->refresh(0, optimizer.first_moments());
    if (root)
      std::printf("sdmoe: %zu decomposed expert matrix stacks (MoE layers x matrix types), rank %d, refresh every %d steps, %.2f MB of bases and unique moments per rank\n",
                  decomposition->targets().size(), job.sdmoe.rank, job.sdmoe.refresh_interval,
                  double(decomposition->added_elements()) * 4 / 1e6);
    print_spectral(0, first);
  }

  auto validate = [&]() {
    return evaluate(model, val_loader, job.micro_batch, run.training().eval_batches(), *groups.dp);
  };

  if (run.training().eval_interval() > 0) {
    const double initial = validate();
    if (root) std::printf("step %ld/%d | val_loss %.6f\n", (long)first_step, run.training().steps(), initial);
  }
  std::vector<int32_t> tokens;
  const int moe_layers = job.model.moe_layer_count();
  const auto traffic = traffic_groups(groups);
  const config::Checkpoint& ck = run.checkpoint();
  const auto loop_start = std::chrono::steady_clock::now();
  for (int64_t step = first_step; step < run.training().steps(); ++step) {
    const auto start = std::chrono::steady_clock::now();
    const double collective_seconds_before = watchdog.collective_seconds();
    watchdog.set_step(step + 1);
    watchdog.set_phase("forward/backward");
    for (const auto& [name, comm] : traffic) comm->reset_bytes_sent();
    model.zero_grads();
    // [loss_sum, tokens, aux, z, then min/max load per MoE layer, then each expert's load
    // per MoE layer, summed over micro-batches]
    const int experts = job.model.moe.num_experts;
    std::vector<double> sums(4 + 2 * moe_layers + experts * moe_layers, 0.0);
    for (int micro = 0; micro < job.accumulation; ++micro) {
      train_loader.next(job.micro_batch, tokens);
      if (micro == job.accumulation - 1) sync.expect_backward();  // reduce buckets as they finish
      MicroBatchStats s = model.forward_backward(tokens.data(), 1.0 / micro_batches);
      sums[0] += s.loss_sum;
      sums[1] += double(s.tokens);
      sums[2] += s.aux_loss;
      sums[3] += s.z_loss;
      for (int l = 0; l < moe_layers; ++l) {
        sums[4 + 2 * l] += s.moe[l].min_load;
        sums[5 + 2 * l] += s.moe[l].max_load;
        for (int x = 0; x < experts && x < int(s.moe[l].load.size()); ++x)
          sums[4 + 2 * moe_layers + l * experts + x] += s.moe[l].load[x];
      }
    }
    // The phases are timed between device synchronizations, so that on a GPU they measure
    // the work and not its launch; the gradient reductions overlapped with the backward
    // count in its phase, the rest of them in the optimizer's.
    be.synchronize();
    const auto backward_done = std::chrono::steady_clock::now();
    const double collective_seconds_backward = watchdog.collective_seconds();
    watchdog.set_phase("optimizer step");
    groups.dp->all_reduce_host(sums, ReduceOp::SUM);
    const OptimizerStepResult opt = optimizer.step(step, sync.reduce());
    // The working copy of what this rank updated, then (ZeRO-1) the gather of the rest:
    // in BF16 of the working copy, the fp32 master's other blocks following at a save.
    model.weights_changed(sync.owned());
    sync.after_update();
    be.synchronize();
    const auto update_done = std::chrono::steady_clock::now();
    const double collective_seconds_update = watchdog.collective_seconds();
    watchdog.set_phase("SD-MoE refresh");
    RefreshReport refresh;
    bool refreshed = false;
    if (spectral) {
      // The refresh's router alignment reads the routers' fp32 master, which BF16 with
      // ZeRO-1 brings up to date on every rank only with the master gather (a no-op
      // otherwise).
      if (spectral->async_pending() || (spectral->due(step + 1) && !job.sdmoe.async)) sync.gather_master();
      // Async: bases started at the previous boundary are installed at this one (every rank
      // at the same step), then the next refresh may start.
      if (spectral->async_pending()) {
        refresh = spectral->finish_async(step + 1, optimizer.first_moments());
        refreshed = true;
      }
      if (spectral->due(step + 1) && !job.sdmoe.async) {
        refresh = spectral->refresh(step + 1, optimizer.first_moments());
        refreshed = true;
      }
    }
    be.synchronize();
    const auto step_done = std::chrono::steady_clock::now();
    const double seconds = std::chrono::duration<double>(step_done - start).count();
    watchdog.set_phase("metrics and evaluation");
    const StragglerWatch::Spread spread =
        stragglers.record(seconds - (watchdog.collective_seconds() - collective_seconds_before), *groups.world);

    StepRecord r;
    r.step = step + 1;
    r.loss = sums[0] / sums[1];
    r.lr = opt.lr;
    r.grad_norm = opt.grad_norm;
    r.aux_loss = sums[2] / micro_batches;
    r.z_loss = sums[3] / micro_batches;
    for (int l = 0; l < moe_layers; ++l) {
      r.min_load.push_back(sums[4 + 2 * l] / micro_batches);
      r.max_load.push_back(sums[5 + 2 * l] / micro_batches);
      r.expert_load.emplace_back(experts);
      for (int x = 0; x < experts; ++x) r.expert_load[l][x] = sums[4 + 2 * moe_layers + l * experts + x] / micro_batches;
    }
    for (const auto& [name, comm] : traffic) r.bytes_sent.emplace_back(name, comm->bytes_sent());
    if (refreshed) {
      r.spectral = refresh.metrics;
      r.spectral_compute_seconds = refresh.compute_seconds;
      r.spectral_comm_seconds = refresh.comm_seconds;
    }
    r.buffer_bytes = buffer_bytes_in_use(be.device());
    r.buffer_peak_bytes = buffer_bytes_peak(be.device());
    r.activation_bytes = int64_t(model.activation_bytes());
    r.step_seconds = seconds;
    r.forward_backward_seconds = std::chrono::duration<double>(backward_done - start).count();
    r.optimizer_seconds = std::chrono::duration<double>(update_done - backward_done).count();
    r.refresh_seconds = std::chrono::duration<double>(step_done - update_done).count();
    r.forward_backward_comm_seconds = collective_seconds_backward - collective_seconds_before;
    r.optimizer_comm_seconds = collective_seconds_update - collective_seconds_backward;
    r.tokens_per_second = double(tokens_per_step) / seconds;
    r.model_flops = r.tokens_per_second * job.model.train_flops_per_token();
    r.peak_fraction = peak > 0 ? r.model_flops / peak : 0.0;
    r.compute_seconds_min = spread.min;
    r.compute_seconds_median = spread.median;
    r.compute_seconds_max = spread.max;
    r.slowest_rank = spread.slowest;
    const int eval_interval = run.training().eval_interval();
    // eval_interval 0 turns validation off entirely (its batch count is then unchecked).
    if (eval_interval > 0 && (r.step % eval_interval == 0 || r.step == run.training().steps())) r.val_loss = validate();
    if (!std::isfinite(r.loss)) {
      // Every rank sees the same all-reduced loss, so every rank stops here together.
      std::fprintf(stderr, "sdmoe_pretrain: error: loss became %f at step %ld\n", r.loss, (long)r.step);
      return 3;
    }
    if (!std::isfinite(r.grad_norm)) {
      // The global norm, the same on every rank; the update it scaled is not finite either.
      std::fprintf(stderr, "sdmoe_pretrain: error: gradient norm became %f at step %ld\n", r.grad_norm, (long)r.step);
      return 3;
    }
    if (root && (r.step % run.training().log_interval() == 0 || r.val_loss >= 0)) {
      std::printf("step %ld/%d | loss %.6f | lr %.3e | gnorm %.4f | %.0f tok/s | %.2f GFLOP/s (%.1f%% of peak) | %s | aux %.5f z %.5f | load%s",
                  (long)r.step, run.training().steps(), r.loss, r.lr, r.grad_norm, r.tokens_per_second,
                  r.model_flops / 1e9, 100.0 * r.peak_fraction, time_summary(r).c_str(), r.aux_loss, r.z_loss,
                  load_summary(r).c_str());
      if (r.val_loss >= 0) std::printf(" | val_loss %.6f", r.val_loss);
      std::printf("%s", bytes_summary(r).c_str());
      if (dims.world > 1)
        std::printf(" | compute %.3f-%.3f s (slowest rank %d)", r.compute_seconds_min, r.compute_seconds_max,
                    r.slowest_rank);
      // Remaining steps at the mean pace since this process started training.
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - loop_start).count();
      std::printf(" | ETA %s", duration_text(elapsed / double(r.step - first_step) *
                                             double(run.training().steps() - r.step)).c_str());
      std::printf("\n");
      std::fflush(stdout);
    }
    if (refreshed) print_spectral(r.step, refresh);
    if (root && spread.straggler >= 0)
      std::fprintf(stderr,
                   "sdmoe_pretrain: warning: rank %d (%s) is a straggler: its compute time exceeded %.2gx the median "
                   "of the ranks for %d consecutive steps (%.3f s against %.3f s at step %ld)\n",
                   spread.straggler, hosts[size_t(spread.straggler)].c_str(), run.parallel().straggler_factor(),
                   StragglerWatch::kConsecutiveSteps, spread.straggler_seconds, spread.median, (long)r.step);
    // A metrics file that cannot be written (disk full, a network file system hiccup) is
    // dropped with a warning: it must not end a long run before its next checkpoint.
    try {
      if (setup.jsonl)
        setup.jsonl->append(r, std::chrono::duration<double>(std::chrono::steady_clock::now() - loop_start).count());
    } catch (const Error& e) {
      std::fprintf(stderr, "sdmoe_pretrain: warning: %s; no more JSONL records\n", e.what());
      setup.jsonl.reset();
    }
    try {
      if (setup.tensorboard) setup.tensorboard->append(r);
    } catch (const Error& e) {
      std::fprintf(stderr, "sdmoe_pretrain: warning: %s; no more TensorBoard records\n", e.what());
      setup.tensorboard.reset();
    }
    if (on_step) on_step(r);

    // Every rank learns of a signal at the same step boundary.
    std::vector<double> stop_any{double(stop_signal)};
    groups.world->all_reduce_host(stop_any, ReduceOp::MAX);
    const int stop = int(stop_any[0]);
    const bool last = r.step == run.training().steps();
    if (!ck.dir().empty() && (stop != 0 || last || (ck.interval() > 0 && r.step % ck.interval() == 0))) {
      sync.gather_master();
      // A checkpoint of parameters that are no longer finite would become `latest` and
      // rotate the good ones out, and every resume would fail: stop without writing it.
      if (mpi.any_rank(!std::isfinite(be.sum_squares(model.params())))) {
        std::fprintf(stderr, "sdmoe_pretrain: error: the parameters are not finite after step %ld; checkpoint not "
                     "written, the previous ones are kept\n", (long)r.step);
        return 3;
      }
      const auto save_start = std::chrono::steady_clock::now();
      watchdog.set_phase("checkpoint save");
      try {
        checkpointer.save({r.step, train_loader.position()});
      } catch (const Error& e) {
        // Every rank holds the same agreed message (a full disk, say): one line each, and
        // the run ends here with the previous checkpoint as `latest`.
        std::fprintf(stderr, "sdmoe_pretrain: error: %s\n", e.what());
        return 3;
      }
      if (root) {
        std::printf("checkpoint %s written (%.2f s)\n", Checkpointer::step_directory(ck.dir(), r.step).c_str(),
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - save_start).count());
        std::fflush(stdout);
      }
    }
    if (stop != 0) {
      if (root) {
        std::printf("stopping after step %ld on signal %d%s\n", (long)r.step, stop,
                    ck.dir().empty() ? " (no checkpoint.dir: nothing saved)" : "");
        std::fflush(stdout);
      }
      return ck.dir().empty() ? 1 : 0;
    }
    // Started after the checkpoint, so that a resumed run starts it at the same boundary.
    if (spectral && job.sdmoe.async && spectral->due(step + 1)) spectral->start_async(step + 1);
  }
  return 0;
}

int run_eval(const config::Run& run, const MpiRuntime& mpi, const std::string& split, const std::string& dump_tokens) {
  Setup setup;
  if (!agree_on_setup(run, mpi, "sdmoe_eval", setup)) return 2;
  const Job& job = setup.job;
  if (job.resume_from.empty() || (split != "train" && split != "validation")) {
    // The same on every rank (config and argument only): no rank waits.
    std::fprintf(stderr, "sdmoe_eval: error: %s\n",
                 job.resume_from.empty() ? "no checkpoint: give --checkpoint PATH (or a checkpoint.dir with a latest)"
                                         : "--split must be train or validation");
    return 2;
  }
  const int batches = run.training().eval_batches();
  if (batches <= 0 || batches % setup.dims.dp != 0) {
    std::fprintf(stderr, "sdmoe_eval: error: training.eval_batches (%d) must be a positive multiple of the data-parallel ranks (%d)\n",
                 batches, setup.dims.dp);
    return 2;
  }
  Backend& be = *setup.backend;
  ProcessGroups groups = make_process_groups(setup.dims, be, setup.comm_kind);
  GptModel model(job.model, be, job.precision, job.micro_batch,
                 placement_for(groups, run.parallel().zero1(), run.parallel().sequence_parallel()),
                 ModelExecution{Recompute::NONE, job.fused_attention});
  Checkpointer checkpointer(run, model, nullptr, nullptr, groups, MomentSharding{});
  TrainingPosition position;
  try {
    position = checkpointer.load(job.resume_from, /*parameters_only=*/true);
  } catch (const Error& e) {
    std::fprintf(stderr, "sdmoe_eval: error: %s\n", e.what());
    return 2;
  }
  // The sequences training validates on (validation: seed + 1) or starts from (train).
  const bool validation = split == "validation";
  data::SequenceLoader loader(validation ? job.validation : job.train, job.model.seq_len,
                              run.data().seed() + (validation ? 1 : 0), groups.dp->rank(), setup.dims.dp);
  const auto start = std::chrono::steady_clock::now();
  const double loss = evaluate(model, loader, job.micro_batch, batches, *groups.dp);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (mpi.world_rank() == 0) {
    std::printf("sdmoe_eval: %s (step %ld), %s split, %d sequences of %d tokens, %s: loss %.6f, perplexity %.3f (%.2f s)\n",
                job.resume_from.c_str(), (long)position.step, split.c_str(), batches * job.micro_batch,
                job.model.seq_len, setup.dims.describe().c_str(), loss, std::exp(loss), seconds);
    std::fflush(stdout);
  }
  if (!dump_tokens.empty()) {
    // The evaluated windows, for a reader that checks the loss with a model of its own:
    // [sequences, seq_len + 1] int32, in evaluation order (one data-parallel rank: all).
    if (setup.dims.dp != 1) {
      std::fprintf(stderr, "sdmoe_eval: error: --dump-tokens needs one data-parallel rank (this layout has %d)\n",
                   setup.dims.dp);
      return 2;
    }
    if (mpi.world_rank() == 0) {
      loader.set_position(0);
      std::vector<int32_t> tokens, all;
      for (int i = 0; i < batches; ++i) {
        loader.next(job.micro_batch, tokens);
        all.insert(all.end(), tokens.begin(), tokens.end());
      }
      std::FILE* f = std::fopen(dump_tokens.c_str(), "wb");
      if (!f || std::fwrite(all.data(), sizeof(int32_t), all.size(), f) != all.size() || std::fclose(f) != 0) {
        std::fprintf(stderr, "sdmoe_eval: error: cannot write %s\n", dump_tokens.c_str());
        return 2;
      }
    }
  }
  return 0;
}

}  // namespace sdmoe
