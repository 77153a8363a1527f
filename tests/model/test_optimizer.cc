// The optimizer: the learning-rate schedule (linear warmup, cosine decay to min_lr), AdamW
// through model/optimizer against the textbook update with bias correction and decoupled
// weight decay (only on the roles that decay), and global gradient-norm clipping.
#include <cmath>

#include "model/optimizer.h"
#include "tests/model/layer_support.h"

namespace sdmoe::gradtest {
namespace {

TEST(LearningRate, WarmupThenCosineToMinimum) {
  OptimizerSpec s;
  s.lr = 1.0;
  s.min_lr = 0.1;
  s.warmup_steps = 10;
  s.total_steps = 110;
  // Warmup: lr * (step + 1) / warmup, reaching lr at the last warmup step.
  EXPECT_DOUBLE_EQ(learning_rate(s, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(s, 4), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(s, 9), 1.0);
  // Cosine: starts at lr, halfway between lr and min_lr at the midpoint, min_lr at the end.
  EXPECT_DOUBLE_EQ(learning_rate(s, 10), 1.0);
  EXPECT_NEAR(learning_rate(s, 60), 0.55, 1e-15);
  EXPECT_NEAR(learning_rate(s, 35), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 0.25)), 1e-15);
  EXPECT_NEAR(learning_rate(s, 110), 0.1, 1e-15);
  EXPECT_NEAR(learning_rate(s, 5000), 0.1, 1e-15) << "stays at min_lr after total_steps";
  for (int64_t step = 1; step < 10; ++step) EXPECT_GT(learning_rate(s, step), learning_rate(s, step - 1));
  for (int64_t step = 11; step <= 120; ++step) EXPECT_LE(learning_rate(s, step), learning_rate(s, step - 1));
  for (int64_t step = 0; step <= 120; ++step) {
    EXPECT_GE(learning_rate(s, step), 0.1 - 1e-15);
    EXPECT_LE(learning_rate(s, step), 1.0 + 1e-15);
  }
  // No warmup: the first step uses the full rate.
  s.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(learning_rate(s, 0), 1.0);
  EXPECT_NEAR(learning_rate(s, 55), 0.55, 1e-15);
}

// Tensor of parameter `id` inside a flat per-parameter buffer (the moments).
Tensor slice(const Tensor& flat, const ParamSpec& ps) {
  Tensor t = flat;
  t.data = static_cast<char*>(flat.data) + ps.offset * dtype_size(flat.dtype);
  t.shape = {ps.numel, 1, 1, 1};
  t.ndim = 1;
  return t;
}

int find_id(const GptModel& model, ParamRole role) {
  for (size_t id = 0; id < model.registry().specs().size(); ++id)
    if (model.registry().spec(int(id)).role == role) return int(id);
  ADD_FAILURE() << "no parameter with role " << int(role);
  return 0;
}

// AdamW reference for one element after `steps` updates with the same gradient.
double adamw_reference(double p, double g, int steps, const OptimizerSpec& s, double lr, bool decay) {
  double m = 0, v = 0;
  for (int t = 1; t <= steps; ++t) {
    m = s.beta1 * m + (1 - s.beta1) * g;
    v = s.beta2 * v + (1 - s.beta2) * g * g;
    const double mhat = m / (1 - std::pow(s.beta1, t)), vhat = v / (1 - std::pow(s.beta2, t));
    p = p - lr * (mhat / (std::sqrt(vhat) + s.eps) + (decay ? s.weight_decay * p : 0.0));
  }
  return p;
}

TEST(AdamWOptimizer, DecayOnlyWhereItBelongsAndTextbookUpdate) {
  const ModelSpec spec = tiny_spec(RouterScore::SOFTMAX, true, /*tied=*/false);
  GptModel model(spec, be(), DType::F64, 1);
  model.init_parameters(3);
  OptimizerSpec os;
  os.lr = 1e-2;
  os.min_lr = 1e-2;
  os.warmup_steps = 1;  // learning_rate(0) = learning_rate(1) = lr
  os.total_steps = 100;
  os.weight_decay = 0.1;
  os.grad_clip = 0.0;  // disabled
  AdamW opt(model, os);
  const ParamRegistry& reg = model.registry();
  const int dense = find_id(model, ParamRole::DENSE);
  // Gradients: zero everywhere except one dense matrix.
  model.zero_grads();
  const auto g = randn(reg.spec(dense).numel, 4, 0.1);
  put(model.grad(dense), g);
  std::vector<std::vector<double>> before;
  for (size_t id = 0; id < reg.specs().size(); ++id) before.push_back(get(model.param(int(id))));
  for (int step = 0; step < 2; ++step) {
    const OptimizerStepResult r = opt.step(step);
    EXPECT_DOUBLE_EQ(r.lr, 1e-2);
    EXPECT_DOUBLE_EQ(r.clip_factor, 1.0);
  }
  for (size_t id = 0; id < reg.specs().size(); ++id) {
    const ParamSpec& ps = reg.spec(int(id));
    const auto after = get(model.param(int(id)));
    // Matrices decay (dense, router, experts, untied output); gains and the embedding do not.
    const bool decays = ps.role == ParamRole::DENSE || ps.role == ParamRole::ROUTER || ps.role == ParamRole::EXPERT ||
                        ps.role == ParamRole::OUTPUT;
    for (int64_t i = 0; i < ps.numel; ++i) {
      const double want = adamw_reference(before[id][i], int(id) == dense ? g[i] : 0.0, 2, os, 1e-2, decays);
      ASSERT_NEAR(after[i], want, 1e-15 + 1e-12 * std::fabs(want)) << ps.name << " element " << i;
    }
    if (ps.role == ParamRole::NORM) EXPECT_EQ(after, before[id]) << ps.name << ": a zero gradient leaves gains unchanged";
    if (decays && int(id) != dense)
      EXPECT_NEAR(after[0], before[id][0] * (1 - 1e-3) * (1 - 1e-3), 1e-15) << ps.name << ": pure decay";
  }
  // The dense update after step one is about lr * sign(g): Adam normalises the magnitude.
  const auto m = get(slice(opt.first_moments(), reg.spec(dense)));
  const auto v = get(slice(opt.second_moments(), reg.spec(dense)));
  for (int64_t i = 0; i < reg.spec(dense).numel; ++i) {
    const double m2 = 0.9 * 0.1 * g[i] + 0.1 * g[i], v2 = 0.95 * 0.05 * g[i] * g[i] + 0.05 * g[i] * g[i];
    ASSERT_NEAR(m[i], m2, 1e-15);
    ASSERT_NEAR(v[i], v2, 1e-15);
  }
}

TEST(AdamWOptimizer, GlobalNormClipping) {
  const ModelSpec spec = tiny_spec();
  GptModel model(spec, be(), DType::F64, 1);
  model.init_parameters(5);
  const ParamRegistry& reg = model.registry();
  const int dense = find_id(model, ParamRole::DENSE), norm = find_id(model, ParamRole::NORM);
  const auto gd = randn(reg.spec(dense).numel, 6), gn = randn(reg.spec(norm).numel, 7);
  double norm2 = 0;
  for (double x : gd) norm2 += x * x;
  for (double x : gn) norm2 += x * x;
  const double gnorm = std::sqrt(norm2);
  ASSERT_GT(gnorm, 3.0);
  for (double clip : {1.5, 2 * gnorm, 0.0}) {
    OptimizerSpec os;
    os.grad_clip = clip;
    os.warmup_steps = 1;
    AdamW opt(model, os);
    model.zero_grads();
    put(model.grad(dense), gd);
    put(model.grad(norm), gn);
    const OptimizerStepResult r = opt.step(0);
    EXPECT_NEAR(r.grad_norm, gnorm, 1e-12 * gnorm) << "norm before clipping";
    const double factor = clip == 1.5 ? 1.5 / gnorm : 1.0;  // clip / norm when clipping
    EXPECT_NEAR(r.clip_factor, factor, 1e-15) << "clip " << clip;
    // The first moment after one step is (1 - beta1) * factor * g: the update used the
    // clipped gradient, for every tensor alike.
    const auto m = get(slice(opt.first_moments(), reg.spec(dense)));
    const auto mn = get(slice(opt.first_moments(), reg.spec(norm)));
    for (size_t i = 0; i < gd.size(); ++i) ASSERT_NEAR(m[i], 0.1 * factor * gd[i], 1e-15) << i;
    for (size_t i = 0; i < gn.size(); ++i) ASSERT_NEAR(mn[i], 0.1 * factor * gn[i], 1e-15) << i;
    EXPECT_EQ(get(model.grad(dense)), gd) << "the step must not modify the gradients";
  }
}

}  // namespace
}  // namespace sdmoe::gradtest
