// CPU backend MoE ops (router, gather, combine), the AdamW update and the LAPACK wrappers
// (SVD, symmetric eigendecomposition) against double-precision references written here.
// Matrices for the decompositions are built from known factors, so the expected singular
// values and eigenvalues are known without calling any solver.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "tests/core/cpu_test_support.h"

namespace sdmoe::test {
namespace {

// ---- router -----------------------------------------------------------------------------

struct RouterRef {
  std::vector<int32_t> index;  // [T,K]
  std::vector<double> weight;  // [T,K]
  std::vector<double> aux;     // [T,E]
  std::vector<double> lse;     // [T]
};

RouterRef ref_router(const std::vector<double>& z, int64_t t, int64_t e, int64_t k, RouterScore score, bool norm) {
  RouterRef r;
  r.index.resize(t * k);
  r.weight.resize(t * k);
  r.aux.resize(t * e);
  r.lse.resize(t);
  for (int64_t i = 0; i < t; ++i) {
    const double* zi = z.data() + i * e;
    double mx = *std::max_element(zi, zi + e), sum = 0;
    for (int64_t x = 0; x < e; ++x) sum += std::exp(zi[x] - mx);
    r.lse[i] = mx + std::log(sum);
    std::vector<double> s(e);
    for (int64_t x = 0; x < e; ++x)
      s[x] = score == RouterScore::SOFTMAX ? std::exp(zi[x] - r.lse[i]) : 1.0 / (1.0 + std::exp(-zi[x]));
    std::vector<int32_t> order(e);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return s[a] > s[b]; });
    double chosen = 0, all = 0;
    for (int64_t j = 0; j < k; ++j) chosen += s[order[j]];
    for (int64_t x = 0; x < e; ++x) all += s[x];
    for (int64_t j = 0; j < k; ++j) {
      r.index[i * k + j] = order[j];
      r.weight[i * k + j] = s[order[j]] / (norm ? chosen : 1.0);
    }
    for (int64_t x = 0; x < e; ++x) r.aux[i * e + x] = score == RouterScore::SOFTMAX ? s[x] : s[x] / all;
  }
  return r;
}

struct RouterCase {
  DType dtype;
  RouterScore score;
  bool normalize;
  int k;
};

class RouterForwardTest : public ::testing::TestWithParam<RouterCase> {};

TEST_P(RouterForwardTest, MatchesReference) {
  const auto [dt, score, norm, k] = GetParam();
  const int64_t t = 9, e = 6;
  auto z = rounded(dt, randn(t * e, 31 + k, 1.5));
  for (int64_t x = 0; x < e; ++x) z[x] = 0.25;  // token 0: all tied -> experts 0..k-1
  const double row1[] = {0.5, 2.0, 2.0, 2.0, -1.0, 2.0};  // token 1: ties at 2 -> 1, 2, 3 first
  std::copy(std::begin(row1), std::end(row1), z.begin() + e);
  Owned logits = make_from(dt, {t, e}, z), idx = make(DType::I32, {t, k}), w = make(dt, {t, k}),
        aux = make(dt, {t, e}), lse = make(dt, {t});
  cpu().router_forward(logits.t, score, norm, idx.t, w.t, aux.t, lse.t);
  const RouterRef want = ref_router(z, t, e, k, score, norm);
  const auto gi = get_i32(idx.t);
  const auto gw = get(w.t), ga = get(aux.t);
  const double tol = dt == DType::F32 ? 2e-6 : 1e-13;
  for (int64_t i = 0; i < t; ++i) {
    // Compare the chosen (expert, weight) pairs irrespective of their order.
    std::vector<std::pair<int32_t, double>> got_pairs, want_pairs;
    for (int64_t j = 0; j < k; ++j) {
      got_pairs.emplace_back(gi[i * k + j], gw[i * k + j]);
      want_pairs.emplace_back(want.index[i * k + j], want.weight[i * k + j]);
    }
    std::sort(got_pairs.begin(), got_pairs.end());
    std::sort(want_pairs.begin(), want_pairs.end());
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_EQ(got_pairs[j].first, want_pairs[j].first) << "token " << i << " slot " << j;
      EXPECT_NEAR(got_pairs[j].second, want_pairs[j].second, tol) << "token " << i << " expert " << want_pairs[j].first;
    }
    double row = 0;
    for (int64_t x = 0; x < e; ++x) row += ga[i * e + x];
    EXPECT_NEAR(row, 1.0, tol * e) << "aux_probs row " << i << " must sum to 1";
  }
  expect_close(want.aux, ga, tol, tol, "aux_probs");
  expect_close(want.lse, get(lse.t), tol, tol, "lse");
  // Explicit tie expectations, independent of the reference implementation.
  for (int j = 0; j < k; ++j) {
    EXPECT_NE(std::find(gi.begin(), gi.begin() + k, j), gi.begin() + k) << "all-tied row must pick expert " << j;
    const int want1 = j < 3 ? j + 1 : 5;
    EXPECT_NE(std::find(gi.begin() + k, gi.begin() + 2 * k, want1), gi.begin() + 2 * k)
        << "tied row must pick expert " << want1;
  }
}

std::vector<RouterCase> router_cases() {
  std::vector<RouterCase> out;
  for (DType dt : {DType::F32, DType::F64})
    for (RouterScore s : {RouterScore::SOFTMAX, RouterScore::SIGMOID})
      for (bool n : {true, false})
        for (int k : {1, 2, 3}) out.push_back({dt, s, n, k});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Cases, RouterForwardTest, ::testing::ValuesIn(router_cases()),
                         [](const ::testing::TestParamInfo<RouterCase>& info) {
                           const RouterCase& c = info.param;
                           return fmt::format("{}_{}_{}_k{}", dname(c.dtype),
                                              c.score == RouterScore::SOFTMAX ? "softmax" : "sigmoid",
                                              c.normalize ? "norm" : "raw", c.k);
                         });

// ---- gather and combine -----------------------------------------------------------------

TEST_P(CpuOpsTest, GatherRows) {
  const DType dt = GetParam();
  const int64_t t = 7, d = 5, n = 10;
  const auto src = rounded(dt, randn(t * d, 32));
  const std::vector<int32_t> index = {6, 0, 3, 3, 1, 6, 2, 5, 4, 0};
  Owned s = make_from(dt, {t, d}, src), ix = make(DType::I32, {n}), dst = make(dt, {n, d});
  put_i32(ix.t, index);
  cpu().gather_rows(s.t, ix.t, dst.t);
  std::vector<double> want(n * d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) want[i * d + j] = src[index[i] * d + j];
  expect_close(want, get(dst.t), 0, 0, "gather_rows");
}

TEST_P(CpuOpsTest, CombineRows) {
  const DType dt = GetParam();
  const int64_t n = 8, d = 5, t = 4, k = 3;
  const auto rows = rounded(dt, randn(n * d, 33)), wv = rounded(dt, randn(t * k, 34)),
             out0 = rounded(dt, randn(t * d, 35));
  const std::vector<int32_t> slot = {7, 0, 3, 2, 2, 5, 1, 6, 4, 0, 7, 3};  // repeats allowed for the forward
  Owned r = make_from(dt, {n, d}, rows), sr = make(DType::I32, {t, k}), w = make_from(dt, {t, k}, wv),
        out = make(dt, {t, d});
  put_i32(sr.t, slot);
  for (bool weighted : {true, false})
    for (double beta : {0.0, 0.7}) {
      if (beta == 0.0) cpu().fill(out.t, std::numeric_limits<double>::quiet_NaN());  // must not be read
      else put(out.t, out0);
      cpu().combine_rows(r.t, sr.t, weighted ? &w.t : nullptr, beta, out.t);
      std::vector<double> want(t * d), tol(t * d);
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < d; ++j) {
          double acc = beta == 0.0 ? 0.0 : beta * out0[i * d + j], mag = std::fabs(acc);
          for (int64_t s = 0; s < k; ++s) {
            const double term = (weighted ? wv[i * k + s] : 1.0) * rows[slot[i * k + s] * d + j];
            acc += term;
            mag += std::fabs(term);
          }
          want[i * d + j] = acc;
          tol[i * d + j] = 4 * elem_rtol(dt) * mag;
        }
      expect_within(want, get(out.t), tol, fmt::format("combine_rows weighted={} beta={}", weighted, beta));
    }
}

// ---- AdamW ------------------------------------------------------------------------------

TEST_P(CpuOpsTest, AdamWOneStepMatchesTextbook) {
  const DType dt = GetParam();
  const int64_t n = 257;
  const auto p0 = rounded(dt, randn(n, 36)), g = rounded(dt, randn(n, 37, 3.0)), m0 = rounded(dt, randn(n, 38, 0.1));
  auto v0 = randn(n, 39, 0.1);
  for (double& x : v0) x = x * x;
  v0 = rounded(dt, v0);
  v0[0] = 0.0;  // fresh state for one element
  AdamWStep st{};
  st.lr = 1e-2;
  st.beta1 = 0.9;
  st.beta2 = 0.95;
  st.eps = 1e-8;
  st.weight_decay = 0.1;
  const int step = 3;  // the third update: bias corrections 1 - beta^3
  st.bias_correction1 = 1.0 - std::pow(st.beta1, step);
  st.bias_correction2 = 1.0 - std::pow(st.beta2, step);
  st.grad_scale = 0.5;
  Owned p = make_from(dt, {n}, p0), gr = make_from(dt, {n}, g), m = make_from(dt, {n}, m0), v = make_from(dt, {n}, v0);
  cpu().adamw_update(p.t, gr.t, m.t, v.t, st);
  std::vector<double> pw(n), mw(n), vw(n);
  for (int64_t i = 0; i < n; ++i) {
    const double gi = 0.5 * g[i];
    mw[i] = 0.9 * m0[i] + 0.1 * gi;
    vw[i] = 0.95 * v0[i] + 0.05 * gi * gi;
    const double mhat = mw[i] / (1 - std::pow(0.9, 3)), vhat = vw[i] / (1 - std::pow(0.95, 3));
    // Decoupled decay (Loshchilov & Hutter): the decay term is not scaled by Adam's denominator.
    pw[i] = p0[i] - 1e-2 * (mhat / (std::sqrt(vhat) + 1e-8) + 0.1 * p0[i]);
  }
  const double tol = dt == DType::F32 ? 1e-6 : 1e-14;
  expect_close(mw, get(m.t), tol, tol, "first moment");
  expect_close(vw, get(v.t), tol, tol, "second moment");
  expect_close(pw, get(p.t), tol, tol, "parameter");
  expect_close(g, get(gr.t), 0, 0, "gradient untouched");
}

// ---- SVD and eigen ----------------------------------------------------------------------

// [rows, cols] with orthonormal columns: modified Gram-Schmidt, twice, in double.
std::vector<double> orthonormal_columns(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<double> q = randn(rows * cols, seed);
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t p = 0; p < c; ++p) {
        double d = 0;
        for (int64_t r = 0; r < rows; ++r) d += q[r * cols + c] * q[r * cols + p];
        for (int64_t r = 0; r < rows; ++r) q[r * cols + c] -= d * q[r * cols + p];
      }
      double nrm = 0;
      for (int64_t r = 0; r < rows; ++r) nrm += q[r * cols + c] * q[r * cols + c];
      for (int64_t r = 0; r < rows; ++r) q[r * cols + c] /= std::sqrt(nrm);
    }
  return q;
}

// max |X^T X - I| for X [rows, cols] (columns orthonormal), or of X X^T with rows=true.
double orthonormality_error(const std::vector<double>& x, int64_t rows, int64_t cols, bool by_rows) {
  const int64_t n = by_rows ? rows : cols, len = by_rows ? cols : rows;
  double worst = 0;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) {
      double d = 0;
      for (int64_t i = 0; i < len; ++i) d += by_rows ? x[a * cols + i] * x[b * cols + i] : x[i * cols + a] * x[i * cols + b];
      worst = std::max(worst, std::fabs(d - (a == b ? 1.0 : 0.0)));
    }
  return worst;
}

TEST_P(CpuOpsTest, SdmoePartStepClosedForm) {
  // Three experts of 37 elements, 50 apart in the strided operands (the gaps must stay
  // untouched), both parts' AdamW against the formula of docs/sdmoe.md in double.
  const DType dt = GetParam();
  const MatrixStack stack{3, 37, 50};
  const int64_t strided = 150, packed = 3 * 37;
  auto positive = [&](uint64_t seed) {
    auto v = randn(packed, seed, 0.1);
    for (double& x : v) x = x * x;
    return v;
  };
  const auto w0 = rounded(dt, randn(strided, 70)), g = rounded(dt, randn(strided, 71, 2.0)),
             mc0 = rounded(dt, randn(strided, 72, 0.1)), vc0s = rounded(dt, positive(73)), gc = rounded(dt, randn(packed, 74)),
             mu0 = rounded(dt, randn(packed, 75, 0.1)), vu0 = rounded(dt, positive(76));
  std::vector<double> vc0(strided, 0.5);
  for (int64_t i = 0; i < packed; ++i) vc0[(i / 37) * 50 + i % 37] = vc0s[i];
  SdmoePartStep st{};
  st.adam.beta1 = 0.9;
  st.adam.beta2 = 0.95;
  st.adam.eps = 1e-8;
  st.adam.bias_correction1 = 1.0 - std::pow(0.9, 2);
  st.adam.bias_correction2 = 1.0 - std::pow(0.95, 2);
  st.adam.grad_scale = 0.5;
  st.lr_common = 2e-2;
  st.lr_unique = 1e-2;
  st.decay_shift = (st.lr_common - st.lr_unique) * 0.1;
  st.decay_common = st.lr_common * 0.1;
  st.sgd = false;
  Owned w = make_from(dt, {strided}, w0), gt = make_from(dt, {strided}, g), mc = make_from(dt, {strided}, mc0),
        vc = make_from(dt, {strided}, vc0), gct = make_from(dt, {packed}, gc), mu = make_from(dt, {packed}, mu0),
        vu = make_from(dt, {packed}, vu0), diff = make(dt, {packed});
  cpu().sdmoe_part_step(w.t, gt.t, mc.t, vc.t, gct.t, mu.t, vu.t, diff.t, stack, st);
  std::vector<double> ww = w0, mcw = mc0, vcw = vc0, muw(packed), vuw(packed), dw(packed);
  for (int64_t i = 0; i < packed; ++i) {
    const int64_t at = (i / 37) * 50 + i % 37;
    const double c = 0.5 * gc[i], u = 0.5 * (g[at] - gc[i]);
    mcw[at] = 0.9 * mc0[at] + 0.1 * c;
    vcw[at] = 0.95 * vc0[at] + 0.05 * c * c;
    muw[i] = 0.9 * mu0[i] + 0.1 * u;
    vuw[i] = 0.95 * vu0[i] + 0.05 * u * u;
    const double b1 = 1.0 - 0.81, b2 = 1.0 - 0.9025;
    const double ac = -2e-2 * (mcw[at] / b1) / (std::sqrt(vcw[at] / b2) + 1e-8);
    const double au = -1e-2 * (muw[i] / b1) / (std::sqrt(vuw[i] / b2) + 1e-8);
    dw[i] = au - ac + st.decay_shift * w0[at];
    ww[at] = (1.0 - st.decay_common) * w0[at] + ac + dw[i];
  }
  const double tol = dt == DType::F32 ? 2e-6 : 1e-13;
  expect_close(ww, get(w.t), tol, tol, "weights (gaps unchanged)");
  expect_close(mcw, get(mc.t), tol, tol, "common first moment");
  expect_close(vcw, get(vc.t), tol, tol, "common second moment (gaps unchanged)");
  expect_close(muw, get(mu.t), tol, tol, "unique first moment");
  expect_close(vuw, get(vu.t), tol, tol, "unique second moment");
  expect_close(dw, get(diff.t), tol, tol, "difference D");
}

TEST_P(CpuOpsTest, SvdKnownSingularValues) {
  const DType dt = GetParam();
  const double sig_all[] = {9.0, 4.0, 2.5, 1.0, 0.3, 0.1};
  struct Shape { int64_t m, n; };
  for (Shape sh : {Shape{7, 4}, Shape{4, 7}, Shape{6, 6}, Shape{9, 1}}) {
    const int64_t m = sh.m, n = sh.n, r = std::min(m, n);
    // A = Q1 diag(sigma) Q2^T with the singular values given in scrambled order.
    const auto q1 = orthonormal_columns(m, r, 40 + m), q2 = orthonormal_columns(n, r, 50 + n);
    std::vector<double> sigma(sig_all, sig_all + r);
    std::rotate(sigma.begin(), sigma.begin() + r / 2, sigma.end());
    std::vector<double> a(m * n, 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t p = 0; p < r; ++p) a[i * n + j] += q1[i * r + p] * sigma[p] * q2[j * r + p];
    a = rounded(dt, a);
    Owned at = make_from(dt, {m, n}, a), u = make(dt, {m, r}), s = make(dt, {r}), vt = make(dt, {r, n});
    cpu().svd(at.t, u.t, s.t, vt.t);
    const auto gu = get(u.t), gs = get(s.t), gv = get(vt.t);
    const double tol = (dt == DType::F32 ? 2e-5 : 1e-12) * 9.0;
    std::vector<double> want_s = sigma;
    std::sort(want_s.rbegin(), want_s.rend());
    expect_close(want_s, gs, tol, 0, fmt::format("singular values {}x{}", m, n));
    for (int64_t i = 1; i < r; ++i) EXPECT_GE(gs[i - 1], gs[i]) << "descending";
    double recon = 0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double x = 0;
        for (int64_t p = 0; p < r; ++p) x += gu[i * r + p] * gs[p] * gv[p * n + j];
        recon = std::max(recon, std::fabs(x - a[i * n + j]));
      }
    EXPECT_LT(recon, tol) << "reconstruction " << m << "x" << n;
    EXPECT_LT(orthonormality_error(gu, m, r, false), tol) << "U^T U = I";
    EXPECT_LT(orthonormality_error(gv, r, n, true), tol) << "Vt Vt^T = I";
    expect_close(a, get(at.t), 0, 0, "svd must not modify its input");
  }
}

TEST_P(CpuOpsTest, SvdGeneralMatrixInvariants) {
  const DType dt = GetParam();
  for (auto [m, n] : {std::pair<int64_t, int64_t>{12, 5}, {5, 12}}) {
    const int64_t r = std::min(m, n);
    const auto a = rounded(dt, randn(m * n, 60 + m));
    Owned at = make_from(dt, {m, n}, a), u = make(dt, {m, r}), s = make(dt, {r}), vt = make(dt, {r, n});
    cpu().svd(at.t, u.t, s.t, vt.t);
    const auto gs = get(s.t);
    double fro = 0, ss = 0;
    for (double x : a) fro += x * x;
    for (double x : gs) ss += x * x;
    EXPECT_NEAR(ss, fro, (dt == DType::F32 ? 1e-5 : 1e-12) * fro) << "sum s^2 = ||A||_F^2";
    for (int64_t i = 0; i < r; ++i) EXPECT_GE(gs[i], 0.0);
    for (int64_t i = 1; i < r; ++i) EXPECT_GE(gs[i - 1], gs[i]);
    // A^T u_i = s_i v_i for every singular triple.
    const auto gu = get(u.t), gv = get(vt.t);
    const double tol = (dt == DType::F32 ? 2e-5 : 1e-12) * gs[0];
    for (int64_t p = 0; p < r; ++p)
      for (int64_t j = 0; j < n; ++j) {
        double x = 0;
        for (int64_t i = 0; i < m; ++i) x += a[i * n + j] * gu[i * r + p];
        EXPECT_NEAR(x, gs[p] * gv[p * n + j], tol) << "triple " << p;
      }
  }
}

TEST_P(CpuOpsTest, SymmetricEigenKnownSpectrum) {
  const DType dt = GetParam();
  const int64_t n = 6;
  const std::vector<double> lambda = {4.0, -2.0, 0.3, 2.5, -0.5, 1.0};
  const auto q = orthonormal_columns(n, n, 70);
  std::vector<double> a(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) {
      double x = 0;
      for (int64_t p = 0; p < n; ++p) x += q[i * n + p] * lambda[p] * q[j * n + p];
      a[i * n + j] = a[j * n + i] = x;  // exactly symmetric
    }
  a = rounded(dt, a);
  Owned at = make_from(dt, {n, n}, a), w = make(dt, {n}), vecs = make(dt, {n, n});
  cpu().symmetric_eigen(at.t, w.t, vecs.t);
  const auto gw = get(w.t), gv = get(vecs.t);
  std::vector<double> want = lambda;
  std::sort(want.begin(), want.end());
  const double tol = (dt == DType::F32 ? 2e-5 : 1e-12) * 4.0;
  expect_close(want, gw, tol, 0, "eigenvalues ascending");
  for (int64_t i = 0; i < n; ++i)  // A v = lambda v, v = row i of vecs
    for (int64_t r = 0; r < n; ++r) {
      double x = 0;
      for (int64_t c = 0; c < n; ++c) x += a[r * n + c] * gv[i * n + c];
      EXPECT_NEAR(x, gw[i] * gv[i * n + r], tol) << "eigenpair " << i << " component " << r;
    }
  EXPECT_LT(orthonormality_error(gv, n, n, true), tol) << "eigenvector rows orthonormal";
  expect_close(a, get(at.t), 0, 0, "input unchanged");
}

TEST_P(CpuOpsTest, SymmetricEigenBatchedKnownSpectra) {
  // Three matrices in one call, each with its own spectrum: the batch must not mix them.
  const DType dt = GetParam();
  const int64_t n = 5, batch = 3;
  std::vector<double> a(batch * n * n, 0.0);
  std::vector<std::vector<double>> spectra;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<double> lambda(n);
    for (int64_t p = 0; p < n; ++p) lambda[p] = double(b + 1) * (double(p) - 1.5);
    spectra.push_back(lambda);
    const auto q = orthonormal_columns(n, n, 90 + uint32_t(b));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) {
        double x = 0;
        for (int64_t p = 0; p < n; ++p) x += q[i * n + p] * lambda[p] * q[j * n + p];
        a[b * n * n + i * n + j] = a[b * n * n + j * n + i] = x;
      }
  }
  a = rounded(dt, a);
  Owned at = make_from(dt, {batch, n, n}, a), w = make(dt, {batch, n}), vecs = make(dt, {batch, n, n});
  cpu().symmetric_eigen(at.t, w.t, vecs.t);
  const auto gw = get(w.t), gv = get(vecs.t);
  const double tol = (dt == DType::F32 ? 2e-5 : 1e-12) * 4.0;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<double> want = spectra[b];
    std::sort(want.begin(), want.end());
    const std::vector<double> got(gw.begin() + b * n, gw.begin() + (b + 1) * n);
    expect_close(want, got, tol * double(b + 1), 0, "eigenvalues of matrix " + std::to_string(b));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < n; ++r) {
        double x = 0;
        for (int64_t c = 0; c < n; ++c) x += a[b * n * n + r * n + c] * gv[b * n * n + i * n + c];
        EXPECT_NEAR(x, got[i] * gv[b * n * n + i * n + r], tol * double(b + 1)) << "matrix " << b << " pair " << i;
      }
  }
}

TEST_P(CpuOpsTest, CholeskyInverseWhitensEachMatrix) {
  // inv (G + ridge I) inv^T = I with inv lower triangular, for a batch of Gram matrices of
  // random k x L rows; one of them all zeros (a zero gradient), which must stay finite.
  const DType dt = GetParam();
  const int64_t k = 6, length = 40, batch = 3;
  const double relative_ridge = dt == DType::F32 ? 1e-12 : 1e-26;
  std::vector<double> g(batch * k * k, 0.0);
  for (int64_t b = 0; b < 2; ++b) {
    const auto y = randn(k * length, 300 + uint32_t(b));
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        double x = 0;
        for (int64_t l = 0; l < length; ++l) x += y[i * length + l] * y[j * length + l];
        g[b * k * k + i * k + j] = x;
      }
  }
  g = rounded(dt, g);
  Owned gt = make_from(dt, {batch, k, k}, g), inv = make(dt, {batch, k, k});
  cpu().cholesky_inverse(gt.t, inv.t, relative_ridge);
  const auto li = get(inv.t);
  const double tol = dt == DType::F32 ? 1e-5 : 1e-12;
  for (int64_t b = 0; b < batch; ++b) {
    const double* l = &li[b * k * k];
    double trace = 0;
    for (int64_t i = 0; i < k; ++i) trace += g[b * k * k + i * k + i];
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = i + 1; j < k; ++j) EXPECT_EQ(l[i * k + j], 0.0) << "upper triangle of matrix " << b;
    for (int64_t i = 0; i < k * k; ++i) EXPECT_TRUE(std::isfinite(l[i])) << "matrix " << b;
    if (b == 2) {  // the zero matrix: the identity, so zero rows stay zero
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) EXPECT_EQ(l[i * k + j], i == j ? 1.0 : 0.0) << "zero matrix " << i << "," << j;
      continue;
    }
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        double x = 0;
        for (int64_t p = 0; p < k; ++p)
          for (int64_t q = 0; q < k; ++q)
            x += l[i * k + p] * (g[b * k * k + p * k + q] + (p == q ? relative_ridge * trace : 0.0)) * l[j * k + q];
        EXPECT_NEAR(x, i == j ? 1.0 : 0.0, tol) << "matrix " << b << " entry " << i << "," << j;
      }
  }
}

TEST_P(CpuOpsTest, CholeskyInverseStaysFiniteOnRankDeficientGrams) {
  // k rows spanning only r < k dimensions (an expert's gradient from fewer than k routed
  // tokens, as the gradient metric's subspace iteration sees it): past the r-th, the
  // pivots are the Gram's rounding, of either sign. The inverse stays finite, and still
  // whitens the r independent rows (its leading r x r block depends on them alone).
  const DType dt = GetParam();
  const int64_t k = 6, r = 2, length = 40;
  const double relative_ridge = dt == DType::F32 ? 1e-12 : 1e-26;
  for (uint32_t seed = 0; seed < 8; ++seed) {
    const auto basis = randn(r * length, 700 + seed), mix = randn(k * r, 800 + seed);
    std::vector<double> y(k * length, 0.0), g(k * k, 0.0);
    // Rows 0 .. r-1 are the basis itself (well conditioned), the others mixtures of it.
    for (int64_t i = 0; i < k; ++i)
      for (int64_t p = 0; p < r; ++p)
        for (int64_t l = 0; l < length; ++l)
          y[i * length + l] += (i < r ? double(i == p) : mix[i * r + p]) * basis[p * length + l];
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j)
        for (int64_t l = 0; l < length; ++l) g[i * k + j] += y[i * length + l] * y[j * length + l];
    g = rounded(dt, g);
    Owned gt = make_from(dt, {k, k}, g), inv = make(dt, {k, k});
    cpu().cholesky_inverse(gt.t, inv.t, relative_ridge);
    const auto li = get(inv.t);
    for (int64_t i = 0; i < k * k; ++i) ASSERT_TRUE(std::isfinite(li[i])) << "seed " << seed << " entry " << i;
    double trace = 0;
    for (int64_t i = 0; i < k; ++i) trace += g[i * k + i];
    const double tol = dt == DType::F32 ? 1e-5 : 1e-12;
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) {
        double x = 0;
        for (int64_t p = 0; p < k; ++p)
          for (int64_t q = 0; q < k; ++q)
            x += li[i * k + p] * (g[p * k + q] + (p == q ? relative_ridge * trace : 0.0)) * li[j * k + q];
        EXPECT_NEAR(x, i == j ? 1.0 : 0.0, tol) << "seed " << seed << " entry " << i << "," << j;
      }
  }
}

}  // namespace
}  // namespace sdmoe::test
