// The SD-MoE decomposition on the CUDA backend against the CPU oracle: the same model,
// bases computed by each backend's exact solver (cuSOLVER against LAPACK) or by subspace
// iteration, the O(mnk) projection and one SD-MoE optimizer step. Bases are compared as
// subspaces (signs and rotations within the subspace are free); the step depends on the
// projectors only, so the updated weights are compared elementwise within fp32 tolerance.
// Each test skips itself when no GPU is visible.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "model/gpt.h"
#include "model/optimizer.h"
#include "model/sdmoe.h"
#include "model/spectral_service.h"

namespace sdmoe {
namespace {

ModelSpec tiny() {
  ModelSpec s;
  s.vocab_size = 64;
  s.seq_len = 16;
  s.dim = 32;
  s.layers = 2;
  s.heads = 4;
  s.ffn_dim = 48;
  s.moe.num_experts = 4;
  s.moe.top_k = 2;
  s.moe.expert_ffn_dim = 24;
  s.moe.first_dense_layers = 0;
  return s;
}

std::vector<float> host(Backend& be, const Tensor& t) {
  std::vector<float> v(size_t(t.numel()));
  be.copy_to_host(t, v.data());
  return v;
}

// One model, its decomposition and spectral service on one backend.
struct Run {
  std::unique_ptr<Backend> be;
  std::unique_ptr<GptModel> model;
  std::unique_ptr<SpectralDecomposition> sd;
  std::unique_ptr<AdamW> opt;
  std::unique_ptr<SpectralService> service;
  Run(std::unique_ptr<Backend> backend, const SdmoeSpec& spec, const std::vector<float>& params) : be(std::move(backend)) {
    model = std::make_unique<GptModel>(tiny(), *be, DType::F32, 1);
    be->copy_from_host(params.data(), model->params());
    sd = std::make_unique<SpectralDecomposition>(*be, DType::F32, model->registry(), spec);
    OptimizerSpec os;
    os.lr = os.min_lr = 1e-2;
    os.warmup_steps = 0;
    os.grad_clip = 0.0;
    opt = std::make_unique<AdamW>(*model, os, std::vector<ElementRange>{}, sd.get());
    service = std::make_unique<SpectralService>(*sd, model->registry(), model->params(), model->grads(),
                                                std::vector<int>{}, nullptr, nullptr);
  }
};

// Parameters with a clear top-k structure in every expert matrix (a planted rank-k part
// of singular values 8..5 over noise of norm ~1), so both solvers pick the same subspace.
std::vector<float> planted_params(const SdmoeSpec& spec) {
  auto cpu = make_cpu_backend(1);
  GptModel model(tiny(), *cpu, DType::F32, 1);
  model.init_parameters(3);
  std::vector<float> p = host(*cpu, model.params());
  SpectralDecomposition sd(*cpu, DType::F32, model.registry(), spec);
  std::mt19937 gen(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const SpectralTarget& t : sd.targets())
    for (int64_t e = 0; e < t.experts; ++e) {
      float* w = &p[model.registry().spec(t.param_id).offset + t.first + e * t.stride];
      for (int64_t i = 0; i < t.m * t.n; ++i) w[i] = normal(gen) / std::sqrt(float(t.n));
      for (int c = 0; c < spec.rank; ++c) {
        std::vector<float> x(t.m), y(t.n);
        for (float& v : x) v = normal(gen) / std::sqrt(float(t.m));
        for (float& v : y) v = normal(gen) / std::sqrt(float(t.n));
        for (int64_t i = 0; i < t.m; ++i)
          for (int64_t j = 0; j < t.n; ++j) w[i * t.n + j] += float(8 - c) * x[i] * y[j];
      }
    }
  return p;
}

void compare(SdmoeBasis basis, SdmoeSolver solver) {
  SdmoeSpec spec;
  spec.enabled = true;
  spec.rank = 4;
  spec.basis = basis;
  spec.solver = solver;
  const std::vector<float> params = planted_params(spec);
  Run c(make_cpu_backend(1), spec, params), g(make_cuda_backend(0), spec, params);
  const RefreshReport cpu_first = c.service->refresh(0, c.opt->first_moments());
  const RefreshReport gpu_first = g.service->refresh(0, g.opt->first_moments());
  // The overlaps of the planted (well separated) top subspaces, measured on the device.
  auto same_overlaps = [](const RefreshReport& a, const RefreshReport& b, const char* when) {
    ASSERT_EQ(a.metrics.size(), b.metrics.size());
    for (size_t i = 0; i < a.metrics.size(); ++i) {
      EXPECT_NEAR(a.metrics[i].overlap_left, b.metrics[i].overlap_left, 1e-4) << when << " target " << i;
      EXPECT_NEAR(a.metrics[i].overlap_right, b.metrics[i].overlap_right, 1e-4) << when << " target " << i;
    }
  };
  same_overlaps(cpu_first, gpu_first, "first refresh");
  // Bases: the same subspaces.
  const std::vector<float> cb = host(*c.be, c.sd->bases()), gb = host(*g.be, g.sd->bases());
  double worst = 0.0;
  for (const SpectralTarget& t : c.sd->targets())
    for (int p = 0; p < t.bases; ++p)
      for (auto [offset, length] : {std::pair{t.ut_offset + p * spec.rank * t.m, t.m},
                                    std::pair{t.vt_offset + p * spec.rank * t.n, t.n}}) {
        const std::vector<double> a(cb.begin() + offset, cb.begin() + offset + spec.rank * length);
        const std::vector<double> b(gb.begin() + offset, gb.begin() + offset + spec.rank * length);
        worst = std::max(worst, SpectralService::largest_principal_angle(a, b, spec.rank, length));
      }
  EXPECT_LT(worst, 1e-3) << "bases differ between CPU and GPU";
  // One optimizer step from the same gradients.
  std::mt19937 gen(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> grads(size_t(c.model->grads().numel()));
  for (float& v : grads) v = normal(gen);
  for (Run* r : {&c, &g}) {
    r->be->copy_from_host(grads.data(), r->model->grads());
    r->opt->step(0);
  }
  const std::vector<float> cw = host(*c.be, c.model->params()), gw = host(*g.be, g.model->params());
  double diff = 0.0, moved = 0.0;
  for (size_t i = 0; i < cw.size(); ++i) {
    diff = std::max(diff, double(std::fabs(cw[i] - gw[i])));
    moved = std::max(moved, double(std::fabs(cw[i] - params[i])));
  }
  EXPECT_GT(moved, 1e-3) << "the step must change the weights";
  EXPECT_LT(diff, 2e-5) << "updated weights differ between CPU and GPU";
  // A second refresh: warm starts from the first (bases and metric bases) and gradients.
  const RefreshReport cpu_second = c.service->refresh(1, c.opt->first_moments());
  const RefreshReport gpu_second = g.service->refresh(1, g.opt->first_moments());
  same_overlaps(cpu_second, gpu_second, "second refresh");
}

TEST(CudaSdmoe, PerExpertExactMatchesCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  compare(SdmoeBasis::PER_EXPERT, SdmoeSolver::EXACT);
}

TEST(CudaSdmoe, LayerSharedSubspaceIterationMatchesCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  compare(SdmoeBasis::LAYER_SHARED, SdmoeSolver::SUBSPACE_ITERATION);
}

}  // namespace
}  // namespace sdmoe
