// Backward kernels in F32 and F64 against their closed forms evaluated in double (the F64
// paths are also checked against finite differences in tests/model; here the point is
// that both dtypes implement the same formula, including the F32-only fast paths).
#include <cmath>
#include <limits>
#include <string>

#include "tests/core/cpu_test_support.h"

namespace sdmoe::test {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

TEST_P(CpuOpsTest, CrossEntropyBackwardClosedForm) {
  const DType dt = GetParam();
  const int64_t t = 5, v = 37;  // v > 16: exercises any vectorised main loop and its tail
  const double scale = 0.3;
  const auto lg = rounded(dt, randn(t * v, 40, 3.0));
  const std::vector<int32_t> tgt = {2, -1, 36, Backend::kTargetOnOtherShard, 17};
  Owned logits = make_from(dt, {t, v}, lg), targets = make(DType::I32, {t}), losses = make(dt, {t}),
        lse = make(dt, {t});
  put_i32(targets.t, tgt);
  cpu().cross_entropy_forward(logits.t, targets.t, losses.t, lse.t);
  cpu().cross_entropy_backward(logits.t, targets.t, lse.t, scale);
  std::vector<double> want(t * v, 0.0);
  for (int64_t r = 0; r < t; ++r) {
    if (tgt[r] < 0 && tgt[r] != Backend::kTargetOnOtherShard) continue;  // ignored: zero row
    double mx = -1e300, sum = 0;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, lg[r * v + j]);
    for (int64_t j = 0; j < v; ++j) sum += std::exp(lg[r * v + j] - mx);
    for (int64_t j = 0; j < v; ++j) want[r * v + j] = scale * (std::exp(lg[r * v + j] - mx) / sum - (j == tgt[r]));
  }
  const double tol = dt == DType::F32 ? 2e-6 * scale : 1e-14;
  expect_close(want, get(logits.t), tol, dt == DType::F32 ? 1e-5 : 1e-12,
               "scale * (softmax - onehot); a target on another shard has no onehot");
}

// The float cross-entropy rows (AVX-512 where the CPU has it) for lengths around the
// vector width and the model's vocabulary, large offsets included, against double.
TEST(CpuOps, CrossEntropyRowsOfEveryLength) {
  const double scale = 0.25;
  for (const int64_t v : {1, 15, 16, 17, 63, 64, 65, 100, 50304}) {
    const int64_t t = 4;
    auto lg = rounded(DType::F32, randn(t * v, 60 + uint64_t(v), 4.0));
    for (int64_t j = 0; j < v; ++j) {
      lg[1 * v + j] = double(float(lg[1 * v + j] + 70.0));
      lg[2 * v + j] = double(float(lg[2 * v + j] - 70.0));
    }
    const std::vector<int32_t> tgt = {0, int32_t(v - 1), int32_t(v / 2), Backend::kTargetOnOtherShard};
    Owned logits = make_from(DType::F32, {t, v}, lg), targets = make(DType::I32, {t}), losses = make(DType::F32, {t}),
          lse = make(DType::F32, {t});
    put_i32(targets.t, tgt);
    cpu().cross_entropy_forward(logits.t, targets.t, losses.t, lse.t);
    cpu().cross_entropy_backward(logits.t, targets.t, lse.t, scale);
    std::vector<double> want_lse(t), want_grad(t * v);
    for (int64_t r = 0; r < t; ++r) {
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < v; ++j) mx = std::max(mx, lg[r * v + j]);
      for (int64_t j = 0; j < v; ++j) sum += std::exp(lg[r * v + j] - mx);
      want_lse[r] = mx + std::log(sum);
      for (int64_t j = 0; j < v; ++j) want_grad[r * v + j] = scale * (std::exp(lg[r * v + j] - mx) / sum - (j == tgt[r]));
    }
    const std::string where = "vocabulary " + std::to_string(v);
    expect_close(want_lse, get(lse.t), 2e-6, 2e-6, where + ": lse");
    expect_close(want_grad, get(logits.t), 2e-6 * scale, 1e-5, where + ": scale * (softmax - onehot)");
  }
}

TEST(CpuOps, CrossEntropyOfANaNLogitIsNaN) {
  // A NaN anywhere in a row (in a full vector, in the tail) must reach the loss, where the
  // trainer's check for non-finite losses stops the run.
  for (const int64_t at : {5, 70, 99}) {
    const int64_t v = 100;
    auto lg = randn(v, 61, 2.0);
    lg[at] = kNaN;
    Owned logits = make_from(DType::F32, {1, v}, lg), targets = make(DType::I32, {1}), losses = make(DType::F32, {1}),
          lse = make(DType::F32, {1});
    put_i32(targets.t, {3});
    cpu().cross_entropy_forward(logits.t, targets.t, losses.t, lse.t);
    EXPECT_TRUE(std::isnan(get(lse.t)[0])) << "NaN at " << at;
    EXPECT_TRUE(std::isnan(get(losses.t)[0])) << "NaN at " << at;
  }
}

TEST_P(CpuOpsTest, CausalSoftmaxBackwardClosedForm) {
  const DType dt = GetParam();
  const int64_t n = 2, s = 7;
  const double scale = 0.6;
  Owned p = make_from(dt, {n, s, s}, rounded(dt, randn(n * s * s, 41)));
  cpu().causal_softmax_forward(p.t, scale);
  const auto pv = get(p.t);
  const auto dp = rounded(dt, randn(n * s * s, 42));
  Owned g = make_from(dt, {n, s, s}, dp);
  cpu().causal_softmax_backward(p.t, g.t, scale);
  std::vector<double> want(n * s * s, 0.0);
  for (int64_t r = 0; r < n * s; ++r) {
    const int64_t i = r % s;
    double d = 0;
    for (int64_t j = 0; j <= i; ++j) d += pv[r * s + j] * dp[r * s + j];
    for (int64_t j = 0; j <= i; ++j) want[r * s + j] = scale * pv[r * s + j] * (dp[r * s + j] - d);
  }
  expect_close(want, get(g.t), dt == DType::F32 ? 1e-6 : 1e-15, 8 * elem_rtol(dt), "scale * P * (dP - <P, dP>)");
}

TEST_P(CpuOpsTest, RmsNormBackwardClosedForm) {
  const DType dt = GetParam();
  const int64_t t = 6, d = 20;
  const double eps = 1e-5;
  const auto x = rounded(dt, randn(t * d, 43, 1.5)), w = rounded(dt, randn(d, 44, 0.3, 1.0)),
             dy = rounded(dt, randn(t * d, 45)), dw0 = rounded(dt, randn(d, 46));
  Owned xt = make_from(dt, {t, d}, x), wt = make_from(dt, {d}, w), y = make(dt, {t, d}), rstd = make(dt, {t}),
        g = make_from(dt, {t, d}, dy), dx = make(dt, {t, d}), dw = make_from(dt, {d}, dw0);
  cpu().rmsnorm_forward(xt.t, wt.t, eps, y.t, rstd.t);
  cpu().fill(dx.t, kNaN);
  cpu().rmsnorm_backward(xt.t, wt.t, rstd.t, g.t, dx.t, dw.t);
  // y_i = x_i r w_i, r = (mean x^2 + eps)^-1/2, dr/dx_j = -r^3 x_j / D.
  std::vector<double> want_dx(t * d), want_dw = dw0;
  for (int64_t r = 0; r < t; ++r) {
    double ms = 0, gwx = 0;
    for (int64_t j = 0; j < d; ++j) ms += x[r * d + j] * x[r * d + j];
    const double rs = 1.0 / std::sqrt(ms / d + eps);
    for (int64_t j = 0; j < d; ++j) gwx += dy[r * d + j] * w[j] * x[r * d + j];
    for (int64_t j = 0; j < d; ++j) {
      want_dx[r * d + j] = dy[r * d + j] * w[j] * rs - x[r * d + j] * rs * rs * rs * gwx / d;
      want_dw[j] += dy[r * d + j] * x[r * d + j] * rs;
    }
  }
  const double tol = dt == DType::F32 ? 2e-5 : 1e-12;
  expect_close(want_dx, get(dx.t), tol, tol, "rmsnorm dx");
  expect_close(want_dw, get(dw.t), tol, tol, "rmsnorm dweight accumulates");
}

TEST_P(CpuOpsTest, SwigluBackwardClosedForm) {
  const DType dt = GetParam();
  const int64_t t = 4, f = 9;
  const auto gu = rounded(dt, randn(t * 2 * f, 47, 2.5)), dout = rounded(dt, randn(t * f, 48));
  Owned g = make_from(dt, {t, 2 * f}, gu), d = make_from(dt, {t, f}, dout), dg = make(dt, {t, 2 * f});
  cpu().fill(dg.t, kNaN);
  cpu().swiglu_backward(g.t, d.t, dg.t);
  std::vector<double> want(t * 2 * f);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < f; ++i) {
      const double a = gu[r * 2 * f + i], u = gu[r * 2 * f + f + i], s = 1.0 / (1.0 + std::exp(-a));
      want[r * 2 * f + i] = dout[r * f + i] * u * (s + a * s * (1 - s));  // d/da of a s(a) u
      want[r * 2 * f + f + i] = dout[r * f + i] * a * s;
    }
  expect_close(want, get(dg.t), dt == DType::F32 ? 1e-6 : 1e-14, 8 * elem_rtol(dt), "swiglu backward");
}

TEST_P(CpuOpsTest, CombineRowsBackwardClosedForm) {
  const DType dt = GetParam();
  const int64_t t = 4, k = 2, n = t * k, d = 6;
  const std::vector<int32_t> slot = {3, 6, 0, 5, 7, 1, 2, 4};
  const auto rows = rounded(dt, randn(n * d, 49)), w = rounded(dt, randn(t * k, 50)), dout = rounded(dt, randn(t * d, 51));
  Owned r = make_from(dt, {n, d}, rows), sr = make(DType::I32, {t, k}), wt = make_from(dt, {t, k}, w),
        g = make_from(dt, {t, d}, dout), drows = make(dt, {n, d}), dw = make(dt, {t, k});
  put_i32(sr.t, slot);
  cpu().fill(drows.t, kNaN);
  cpu().fill(dw.t, kNaN);
  cpu().combine_rows_backward(g.t, r.t, sr.t, wt.t, drows.t, dw.t);
  std::vector<double> want_rows(n * d), want_w(t * k);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < k; ++j) {
      double dd = 0;
      for (int64_t c = 0; c < d; ++c) {
        want_rows[slot[i * k + j] * d + c] = w[i * k + j] * dout[i * d + c];
        dd += dout[i * d + c] * rows[slot[i * k + j] * d + c];
      }
      want_w[i * k + j] = dd;
    }
  const double tol = dt == DType::F32 ? 1e-5 : 1e-13;
  expect_close(want_rows, get(drows.t), tol, tol, "drows = w * dout");
  expect_close(want_w, get(dw.t), tol, tol, "dweight = <dout, row>");
}

}  // namespace
}  // namespace sdmoe::test
