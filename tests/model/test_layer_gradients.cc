// Sublayers on their own, in F64: forwards against plain-loop references written here
// (attention with RoPE; the MoE layer with routing, experts, shared expert and its
// load-balancing and z-loss statistics), and backwards (input and parameter gradients)
// against central finite differences. Also the routing plan's permutation.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "tests/model/layer_support.h"

namespace sdmoe::gradtest {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- attention --------------------------------------------------------------------------

// out = in + proj(attn(rope(qkv(rmsnorm(in))))) with plain loops.
std::vector<double> attention_reference(const ModelSpec& spec, int64_t batch, const std::vector<double>& in,
                                        const std::vector<double>& norm_w, const std::vector<double>& wqkv,
                                        const std::vector<double>& wproj) {
  const int64_t s = spec.seq_len, d = spec.dim, h = spec.heads, dh = d / h, half = dh / 2, t = batch * s;
  std::vector<double> x(t * d), qkv[3] = {std::vector<double>(t * d), std::vector<double>(t * d),
                                          std::vector<double>(t * d)};
  for (int64_t r = 0; r < t; ++r) {
    double ms = 0;
    for (int64_t c = 0; c < d; ++c) ms += in[r * d + c] * in[r * d + c];
    const double inv = 1.0 / std::sqrt(ms / d + spec.norm_eps);
    for (int64_t c = 0; c < d; ++c) x[r * d + c] = in[r * d + c] * inv * norm_w[c];
    for (int64_t o = 0; o < 3 * d; ++o) {  // output feature o = part * D + head * Dh + e
      double acc = 0;
      for (int64_t c = 0; c < d; ++c) acc += x[r * d + c] * wqkv[o * d + c];
      qkv[o / d][r * d + o % d] = acc;
    }
    const double pos = double(r % s);
    for (int p = 0; p < 2; ++p)  // rotate q and k
      for (int64_t hd = 0; hd < h; ++hd)
        for (int64_t i = 0; i < half; ++i) {
          const double ang = pos * std::pow(spec.rope_theta, -2.0 * double(i) / double(dh));
          double& a = qkv[p][r * d + hd * dh + i];
          double& b = qkv[p][r * d + hd * dh + i + half];
          const double a0 = a, b0 = b;
          a = a0 * std::cos(ang) - b0 * std::sin(ang);
          b = a0 * std::sin(ang) + b0 * std::cos(ang);
        }
  }
  std::vector<double> ctx(t * d, 0.0), out = in;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t hd = 0; hd < h; ++hd)
      for (int64_t i = 0; i < s; ++i) {
        std::vector<double> p(i + 1);
        double mx = -1e300, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double sc = 0;
          for (int64_t e = 0; e < dh; ++e) sc += qkv[0][(b * s + i) * d + hd * dh + e] * qkv[1][(b * s + j) * d + hd * dh + e];
          p[j] = sc / std::sqrt(double(dh));
          mx = std::max(mx, p[j]);
        }
        for (double& v : p) sum += (v = std::exp(v - mx));
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t e = 0; e < dh; ++e)
            ctx[(b * s + i) * d + hd * dh + e] += p[j] / sum * qkv[2][(b * s + j) * d + hd * dh + e];
      }
  for (int64_t r = 0; r < t; ++r)
    for (int64_t o = 0; o < d; ++o)
      for (int64_t c = 0; c < d; ++c) out[r * d + o] += ctx[r * d + c] * wproj[o * d + c];
  return out;
}

struct AttentionHarness {
  ModelSpec spec = tiny_spec();
  int64_t batch = 2, t = 0;
  LayerParams p;
  Attention attn;
  Scratch sc;
  Buffer acts;
  AttentionHarness() {
    t = batch * spec.seq_len;
    attn.declare(p.reg, "layers.0", spec);
    p.allocate();
    attn.bind(p.buffers());
    const LayerDims dims{batch, spec.seq_len, spec.dim, spec.heads, spec.head_dim()};
    Arena planner(Device::CPU);
    attn.plan(planner, dims);
    sc.plan(planner, spec, int(batch), PrecisionPolicy::uniform(DType::F64));
    acts = Buffer(be(), planner.used());
    Arena arena(Device::CPU, acts);
    attn.plan(arena, dims);
    sc.plan(arena, spec, int(batch), PrecisionPolicy::uniform(DType::F64));
  }
};

TEST(LayerForward, AttentionMatchesReference) {
  AttentionHarness a;
  a.p.randomize(100, 0.3);
  const auto in = randn(a.t * a.spec.dim, 101);
  Owned x = make_from({a.t, a.spec.dim}, in), out = make(DType::F64, {a.t, a.spec.dim});
  a.attn.forward(be(), x.t, out.t, a.sc);
  const auto& h = a.p.host;
  const auto want = attention_reference(a.spec, a.batch, in, h[a.p.id_of("layers.0.attn_norm")],
                                        h[a.p.id_of("layers.0.attn.qkv")], h[a.p.id_of("layers.0.attn.proj")]);
  const auto got = get(out.t);
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-12 * (1 + std::fabs(want[i]))) << i;
}

TEST(LayerGradients, Attention) {
  AttentionHarness a;
  a.p.randomize(110, 0.3);
  std::vector<double> in = randn(a.t * a.spec.dim, 111);
  const std::vector<double> c = randn(a.t * a.spec.dim, 112);
  Owned x = make(DType::F64, {a.t, a.spec.dim}), out = make(DType::F64, {a.t, a.spec.dim});
  auto loss = [&] {
    a.p.upload();
    put(x.t, in);
    a.attn.forward(be(), x.t, out.t, a.sc);
    return dot(c, get(out.t));
  };
  loss();
  a.p.zero_grads();
  Owned dres = make_from({a.t, a.spec.dim}, c);
  a.attn.backward(be(), x.t, dres.t, a.sc);  // dres becomes d(in)
  check_fd("attention d(in)", in, get(dres.t), loss);
  for (size_t id = 0; id < a.p.host.size(); ++id)
    check_fd("attention d(" + a.p.reg.spec(int(id)).name + ")", a.p.host[id], get(a.p.grad(int(id))), loss);
}

// ---- dense SwiGLU MLP -------------------------------------------------------------------

TEST(LayerGradients, SwigluMlpWithBeta) {
  const ModelSpec spec = tiny_spec();
  const int64_t t = 6, d = spec.dim, f = spec.ffn_dim;
  LayerParams p;
  SwigluMlp mlp;
  mlp.declare(p.reg, "mlp", d, f, 0.3, 0.3);
  p.allocate();
  mlp.bind(p.buffers());
  Scratch sc;
  Arena planner(Device::CPU);
  mlp.plan(planner, t);
  sc.plan(planner, spec, 1, PrecisionPolicy::uniform(DType::F64));
  Buffer acts(be(), planner.used());
  Arena arena(Device::CPU, acts);
  mlp.plan(arena, t);
  sc.plan(arena, spec, 1, PrecisionPolicy::uniform(DType::F64));
  p.randomize(120, 0.3);
  std::vector<double> hv = randn(t * d, 121);
  const std::vector<double> c = randn(t * d, 122), out0 = randn(t * d, 123), dh0 = randn(t * d, 124);
  Owned h = make(DType::F64, {t, d}), out = make(DType::F64, {t, d});
  auto loss = [&] {
    p.upload();
    put(h.t, hv);
    put(out.t, out0);  // forward adds into out
    mlp.forward(be(), h.t, out.t);
    return dot(c, get(out.t));
  };
  loss();
  // Forward against plain loops: out = out0 + down(silu(gate h) * up h).
  const auto& gu = p.host[p.id_of("mlp.gate_up")];
  const auto& dn = p.host[p.id_of("mlp.down")];
  const auto got = get(out.t);
  for (int64_t r = 0; r < t; ++r) {
    std::vector<double> act(f);
    for (int64_t i = 0; i < f; ++i) {
      double g = 0, u = 0;
      for (int64_t k = 0; k < d; ++k) g += gu[i * d + k] * hv[r * d + k], u += gu[(f + i) * d + k] * hv[r * d + k];
      act[i] = silu(g) * u;
    }
    for (int64_t o = 0; o < d; ++o) {
      double y = out0[r * d + o];
      for (int64_t i = 0; i < f; ++i) y += dn[o * f + i] * act[i];
      ASSERT_NEAR(got[r * d + o], y, 1e-12 * (1 + std::fabs(y)));
    }
  }
  p.zero_grads();
  Owned dout = make_from({t, d}, c), dh = make_from({t, d}, dh0);
  mlp.backward(be(), h.t, dout.t, dh.t, 0.5, sc);  // dh = 0.5 dh0 + d(h)
  std::vector<double> dh_only = get(dh.t);
  for (int64_t i = 0; i < t * d; ++i) dh_only[i] -= 0.5 * dh0[i];
  check_fd("mlp d(h)", hv, dh_only, loss);
  for (size_t id = 0; id < p.host.size(); ++id)
    check_fd("mlp d(" + p.reg.spec(int(id)).name + ")", p.host[id], get(p.grad(int(id))), loss);
}

// ---- MoE --------------------------------------------------------------------------------

struct MoeHarness {
  ModelSpec spec;
  int64_t batch = 2, t = 0;
  LayerParams p;
  MoeFeedForward moe;
  Scratch sc;
  Buffer acts;
  explicit MoeHarness(const ModelSpec& s) : spec(s) {
    t = batch * spec.seq_len;
    moe.declare(p.reg, "layers.1", spec, std::make_shared<TokenDispatcher>(nullptr, nullptr, be(), spec.moe.num_experts));
    p.allocate();
    moe.bind(p.buffers());
    Arena planner(Device::CPU);
    moe.plan(planner, t);
    sc.plan(planner, spec, int(batch), PrecisionPolicy::uniform(DType::F64));
    acts = Buffer(be(), planner.used());
    Arena arena(Device::CPU, acts);
    moe.plan(arena, t);
    sc.plan(arena, spec, int(batch), PrecisionPolicy::uniform(DType::F64));
  }
  const std::vector<double>& host(const std::string& suffix) const { return p.host[p.id_of("layers.1.moe." + suffix)]; }
};

struct MoeReference {
  std::vector<double> out;
  double aux = 0, z = 0, min_load = 1, max_load = 0;
  double min_gap = 1e300;  // smallest logit gap between the k-th and (k+1)-th expert
};

// out = out0 + sum_j w_j expert_j(h) + shared(h); aux = coef * E * sum_e f_e P_e with f_e the
// share of routed (token, slot) pairs and P_e the mean aux probability; z = coef * mean lse^2.
MoeReference moe_reference(const MoeHarness& m, const std::vector<double>& h, const std::vector<double>& out0) {
  const MoeSpec& ms = m.spec.moe;
  const int64_t t = m.t, d = m.spec.dim, e = ms.num_experts, k = ms.top_k, f = ms.expert_ffn_dim,
                fs = ms.shared_expert_ffn_dim;
  const auto &router = m.host("router"), &egu = m.host("experts.gate_up"), &edn = m.host("experts.down"),
             &sgu = m.host("shared_expert.gate_up"), &sdn = m.host("shared_expert.down");
  MoeReference r;
  r.out = out0;
  std::vector<double> counts(e, 0), psum(e, 0);
  double zsum = 0;
  // y += w * down(silu(gate x) * up x) for an MLP with weights gu [2F, D], dn [D, F].
  auto mlp = [&](const double* gu, const double* dn, int64_t ff, const double* x, double w, double* y) {
    for (int64_t i = 0; i < ff; ++i) {
      double g = 0, u = 0;
      for (int64_t c = 0; c < d; ++c) g += gu[i * d + c] * x[c], u += gu[(ff + i) * d + c] * x[c];
      const double a = silu(g) * u;
      for (int64_t o = 0; o < d; ++o) y[o] += w * dn[o * ff + i] * a;
    }
  };
  for (int64_t tok = 0; tok < t; ++tok) {
    const double* x = h.data() + tok * d;
    std::vector<double> z(e), s(e);
    for (int64_t x_e = 0; x_e < e; ++x_e) {
      z[x_e] = 0;
      for (int64_t c = 0; c < d; ++c) z[x_e] += router[x_e * d + c] * x[c];
    }
    const double mx = *std::max_element(z.begin(), z.end());
    double se = 0;
    for (double v : z) se += std::exp(v - mx);
    const double lse = mx + std::log(se);
    for (int64_t x_e = 0; x_e < e; ++x_e)
      s[x_e] = ms.router_score == RouterScore::SOFTMAX ? std::exp(z[x_e] - lse) : 1.0 / (1.0 + std::exp(-z[x_e]));
    std::vector<int> order(e);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] > s[b]; });
    if (k < e) r.min_gap = std::min(r.min_gap, z[order[k - 1]] - z[order[k]]);
    double chosen = 0, all = 0;
    for (int64_t j = 0; j < k; ++j) chosen += s[order[j]];
    for (double v : s) all += v;
    for (int64_t j = 0; j < k; ++j) {
      const int x_e = order[j];
      counts[x_e] += 1;
      mlp(egu.data() + x_e * 2 * f * d, edn.data() + x_e * d * f, f, x, s[x_e] / (ms.normalize_topk ? chosen : 1.0),
          r.out.data() + tok * d);
    }
    mlp(sgu.data(), sdn.data(), fs, x, 1.0, r.out.data() + tok * d);
    for (int64_t x_e = 0; x_e < e; ++x_e) psum[x_e] += ms.router_score == RouterScore::SOFTMAX ? s[x_e] : s[x_e] / all;
    zsum += lse * lse;
  }
  for (int64_t x_e = 0; x_e < e; ++x_e) {
    const double load = counts[x_e] / double(t * k);
    r.aux += load * psum[x_e] / double(t);
    r.min_load = std::min(r.min_load, load);
    r.max_load = std::max(r.max_load, load);
  }
  r.aux *= ms.aux_loss_coef * double(e);
  r.z = ms.z_loss_coef * zsum / double(t);
  return r;
}

struct MoeCase {
  RouterScore score;
  bool normalize;
};
class MoeLayerTest : public ::testing::TestWithParam<MoeCase> {
 protected:
  ModelSpec spec() const { return tiny_spec(GetParam().score, GetParam().normalize); }
};

TEST_P(MoeLayerTest, ForwardAndLossStatsMatchReference) {
  MoeHarness m(spec());
  m.p.randomize(200, 0.3);
  const auto hv = randn(m.t * m.spec.dim, 201), out0 = randn(m.t * m.spec.dim, 202);
  Owned h = make_from({m.t, m.spec.dim}, hv), out = make_from({m.t, m.spec.dim}, out0);
  const MoeStats st = m.moe.forward(be(), h.t, out.t);
  const MoeReference r = moe_reference(m, hv, out0);
  ASSERT_GT(r.min_gap, 1e-9) << "reference saw a tie; pick another seed";
  const auto got = get(out.t);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], r.out[i], 1e-12 * (1 + std::fabs(r.out[i]))) << i;
  EXPECT_NEAR(st.aux_loss, r.aux, 1e-14);
  EXPECT_NEAR(st.z_loss, r.z, 1e-14);
  EXPECT_DOUBLE_EQ(st.min_load, r.min_load);
  EXPECT_DOUBLE_EQ(st.max_load, r.max_load);
  EXPECT_GT(r.aux, 0.0);
  EXPECT_LT(r.min_load, r.max_load) << "unbalanced routing makes the load statistics informative";
}

// h with a clear top-k margin for every token, so that no finite-difference probe (steps up
// to 1e-4 in h or the router) can change an expert choice.
std::vector<double> separated_input(const MoeHarness& m, uint64_t seed) {
  for (uint64_t s = seed; s < seed + 200; ++s) {
    auto hv = randn(m.t * m.spec.dim, s);
    if (moe_reference(m, hv, std::vector<double>(m.t * m.spec.dim, 0.0)).min_gap > 5e-3) return hv;
  }
  ADD_FAILURE() << "no input with separated routing found";
  return {};
}

TEST_P(MoeLayerTest, BackwardMatchesFiniteDifferences) {
  MoeHarness m(spec());
  m.p.randomize(210, 0.3);
  std::vector<double> hv = separated_input(m, 211);
  const std::vector<double> c = randn(m.t * m.spec.dim, 212), out0 = randn(m.t * m.spec.dim, 213);
  Owned h = make(DType::F64, {m.t, m.spec.dim}), out = make(DType::F64, {m.t, m.spec.dim});
  // L = <c, out> + aux + z: the layer's output and its two auxiliary losses.
  auto loss = [&] {
    m.p.upload();
    put(h.t, hv);
    put(out.t, out0);
    const MoeStats st = m.moe.forward(be(), h.t, out.t);
    return dot(c, get(out.t)) + st.aux_loss + st.z_loss;
  };
  loss();
  m.p.zero_grads();
  Owned dout = make_from({m.t, m.spec.dim}, c), dh = make(DType::F64, {m.t, m.spec.dim});
  be().fill(dh.t, kNaN);  // assigned
  m.moe.backward(be(), h.t, dout.t, dh.t, 1.0, m.sc);
  check_fd("moe d(h)", hv, get(dh.t), loss);
  for (size_t id = 0; id < m.p.host.size(); ++id)
    check_fd("moe d(" + m.p.reg.spec(int(id)).name + ")", m.p.host[id], get(m.p.grad(int(id))), loss);
}

// The load-balancing and z-loss gradients alone (no output gradient), with coefficients
// large enough that an error in those paths cannot hide behind the main loss.
TEST_P(MoeLayerTest, AuxAndZLossGradientsAlone) {
  ModelSpec s = spec();
  s.moe.aux_loss_coef = 1.0;
  s.moe.z_loss_coef = 0.5;
  MoeHarness m(s);
  m.p.randomize(220, 0.3);
  std::vector<double> hv = separated_input(m, 221);
  Owned h = make(DType::F64, {m.t, m.spec.dim}), out = make(DType::F64, {m.t, m.spec.dim});
  auto loss = [&] {
    m.p.upload();
    put(h.t, hv);
    be().fill(out.t, 0.0);
    const MoeStats st = m.moe.forward(be(), h.t, out.t);
    return st.aux_loss + st.z_loss;
  };
  loss();
  m.p.zero_grads();
  Owned dout = make(DType::F64, {m.t, m.spec.dim}), dh = make(DType::F64, {m.t, m.spec.dim});
  be().fill(dout.t, 0.0);
  m.moe.backward(be(), h.t, dout.t, dh.t, 1.0, m.sc);
  const int router = m.p.id_of("layers.1.moe.router");
  check_fd("aux+z d(h)", hv, get(dh.t), loss);
  check_fd("aux+z d(router)", m.p.host[router], get(m.p.grad(router)), loss);
  for (size_t id = 0; id < m.p.host.size(); ++id)
    if (int(id) != router)
      for (double g : get(m.p.grad(int(id)))) ASSERT_EQ(g, 0.0) << m.p.reg.spec(int(id)).name;
}

// loss_scale scales the auxiliary gradients as the caller's d_out scale does the main one:
// (d_out = 2c, loss_scale = 2) must give exactly twice the gradients of (c, 1).
TEST_P(MoeLayerTest, LossScaleScalesEveryGradient) {
  MoeHarness m(spec());
  m.p.randomize(230, 0.3);
  const auto hv = randn(m.t * m.spec.dim, 231), c = randn(m.t * m.spec.dim, 232);
  std::vector<double> c2 = c;
  for (double& v : c2) v *= 2;
  Owned h = make_from({m.t, m.spec.dim}, hv), out = make(DType::F64, {m.t, m.spec.dim}),
        dh = make(DType::F64, {m.t, m.spec.dim});
  std::vector<std::vector<double>> grads[2], dhs[2];
  for (int run = 0; run < 2; ++run) {
    be().fill(out.t, 0.0);
    m.moe.forward(be(), h.t, out.t);
    m.p.zero_grads();
    Owned dout = make_from({m.t, m.spec.dim}, run ? c2 : c);
    m.moe.backward(be(), h.t, dout.t, dh.t, run ? 2.0 : 1.0, m.sc);
    dhs[run].push_back(get(dh.t));
    for (size_t id = 0; id < m.p.host.size(); ++id) grads[run].push_back(get(m.p.grad(int(id))));
  }
  grads[0].push_back(dhs[0][0]);
  grads[1].push_back(dhs[1][0]);
  for (size_t i = 0; i < grads[0].size(); ++i)
    for (size_t j = 0; j < grads[0][i].size(); ++j)
      ASSERT_NEAR(grads[1][i][j], 2 * grads[0][i][j], 1e-13 * (1 + std::fabs(grads[0][i][j]))) << i << " " << j;
}

INSTANTIATE_TEST_SUITE_P(Routers, MoeLayerTest,
                         ::testing::Values(MoeCase{RouterScore::SOFTMAX, true}, MoeCase{RouterScore::SOFTMAX, false},
                                           MoeCase{RouterScore::SIGMOID, true}, MoeCase{RouterScore::SIGMOID, false}),
                         [](const ::testing::TestParamInfo<MoeCase>& info) {
                           return std::string(info.param.score == RouterScore::SOFTMAX ? "softmax" : "sigmoid") +
                                  (info.param.normalize ? "_norm" : "_raw");
                         });

// ---- routing plan -----------------------------------------------------------------------

TEST(RoutingPlan, StableCountingSortByExpert) {
  const int64_t t = 6;
  const int k = 2, e = 5;  // expert 3 receives nothing
  const std::vector<int32_t> topk = {4, 0, 0, 2, 1, 4, 2, 0, 4, 1, 0, 2};
  RoutingPlan plan;
  plan.build(topk, t, k, e);
  // Expected: rows grouped by expert in expert order, tokens ascending within an expert.
  std::vector<int32_t> want_row_token;
  std::vector<int64_t> want_offset = {0};
  std::vector<int32_t> want_slot(t * k, -1);
  for (int x = 0; x < e; ++x) {
    for (int64_t tok = 0; tok < t; ++tok)
      for (int j = 0; j < k; ++j)
        if (topk[tok * k + j] == x) {
          want_slot[tok * k + j] = static_cast<int32_t>(want_row_token.size());
          want_row_token.push_back(static_cast<int32_t>(tok));
        }
    want_offset.push_back(static_cast<int64_t>(want_row_token.size()));
  }
  EXPECT_EQ(plan.expert_offset, want_offset);
  EXPECT_EQ(plan.row_token, want_row_token);
  EXPECT_EQ(plan.slot_row, want_slot);
  EXPECT_EQ(plan.expert_offset[4] - plan.expert_offset[3], 0);
  // Rebuilding reuses the vectors without leftovers.
  const std::vector<int32_t> topk2 = {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0};
  plan.build(topk2, t, k, e);
  EXPECT_EQ(plan.expert_offset, (std::vector<int64_t>{0, 6, 12, 12, 12, 12}));
  for (int64_t tok = 0; tok < t; ++tok) {
    EXPECT_EQ(plan.slot_row[tok * k + 0], 6 + tok);
    EXPECT_EQ(plan.slot_row[tok * k + 1], tok);
  }
}

}  // namespace
}  // namespace sdmoe::gradtest
