// sdmoe_bench --config FILE.textproto [--device CPU|CUDA|AUTO] [--steps N]: prints the
// measured fp32 FMA peak of the device the config (or --device) selects, GEMM throughput
// on the model's shapes and the throughput of full training steps, each as a percentage
// of that peak. Figures only; nothing is asserted.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/cpu/cpu_backend.h"
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
double time_gemm(sdmoe::Backend& be, bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t count, int trials) {
  sdmoe::Buffer a(be, count * m * k * 4), b(be, count * k * n * 4), c(be, count * m * n * 4);
  sdmoe::Tensor ta_(a.data(), sdmoe::DType::F32, be.device(), {count * m, k}),
      tb_(b.data(), sdmoe::DType::F32, be.device(), {count * k, n}), tc(c.data(), sdmoe::DType::F32, be.device(), {count * m, n});
  be.init_normal(ta_, 1, 1, 1.0, 0);
  be.init_normal(tb_, 1, 2, 1.0, 0);
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
}  // namespace

int main(int argc, char** argv) {
  std::string path = "configs/small-cpu.textproto";
  int steps = 7;
  std::string device;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("usage: sdmoe_bench [--config FILE.textproto] [--device CPU|CUDA|AUTO] [--steps N]\n"
                  "Prints the measured fp32 FMA peak, GEMM throughput on the model's shapes (best of 6\n"
                  "trials in 3 rounds over all shapes) and the median of N training steps, as\n"
                  "percentages of that peak.\n");
      return 0;
    }
    if (i + 1 >= argc || (arg != "--config" && arg != "--steps" && arg != "--device")) {
      std::fprintf(stderr, "sdmoe_bench: error: unknown or incomplete argument '%s' (see --help)\n", arg.c_str());
      return 2;
    }
    const std::string value = argv[++i];
    if (arg == "--config") path = value;
    else if (arg == "--device") device = value;
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
    std::vector<std::string> overrides;
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
    std::vector<double> gemm_flops(std::size(shapes), 0.0);
    for (int round = 0; round < kGemmRounds; ++round) {
      for (size_t i = 0; i < std::size(shapes); ++i) {
        const Shape& s = shapes[i];
        gemm_flops[i] = std::max(gemm_flops[i], time_gemm(*be, s.ta, s.tb, s.m, s.n, s.k, s.count, kTrialsPerRound));
      }
      if (auto* cpu = dynamic_cast<sdmoe::CpuBackend*>(be.get()))
        peak = std::max(peak, sdmoe::measure_cpu_fma_peak(cpu->threads()));
    }
    std::printf("measured fp32 FMA peak: %.1f GFLOP/s (best of %d measurements)\n\n", peak / 1e9,
                be->device() == sdmoe::Device::CPU ? kGemmRounds + 1 : 1);
    std::printf("%-28s %24s %12s %8s\n", "GEMM (model shapes)", "[batch x] m x n x k", "GFLOP/s", "% peak");
    for (size_t i = 0; i < std::size(shapes); ++i) {
      const Shape& s = shapes[i];
      const std::string dims = (s.count > 1 ? fmt::format("{} x ", s.count) : std::string()) +
                               fmt::format("{}x{}x{}", s.m, s.n, s.k);
      std::printf("%-28s %24s %12.1f %7.1f%%\n", s.name, dims.c_str(), gemm_flops[i] / 1e9,
                  100.0 * gemm_flops[i] / peak);
    }

    sdmoe::GptModel model(spec, *be, sdmoe::DType::F32, run.training().micro_batch_size());
    model.init_parameters(1);
    sdmoe::AdamW opt(model, optimizer_spec);
    std::vector<int32_t> tokens(int64_t(model.micro_batch()) * (spec.seq_len + 1));
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t(sdmoe::random_bits(7, 0, i) % uint64_t(spec.vocab_size));
    model.forward_backward(tokens.data(), 1.0);  // warm-up
    be->synchronize();
    // The median step: one slow step caused by a neighbour on a shared machine moves it
    // little, and no step is dropped.
    std::vector<double> step_seconds;
    for (int s = 0; s < steps; ++s) {
      auto start = Clock::now();
      model.zero_grads();
      model.forward_backward(tokens.data(), 1.0);
      opt.step(s);
      be->synchronize();
      step_seconds.push_back(seconds_since(start));
    }
    std::sort(step_seconds.begin(), step_seconds.end());
    const double sec = step_seconds[step_seconds.size() / 2];
    const double tps = double(t) / sec, flops = tps * spec.train_flops_per_token();
    std::printf("\ntraining step (%s, micro-batch %d x %d tokens, forward+backward+AdamW, median of %d):\n",
                path.c_str(), model.micro_batch(), spec.seq_len, steps);
    std::printf("  %.3f s/step, %.0f tokens/s, %.1f GFLOP/s model FLOPs = %.1f%% of measured peak\n", sec, tps,
                flops / 1e9, 100.0 * flops / peak);
  } catch (const sdmoe::Error& e) {
    std::fprintf(stderr, "sdmoe_bench: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
