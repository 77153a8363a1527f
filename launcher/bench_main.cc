// sdmoe_bench --config FILE.textproto [--device CPU|CUDA|AUTO] [--steps N] [--set KEY=VALUE]:
// prints the measured fp32 FMA peak of the device the config (or --device) selects and its
// measured bf16 peak (CPU: the AMX or vdpbf16ps GEMM path; CUDA: a large cuBLASLt bf16
// GEMM on the tensor cores); GEMM throughput on the model's shapes
// with fp32 and with bf16 operands; and the throughput of full training steps in FP32
// and BF16, each as a percentage of the peak of its own precision. Figures only; nothing
// is asserted.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/gemm_bf16_avx512.h"
#include "core/rng.h"
#include "launcher/config.h"
#include "launcher/trainer.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "parallel/communicator.h"

extern "C" char* openblas_get_config(void);

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

constexpr int kGemmRounds = 3, kTrialsPerRound = 2;

// Best of several short trials: these machines are shared, and a neighbour's burst in one
// trial should not decide the figure. The same rule times the peak.
// operand: F32, or BF16 (operands bf16, C fp32, as the BF16 training step runs them).
double time_gemm(sdmoe::Backend& be, sdmoe::DType operand, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                 int64_t count, int trials) {
  const size_t width = sdmoe::dtype_size(operand);
  sdmoe::Buffer a(be, count * m * k * width), b(be, count * k * n * width), c(be, count * m * n * 4);
  sdmoe::Buffer wide(be, std::max(count * m * k, count * k * n) * 4);
  sdmoe::Tensor ta_(a.data(), operand, be.device(), {count * m, k}), tb_(b.data(), operand, be.device(), {count * k, n}),
      tc(c.data(), sdmoe::DType::F32, be.device(), {count * m, n});
  // Random values drawn in fp32 and rounded to the operand type.
  for (auto [x, stream] : {std::pair{ta_, 1}, std::pair{tb_, 2}}) {
    const sdmoe::Tensor w(wide.data(), sdmoe::DType::F32, be.device(), {x.numel()});
    be.init_normal(w, 1, stream, 1.0, 0);
    be.cast(w, x);
  }
  const sdmoe::GemmBatch batch{count, m * k, k * n, m * n};
  be.gemm(ta, tb, m, n, k, 1.0, ta_, tb_, 0.0, tc, batch);  // warm-up
  be.synchronize();
  double best = 0.0;
  for (int trial = 0; trial < trials; ++trial) {
    int reps = 0;
    auto start = Clock::now();
    while (seconds_since(start) < 0.1 || reps < 3) {
      be.gemm(ta, tb, m, n, k, 1.0, ta_, tb_, 0.0, tc, batch);
      ++reps;
      if (reps % 4 == 0) be.synchronize();
    }
    be.synchronize();
    best = std::max(best, 2.0 * m * n * k * count * reps / seconds_since(start));
  }
  return best;
}
// The fused attention kernel's forward plus backward at head dimension 64 and sequence
// 1024 (8 heads on a CPU, 96 on a GPU: the GPU config's 8 sequences x 12 heads), with fp32
// and with bf16 operands, in causal FLOP/s (forward 2 N S^2 Dh, backward 2.5x that), each
// against the peak of its precision.
void fused_attention_kernel_figure(sdmoe::Backend& be, sdmoe::DType operand, double peak) {
  const int64_t n = be.device() == sdmoe::Device::CUDA ? 96 : 8, s = 1024, dh = 64;
  auto take = [&](sdmoe::Buffer& b, std::initializer_list<int64_t> dims, sdmoe::DType dtype) {
    sdmoe::Tensor t(nullptr, dtype, be.device(), dims);
    b = sdmoe::Buffer(be, t.bytes());
    t.data = b.data();
    return t;
  };
  using sdmoe::DType;
  sdmoe::Buffer bq, bk, bv, bo, bl, bdo, bdq, bdk, bdv, bwide;
  const sdmoe::Tensor q = take(bq, {n, s, dh}, operand), k = take(bk, {n, s, dh}, operand),
                      v = take(bv, {n, s, dh}, operand), o = take(bo, {n, s, dh}, operand),
                      lse = take(bl, {n, s}, DType::F32), dout = take(bdo, {n, s, dh}, operand),
                      dq = take(bdq, {n, s, dh}, DType::F32), dk = take(bdk, {n, s, dh}, DType::F32),
                      dv = take(bdv, {n, s, dh}, DType::F32), wide = take(bwide, {n, s, dh}, DType::F32);
  int stream = 0;
  for (const sdmoe::Tensor* t : {&q, &k, &v, &dout}) {  // drawn in fp32, rounded to the operand type
    be.init_normal(wide, 3, ++stream, 1.0, 0);
    be.cast(wide, *t);
  }
  const double scale = 1.0 / std::sqrt(double(dh));
  double best = 1e30;
  for (int trial = 0; trial < 5; ++trial) {
    const auto start = Clock::now();
    be.attention_forward(q, k, v, scale, o, lse);
    be.attention_backward(q, k, v, o, dout, lse, scale, dq, dk, dv);
    be.synchronize();
    best = std::min(best, seconds_since(start));
  }
  const double flops = 3.5 * 2.0 * double(n) * double(s) * double(s) * double(dh);
  const char* precision = operand == DType::BF16 ? "bf16" : "fp32";
  std::printf("fused attention, %s operands, %ld heads x sequence %ld x head dim %ld: forward+backward %.2f ms, %.1f "
              "GFLOP/s (causal FLOPs), %.1f%% of the measured %s peak\n",
              precision, (long)n, (long)s, (long)dh, best * 1e3, flops / best / 1e9, 100.0 * flops / best / peak,
              precision);
}

// The activation bytes of the model with one sequence per micro-batch at sequence lengths
// 128, 1024 and 4096, fused attention against unfused.
void fused_attention_memory_figures(sdmoe::Backend& be, const sdmoe::ModelSpec& spec) {
  std::printf("activations of the model with 1 sequence per micro-batch (FP32):\n");
  for (int64_t seq : {128, 1024, 4096}) {
    sdmoe::ModelSpec at = spec;
    at.seq_len = seq;
    const auto bytes = [&](bool fused) {
      return double(sdmoe::GptModel(at, be, sdmoe::PrecisionPolicy::of(sdmoe::Precision::FP32), 1, {},
                                    sdmoe::ModelExecution{sdmoe::Recompute::NONE, fused})
                        .activation_bytes());
    };
    std::printf("  sequence %5ld: unfused %8.1f MB, fused %8.1f MB\n", (long)seq, bytes(false) / 1e6, bytes(true) / 1e6);
  }
}
}  // namespace

int main(int argc, char** argv) {
  std::string path = "configs/small-cpu.textproto";
  int steps = 9;
  std::string device;
  std::vector<std::string> overrides;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("usage: sdmoe_bench [--config FILE.textproto] [--device CPU|CUDA|AUTO] [--steps N] [--set KEY=VALUE]\n"
                  "Prints the measured fp32 FMA peak and the measured bf16 GEMM peak (CPU: AMX or\n"
                  "vdpbf16ps; CUDA: the tensor cores through cuBLASLt), GEMM\n"
                  "throughput on the model's shapes with fp32 and bf16 operands (best of 6 trials in 3\n"
                  "rounds over all shapes), and the median of N training steps in FP32 and BF16 (steps\n"
                  "of the two alternate), each as a percentage of the peak of its own precision.\n"
                  "--set overrides a config field as sdmoe_pretrain's does (e.g. model.moe.num_experts=0).\n");
      return 0;
    }
    if (i + 1 >= argc || (arg != "--config" && arg != "--steps" && arg != "--device" && arg != "--set")) {
      std::fprintf(stderr, "sdmoe_bench: error: unknown or incomplete argument '%s' (see --help)\n", arg.c_str());
      return 2;
    }
    const std::string value = argv[++i];
    if (arg == "--config") path = value;
    else if (arg == "--device") device = value;
    else if (arg == "--set") overrides.push_back(value);
    else if (arg == "--steps") {
      char* end = nullptr;
      steps = int(std::strtol(value.c_str(), &end, 10));
      if (*end != '\0' || steps < 1) {
        std::fprintf(stderr, "sdmoe_bench: error: --steps needs a positive integer, got '%s'\n", value.c_str());
        return 2;
      }
    }
  }
  sdmoe::MpiRuntime mpi(&argc, &argv);
  try {
    if (!device.empty()) overrides.push_back("device=" + device);
    sdmoe::config::Run run = sdmoe::load_config(path, overrides);
    sdmoe::ModelSpec spec = sdmoe::model_spec_from(run.model());
    // The config is checked before the minutes of measurement, not after.
    spec.validate();
    if (run.training().micro_batch_size() <= 0) sdmoe::fail("training.micro_batch_size must be positive");
    const sdmoe::OptimizerSpec optimizer_spec = sdmoe::optimizer_spec_from(run.optimizer(), 100);
    auto be = sdmoe::make_backend(run, mpi);
    double peak = be->peak_flops();
    std::printf("backend: %s\n", be->name().c_str());
    if (be->device() == sdmoe::Device::CPU) std::printf("OpenBLAS: %s\n", openblas_get_config());

    const int64_t t = int64_t(run.training().micro_batch_size()) * spec.seq_len, d = spec.dim, v = spec.vocab_size;
    const int64_t fe = spec.moe.expert_ffn_dim, rows = t * spec.moe.top_k / std::max(1, spec.moe.num_experts);
    const int64_t s_len = spec.seq_len, dh = d / spec.heads;
    const int64_t bh = int64_t(run.training().micro_batch_size()) * spec.heads;
    const int64_t chunk = sdmoe::GptModel::output_head_chunk(spec, t);
    struct Shape { const char* name; bool ta, tb; int64_t m, n, k, count; };
    const Shape shapes[] = {
        {"qkv projection      x W^T", false, true, t, 3 * d, d, 1},
        {"attention scores  q k^T  ", false, true, s_len, s_len, dh, bh},
        {"attention context   P v  ", false, false, s_len, dh, s_len, bh},
        {"attention output    x W^T", false, true, t, d, d, 1},
        {"qkv input grad     dY W  ", false, false, t, d, 3 * d, 1},
        {"qkv weight grad  dY^T x  ", true, false, 3 * d, d, t, 1},
        {"dense MLP gate_up   x W^T", false, true, t, 2 * spec.ffn_dim, d, 1},
        {"expert gate_up      x W^T", false, true, rows, 2 * fe, d, 1},
        {"expert down         x W^T", false, true, rows, d, fe, 1},
        {"output logits       x E^T", false, true, chunk, v, d, 1},
        {"logits backward    dL E  ", false, false, chunk, d, v, 1},
        {"embedding grad    dL^T x ", true, false, v, d, chunk, 1},
    };
    // Rounds over all shapes, each shape's best trial kept, and the peak re-measured after
    // every round: a neighbour's burst then spoils one trial of a shape rather than all of
    // them, and cannot lower the denominator (a lowered peak once put a GEMM above 100%).
    // BF16 figures on both backends. On a CPU the peak is that of the bf16 GEMM path it
    // uses (AMX or vdpbf16ps), or the fp32 FMA rate where the GEMMs widen their operands to
    // fp32; on CUDA that of a large cuBLASLt bf16 GEMM.
    auto* cpu = dynamic_cast<sdmoe::CpuBackend*>(be.get());
    const bool cuda = be->device() == sdmoe::Device::CUDA;
    const sdmoe::Bf16GemmPath gemm_path = cpu ? sdmoe::cpu_bf16_gemm_path() : sdmoe::Bf16GemmPath::WIDEN;
    const bool bf16_kernel = cuda || gemm_path != sdmoe::Bf16GemmPath::WIDEN;
    double peak_bf16 = cuda ? be->peak_bf16_flops() : 0.0;
    std::vector<double> gemm_flops(std::size(shapes), 0.0), gemm_flops_bf16(std::size(shapes), 0.0);
    for (int round = 0; round < kGemmRounds; ++round) {
      for (size_t i = 0; i < std::size(shapes); ++i) {
        const Shape& s = shapes[i];
        gemm_flops[i] = std::max(gemm_flops[i], time_gemm(*be, sdmoe::DType::F32, s.ta, s.tb, s.m, s.n, s.k, s.count,
                                                          kTrialsPerRound));
        gemm_flops_bf16[i] = std::max(gemm_flops_bf16[i], time_gemm(*be, sdmoe::DType::BF16, s.ta, s.tb, s.m, s.n, s.k,
                                                                    s.count, kTrialsPerRound));
      }
      if (cpu) {
        peak = std::max(peak, sdmoe::measure_cpu_fma_peak(cpu->threads()));
        peak_bf16 = std::max(peak_bf16, bf16_kernel ? sdmoe::measure_cpu_bf16_gemm_peak(gemm_path, cpu->threads()) : peak);
      }
    }
    std::printf("measured fp32 FMA peak: %.1f GFLOP/s (best of %d measurements)\n", peak / 1e9,
                be->device() == sdmoe::Device::CPU ? kGemmRounds + 1 : 1);
    if (cpu) std::printf("bf16 GEMMs: %s\n", sdmoe::cpu_bf16_gemm_reason().c_str());
    if (cuda)
      std::printf("measured bf16 peak (cuBLASLt 8192^3 GEMM on the tensor cores): %.1f GFLOP/s, %.2fx the fp32 peak\n",
                  peak_bf16 / 1e9, peak_bf16 / peak);
    else if (bf16_kernel)
      std::printf("measured bf16 peak (%s): %.1f GFLOP/s (best of %d), %.2fx the fp32 peak\n",
                  sdmoe::bf16_gemm_path_name(gemm_path), peak_bf16 / 1e9, kGemmRounds, peak_bf16 / peak);
    else
      std::printf("bf16 GEMMs widen to fp32 here: measured against the fp32 peak\n");
    if (cpu && sdmoe::cpu::cpu_supports_avx512_bf16())
      std::printf("measured vdpbf16ps (AVX512_BF16) peak: %.1f GFLOP/s, %.2fx the fp32 FMA peak\n",
                  sdmoe::cpu::measure_cpu_bf16_dot_peak(cpu->threads()) / 1e9,
                  sdmoe::cpu::measure_cpu_bf16_dot_peak(cpu->threads()) / peak);
    std::printf("\n%-28s %24s %10s %7s", "GEMM (model shapes)", "[batch x] m x n x k", "fp32 GF/s", "% peak");
    std::printf(" %10s %7s %7s\n", "bf16 GF/s", "% peak", "bf16/32");
    for (size_t i = 0; i < std::size(shapes); ++i) {
      const Shape& s = shapes[i];
      const std::string dims = (s.count > 1 ? fmt::format("{} x ", s.count) : std::string()) +
                               fmt::format("{}x{}x{}", s.m, s.n, s.k);
      std::printf("%-28s %24s %10.1f %6.1f%%", s.name, dims.c_str(), gemm_flops[i] / 1e9, 100.0 * gemm_flops[i] / peak);
      std::printf(" %10.1f %6.1f%% %6.2fx\n", gemm_flops_bf16[i] / 1e9, 100.0 * gemm_flops_bf16[i] / peak_bf16,
                  gemm_flops_bf16[i] / gemm_flops[i]);
    }

    // Training steps of the FP32 and the BF16 model, alternating, so that a
    // neighbour's load falls on both alike; the median step of each.
    struct Arm {
      sdmoe::Precision precision;
      bool fused_attention;
      std::unique_ptr<sdmoe::GptModel> model;
      std::unique_ptr<sdmoe::AdamW> optimizer;
      std::vector<double> seconds;
    };
    std::vector<Arm> arms;
    // FP32, BF16, and (where the backend has it) BF16 with the fused attention kernel.
    for (auto [p, fused] : {std::pair{sdmoe::Precision::FP32, false}, std::pair{sdmoe::Precision::BF16, false},
                            std::pair{sdmoe::Precision::BF16, true}}) {
      if (fused && !be->has_fused_attention()) continue;
      Arm arm{p, fused,
              std::make_unique<sdmoe::GptModel>(spec, *be, sdmoe::PrecisionPolicy::of(p),
                                                run.training().micro_batch_size(), sdmoe::ModelPlacement{},
                                                sdmoe::ModelExecution{sdmoe::Recompute::NONE, fused}),
              nullptr, {}};
      arm.model->init_parameters(1);
      arm.optimizer = std::make_unique<sdmoe::AdamW>(*arm.model, optimizer_spec);
      arms.push_back(std::move(arm));
    }
    const int micro_batch = arms[0].model->micro_batch();
    std::vector<int32_t> tokens(int64_t(micro_batch) * (spec.seq_len + 1));
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t(sdmoe::random_bits(7, 0, i) % uint64_t(spec.vocab_size));
    for (Arm& arm : arms) arm.model->forward_backward(tokens.data(), 1.0);  // warm-up
    be->synchronize();
    for (int s = 0; s < steps; ++s)
      for (Arm& arm : arms) {
        auto start = Clock::now();
        arm.model->zero_grads();
        arm.model->forward_backward(tokens.data(), 1.0);
        arm.optimizer->step(s);
        arm.model->weights_changed();
        be->synchronize();
        arm.seconds.push_back(seconds_since(start));
      }
    std::printf("\ntraining step (%s, micro-batch %d x %d tokens, forward+backward+AdamW, median of %d):\n",
                path.c_str(), micro_batch, spec.seq_len, steps);
    double fp32_tokens_per_second = 0.0;
    for (Arm& arm : arms) {
      // The median step: one slow step caused by a neighbour moves it little, and no step
      // is dropped.
      std::sort(arm.seconds.begin(), arm.seconds.end());
      const double sec = arm.seconds[arm.seconds.size() / 2];
      const double tps = double(t) / sec, flops = tps * spec.train_flops_per_token();
      const bool is_bf16 = arm.precision == sdmoe::Precision::BF16;
      if (!is_bf16) fp32_tokens_per_second = tps;
      std::printf("  %s%s: %.3f s/step, %.0f tokens/s, %.1f GFLOP/s model FLOPs = %.1f%% of the measured %s peak, "
                  "activations %.1f MB%s\n",
                  std::string(sdmoe::precision_name(arm.precision)).c_str(),
                  arm.fused_attention ? " + fused attention" : "", sec, tps, flops / 1e9,
                  100.0 * flops / (is_bf16 ? peak_bf16 : peak),
                  !is_bf16 || !bf16_kernel ? "fp32" : cuda ? "bf16 tensor-core" : sdmoe::bf16_gemm_path_name(gemm_path),
                  double(arm.model->activation_bytes()) / 1e6,
                  is_bf16 ? fmt::format(" ({:.2f}x the FP32 tokens/s)", tps / fp32_tokens_per_second).c_str() : "");
    }
    if (be->has_fused_attention()) {
      std::printf("\n");
      fused_attention_kernel_figure(*be, sdmoe::DType::F32, peak);
      fused_attention_kernel_figure(*be, sdmoe::DType::BF16, peak_bf16);
      fused_attention_memory_figures(*be, spec);
    }
  } catch (const sdmoe::Error& e) {
    std::fprintf(stderr, "sdmoe_bench: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
