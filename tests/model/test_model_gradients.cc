// The whole GptModel in F64: the gradient that forward_backward accumulates against
// central finite differences of the objective that forward_only reports,
//   L(params) = loss_sum / tokens + aux_loss + z_loss,
// for a sample of elements of every parameter tensor, with a dense and an MoE layer, both
// router scores, top-k normalisation on and off, tied and untied embeddings. Also gradient
// accumulation and loss scaling, F32 against F64, and initialisation.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "model/gpt.h"
#include "tests/model/layer_support.h"

namespace sdmoe::gradtest {
namespace {

// [micro_batch, seq_len + 1] tokens; the last target of the last sequence is ignored (-1).
std::vector<int32_t> make_tokens(const ModelSpec& spec, int batch, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, spec.vocab_size - 1);
  std::vector<int32_t> tokens(batch * (spec.seq_len + 1));
  for (int32_t& x : tokens) x = dist(gen);
  tokens.back() = -1;
  return tokens;
}

double objective(GptModel& model, const std::vector<int32_t>& tokens, MicroBatchStats* out = nullptr) {
  const MicroBatchStats st = model.forward_only(tokens.data());
  if (out) *out = st;
  return st.loss_sum / double(st.tokens) + st.aux_loss + st.z_loss;
}

// Random norm gains around 1 (init sets them to exactly 1, where a missing gain would not show).
void perturb_norms(GptModel& model, uint64_t seed) {
  for (size_t id = 0; id < model.registry().specs().size(); ++id)
    if (model.registry().spec(int(id)).role == ParamRole::NORM) {
      const Tensor p = model.param(int(id));
      put(p, randn(p.numel(), seed + id, 0.2, 1.0));
    }
}

struct ModelCase {
  RouterScore score;
  bool normalize;
  bool tied;
};

class ModelGradientTest : public ::testing::TestWithParam<ModelCase> {};

TEST_P(ModelGradientTest, EveryParameterMatchesFiniteDifferences) {
  const auto [score, normalize, tied] = GetParam();
  const ModelSpec spec = tiny_spec(score, normalize, tied);
  const int batch = 2;
  GptModel model(spec, be(), DType::F64, batch);
  model.init_parameters(7);
  perturb_norms(model, 8);
  const auto tokens = make_tokens(spec, batch, 9);

  MicroBatchStats base;
  const double l0 = objective(model, tokens, &base);
  ASSERT_EQ(base.tokens, int64_t(batch) * spec.seq_len);
  ASSERT_EQ(base.moe.size(), 1u);
  EXPECT_GT(base.aux_loss, 0.0);
  EXPECT_GT(base.z_loss, 0.0);
  model.zero_grads();
  const MicroBatchStats trained = model.forward_backward(tokens.data(), 1.0);
  EXPECT_DOUBLE_EQ(trained.loss_sum, base.loss_sum);
  EXPECT_DOUBLE_EQ(trained.aux_loss, base.aux_loss);
  EXPECT_DOUBLE_EQ(trained.z_loss, base.z_loss);

  const ParamRegistry& reg = model.registry();
  std::vector<bool> seen_roles(6, false);
  int total_checked = 0, total_probed = 0;
  std::mt19937_64 gen(10);
  for (size_t id = 0; id < reg.specs().size(); ++id) {
    const ParamSpec& ps = reg.spec(int(id));
    seen_roles[int(ps.role)] = true;
    const Tensor p = model.param(int(id));
    std::vector<double> values = get(p);
    const std::vector<double> analytic = get(model.grad(int(id)));
    // ~30 random elements; for the embedding also elements of rows the batch uses.
    std::vector<int64_t> sample(ps.numel);
    std::iota(sample.begin(), sample.end(), 0);
    std::shuffle(sample.begin(), sample.end(), gen);
    sample.resize(std::min<int64_t>(30, ps.numel));
    if (ps.role == ParamRole::EMBEDDING)
      for (int i = 0; i < 10; ++i) sample.push_back(int64_t(tokens[i]) * spec.dim + (i * 7) % spec.dim);
    int checked = 0, bad = 0;
    double max_fd = 0;
    std::string first;
    for (int64_t i : sample) {
      const double x0 = values[i];
      bool flipped = false;
      auto at = [&](double off) {
        values[i] = x0 + off;
        put(p, values);
        MicroBatchStats st;
        const double l = objective(model, tokens, &st);
        // A changed expert load means a changed top-k choice: the loss jumps there.
        if (st.moe[0].min_load != base.moe[0].min_load || st.moe[0].max_load != base.moe[0].max_load) flipped = true;
        return l;
      };
      const double h = 1e-4;
      const double d1 = (at(h) - at(-h)) / (2 * h), d2 = (at(h / 2) - at(-h / 2)) / h;
      values[i] = x0;
      put(p, values);
      // On a smooth stretch d1 - d2 = O(h^2) ~ 1e-9; a top-k switch within the probes makes
      // the two differences disagree by (jump) / h, far more.
      if (flipped || std::fabs(d1 - d2) > 1e-6 * (1 + std::fabs(d2))) continue;
      ++checked;
      const double fd = (4 * d2 - d1) / 3;
      max_fd = std::max(max_fd, std::fabs(fd));
      if (!grad_close(analytic[i], fd, 1e-6, 1e-9)) {
        if (bad < 5) first += fmt::format(" [{}] analytic {:.12g} fd {:.12g};", i, analytic[i], fd);
        ++bad;
      }
    }
    total_checked += checked;
    total_probed += int(sample.size());
    EXPECT_EQ(bad, 0) << ps.name << ": " << bad << " of " << checked << " sampled gradient entries differ:" << first;
    EXPECT_GE(checked, int(0.8 * sample.size())) << ps.name << ": too many probes crossed a routing switch";
    EXPECT_GT(max_fd, 1e-5) << ps.name << ": the objective does not depend on this tensor; the check is vacuous";
  }
  EXPECT_GE(total_checked, int(0.9 * total_probed));
  for (ParamRole r : {ParamRole::EMBEDDING, ParamRole::NORM, ParamRole::DENSE, ParamRole::ROUTER, ParamRole::EXPERT})
    EXPECT_TRUE(seen_roles[int(r)]) << "role " << int(r) << " not covered";
  EXPECT_EQ(seen_roles[int(ParamRole::OUTPUT)], !tied);
  EXPECT_NEAR(objective(model, tokens), l0, 1e-15 * std::fabs(l0)) << "parameters were not restored";
}

INSTANTIATE_TEST_SUITE_P(Configs, ModelGradientTest,
                         ::testing::Values(ModelCase{RouterScore::SOFTMAX, true, true},
                                           ModelCase{RouterScore::SOFTMAX, false, false},
                                           ModelCase{RouterScore::SIGMOID, true, false},
                                           ModelCase{RouterScore::SIGMOID, false, true}),
                         [](const ::testing::TestParamInfo<ModelCase>& info) {
                           return std::string(info.param.score == RouterScore::SOFTMAX ? "softmax" : "sigmoid") +
                                  (info.param.normalize ? "_norm" : "_raw") + (info.param.tied ? "_tied" : "_untied");
                         });

// Parameter gradients accumulate across calls, scaled by loss_scale (the main loss and the
// auxiliary losses alike).
TEST(ModelGradients, AccumulationAndLossScale) {
  const ModelSpec spec = tiny_spec(RouterScore::SIGMOID, true, false);
  GptModel model(spec, be(), DType::F64, 2);
  model.init_parameters(11);
  const auto tokens = make_tokens(spec, 2, 12);
  model.forward_backward(tokens.data(), 1.0);  // starts from zeroed gradients (constructor)
  const auto g1 = get(model.grads());
  model.forward_backward(tokens.data(), 0.5);
  const auto g15 = get(model.grads());
  model.zero_grads();
  for (double v : get(model.grads())) ASSERT_EQ(v, 0.0);
  model.forward_backward(tokens.data(), 0.25);
  const auto g025 = get(model.grads());
  double norm = 0;
  for (size_t i = 0; i < g1.size(); ++i) {
    norm = std::max(norm, std::fabs(g1[i]));
    ASSERT_NEAR(g15[i], 1.5 * g1[i], 1e-13 * (1 + std::fabs(g1[i]))) << i;
    ASSERT_NEAR(g025[i], 0.25 * g1[i], 1e-13 * (1 + std::fabs(g1[i]))) << i;
  }
  EXPECT_GT(norm, 1e-3);
}

// The F32 model computes the same gradients as the F64 one up to float rounding (this also
// covers the F32-only paths of the layers, such as the aux-gradient upload).
TEST(ModelGradients, F32AgreesWithF64) {
  const ModelSpec spec = tiny_spec(RouterScore::SOFTMAX, true, true);
  GptModel m64(spec, be(), DType::F64, 2), m32(spec, be(), DType::F32, 2);
  m64.init_parameters(13);
  m32.init_parameters(13);
  const auto tokens = make_tokens(spec, 2, 14);
  const MicroBatchStats s64 = m64.forward_backward(tokens.data(), 1.0);
  const MicroBatchStats s32 = m32.forward_backward(tokens.data(), 1.0);
  EXPECT_NEAR(s32.loss_sum, s64.loss_sum, 1e-4 * s64.loss_sum);
  EXPECT_NEAR(s32.aux_loss, s64.aux_loss, 1e-4 * s64.aux_loss);
  EXPECT_NEAR(s32.z_loss, s64.z_loss, 1e-4 * s64.z_loss);
  const auto& reg = m64.registry();
  for (size_t id = 0; id < reg.specs().size(); ++id) {
    const auto g64 = get(m64.grad(int(id)));
    std::vector<float> g32(g64.size());
    be().copy_to_host(m32.grad(int(id)), g32.data());
    double scale = 0;
    for (double v : g64) scale = std::max(scale, std::fabs(v));
    ASSERT_GT(scale, 0.0) << reg.spec(int(id)).name;
    for (size_t i = 0; i < g64.size(); ++i)
      ASSERT_NEAR(g32[i], g64[i], 1e-3 * scale) << reg.spec(int(id)).name << " element " << i;
  }
}

// With a large vocabulary the output head runs over chunks of at least 64 rows
// (head_chunk = clamp(2^24 / V, 64, T)); 65 tokens with V = 258112 give chunks of 64 + 1.
// Sequences of a dense model are independent and the loss is a mean over tokens, so the
// chunked gradient must equal (1/5) * the sum of the single-sequence gradients, which
// take the one-chunk path that the finite-difference tests check.
TEST(ModelGradients, ChunkedOutputHeadMatchesPerSequence) {
  ModelSpec spec;
  spec.vocab_size = 258112;
  spec.seq_len = 13;
  spec.dim = 8;
  spec.layers = 1;
  spec.heads = 2;
  spec.ffn_dim = 8;
  spec.init_std = 0.3;
  spec.moe.num_experts = 0;
  const int batch = 5;
  GptModel chunked(spec, be(), DType::F64, batch), single(spec, be(), DType::F64, 1);
  chunked.init_parameters(21);
  single.init_parameters(21);
  perturb_norms(chunked, 22);
  perturb_norms(single, 22);
  auto tokens = make_tokens(spec, batch, 23);
  tokens[batch * (spec.seq_len + 1) - 1] = 17;  // every target counts
  const MicroBatchStats whole = chunked.forward_backward(tokens.data(), 1.0);
  double loss_sum = 0;
  for (int b = 0; b < batch; ++b)
    loss_sum += single.forward_backward(tokens.data() + b * (spec.seq_len + 1), 1.0 / batch).loss_sum;
  EXPECT_NEAR(whole.loss_sum, loss_sum, 1e-12 * loss_sum);
  const auto g_chunked = get(chunked.grads()), g_single = get(single.grads());
  double scale = 0;
  for (double v : g_single) scale = std::max(scale, std::fabs(v));
  ASSERT_GT(scale, 1e-4);
  for (size_t i = 0; i < g_single.size(); ++i)
    ASSERT_NEAR(g_chunked[i], g_single[i], 1e-12 * scale) << "flat gradient element " << i;
}

// Token ids are validated before anything runs; targets < 0 are allowed (ignored).
TEST(ModelInputs, OutOfVocabularyTokensThrow) {
  const ModelSpec spec = tiny_spec();
  GptModel model(spec, be(), DType::F64, 1);
  model.init_parameters(1);
  auto tokens = make_tokens(spec, 1, 2);
  EXPECT_NO_THROW(model.forward_only(tokens.data()));
  for (int pos : {0, 3, spec.seq_len}) {  // the first input, a middle one, the last target only
    for (int32_t bad : {spec.vocab_size, spec.vocab_size + 100}) {
      auto t = tokens;
      t[pos] = bad;
      try {
        model.forward_only(t.data());
        ADD_FAILURE() << "token " << bad << " at " << pos << " accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(std::to_string(bad)), std::string::npos)
            << "the message should name the offending id: " << e.what();
      }
    }
  }
  auto t = tokens;
  t[2] = -5;  // a negative input id (only targets may be negative)
  try {
    model.forward_only(t.data());
    ADD_FAILURE() << "negative input id accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("-5"), std::string::npos)
        << "the message should name the offending id: " << e.what();
  }
}

TEST(ModelInit, NormsOneMatricesScaledAndDeterministic) {
  ModelSpec spec = tiny_spec(RouterScore::SOFTMAX, true, false);
  spec.dim = 64;  // enough elements per tensor for a meaningful standard deviation
  spec.heads = 4;
  spec.init_std = 0.02;
  GptModel a(spec, be(), DType::F64, 1), b(spec, be(), DType::F64, 1), c(spec, be(), DType::F64, 1);
  a.init_parameters(5);
  b.init_parameters(5);
  c.init_parameters(6);
  const auto& reg = a.registry();
  for (size_t id = 0; id < reg.specs().size(); ++id) {
    const ParamSpec& ps = reg.spec(int(id));
    const auto va = get(a.param(int(id))), vb = get(b.param(int(id))), vc = get(c.param(int(id)));
    EXPECT_EQ(va, vb) << ps.name << ": same seed, same values";
    if (ps.role == ParamRole::NORM) {
      for (double v : va) ASSERT_EQ(v, 1.0) << ps.name;
      continue;
    }
    EXPECT_NE(va, vc) << ps.name << ": another seed must change the values";
    double ss = 0;
    for (double v : va) ss += v * v;
    const double sd = std::sqrt(ss / double(va.size()));
    // Output-side projections are scaled down by sqrt(2 * layers) (GPT-2 style).
    const bool out_proj = ps.name.ends_with(".proj") || ps.name.ends_with(".down");
    const double want = out_proj ? 0.02 / std::sqrt(2.0 * spec.layers) : 0.02;
    EXPECT_NEAR(sd, want, 5 * want / std::sqrt(2.0 * double(va.size()))) << ps.name;
  }
  // Tensors get independent streams (derived from their names): same shape, other values.
  int q0 = -1, q1 = -1;
  for (size_t id = 0; id < reg.specs().size(); ++id) {
    if (reg.spec(int(id)).name == "layers.0.attn.qkv") q0 = int(id);
    if (reg.spec(int(id)).name == "layers.1.attn.qkv") q1 = int(id);
  }
  ASSERT_GE(q0, 0);
  ASSERT_GE(q1, 0);
  EXPECT_NE(get(a.param(q0)), get(a.param(q1)));
}

}  // namespace
}  // namespace sdmoe::gradtest
