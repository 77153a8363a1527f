// sdmoe_spectral_bench [--config FILE.textproto] [--device CPU|CUDA|AUTO] [--rounds N]:
// the cost of SD-MoE against plain MoE on the same model in the same process. Two copies
// of the config's model train on the same real batches in blocks of T steps
// (T = sdmoe.refresh_interval), step by step in turn: one with plain AdamW, one with SD-MoE (its optimizer step
// with the per-part projections, and one spectral refresh per block). A second spectral
// service with the other solver refreshes from the same weights at the same points, for
// the solver comparison (time, largest principal angle against the exact bases and the
// energy its common parts hold against the exact ones').
// Last, asynchronous subspace-iteration refreshes of a third decomposition, each started
// at a step boundary of the SD-MoE model and installed at the next: the worker's time
// beside the step and what the boundary waited for. Figures only; nothing is asserted.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/sequence_loader.h"
#include "data/token_dataset.h"
#include "launcher/config.h"
#include "launcher/trainer.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "model/sdmoe.h"
#include "model/spectral_service.h"
#include "parallel/communicator.h"

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::vector<double> host(sdmoe::Backend& be, const sdmoe::Tensor& t) {
  std::vector<float> f(size_t(t.numel()));
  be.copy_to_host(t, f.data());
  return std::vector<double>(f.begin(), f.end());
}

// Largest principal angle over every basis of two decompositions of the same model.
double worst_angle(sdmoe::Backend& be, const sdmoe::SpectralDecomposition& a, const sdmoe::SpectralDecomposition& b) {
  const std::vector<double> x = host(be, a.bases()), y = host(be, b.bases());
  const int k = a.spec().rank;
  double worst = 0.0;
  for (const sdmoe::SpectralTarget& t : a.targets())
    for (int p = 0; p < t.bases; ++p)
      for (const auto& [offset, length] : {std::pair{t.ut_offset + p * k * t.m, t.m}, std::pair{t.vt_offset + p * k * t.n, t.n}}) {
        const std::vector<double> u(x.begin() + offset, x.begin() + offset + k * length);
        const std::vector<double> v(y.begin() + offset, y.begin() + offset + k * length);
        worst = std::max(worst, sdmoe::SpectralService::largest_principal_angle(u, v, k, length));
      }
  return worst;
}
// Energy a decomposition's common part holds, ||U^T W V||_F^2, as a share of what the
// exact bases' holds, per expert matrix, for PER_EXPERT bases: there the exact share is
// the best possible, sigma_1^2 + ... + sigma_k^2 (Ky Fan), so the ratio is at most 1 up to
// rounding. (A LAYER_SHARED basis is the best for the sum over a layer's experts, not for
// each one.) Where the top-k subspace is ill defined (no spectral gap) two bases can be
// far apart in angle and still capture almost the same energy, which is what the split
// into common and unique parts depends on. Returns {median, smallest}.
std::pair<double, double> captured_energy(sdmoe::Backend& be, const sdmoe::SpectralDecomposition& sd,
                                          const sdmoe::SpectralDecomposition& exact, const sdmoe::GptModel& model) {
  const std::vector<double> bases = host(be, sd.bases()), best = host(be, exact.bases());
  const int k = sd.spec().rank;
  // ||Ut W Vt^T||_F^2 for expert e's rows Ut [k, m], Vt [k, n].
  auto energy = [&](const std::vector<double>& b, const sdmoe::SpectralTarget& t, const std::vector<double>& w,
                    int64_t e) {
    const double* ut = b.data() + t.ut_offset + e * k * t.m;
    const double* vt = b.data() + t.vt_offset + e * k * t.n;
    std::vector<double> wv(size_t(t.m) * k, 0.0);  // W Vt^T, [m, k]
    for (int64_t i = 0; i < t.m; ++i)
      for (int64_t j = 0; j < t.n; ++j)
        for (int c = 0; c < k; ++c) wv[i * k + c] += w[i * t.n + j] * vt[c * t.n + j];
    double sum = 0.0;
    for (int r = 0; r < k; ++r)
      for (int c = 0; c < k; ++c) {
        double x = 0.0;
        for (int64_t i = 0; i < t.m; ++i) x += ut[r * t.m + i] * wv[i * k + c];
        sum += x * x;
      }
    return sum;
  };
  std::vector<double> ratios;
  for (const sdmoe::SpectralTarget& t : sd.targets())
    for (int64_t e = 0; e < t.experts; ++e) {
      const int64_t offset = model.registry().spec(t.param_id).offset + t.first + e * t.stride;
      const std::vector<double> w =
          host(be, sdmoe::Tensor(static_cast<float*>(model.params().data) + offset, sdmoe::DType::F32, be.device(),
                                 {t.m, t.n}));
      const double best_energy = energy(best, t, w, e);
      if (best_energy > 0.0) ratios.push_back(energy(bases, t, w, e) / best_energy);
    }
  if (ratios.empty()) return {0.0, 0.0};
  return {median(ratios), *std::min_element(ratios.begin(), ratios.end())};
}
// sigma_k / sigma_(k+1) of every expert matrix (median): how well separated the top-k
// subspace is, which decides how fast subspace iteration converges to it.
double median_gap(sdmoe::Backend& be, const sdmoe::SpectralDecomposition& sd, const sdmoe::GptModel& model) {
  std::vector<double> gaps;
  const int k = sd.spec().rank;
  for (const sdmoe::SpectralTarget& t : sd.targets()) {
    const int64_t r = std::min(t.m, t.n);
    sdmoe::Buffer u(be, size_t(t.m * r) * 4), s(be, size_t(r) * 4), vt(be, size_t(r * t.n) * 4);
    for (int64_t e = 0; e < t.experts; ++e) {
      const int64_t offset = model.registry().spec(t.param_id).offset + t.first + e * t.stride;
      const sdmoe::Tensor w(static_cast<float*>(model.params().data) + offset, sdmoe::DType::F32, be.device(), {t.m, t.n});
      be.svd(w, sdmoe::Tensor(u.data(), sdmoe::DType::F32, be.device(), {t.m, r}),
             sdmoe::Tensor(s.data(), sdmoe::DType::F32, be.device(), {r}),
             sdmoe::Tensor(vt.data(), sdmoe::DType::F32, be.device(), {r, t.n}));
      const std::vector<double> sv = host(be, sdmoe::Tensor(s.data(), sdmoe::DType::F32, be.device(), {r}));
      gaps.push_back(sv[k - 1] / sv[k]);
    }
  }
  return median(gaps);
}
}  // namespace

int main(int argc, char** argv) {
  std::string path = "configs/small-cpu.textproto", device;
  int rounds = 4;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("usage: sdmoe_spectral_bench [--config FILE.textproto] [--device CPU|CUDA|AUTO] [--rounds N]\n"
                  "SD-MoE against plain MoE on the config's model: step-time ratio, refresh and projection\n"
                  "shares, exact against subspace-iteration refreshes (time, largest principal angle, energy\n"
                  "held by the common parts), and asynchronous subspace-iteration refreshes (worker time\n"
                  "beside a step, wait at the boundary).\n");
      return 0;
    }
    if (i + 1 >= argc || (arg != "--config" && arg != "--device" && arg != "--rounds")) {
      std::fprintf(stderr, "sdmoe_spectral_bench: error: unknown or incomplete argument '%s' (see --help)\n", arg.c_str());
      return 2;
    }
    const std::string value = argv[++i];
    if (arg == "--config") path = value;
    else if (arg == "--device") device = value;
    else if (char* end = nullptr; (rounds = int(std::strtol(value.c_str(), &end, 10))) <= 0 || *end != '\0') {
      std::fprintf(stderr, "sdmoe_spectral_bench: error: --rounds needs a positive integer, got '%s'\n", value.c_str());
      return 2;
    }
  }
  sdmoe::MpiRuntime mpi(&argc, &argv);
  try {
    std::vector<std::string> overrides{"sdmoe.enabled=true"};
    if (!device.empty()) overrides.push_back("device=" + device);
    const sdmoe::config::Run run = sdmoe::load_config(path, overrides);
    const sdmoe::ModelSpec spec = sdmoe::model_spec_from(run.model());
    spec.validate();
    sdmoe::SdmoeSpec exact_spec = sdmoe::sdmoe_spec_from(run.sdmoe());
    exact_spec.solver = sdmoe::SdmoeSolver::EXACT;
    exact_spec.async = false;
    exact_spec.validate(spec);
    sdmoe::SdmoeSpec iter_spec = exact_spec;
    iter_spec.solver = sdmoe::SdmoeSolver::SUBSPACE_ITERATION;
    const int T = exact_spec.refresh_interval, mb = run.training().micro_batch_size();
    // One rank: a step accumulates the config's global batch in micro-batches, as training does.
    const int accumulate = std::max(1, int(run.training().global_batch_size() / std::max(mb, 1)));
    auto be = sdmoe::make_backend(run, mpi);
    const sdmoe::OptimizerSpec os = sdmoe::optimizer_spec_from(run.optimizer(), int64_t(rounds + 1) * (T + 1));
    auto dataset = std::make_shared<sdmoe::data::TokenDataset>(sdmoe::data::TokenDataset::open(run.data().path(), "train"));
    sdmoe::data::SequenceLoader loader(dataset, spec.seq_len, run.data().seed(), 0, 1);

    sdmoe::GptModel plain(spec, *be, sdmoe::DType::F32, mb), model(spec, *be, sdmoe::DType::F32, mb);
    plain.init_parameters(1);
    model.init_parameters(1);
    sdmoe::AdamW plain_opt(plain, os);
    sdmoe::SpectralDecomposition exact(*be, sdmoe::DType::F32, model.registry(), exact_spec);
    sdmoe::SpectralDecomposition iter(*be, sdmoe::DType::F32, model.registry(), iter_spec);
    sdmoe::AdamW opt(model, os, {}, &exact);
    sdmoe::SpectralService exact_service(exact, model.registry(), model.params(), model.grads(), {}, nullptr, nullptr);
    sdmoe::SpectralService iter_service(iter, model.registry(), model.params(), model.grads(), {}, nullptr, nullptr);
    // The side decomposition's first moments are never used: a buffer of the right size.
    sdmoe::AdamW side_opt(model, os);
    exact_service.refresh(0, opt.first_moments());
    iter_service.refresh(0, side_opt.first_moments());

    std::printf("backend: %s; %s, SD-MoE rank %d on %zu expert matrix stacks, refresh every %d steps, "
                "%d micro-batch(es) of %d x %d tokens per step\n",
                be->name().c_str(), spec.summary().c_str(), exact_spec.rank, exact.targets().size(), T, accumulate, mb,
                spec.seq_len);
    std::vector<double> plain_block, sd_block, plain_opt_s, sd_opt_s, refresh_s, exact_refresh, iter_refresh, angles;
    // One training step of `m` on batches[(index - first) * accumulate ...], timed in total
    // and in the optimizer.
    auto timed_step = [&](sdmoe::GptModel& m, sdmoe::AdamW& o, int64_t index, double& total, double& in_optimizer,
                          const std::vector<std::vector<int32_t>>& batches, int64_t first) {
      be->synchronize();
      const auto start = Clock::now();
      m.zero_grads();
      for (int a = 0; a < accumulate; ++a)
        m.forward_backward(batches[size_t(index - first) * accumulate + a].data(), 1.0 / accumulate);
      be->synchronize();
      const auto mid = Clock::now();
      o.step(index);
      be->synchronize();
      in_optimizer += seconds_since(mid);
      total += seconds_since(start);
    };
    int64_t step = 0;
    for (int round = -1; round < rounds; ++round) {  // round -1 warms up
      std::vector<std::vector<int32_t>> batches(size_t(T) * accumulate);
      for (auto& b : batches) loader.next(mb, b);
      double p_total = 0, p_opt = 0, s_total = 0, s_opt = 0;
      // Step by step in turn, so that a slow spell of a shared machine hits both alike.
      for (int i = 0; i < T; ++i) {
        timed_step(plain, plain_opt, step + i, p_total, p_opt, batches, step);
        timed_step(model, opt, step + i, s_total, s_opt, batches, step);
      }
      step += T;
      auto start = Clock::now();
      const sdmoe::RefreshReport rep = exact_service.refresh(step, opt.first_moments());
      const double refresh = seconds_since(start);
      start = Clock::now();
      iter_service.refresh(step, side_opt.first_moments());
      const double iter_time = seconds_since(start);
      if (round < 0) continue;
      plain_block.push_back(p_total);
      sd_block.push_back(s_total + refresh);
      plain_opt_s.push_back(p_opt);
      sd_opt_s.push_back(s_opt);
      refresh_s.push_back(refresh);
      exact_refresh.push_back(rep.compute_seconds + rep.comm_seconds);
      iter_refresh.push_back(iter_time);
      angles.push_back(worst_angle(*be, exact, iter));
    }
    const double pb = median(plain_block), sb = median(sd_block);
    std::printf("\nper block of %d steps (median of %d rounds):\n", T, rounds);
    std::printf("  plain MoE        %.3f s (forward+backward %.3f s, optimizer %.3f s)\n", pb, pb - median(plain_opt_s),
                median(plain_opt_s));
    std::printf("  SD-MoE           %.3f s (forward+backward %.3f s, optimizer %.3f s, refresh %.3f s)\n", sb,
                sb - median(sd_opt_s) - median(refresh_s), median(sd_opt_s), median(refresh_s));
    std::printf("  step-time ratio SD-MoE / plain: %.4f (overhead %.2f%%)\n", sb / pb, 100.0 * (sb / pb - 1.0));
    std::printf("  refresh share of the SD-MoE block: %.2f%%; per-step projection share (optimizer time above plain): %.2f%%\n",
                100.0 * median(refresh_s) / sb, 100.0 * (median(sd_opt_s) - median(plain_opt_s)) / sb);
    // The forward and backward are the same ops in both models; on a shared machine their
    // times differ by noise of the same size as SD-MoE's cost, which the next figure omits.
    std::printf("  SD-MoE's own time (optimizer above plain + refresh) / plain block: %.2f%%\n",
                100.0 * (median(sd_opt_s) - median(plain_opt_s) + median(refresh_s)) / pb);
    std::printf("  the same with subspace-iteration refreshes instead of exact ones: %.2f%%\n",
                100.0 * (median(sd_opt_s) - median(plain_opt_s) + median(iter_refresh)) / pb);
    std::printf("\nrefresh solvers on the trained weights (median of %d refreshes, metrics included):\n", rounds);
    std::printf("  exact (syevd of each matrix's Gram)       %.3f s\n", median(exact_refresh));
    std::printf("  subspace iteration (%d rounds, warm start) %.3f s; largest principal angle to exact %.2e rad (worst %.2e)\n",
                iter_spec.subspace_iterations, median(iter_refresh), median(angles),
                *std::max_element(angles.begin(), angles.end()));
    if (exact_spec.basis == sdmoe::SdmoeBasis::PER_EXPERT) {
      const auto [energy_median, energy_lowest] = captured_energy(*be, iter, exact, model);
      std::printf("  energy of subspace iteration's common parts / the exact ones': %.4f (median; lowest %.4f)\n",
                  energy_median, energy_lowest);
    }
    std::printf("  spectral gap sigma_k / sigma_(k+1) of the expert matrices after %ld steps: %.3f (median)\n", (long)step,
                median_gap(*be, exact, model));

    // Asynchronous refreshes by subspace iteration, as training runs them: started after a
    // step, computed by a worker (on a GPU on its own backend and stream) while the next
    // step runs, installed at the boundary after it. Its own decomposition, so that the
    // training model's bases stay the exact ones.
    sdmoe::SdmoeSpec async_spec = iter_spec;
    async_spec.async = true;
    sdmoe::SpectralDecomposition async_sd(*be, sdmoe::DType::F32, model.registry(), async_spec);
    std::unique_ptr<sdmoe::Backend> worker;
    if (be->device() == sdmoe::Device::CUDA) worker = sdmoe::make_cuda_backend(be->device_ordinal());
    sdmoe::SpectralService async_service(async_sd, model.registry(), model.params(), model.grads(), {}, nullptr,
                                         nullptr, worker.get());
    async_service.refresh(step, side_opt.first_moments());
    std::vector<double> async_step_s, plain_step_s, async_worker_s, async_blocking_s;
    for (int round = -1; round < rounds; ++round) {
      std::vector<std::vector<int32_t>> batches(size_t(2) * accumulate);
      for (auto& b : batches) loader.next(mb, b);
      double with_worker = 0, alone = 0, ignored = 0;
      timed_step(model, opt, step, alone, ignored, batches, step);  // a step with nothing beside it
      async_service.start_async(step + 1);
      timed_step(model, opt, step + 1, with_worker, ignored, batches, step);
      const sdmoe::RefreshReport rep = async_service.finish_async(step + 2, side_opt.first_moments());
      step += 2;
      if (round < 0) continue;
      plain_step_s.push_back(alone);
      async_step_s.push_back(with_worker);
      async_worker_s.push_back(rep.compute_seconds);
      async_blocking_s.push_back(rep.blocking_seconds);
    }
    std::printf("\nasynchronous subspace-iteration refreshes (median of %d):\n", rounds);
    std::printf("  worker %.3f s beside a step of %.3f s (%.3f s without it); the boundary waited %.3f s\n",
                median(async_worker_s), median(async_step_s), median(plain_step_s), median(async_blocking_s));
    // Its cost to training: the wait at the boundary, and the step beside the worker
    // slowing down where both share the device (the cores of a CPU, the SMs of a GPU).
    const double slowdown = std::max(0.0, median(async_step_s) - median(plain_step_s));
    std::printf("  SD-MoE's own time with them (optimizer above plain + wait + slowdown of the step beside the worker, "
                "one refresh per block) / plain block: %.2f%%\n",
                100.0 * (median(sd_opt_s) - median(plain_opt_s) + median(async_blocking_s) + slowdown) / pb);
  } catch (const sdmoe::Error& e) {
    std::fprintf(stderr, "sdmoe_spectral_bench: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
