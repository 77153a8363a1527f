// SD-MoE on the CPU backend in F64: the invariants of the method (docs/sdmoe.md), each
// against dense projector matrices P_U = U U^T, P_V = V V^T built here, never against the
// O(mnk) code path under test.
//   1. G_C + G_U = G, with G_C = P_U G + (I - P_U) G P_V computed densely.
//   2. Between refreshes the unique part stays in the double complement, and both parts
//      follow a dense reference of the per-part AdamW with projected updates.
//   3. A refresh leaves W_eff unchanged and re-splits the first moments.
//   4. With plain SGD and equal multipliers SD-MoE follows the plain MoE trajectory.
//   5. Subspace iteration agrees with the exact solver (largest principal angle).
// (6, independence from how jobs are spread over ranks, runs under MPI in
// tests/layout/test_spectral_service.cc.)
// Every test runs on two models (LayerCase): tiny_spec, a dense layer then one MoE layer,
// with no routers given to the service; and tiny_dense_first_spec, a dense layer then MoE
// layers 1 and 2, with the routers passed as launcher/trainer.cc passes them. The metrics
// must name the model layer of each target and measure each layer against its own router.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <ostream>
#include <set>
#include <string>
#include <utility>

#include "model/optimizer.h"
#include "model/sdmoe.h"
#include "model/spectral_service.h"
#include "tests/model/layer_support.h"

namespace sdmoe::gradtest {
namespace {

constexpr int kRank = 3;

// ---- dense helpers (row-major, double) ---------------------------------------------------
using Mat = std::vector<double>;

Mat matmul(const Mat& a, const Mat& b, int64_t m, int64_t k, int64_t n) {
  Mat c(size_t(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p)
      for (int64_t j = 0; j < n; ++j) c[i * n + j] += a[i * k + p] * b[p * n + j];
  return c;
}

// P = B^T B for a row basis B [k, L].
Mat projector(const Mat& rows, int64_t length) {
  Mat p(size_t(length * length), 0.0);
  for (int r = 0; r < kRank; ++r)
    for (int64_t i = 0; i < length; ++i)
      for (int64_t j = 0; j < length; ++j) p[i * length + j] += rows[r * length + i] * rows[r * length + j];
  return p;
}

Mat identity_minus(const Mat& p, int64_t n) {
  Mat q(p.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) q[i * n + j] = (i == j ? 1.0 : 0.0) - p[i * n + j];
  return q;
}

double max_abs(const Mat& a) {
  double m = 0.0;
  for (double x : a) m = std::max(m, std::fabs(x));
  return m;
}

double max_diff(const Mat& a, const Mat& b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

Mat slice(const Mat& flat, int64_t offset, int64_t count) { return Mat(flat.begin() + offset, flat.begin() + offset + count); }

// The dense split of one matrix under the bases (Ut [k,m], Vt [k,n]).
struct DenseSplit {
  Mat pu, pv, qu, qv;  // projectors and complements
  int64_t m, n;
  Mat unique(const Mat& x) const { return matmul(matmul(qu, x, m, m, n), qv, m, n, n); }
  Mat common(const Mat& x) const {
    Mat u = unique(x), c(x.size());
    for (size_t i = 0; i < x.size(); ++i) c[i] = x[i] - u[i];
    return c;
  }
};

DenseSplit dense_split(const Mat& bases, const SpectralTarget& t, int64_t e) {
  const int64_t pick = t.bases > 1 ? e : 0;
  DenseSplit d;
  d.m = t.m;
  d.n = t.n;
  d.pu = projector(slice(bases, t.ut_offset + pick * kRank * t.m, kRank * t.m), t.m);
  d.pv = projector(slice(bases, t.vt_offset + pick * kRank * t.n, kRank * t.n), t.n);
  d.qu = identity_minus(d.pu, t.m);
  d.qv = identity_minus(d.pv, t.n);
  return d;
}

// ---- a tiny MoE model with SD-MoE ------------------------------------------------------------
SdmoeSpec sdmoe_spec(SdmoeBasis basis = SdmoeBasis::PER_EXPERT, SdmoeSolver solver = SdmoeSolver::EXACT) {
  SdmoeSpec s;
  s.enabled = true;
  s.rank = kRank;
  s.basis = basis;
  s.solver = solver;
  return s;
}

// A model to run the tests on. moe_layers: its MoE layers by the spec's definition
// (first_dense_layers, layer_freq), written out here.
struct LayerCase {
  std::string name;
  ModelSpec model;
  bool routers = false;  // give the service the router ids, as the trainer does
  std::vector<int> moe_layers;
};

void PrintTo(const LayerCase& c, std::ostream* os) { *os << c.name; }

std::vector<LayerCase> layer_cases() {
  return {{"OneMoeLayer", tiny_spec(), false, {1}}, {"DenseFirstTwoMoeLayers", tiny_dense_first_spec(), true, {1, 2}}};
}

// The router ids as launcher/trainer.cc builds them: one slot per model layer, the ROUTER
// parameter named "layers.<l>...." at l, -1 elsewhere.
std::vector<int> trainer_routers(const ParamRegistry& reg, int layers) {
  std::vector<int> routers(size_t(layers), -1);
  for (size_t id = 0; id < reg.specs().size(); ++id) {
    const ParamSpec& ps = reg.spec(int(id));
    int layer = -1;
    if (ps.role == ParamRole::ROUTER && std::sscanf(ps.name.c_str(), "layers.%d.", &layer) == 1) routers[layer] = int(id);
  }
  return routers;
}

struct SdmoeModel {
  GptModel model;
  SpectralDecomposition sd;
  AdamW opt;
  SpectralService service;
  SdmoeModel(const LayerCase& c, const SdmoeSpec& spec, const OptimizerSpec& os, uint64_t seed = 11)
      : model(c.model, be(), DType::F64, 1),
        sd((model.init_parameters(seed), be()), DType::F64, model.registry(), spec),
        opt(model, os, {}, &sd),
        service(sd, model.registry(), model.params(), model.grads(),
                c.routers ? trainer_routers(model.registry(), c.model.layers) : std::vector<int>{}, nullptr, nullptr) {}
  int64_t offset(const SpectralTarget& t, int64_t e) const {
    return model.registry().spec(t.param_id).offset + t.first + e * t.stride;
  }
};

OptimizerSpec test_optimizer() {
  OptimizerSpec os;
  os.lr = 3e-2;
  os.min_lr = 3e-2;
  os.warmup_steps = 0;
  os.total_steps = 100;
  os.weight_decay = 0.1;
  os.grad_clip = 0.0;
  return os;
}

void random_expert_grads(SdmoeModel& s, uint64_t seed) {
  s.model.zero_grads();
  for (size_t id = 0; id < s.model.registry().specs().size(); ++id) {
    const ParamSpec& ps = s.model.registry().spec(int(id));
    if (ps.role == ParamRole::EXPERT) put(s.model.grad(int(id)), randn(ps.numel, seed + id, 0.5));
  }
}

int param_named(const SdmoeModel& s, const std::string& name) {
  for (size_t id = 0; id < s.model.registry().specs().size(); ++id)
    if (s.model.registry().spec(int(id)).name == name) return int(id);
  ADD_FAILURE() << "no parameter named " << name;
  return 0;
}

// What every refresh must report on the case's model: one entry per target, in target
// order, naming the target's model layer (so exactly the MoE layers appear); gradient
// metrics from step 1 on; a router alignment in [0, 1] for gate and up where the service
// has the routers, NaN elsewhere.
void expect_layer_metrics(const SdmoeModel& s, const LayerCase& c, const RefreshReport& r, bool gradients) {
  ASSERT_EQ(r.metrics.size(), s.sd.targets().size());
  std::set<int> layers;
  for (size_t ti = 0; ti < r.metrics.size(); ++ti) {
    const SpectralMetrics& m = r.metrics[ti];
    const SpectralTarget& t = s.sd.targets()[ti];
    const std::string where = c.name + ", refresh " + std::to_string(r.step) + ", layer " + std::to_string(m.layer) +
                              " " + sdmoe_matrix_name(m.matrix);
    EXPECT_EQ(m.layer, t.layer) << where;
    EXPECT_TRUE(m.matrix == t.matrix) << where;
    layers.insert(m.layer);
    EXPECT_EQ(m.has_gradients, gradients) << where;
    EXPECT_EQ(std::isfinite(m.grad_overlap_left), gradients) << where;
    EXPECT_EQ(std::isfinite(m.grad_overlap_right), gradients) << where;
    const bool router = c.routers && m.matrix != SdmoeMatrix::DOWN;
    EXPECT_EQ(m.has_router, router) << where;
    if (router) {
      EXPECT_TRUE(std::isfinite(m.router_alignment)) << where;
      EXPECT_GE(m.router_alignment, 0.0) << where;
      EXPECT_LE(m.router_alignment, 1.0 + 1e-9) << where;
    } else {
      EXPECT_TRUE(std::isnan(m.router_alignment)) << where;
    }
  }
  EXPECT_EQ(layers, std::set<int>(c.moe_layers.begin(), c.moe_layers.end())) << c.name << ", refresh " << r.step;
}

class SdmoeLayerTest : public ::testing::TestWithParam<LayerCase> {};
class SdmoeInvariants : public SdmoeLayerTest {};
class SdmoeMetrics : public SdmoeLayerTest {};
class SdmoeService : public SdmoeLayerTest {};
std::string case_name(const ::testing::TestParamInfo<LayerCase>& info) { return info.param.name; }
INSTANTIATE_TEST_SUITE_P(Layers, SdmoeInvariants, ::testing::ValuesIn(layer_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Layers, SdmoeMetrics, ::testing::ValuesIn(layer_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Layers, SdmoeService, ::testing::ValuesIn(layer_cases()), case_name);

TEST_P(SdmoeInvariants, TargetsCoverEveryMoeLayerAndRoutersAreTheTrainers) {
  // The other tests cover every layer only if the targets do: each matrix type of each MoE
  // layer, inside that layer's experts.
  const LayerCase& c = GetParam();
  SdmoeModel s(c, sdmoe_spec(), test_optimizer());
  std::vector<std::pair<int, int>> want, got;
  for (int l : c.moe_layers)
    for (SdmoeMatrix m : {SdmoeMatrix::GATE, SdmoeMatrix::UP, SdmoeMatrix::DOWN}) want.push_back({l, int(m)});
  for (const SpectralTarget& t : s.sd.targets()) {
    got.push_back({t.layer, int(t.matrix)});
    const std::string prefix = "layers." + std::to_string(t.layer) + ".moe.experts.";
    EXPECT_EQ(s.model.registry().spec(t.param_id).name.rfind(prefix, 0), 0u) << s.model.registry().spec(t.param_id).name;
  }
  std::sort(got.begin(), got.end());
  EXPECT_EQ(got, want);
  // The routers the service gets: each MoE layer's own, -1 at the dense layers.
  const std::vector<int> routers = trainer_routers(s.model.registry(), c.model.layers);
  ASSERT_EQ(routers.size(), size_t(c.model.layers));
  for (int l = 0; l < c.model.layers; ++l) {
    if (std::find(c.moe_layers.begin(), c.moe_layers.end(), l) == c.moe_layers.end()) {
      EXPECT_EQ(routers[l], -1) << "layer " << l;
      continue;
    }
    ASSERT_GE(routers[l], 0) << "layer " << l;
    EXPECT_EQ(s.model.registry().spec(routers[l]).name, "layers." + std::to_string(l) + ".moe.router");
  }
}

TEST_P(SdmoeInvariants, GradientSplitSumsToTheGradient) {
  SdmoeModel s(GetParam(), sdmoe_spec(), test_optimizer());
  s.service.refresh(0, s.opt.first_moments());
  random_expert_grads(s, 5);
  const Mat bases = get(s.sd.bases()), grads = get(s.model.grads());
  ASSERT_FALSE(s.sd.targets().empty());
  for (const SpectralTarget& t : s.sd.targets()) {
    const Tensor out = s.sd.projector().scratch(0, t);
    s.sd.projector().project_unique(t, s.sd.bases(), s.model.grads(), s.offset(t, 0), t.stride, out);
    const Mat unique_all = get(out);
    for (int64_t e = 0; e < t.experts; ++e) {
      const DenseSplit d = dense_split(bases, t, e);
      const Mat g = slice(grads, s.offset(t, e), t.m * t.n), gu = slice(unique_all, e * t.m * t.n, t.m * t.n);
      // G_C = P_U G + (I - P_U) G P_V, densely.
      const Mat a = matmul(d.pu, g, t.m, t.m, t.n), b = matmul(matmul(d.qu, g, t.m, t.m, t.n), d.pv, t.m, t.n, t.n);
      Mat sum(g.size());
      for (size_t i = 0; i < g.size(); ++i) sum[i] = a[i] + b[i] + gu[i];
      EXPECT_LT(max_diff(sum, g), 1e-12 * max_abs(g)) << sdmoe_matrix_name(t.matrix) << " expert " << e;
      // Both parts carry real mass: the split is not trivial.
      EXPECT_GT(max_abs(gu), 0.1 * max_abs(g));
      EXPECT_GT(max_abs(a), 0.01 * max_abs(g));
    }
  }
}

// The dense reference of one optimizer step of one part: AdamW on the part's gradient with
// its own moments; returns -lr x direction.
Mat adam_direction(const Mat& g, Mat& m, Mat& v, const OptimizerSpec& os, double lr, int t) {
  Mat a(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    m[i] = os.beta1 * m[i] + (1 - os.beta1) * g[i];
    v[i] = os.beta2 * v[i] + (1 - os.beta2) * g[i] * g[i];
    const double mhat = m[i] / (1 - std::pow(os.beta1, t)), vhat = v[i] / (1 - std::pow(os.beta2, t));
    a[i] = -lr * mhat / (std::sqrt(vhat) + os.eps);
  }
  return a;
}

TEST_P(SdmoeInvariants, PartsFollowTheDenseReferenceAndTheTailStaysInTheComplement) {
  SdmoeSpec spec = sdmoe_spec();
  spec.lr_mult_common = 1.0;
  spec.lr_mult_unique = 0.5;  // unequal: the decay of each part goes with its own rate
  spec.matrices = {SdmoeMatrix::GATE, SdmoeMatrix::DOWN};  // UP takes the plain update
  const OptimizerSpec os = test_optimizer();
  SdmoeModel s(GetParam(), spec, os);
  s.service.refresh(0, s.opt.first_moments());
  const Mat bases = get(s.sd.bases());
  const Mat w0 = get(s.model.params());

  struct Ref {
    Mat wc, wu, mc, vc, mu, vu;
  };
  std::vector<std::vector<Ref>> ref;
  for (const SpectralTarget& t : s.sd.targets()) {
    ref.emplace_back();
    for (int64_t e = 0; e < t.experts; ++e) {
      const DenseSplit d = dense_split(bases, t, e);
      const Mat w = slice(w0, s.offset(t, e), t.m * t.n);
      const Mat zero(w.size(), 0.0);
      ref.back().push_back({d.common(w), d.unique(w), zero, zero, zero, zero});
    }
  }
  // The plain AdamW reference for the UP rows (not selected) of every MoE layer's gate_up
  // [E, 2, F, D]: expert e's up rows at offset + (2e + 1) F D.
  struct UpRef {
    int64_t offset, experts, f, d;
    Mat w, m, v;
    int64_t at(int64_t e) const { return offset + (2 * e + 1) * f * d; }
  };
  const ParamRegistry& reg = s.model.registry();
  std::vector<UpRef> ups;
  for (const SpectralTarget& t : s.sd.targets()) {
    if (t.matrix != SdmoeMatrix::GATE) continue;
    const ParamSpec& ps = reg.spec(t.param_id);
    UpRef u{ps.offset, ps.shape[0], ps.shape[2], ps.shape[3], {}, {}, {}};
    for (int64_t e = 0; e < u.experts; ++e) {
      const Mat part = slice(w0, u.at(e), u.f * u.d);
      u.w.insert(u.w.end(), part.begin(), part.end());
    }
    u.m.assign(u.w.size(), 0.0);
    u.v.assign(u.w.size(), 0.0);
    ups.push_back(std::move(u));
  }
  ASSERT_EQ(ups.size(), GetParam().moe_layers.size()) << "one gate_up per MoE layer";

  for (int step = 0; step < 3; ++step) {
    random_expert_grads(s, 100 + step);
    const Mat grads = get(s.model.grads());
    s.opt.step(step);
    const double lr = learning_rate(os, step), lr_c = lr * spec.lr_mult_common, lr_u = lr * spec.lr_mult_unique;
    for (size_t ti = 0; ti < s.sd.targets().size(); ++ti) {
      const SpectralTarget& t = s.sd.targets()[ti];
      for (int64_t e = 0; e < t.experts; ++e) {
        const DenseSplit ds = dense_split(bases, t, e);
        Ref& r = ref[ti][e];
        const Mat g = slice(grads, s.offset(t, e), t.m * t.n);
        const Mat gc = ds.common(g), gu = ds.unique(g);
        const Mat ac = ds.common(adam_direction(gc, r.mc, r.vc, os, lr_c, step + 1));
        const Mat au = ds.unique(adam_direction(gu, r.mu, r.vu, os, lr_u, step + 1));
        for (size_t i = 0; i < g.size(); ++i) {
          r.wc[i] += ac[i] - lr_c * os.weight_decay * r.wc[i];
          r.wu[i] += au[i] - lr_u * os.weight_decay * r.wu[i];
        }
      }
    }
    for (UpRef& u : ups)
      for (int64_t e = 0; e < u.experts; ++e)
        for (int64_t i = 0; i < u.f * u.d; ++i) {
          const size_t j = size_t(e * u.f * u.d + i);
          Mat g1{grads[u.at(e) + i]}, m1{u.m[j]}, v1{u.v[j]};
          const double a = adam_direction(g1, m1, v1, os, lr, step + 1)[0];
          u.m[j] = m1[0];
          u.v[j] = v1[0];
          u.w[j] += a - lr * os.weight_decay * u.w[j];
        }
  }
  const Mat w = get(s.model.params());
  for (size_t ti = 0; ti < s.sd.targets().size(); ++ti) {
    const SpectralTarget& t = s.sd.targets()[ti];
    for (int64_t e = 0; e < t.experts; ++e) {
      const DenseSplit ds = dense_split(bases, t, e);
      const Ref& r = ref[ti][e];
      const Mat we = slice(w, s.offset(t, e), t.m * t.n);
      const Mat unique = ds.unique(we), common = ds.common(we);
      const double scale = max_abs(we);
      const std::string where = "layer " + std::to_string(t.layer) + " " + sdmoe_matrix_name(t.matrix) + " expert " +
                                std::to_string(e);
      EXPECT_LT(max_diff(unique, r.wu), 1e-12 * scale) << where << ": W_U";
      EXPECT_LT(max_diff(common, r.wc), 1e-12 * scale) << where << ": W_C";
      // Invariant 2: P_U W_U = 0 and W_U P_V = 0 to rounding.
      EXPECT_LT(max_abs(matmul(ds.pu, unique, t.m, t.m, t.n)), 1e-13 * scale) << where;
      EXPECT_LT(max_abs(matmul(unique, ds.pv, t.m, t.n, t.n)), 1e-13 * scale) << where;
    }
  }
  for (const UpRef& u : ups)
    for (int64_t e = 0; e < u.experts; ++e) {
      const Mat got = slice(w, u.at(e), u.f * u.d);
      EXPECT_LT(max_diff(got, slice(u.w, e * u.f * u.d, u.f * u.d)), 1e-13)
          << "up rows of expert " << e << " at offset " << u.offset << " (plain AdamW)";
    }
}

TEST_P(SdmoeInvariants, RefreshKeepsWeightsAndResplitsFirstMoments) {
  SdmoeModel s(GetParam(), sdmoe_spec(), test_optimizer());
  s.service.refresh(0, s.opt.first_moments());
  for (int step = 0; step < 3; ++step) {
    random_expert_grads(s, 300 + step);
    s.opt.step(step);
  }
  const Mat w_before = get(s.model.params()), m_before = get(s.opt.first_moments());
  const Mat v_before = get(s.opt.second_moments()), bases_before = get(s.sd.bases());
  std::vector<Mat> mu_before, vu_before;
  for (size_t ti = 0; ti < s.sd.targets().size(); ++ti)
    for (int64_t e = 0; e < s.sd.targets()[ti].experts; ++e) {
      mu_before.push_back(get(s.sd.unique_m(ti, e)));
      vu_before.push_back(get(s.sd.unique_v(ti, e)));
    }
  s.service.refresh(3, s.opt.first_moments());
  EXPECT_EQ(get(s.model.params()), w_before) << "a refresh must not touch W_eff";
  EXPECT_EQ(get(s.opt.second_moments()), v_before) << "second moments are kept";
  const Mat bases = get(s.sd.bases()), m_after = get(s.opt.first_moments());
  size_t index = 0;
  std::map<int, double> moved;  // by layer
  for (size_t ti = 0; ti < s.sd.targets().size(); ++ti) {
    const SpectralTarget& t = s.sd.targets()[ti];
    for (int64_t e = 0; e < t.experts; ++e, ++index) {
      const DenseSplit ds = dense_split(bases, t, e);
      const Mat w = slice(w_before, s.offset(t, e), t.m * t.n);
      // W = W_C' + W_U' under the new bases (dense), and the new tail is in the complement.
      const Mat wu = ds.unique(w), wc = ds.common(w);
      Mat sum(w.size());
      for (size_t i = 0; i < w.size(); ++i) sum[i] = wc[i] + wu[i];
      EXPECT_LT(max_diff(sum, w), 1e-13 * max_abs(w));
      // First moments: the sum kept, split by the new projections.
      const Mat mc_old = slice(m_before, s.offset(t, e), t.m * t.n);
      Mat total(mc_old.size());
      for (size_t i = 0; i < total.size(); ++i) total[i] = mc_old[i] + mu_before[index][i];
      const Mat mu_new = get(s.sd.unique_m(ti, e)), mc_new = slice(m_after, s.offset(t, e), t.m * t.n);
      EXPECT_LT(max_diff(mu_new, ds.unique(total)), 1e-13 * max_abs(total));
      EXPECT_LT(max_diff(mc_new, ds.common(total)), 1e-13 * max_abs(total));
      EXPECT_EQ(get(s.sd.unique_v(ti, e)), vu_before[index]);
      // The bases did move (the weights changed since step 0).
      const DenseSplit old = dense_split(bases_before, t, e);
      moved[t.layer] = std::max(moved[t.layer], max_diff(old.pu, ds.pu));
    }
  }
  for (int l : GetParam().moe_layers) EXPECT_GT(moved[l], 1e-6) << "layer " << l;
}

TEST_P(SdmoeInvariants, SgdWithEqualMultipliersFollowsPlainMoe) {
  OptimizerSpec os = test_optimizer();
  os.sgd = true;
  os.weight_decay = 0.0;
  os.grad_clip = 1.0;  // clipping scales both the same way
  const ModelSpec spec = GetParam().model;
  GptModel plain(spec, be(), DType::F64, 1);
  plain.init_parameters(21);
  AdamW plain_opt(plain, os);
  for (SdmoeBasis basis : {SdmoeBasis::PER_EXPERT, SdmoeBasis::LAYER_SHARED}) {
    plain.init_parameters(21);
    SdmoeSpec sspec = sdmoe_spec(basis);
    sspec.refresh_interval = 2;
    SdmoeModel s(GetParam(), sspec, os, 21);
    s.service.refresh(0, s.opt.first_moments());
    const Mat start = get(s.model.params());
    const auto tokens_all = randn(8 * (spec.seq_len + 1), 77);
    for (int step = 0; step < 6; ++step) {
      std::vector<int32_t> tokens(spec.seq_len + 1);
      for (int i = 0; i <= spec.seq_len; ++i)
        tokens[i] = int32_t(std::fabs(tokens_all[step * (spec.seq_len + 1) + i]) * 1000) % spec.vocab_size;
      plain.zero_grads();
      s.model.zero_grads();
      plain.forward_backward(tokens.data(), 1.0);
      s.model.forward_backward(tokens.data(), 1.0);
      plain_opt.step(step);
      s.opt.step(step);
      if (s.service.due(step + 1)) s.service.refresh(step + 1, s.opt.first_moments());
    }
    // Parameter by parameter (the padding between tensors is never written).
    Mat a, b;
    for (size_t id = 0; id < plain.registry().specs().size(); ++id) {
      const Mat x = get(plain.param(int(id))), y = get(s.model.param(int(id)));
      a.insert(a.end(), x.begin(), x.end());
      b.insert(b.end(), y.begin(), y.end());
    }
    EXPECT_LT(max_diff(a, b), 1e-12 * max_abs(a)) << (basis == SdmoeBasis::PER_EXPERT ? "per expert" : "layer shared");
    plain.init_parameters(21);
    Mat initial;
    for (size_t id = 0; id < plain.registry().specs().size(); ++id) {
      const Mat x = get(plain.param(int(id)));
      initial.insert(initial.end(), x.begin(), x.end());
    }
    EXPECT_GT(max_diff(initial, a), 1e-4) << "the trajectory must actually move";
    // And the experts of every MoE layer move with it (so each layer's SD-MoE update is compared).
    const Mat final_params = get(s.model.params());
    std::map<int, double> expert_moved;
    for (const SpectralTarget& t : s.sd.targets())
      for (int64_t e = 0; e < t.experts; ++e) {
        const double moved = max_diff(slice(start, s.offset(t, e), t.m * t.n), slice(final_params, s.offset(t, e), t.m * t.n));
        expert_moved[t.layer] = std::max(expert_moved[t.layer], moved);
      }
    for (int l : GetParam().moe_layers) EXPECT_GT(expert_moved[l], 1e-8) << "layer " << l;
  }
}

// Expert matrices with a planted spectrum: singular values 10, 9, 8 then at most 1, so the
// top-3 subspaces are well separated, as in trained experts. same_bases: every expert of a
// matrix type gets the same singular vectors (a layer-shared dominant subspace).
// The columns of q [rows, cols] made orthonormal in place by Gram-Schmidt, which keeps the
// span of every leading group of columns.
void orthonormalize_columns(Mat& q, int64_t rows, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t p = 0; p < c; ++p) {
      double dot = 0;
      for (int64_t i = 0; i < rows; ++i) dot += q[i * cols + c] * q[i * cols + p];
      for (int64_t i = 0; i < rows; ++i) q[i * cols + c] -= dot * q[i * cols + p];
    }
    double norm = 0;
    for (int64_t i = 0; i < rows; ++i) norm += q[i * cols + c] * q[i * cols + c];
    for (int64_t i = 0; i < rows; ++i) q[i * cols + c] /= std::sqrt(norm);
  }
}

// rows x cols with orthonormal columns, from a random matrix.
Mat orthonormal_columns(int64_t rows, int64_t cols, uint64_t seed) {
  Mat q = randn(rows * cols, seed);
  orthonormalize_columns(q, rows, cols);
  return q;
}

// W = A diag(sigma) B^T (A [m, r], B [n, r] orthonormal columns, r = min(m, n)).
Mat planted_matrix(const Mat& a, const Mat& b, int64_t m, int64_t n, const std::function<double(int64_t)>& sigma) {
  const int64_t r = std::min(m, n);
  Mat w(size_t(m * n), 0.0);
  for (int64_t c = 0; c < r; ++c)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) w[i * n + j] += sigma(c) * a[i * r + c] * b[j * r + c];
  return w;
}

Tensor expert_view(const SdmoeModel& s, const Tensor& flat, const SpectralTarget& t, int64_t e) {
  return Tensor(static_cast<char*>(flat.data) + s.offset(t, e) * sizeof(double), DType::F64, Device::CPU, {t.m, t.n});
}

void plant_spectrum(SdmoeModel& s, uint64_t seed, double noise, bool same_bases = false) {
  for (const SpectralTarget& t : s.sd.targets())
    for (int64_t e = 0; e < t.experts; ++e) {
      const int64_t r = std::min(t.m, t.n);
      const uint64_t base = seed + 1000 * uint64_t(t.param_id) + 37 * uint64_t(t.matrix) + (same_bases ? 0 : uint64_t(e));
      Mat w = planted_matrix(orthonormal_columns(t.m, r, base), orthonormal_columns(t.n, r, base + 500), t.m, t.n,
                             [](int64_t c) { return c < kRank ? 10.0 - c : 1.0 / (1.0 + c); });
      const Mat jitter = randn(t.m * t.n, base + 900 + 13 * uint64_t(e), noise);
      for (size_t i = 0; i < w.size(); ++i) w[i] += jitter[i];
      put(expert_view(s, s.model.params(), t, e), w);
    }
}

double worst_angle(const SdmoeModel& a, const SdmoeModel& b) {
  const Mat x = get(a.sd.bases()), y = get(b.sd.bases());
  double worst = 0.0;
  for (const SpectralTarget& t : a.sd.targets())
    for (int p = 0; p < t.bases; ++p) {
      worst = std::max(worst, SpectralService::largest_principal_angle(slice(x, t.ut_offset + p * kRank * t.m, kRank * t.m),
                                                                       slice(y, t.ut_offset + p * kRank * t.m, kRank * t.m),
                                                                       kRank, t.m));
      worst = std::max(worst, SpectralService::largest_principal_angle(slice(x, t.vt_offset + p * kRank * t.n, kRank * t.n),
                                                                       slice(y, t.vt_offset + p * kRank * t.n, kRank * t.n),
                                                                       kRank, t.n));
    }
  return worst;
}

TEST_P(SdmoeInvariants, SubspaceIterationAgreesWithExact) {
  for (SdmoeBasis basis : {SdmoeBasis::PER_EXPERT, SdmoeBasis::LAYER_SHARED}) {
    const char* mode = basis == SdmoeBasis::PER_EXPERT ? "per expert" : "layer shared";
    SdmoeModel exact(GetParam(), sdmoe_spec(basis, SdmoeSolver::EXACT), test_optimizer());
    SdmoeModel iter(GetParam(), sdmoe_spec(basis, SdmoeSolver::SUBSPACE_ITERATION), test_optimizer());
    // Layer-shared bases need a common dominant subspace.
    const bool same = basis == SdmoeBasis::LAYER_SHARED;
    plant_spectrum(exact, 1, 1e-3, same);
    plant_spectrum(iter, 1, 1e-3, same);
    exact.service.refresh(0, exact.opt.first_moments());
    iter.service.refresh(0, iter.opt.first_moments());  // cold start: more rounds
    const double cold = worst_angle(exact, iter);
    // The weights drift; the iteration warm-starts from the previous bases.
    plant_spectrum(exact, 1, 3e-2, same);
    plant_spectrum(iter, 1, 3e-2, same);
    exact.service.refresh(1, exact.opt.first_moments());
    iter.service.refresh(1, iter.opt.first_moments());
    const double warm = worst_angle(exact, iter);
    EXPECT_LT(cold, 1e-6) << mode;
    EXPECT_LT(warm, 1e-4) << mode;
    // A wrong basis gives a large angle: the measure can fail.
    plant_spectrum(iter, 99, 1e-3, same);
    iter.service.refresh(2, iter.opt.first_moments());
    EXPECT_GT(worst_angle(exact, iter), 0.3) << mode;
  }
}

TEST_P(SdmoeInvariants, ExactBasesSpanTheTopSingularSubspaces) {
  SdmoeModel s(GetParam(), sdmoe_spec(), test_optimizer());
  plant_spectrum(s, 4, 1e-3);
  s.service.refresh(0, s.opt.first_moments());
  const Mat bases = get(s.sd.bases()), w = get(s.model.params());
  for (const SpectralTarget& t : s.sd.targets())
    for (int64_t e = 0; e < t.experts; ++e) {
      // Rows orthonormal, and Ut W Vt^T captures the planted top-3 energy 10^2 + 9^2 + 8^2:
      // only the top singular subspaces on both sides hold that much.
      const Mat ut = slice(bases, t.ut_offset + e * kRank * t.m, kRank * t.m);
      const Mat vt = slice(bases, t.vt_offset + e * kRank * t.n, kRank * t.n);
      for (const auto& [rows, length] : {std::pair{&ut, t.m}, std::pair{&vt, t.n}})
        for (int i = 0; i < kRank; ++i)
          for (int j = 0; j < kRank; ++j) {
            double dot = 0;
            for (int64_t l = 0; l < length; ++l) dot += (*rows)[i * length + l] * (*rows)[j * length + l];
            EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-12);
          }
      const Mat uw = matmul(ut, slice(w, s.offset(t, e), t.m * t.n), kRank, t.m, t.n);
      double energy = 0;
      for (int i = 0; i < kRank; ++i)
        for (int j = 0; j < kRank; ++j) {
          double dot = 0;
          for (int64_t l = 0; l < t.n; ++l) dot += uw[i * t.n + l] * vt[j * t.n + l];
          energy += dot * dot;
        }
      EXPECT_NEAR(energy, 100.0 + 81.0 + 64.0, 0.1) << sdmoe_matrix_name(t.matrix) << " expert " << e;
    }
}

TEST_P(SdmoeMetrics, OverlapOfIdenticalAndOfRandomExperts) {
  SdmoeModel s(GetParam(), sdmoe_spec(), test_optimizer());
  // Every expert the same matrix: overlaps of 1.
  plant_spectrum(s, 4, 0.0);
  for (const SpectralTarget& t : s.sd.targets()) {
    const Tensor first(static_cast<char*>(s.model.params().data) + s.offset(t, 0) * sizeof(double), DType::F64,
                       Device::CPU, {t.m * t.n});
    for (int64_t e = 1; e < t.experts; ++e)
      be().copy(first, Tensor(static_cast<char*>(s.model.params().data) + s.offset(t, e) * sizeof(double), DType::F64,
                              Device::CPU, {t.m * t.n}));
  }
  const RefreshReport same = s.service.refresh(0, s.opt.first_moments());
  ASSERT_EQ(same.metrics.size(), s.sd.targets().size());
  for (const SpectralMetrics& m : same.metrics) {
    EXPECT_NEAR(m.overlap_left, 1.0, 1e-9);
    EXPECT_NEAR(m.overlap_right, 1.0, 1e-9);
    EXPECT_TRUE(std::isnan(m.grad_overlap_left)) << "no gradient at step 0";
  }
  expect_layer_metrics(s, GetParam(), same, false);
  // Independent planted experts: overlaps far below 1.
  plant_spectrum(s, 4, 0.0);
  random_expert_grads(s, 600);
  const RefreshReport apart = s.service.refresh(1, s.opt.first_moments());
  expect_layer_metrics(s, GetParam(), apart, true);
  for (const SpectralMetrics& m : apart.metrics) {
    EXPECT_LT(m.overlap_left, 0.8);
    EXPECT_LT(m.overlap_right, 0.8);
    EXPECT_GE(m.overlap_left, 0.0);
  }
  // And exactly the definition, mean over ordered pairs i != j of |U_i^T U_j|_F^2 / k,
  // recomputed here from the installed (PER_EXPERT) bases.
  const Mat bases = get(s.sd.bases());
  for (size_t ti = 0; ti < s.sd.targets().size(); ++ti) {
    const SpectralTarget& t = s.sd.targets()[ti];
    for (const auto& [offset, length, reported] :
         {std::tuple{t.ut_offset, t.m, apart.metrics[ti].overlap_left},
          std::tuple{t.vt_offset, t.n, apart.metrics[ti].overlap_right}}) {
      double total = 0;
      for (int64_t i = 0; i < t.experts; ++i)
        for (int64_t j = 0; j < t.experts; ++j) {
          if (i == j) continue;
          double f = 0;
          for (int p = 0; p < kRank; ++p)
            for (int q = 0; q < kRank; ++q) {
              double dot = 0;
              for (int64_t l = 0; l < length; ++l)
                dot += bases[offset + (i * kRank + p) * length + l] * bases[offset + (j * kRank + q) * length + l];
              f += dot * dot;
            }
          total += f / kRank;
        }
      EXPECT_NEAR(reported, total / double(t.experts * (t.experts - 1)), 1e-12) << "target " << ti;
    }
    // The router alignment by its definition, mean over experts e of |Vt_e r_e|^2 / |r_e|^2,
    // from the installed bases and the router of the target's own layer (found by name).
    if (!apart.metrics[ti].has_router) continue;
    const Mat r = get(s.model.param(param_named(s, "layers." + std::to_string(t.layer) + ".moe.router")));
    ASSERT_EQ(r.size(), size_t(t.experts * t.n));
    double sum = 0;
    for (int64_t e = 0; e < t.experts; ++e) {
      double norm = 0, captured = 0;
      for (int64_t l = 0; l < t.n; ++l) norm += r[e * t.n + l] * r[e * t.n + l];
      for (int p = 0; p < kRank; ++p) {
        double dot = 0;
        for (int64_t l = 0; l < t.n; ++l) dot += bases[t.vt_offset + (e * kRank + p) * t.n + l] * r[e * t.n + l];
        captured += dot * dot;
      }
      sum += captured / norm;
    }
    EXPECT_NEAR(apart.metrics[ti].router_alignment, sum / double(t.experts), 1e-12)
        << "layer " << t.layer << " " << sdmoe_matrix_name(t.matrix);
  }
  EXPECT_EQ(apart.jobs_computed, int64_t(s.sd.targets().size()) * s.sd.targets()[0].experts);
}

TEST_P(SdmoeMetrics, RouterAlignmentIsThePlantedOne) {
  // Gate and up of expert e share planted right singular vectors B_e (values 10, 9, 8, then
  // at most 1/7), so both have the top-k right subspace span(B_e[:, :k]). Router row e is
  // 2.5 (c b_e0 + sqrt(1 - c^2) b_ek) (b_ej the columns of B_e), so its alignment
  // |Vt_e r_e|^2 / |r_e|^2 is c^2, a different value in each MoE layer: each layer must be
  // measured against its own router. Down has none; without routers nothing has one.
  const LayerCase& c = GetParam();
  SdmoeModel s(c, sdmoe_spec(), test_optimizer());
  std::map<int, double> planted;  // c^2 by layer
  for (size_t i = 0; i < c.moe_layers.size(); ++i) planted[c.moe_layers[i]] = 0.3 + 0.4 * double(i);
  for (const SpectralTarget& t : s.sd.targets()) {
    if (t.matrix == SdmoeMatrix::DOWN) continue;
    const int64_t r = std::min(t.m, t.n);
    ASSERT_GT(r, kRank);
    const double cos2 = planted.at(t.layer);
    Mat router(size_t(t.experts * t.n));
    for (int64_t e = 0; e < t.experts; ++e) {
      const uint64_t seed = 7000 + 1000 * uint64_t(t.layer) + 11 * uint64_t(e);  // not by matrix: gate and up share B_e
      const Mat b = orthonormal_columns(t.n, r, seed), a = orthonormal_columns(t.m, r, seed + 500 + 37 * uint64_t(t.matrix));
      put(expert_view(s, s.model.params(), t, e),
          planted_matrix(a, b, t.m, t.n, [](int64_t j) { return j < kRank ? 10.0 - j : 1.0 / (4.0 + j); }));
      for (int64_t l = 0; l < t.n; ++l)
        router[e * t.n + l] = 2.5 * (std::sqrt(cos2) * b[l * r] + std::sqrt(1.0 - cos2) * b[l * r + kRank]);
    }
    put(s.model.param(param_named(s, "layers." + std::to_string(t.layer) + ".moe.router")), router);
  }
  const RefreshReport report = s.service.refresh(0, s.opt.first_moments());
  expect_layer_metrics(s, c, report, false);
  for (const SpectralMetrics& m : report.metrics) {
    if (!m.has_router) continue;
    EXPECT_NEAR(m.router_alignment, planted.at(m.layer), 1e-9) << "layer " << m.layer << " " << sdmoe_matrix_name(m.matrix);
  }
}

// An expert matrix planted as A diag(sigma) B^T: its factors, A [m, r] and B [n, r] with
// orthonormal columns (r = min(m, n)).
struct PlantedFactors {
  Mat left, right;
  int64_t m = 0, n = 0, r = 0;
};

// Plants every expert matrix of `flat` (the parameters or the gradients) as A diag(sigma)
// B^T whose first kRank factor columns come from top_seed and the others from rest_seed,
// so that two plantings with one top_seed share their top subspaces exactly. Returns the factors per target and expert.
std::vector<std::vector<PlantedFactors>> plant_bands(SdmoeModel& s, const Tensor& flat, uint64_t top_seed,
                                                     uint64_t rest_seed, const std::function<double(int64_t)>& sigma) {
  std::vector<std::vector<PlantedFactors>> out;
  for (const SpectralTarget& t : s.sd.targets()) {
    out.emplace_back();
    const int64_t r = std::min(t.m, t.n);
    for (int64_t e = 0; e < t.experts; ++e) {
      auto factor = [&](int64_t rows, uint64_t salt) {
        const uint64_t id = 1000 * uint64_t(t.param_id) + 37 * uint64_t(t.matrix) + 7 * uint64_t(e) + salt;
        const Mat top = randn(rows * r, top_seed + id), rest = randn(rows * r, rest_seed + id);
        Mat q(top.size());
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < r; ++c) q[i * r + c] = c < kRank ? top[i * r + c] : rest[i * r + c];
        orthonormalize_columns(q, rows, r);
        return q;
      };
      PlantedFactors f{factor(t.m, 0), factor(t.n, 500), t.m, t.n, r};
      put(expert_view(s, flat, t, e), planted_matrix(f.left, f.right, t.m, t.n, sigma));
      out.back().push_back(std::move(f));
    }
  }
  return out;
}

// The mean over ordered expert pairs i != j of |X_i^T X_j|_F^2 / k, X_e the factor columns
// [first, first + kRank) of expert e (its left or right factor).
double planted_overlap(const std::vector<PlantedFactors>& experts, bool right, int64_t first) {
  const int64_t count = int64_t(experts.size());
  double total = 0.0;
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = 0; j < count; ++j) {
      if (i == j) continue;
      const PlantedFactors &a = experts[i], &b = experts[j];
      const Mat &x = right ? a.right : a.left, &y = right ? b.right : b.left;
      const int64_t length = right ? a.n : a.m;
      double f = 0.0;
      for (int p = 0; p < kRank; ++p)
        for (int q = 0; q < kRank; ++q) {
          double dot = 0.0;
          for (int64_t l = 0; l < length; ++l) dot += x[l * a.r + first + p] * y[l * b.r + first + q];
          f += dot * dot;
        }
      total += f / kRank;
    }
  return total / double(count * (count - 1));
}

TEST_P(SdmoeMetrics, TailAndGradientOverlapsMatchThePlantedSubspaces) {
  // Weights with three bands of singular values (10, 9, 8 | 3, 2.5, 2 | the rest) and
  // gradients with two (5, 4, 3 | the rest). Once the bases hold the top band, the tail
  // W_U is the rest, whose top-k subspaces are the planted middle factor columns; the
  // gradients' are their first ones. The metrics must be those subspaces' overlaps. At
  // the first refresh the rest is small (0.01 and below), so the metric bases' cold start
  // converges. At the second the subspaces are the same but the bands below the measured
  // ones come up to 1.8 and 2.7: two rounds of subspace iteration from a random start
  // miss the subspaces by far more than the tolerance, so the metric bases must start
  // from the first refresh's.
  auto weight_sigma = [](double low) {
    return [low](int64_t c) {
      return c < kRank ? 10.0 - c : c < 2 * kRank ? 3.0 - 0.5 * (c - kRank) : low / double(c - 5);
    };
  };
  auto grad_sigma = [](double low) { return [low](int64_t c) { return c < kRank ? 5.0 - c : low / double(c - 2); }; };
  for (const SdmoeSolver solver : {SdmoeSolver::EXACT, SdmoeSolver::SUBSPACE_ITERATION}) {
    SdmoeModel s(GetParam(), sdmoe_spec(SdmoeBasis::PER_EXPERT, solver), test_optimizer());
    for (int refresh = 1; refresh <= 2; ++refresh) {
      const auto weights = plant_bands(s, s.model.params(), 40, 50, weight_sigma(refresh == 1 ? 0.01 : 1.8));
      const auto grads = plant_bands(s, s.model.grads(), 70, 71, grad_sigma(refresh == 1 ? 0.01 : 2.7));
      const RefreshReport report = s.service.refresh(refresh, s.opt.first_moments());
      ASSERT_EQ(report.metrics.size(), s.sd.targets().size());
      expect_layer_metrics(s, GetParam(), report, true);
      for (size_t ti = 0; ti < s.sd.targets().size(); ++ti) {
        const SpectralMetrics& m = report.metrics[ti];
        const std::string where = std::string(solver == SdmoeSolver::EXACT ? "exact" : "subspace iteration") +
                                  ", refresh " + std::to_string(refresh) + ", target " + std::to_string(ti) +
                                  " (layer " + std::to_string(m.layer) + " " + sdmoe_matrix_name(m.matrix) + ")";
        // Subspace iteration stops after a fixed number of rounds: on the second MoE
        // layer's planted factors it lands 3e-6 from the subspaces (the gap 8 : 3 shrinks
        // the error by that ratio per round), so it gets 1e-5; a wrong subspace is off by
        // 1e-2 or more.
        const double tol = solver == SdmoeSolver::EXACT ? 1e-6 : 1e-5;
        EXPECT_NEAR(m.overlap_left, planted_overlap(weights[ti], false, 0), tol) << where;
        EXPECT_NEAR(m.overlap_right, planted_overlap(weights[ti], true, 0), tol) << where;
        EXPECT_NEAR(m.tail_overlap_left, planted_overlap(weights[ti], false, kRank), tol) << where;
        EXPECT_NEAR(m.tail_overlap_right, planted_overlap(weights[ti], true, kRank), tol) << where;
        EXPECT_NEAR(m.grad_overlap_left, planted_overlap(grads[ti], false, 0), tol) << where;
        EXPECT_NEAR(m.grad_overlap_right, planted_overlap(grads[ti], true, 0), tol) << where;
      }
    }
  }
}

TEST_P(SdmoeMetrics, GradientOverlapsStayFiniteWhenExpertsGetFewerThanKTokens) {
  // An expert's gradient is a sum of one outer product per routed row: with fewer than k
  // rows in a step its rank is below k (0 with none). Expert e gets a gradient of rank e
  // (0 .. 3, kRank 3): the gradient metric bases must stay finite, the overlaps with them,
  // and the next refresh, warm-started from them with full-rank gradients, too. (A run of
  // configs/small-cpu.textproto printed grad U/V -nan from the first refresh with
  // gradients on, for every MoE layer where an expert got 1 to k-1 rows.)
  SdmoeModel s(GetParam(), sdmoe_spec(), test_optimizer());
  expect_layer_metrics(s, GetParam(), s.service.refresh(0, s.opt.first_moments()), false);
  s.model.zero_grads();
  for (const SpectralTarget& t : s.sd.targets())
    for (int64_t e = 0; e < t.experts; ++e) {
      Mat g(size_t(t.m * t.n), 0.0);
      for (int64_t row = 0; row < e; ++row) {
        const uint64_t seed = 3000 + 1000 * uint64_t(t.param_id) + 37 * uint64_t(t.matrix) + 7 * uint64_t(e) + row;
        const Mat a = randn(t.m, seed), b = randn(t.n, seed + 500);
        for (int64_t i = 0; i < t.m; ++i)
          for (int64_t j = 0; j < t.n; ++j) g[i * t.n + j] += a[i] * b[j];
      }
      put(expert_view(s, s.model.grads(), t, e), g);
    }
  const RefreshReport deficient = s.service.refresh(1, s.opt.first_moments());
  random_expert_grads(s, 4000);
  const RefreshReport after = s.service.refresh(2, s.opt.first_moments());
  for (const RefreshReport* report : {&deficient, &after}) {
    expect_layer_metrics(s, GetParam(), *report, true);
    for (const SpectralMetrics& m : report->metrics) {
      EXPECT_TRUE(std::isfinite(m.grad_overlap_left) && std::isfinite(m.grad_overlap_right))
          << "refresh " << report->step << ", layer " << m.layer << " " << sdmoe_matrix_name(m.matrix);
      EXPECT_GE(m.grad_overlap_left, 0.0);
      EXPECT_LE(m.grad_overlap_left, 1.0 + 1e-9);
      EXPECT_GE(m.grad_overlap_right, 0.0);
      EXPECT_LE(m.grad_overlap_right, 1.0 + 1e-9);
    }
  }
}

TEST_P(SdmoeService, AsyncInstallsTheBasesOfItsSnapshot) {
  // Two identical runs: one refreshes synchronously after step 2, the other starts an
  // asynchronous refresh there, trains one more step and installs at the next boundary.
  // The installed bases must be those of the step-2 weights, not of the step-3 ones.
  SdmoeSpec spec = sdmoe_spec();
  SdmoeModel sync_run(GetParam(), spec, test_optimizer()), async_run(GetParam(), spec, test_optimizer());
  for (SdmoeModel* s : {&sync_run, &async_run}) s->service.refresh(0, s->opt.first_moments());
  for (int step = 0; step < 2; ++step)
    for (SdmoeModel* s : {&sync_run, &async_run}) {
      random_expert_grads(*s, 500 + step);
      s->opt.step(step);
    }
  sync_run.service.refresh(2, sync_run.opt.first_moments());
  async_run.service.start_async(2);
  EXPECT_TRUE(async_run.service.async_pending());
  random_expert_grads(async_run, 900);
  async_run.opt.step(2);  // training goes on while the worker computes
  const RefreshReport late = async_run.service.finish_async(3, async_run.opt.first_moments());
  EXPECT_FALSE(async_run.service.async_pending());
  EXPECT_EQ(late.step, 2);
  EXPECT_EQ(late.staleness, 1);
  expect_layer_metrics(async_run, GetParam(), late, true);
  EXPECT_EQ(late.jobs_computed, int64_t(sync_run.sd.targets().size()) * sync_run.sd.targets()[0].experts);
  EXPECT_LT(worst_angle(sync_run, async_run), 1e-9) << "bases of the snapshot";
  // The step-3 weights have other bases: a refresh from them differs measurably.
  async_run.service.refresh(3, async_run.opt.first_moments());
  EXPECT_GT(worst_angle(sync_run, async_run), 1e-6);
}

}  // namespace
}  // namespace sdmoe::gradtest
