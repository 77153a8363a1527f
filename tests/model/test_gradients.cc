// Backward of every differentiable CPU op against central finite differences of its
// forward, in F64: RMSNorm (dx, dweight), SwiGLU, causal softmax, cross-entropy, RoPE,
// weighted combine (drows, dweight) and the router (softmax and sigmoid scores, top-k
// normalisation on and off, load-balancing and z-loss terms). Each loss is a random
// linear functional of the op's outputs, so every output contributes to the check.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "tests/model/grad_support.h"

namespace sdmoe::gradtest {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

TEST(OpGradients, RmsNormBackward) {
  const int64_t t = 4, d = 9;
  const double eps = 1e-5;
  std::vector<double> x = randn(t * d, 1, 1.3, 0.2), w = randn(d, 2, 0.4, 1.0);
  const std::vector<double> c = randn(t * d, 3), dw0 = randn(d, 4);
  Owned xt = make(DType::F64, {t, d}), wt = make(DType::F64, {d}), y = make(DType::F64, {t, d}),
        rstd = make(DType::F64, {t});
  auto loss = [&] {
    put(xt.t, x);
    put(wt.t, w);
    be().rmsnorm_forward(xt.t, wt.t, eps, y.t, rstd.t);
    return dot(c, get(y.t));
  };
  loss();
  Owned dy = make_from({t, d}, c), dx = make(DType::F64, {t, d}), dw = make_from({d}, dw0);
  be().fill(dx.t, kNaN);  // assigned, not accumulated
  be().rmsnorm_backward(xt.t, wt.t, rstd.t, dy.t, dx.t, dw.t);
  std::vector<double> dweight = get(dw.t);
  for (int64_t i = 0; i < d; ++i) dweight[i] -= dw0[i];  // accumulated on top of dw0
  check_fd("rmsnorm dx", x, get(dx.t), loss);
  check_fd("rmsnorm dweight", w, dweight, loss);
}

TEST(OpGradients, SwigluBackward) {
  const int64_t t = 3, f = 5;
  std::vector<double> gu = randn(t * 2 * f, 5, 2.0);
  const std::vector<double> c = randn(t * f, 6);
  Owned g = make(DType::F64, {t, 2 * f}), out = make(DType::F64, {t, f});
  auto loss = [&] {
    put(g.t, gu);
    be().swiglu_forward(g.t, out.t);
    return dot(c, get(out.t));
  };
  put(g.t, gu);
  Owned dout = make_from({t, f}, c), dg = make(DType::F64, {t, 2 * f});
  be().fill(dg.t, kNaN);
  be().swiglu_backward(g.t, dout.t, dg.t);
  check_fd("swiglu dgate_up", gu, get(dg.t), loss);
}

TEST(OpGradients, CausalSoftmaxBackward) {
  const int64_t n = 2, s = 5;
  const double scale = 0.4;
  std::vector<double> scores = randn(n * s * s, 7, 2.0);
  const std::vector<double> c = randn(n * s * s, 8);
  Owned p = make(DType::F64, {n, s, s});
  auto loss = [&] {
    put(p.t, scores);
    be().causal_softmax_forward(p.t, scale);
    return dot(c, get(p.t));
  };
  loss();  // p holds the probabilities
  Owned grad = make_from({n, s, s}, c);
  be().causal_softmax_backward(p.t, grad.t, scale);
  const auto g = get(grad.t);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = i + 1; j < s; ++j) EXPECT_EQ(g[(b * s + i) * s + j], 0.0) << "masked entries get zero gradient";
  check_fd("causal softmax d(scores)", scores, g, loss);
}

TEST(OpGradients, CrossEntropyBackward) {
  const int64_t t = 5, v = 11;
  const double scale = 0.7;
  std::vector<double> logits = randn(t * v, 9, 2.0);
  const std::vector<int32_t> tgt = {3, -1, 0, 10, 7};
  Owned lg = make(DType::F64, {t, v}), targets = make(DType::I32, {t}), losses = make(DType::F64, {t}),
        lse = make(DType::F64, {t});
  put_i32(targets.t, tgt);
  auto loss = [&] {
    put(lg.t, logits);
    be().cross_entropy_forward(lg.t, targets.t, losses.t, lse.t);
    const auto l = get(losses.t);
    return scale * std::accumulate(l.begin(), l.end(), 0.0);
  };
  loss();
  be().cross_entropy_backward(lg.t, targets.t, lse.t, scale);
  const auto g = get(lg.t);
  for (int64_t j = 0; j < v; ++j) EXPECT_EQ(g[1 * v + j], 0.0) << "ignored target: zero gradient";
  check_fd("cross entropy d(logits)", logits, g, loss);
}

TEST(OpGradients, RopeBackwardIsInverseRotation) {
  const int64_t b = 1, h = 2, s = 4, dh = 6, n = b * h * s * dh;
  std::vector<double> x = randn(n, 10);
  const std::vector<double> c = randn(n, 11);
  Owned xt = make(DType::F64, {b, h, s, dh});
  auto loss = [&] {
    put(xt.t, x);
    be().rope(xt.t, 50.0, +1);
    return dot(c, get(xt.t));
  };
  Owned g = make_from({b, h, s, dh}, c);
  be().rope(g.t, 50.0, -1);  // the backward of a rotation is the inverse rotation
  check_fd("rope backward", x, get(g.t), loss);
}

TEST(OpGradients, CombineRowsBackward) {
  const int64_t t = 5, k = 2, n = t * k, d = 3;
  std::vector<double> rows = randn(n * d, 12), w = randn(t * k, 13);
  const std::vector<double> c = randn(t * d, 14);
  // Each routed row belongs to exactly one (token, slot), as the routing plan builds it.
  const std::vector<int32_t> slot = {4, 9, 0, 7, 2, 5, 8, 1, 3, 6};
  Owned r = make(DType::F64, {n, d}), sr = make(DType::I32, {t, k}), wt = make(DType::F64, {t, k}),
        out = make(DType::F64, {t, d});
  put_i32(sr.t, slot);
  auto loss = [&] {
    put(r.t, rows);
    put(wt.t, w);
    be().combine_rows(r.t, sr.t, &wt.t, 0.0, out.t);
    return dot(c, get(out.t));
  };
  loss();
  Owned dout = make_from({t, d}, c), drows = make(DType::F64, {n, d}), dw = make(DType::F64, {t, k});
  be().fill(drows.t, kNaN);
  be().fill(dw.t, kNaN);
  be().combine_rows_backward(dout.t, r.t, sr.t, wt.t, drows.t, dw.t);
  check_fd("combine_rows drows", rows, get(drows.t), loss);
  check_fd("combine_rows dweight", w, get(dw.t), loss);
}

// ---- router -----------------------------------------------------------------------------

struct RouterGradCase {
  RouterScore score;
  bool normalize;
  int k;
};

class RouterBackwardTest : public ::testing::TestWithParam<RouterGradCase> {};

// loss = sum_tk c_tk w_tk + sum_e a_e sum_t aux_probs_te + 0.5 z sum_t lse_t^2, so
// d loss / d w = c, d loss / d aux_probs[t,e] = a_e and d loss / d lse_t = z * lse_t: exactly
// the dtopk_weight, aux_grad_per_expert and z_grad_scale arguments of router_backward.
TEST_P(RouterBackwardTest, MatchesFiniteDifferences) {
  const auto [score, norm, k] = GetParam();
  const int64_t t = 6, e = 5;
  const double z = 0.3;
  // Well separated logits (gaps >= 0.5): a step of 1e-4 cannot change the top-k choice.
  std::vector<double> logits(t * e);
  std::mt19937_64 gen(15);
  const double levels[] = {-1.1, -0.4, 0.3, 1.0, 1.7};
  for (int64_t i = 0; i < t; ++i) {
    std::vector<int> perm(e);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), gen);
    for (int64_t x = 0; x < e; ++x) logits[i * e + x] = levels[perm[x]] + 0.05 * std::normal_distribution<>()(gen);
  }
  const std::vector<double> c = randn(t * k, 16), a = randn(e, 17);
  Owned lg = make(DType::F64, {t, e}), idx = make(DType::I32, {t, k}), w = make(DType::F64, {t, k}),
        aux = make(DType::F64, {t, e}), lse = make(DType::F64, {t});
  std::vector<int32_t> base_idx;
  int flips = 0;
  auto loss = [&] {
    put(lg.t, logits);
    be().router_forward(lg.t, score, norm, idx.t, w.t, aux.t, lse.t);
    if (!base_idx.empty() && get_i32(idx.t) != base_idx) ++flips;
    const auto wv = get(w.t), av = get(aux.t), lv = get(lse.t);
    double l = dot(c, wv);
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t x = 0; x < e; ++x) l += a[x] * av[i * e + x];
      l += 0.5 * z * lv[i] * lv[i];
    }
    return l;
  };
  loss();
  base_idx = get_i32(idx.t);
  Owned dw = make_from({t, k}, c), ag = make_from({e}, a), dlogits = make(DType::F64, {t, e});
  be().fill(dlogits.t, kNaN);
  be().router_backward(lg.t, score, norm, idx.t, w.t, dw.t, ag.t, lse.t, z, dlogits.t);
  check_fd("router d(logits)", logits, get(dlogits.t), loss);
  EXPECT_EQ(flips, 0) << "a finite-difference step changed the top-k choice; the logits are not separated";
}

std::vector<RouterGradCase> router_grad_cases() {
  std::vector<RouterGradCase> out;
  for (RouterScore s : {RouterScore::SOFTMAX, RouterScore::SIGMOID})
    for (bool n : {true, false})
      for (int k : {1, 2, 3}) out.push_back({s, n, k});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Cases, RouterBackwardTest, ::testing::ValuesIn(router_grad_cases()),
                         [](const ::testing::TestParamInfo<RouterGradCase>& info) {
                           return fmt::format("{}_{}_k{}",
                                              info.param.score == RouterScore::SOFTMAX ? "softmax" : "sigmoid",
                                              info.param.normalize ? "norm" : "raw", info.param.k);
                         });

// Each of the three router gradient paths on its own, so that a path that is silently
// dropped (or double counted) shows up even if the others dominate the combined check.
TEST(OpGradients, RouterBackwardPathsSeparately) {
  const int64_t t = 3, e = 4, k = 2;
  std::vector<double> logits = {1.5, -0.3, 0.6, -1.2, -0.8, 0.9, 2.0, 0.1, 0.4, 1.6, -0.9, -0.2};
  for (RouterScore score : {RouterScore::SOFTMAX, RouterScore::SIGMOID})
    for (int path = 0; path < 3; ++path) {
      const std::vector<double> c = path == 0 ? randn(t * k, 18) : std::vector<double>(t * k, 0.0);
      const std::vector<double> a = path == 1 ? randn(e, 19) : std::vector<double>(e, 0.0);
      const double z = path == 2 ? 0.7 : 0.0;
      Owned lg = make(DType::F64, {t, e}), idx = make(DType::I32, {t, k}), w = make(DType::F64, {t, k}),
            aux = make(DType::F64, {t, e}), lse = make(DType::F64, {t});
      auto loss = [&] {
        put(lg.t, logits);
        be().router_forward(lg.t, score, true, idx.t, w.t, aux.t, lse.t);
        const auto wv = get(w.t), av = get(aux.t), lv = get(lse.t);
        double l = dot(c, wv);
        for (int64_t i = 0; i < t; ++i) {
          for (int64_t x = 0; x < e; ++x) l += a[x] * av[i * e + x];
          l += 0.5 * z * lv[i] * lv[i];
        }
        return l;
      };
      loss();
      Owned dw = make_from({t, k}, c), ag = make_from({e}, a), dl = make(DType::F64, {t, e});
      be().router_backward(lg.t, score, true, idx.t, w.t, dw.t, ag.t, lse.t, z, dl.t);
      check_fd(fmt::format("router path {} ({})", path, score == RouterScore::SOFTMAX ? "softmax" : "sigmoid"),
               logits, get(dl.t), loss);
    }
}

}  // namespace
}  // namespace sdmoe::gradtest
