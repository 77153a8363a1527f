// CPU backend ops against plain double-precision references written here: elementwise
// ops, reductions, casts (with an independent bf16 round-to-nearest-even), the counter
// based normal initialiser, GEMMs (all transposes, alpha/beta, strided batches, grouped
// with empty groups, bf16 inputs), embedding, RMSNorm, SwiGLU, the attention layout
// permutations, RoPE, causal softmax and cross-entropy. F32 and F64 where the op takes
// both.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>

#include "core/cpu/gemm_avx512.h"
#include "tests/core/cpu_test_support.h"

namespace sdmoe::test {
namespace {

// ---- elementwise and reductions ---------------------------------------------------------

TEST_P(CpuOpsTest, FillScaleAxpy) {
  const DType dt = GetParam();
  const int64_t n = 1037;
  Owned x = make(dt, {n}), y = make(dt, {n});
  cpu().fill(x.t, -2.75);
  expect_close(std::vector<double>(n, -2.75), get(x.t), 0, 0, "fill");
  cpu().fill(x.t, 0.1);
  expect_close(std::vector<double>(n, double(dt == DType::F32 ? double(0.1f) : 0.1)), get(x.t), 0, 0, "fill 0.1");

  const auto xv = rounded(dt, randn(n, 1)), yv = rounded(dt, randn(n, 2));
  put(x.t, xv);
  cpu().scale(x.t, -0.37);
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = -0.37 * xv[i];
  expect_close(want, get(x.t), 1e-300, elem_rtol(dt), "scale");

  put(x.t, xv);
  put(y.t, yv);
  cpu().axpy(1.25, x.t, y.t);
  std::vector<double> tol(n);
  for (int64_t i = 0; i < n; ++i) {
    want[i] = yv[i] + 1.25 * xv[i];
    tol[i] = elem_rtol(dt) * (std::fabs(yv[i]) + 1.25 * std::fabs(xv[i]));
  }
  expect_within(want, get(y.t), tol, "axpy");
  expect_close(xv, get(x.t), 0, 0, "axpy leaves x alone");
}

// A column block of one matrix into another of a different width: the block's elements
// move, everything else in the destination stays.
TEST_P(CpuOpsTest, CopyRowsMovesABlock) {
  const DType dt = GetParam();
  const int64_t rows = 5, src_width = 11, dst_width = 7, block = 4, src_col = 6, dst_col = 2;
  const auto sv = rounded(dt, randn(rows * src_width, 61)), dv = rounded(dt, randn(rows * dst_width, 62));
  Owned src = make_from(dt, {rows * src_width}, sv), dst = make_from(dt, {rows * dst_width}, dv);
  const size_t width = dtype_size(dt);
  const Tensor from(static_cast<char*>(src.t.data) + src_col * width, dt, Device::CPU, {rows * src_width - src_col});
  const Tensor to(static_cast<char*>(dst.t.data) + dst_col * width, dt, Device::CPU, {rows * dst_width - dst_col});
  cpu().copy_rows(from, src_width, to, dst_width, rows, block);
  std::vector<double> want = dv;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < block; ++j) want[i * dst_width + dst_col + j] = sv[i * src_width + src_col + j];
  expect_close(want, get(dst.t), 0, 0, "copy_rows");
}

TEST(CpuOps, FillI32) {
  Owned x = make(DType::I32, {19});
  cpu().fill(x.t, -7);
  EXPECT_EQ(get_i32(x.t), std::vector<int32_t>(19, -7));
}

TEST_P(CpuOpsTest, SumSquaresAndColumnSums) {
  const DType dt = GetParam();
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(10007)}) {
    Owned x = make(dt, {n});
    const auto v = rounded(dt, randn(n, 3 + n, 1.5, 0.25));
    if (n) put(x.t, v);
    double want = 0.0;
    for (double a : v) want += a * a;
    EXPECT_NEAR(cpu().sum_squares(x.t), want, (dt == DType::F32 ? 1e-6 : 1e-12) * want) << "n=" << n;
  }
  // A 3-d tensor is a matrix whose columns are the last dimension.
  Owned x = make(dt, {3, 5, 7});
  const auto v = rounded(dt, randn(105, 4, 1.0, 0.5));
  put(x.t, v);
  std::vector<double> want(7, 0.0);
  for (int r = 0; r < 15; ++r)
    for (int c = 0; c < 7; ++c) want[c] += v[r * 7 + c];
  expect_close(want, cpu().column_sums(x.t), 1e-12, 1e-12, "column_sums");
}

// ---- bf16 -------------------------------------------------------------------------------

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even to bf16 by comparing distances to the two neighbouring bf16
// magnitudes in double, ties to the even mantissa; beyond the largest bf16 the upper
// neighbour is 2^128, which becomes infinity.
uint16_t ref_bf16(float f) {
  const uint32_t u = bits_of(f), sign = u & 0x80000000u, mag = u & 0x7fffffffu;
  if (mag >= 0x7f800000u) return static_cast<uint16_t>(u >> 16);  // inf (NaN handled by callers)
  const uint32_t lo = mag & 0xffff0000u, hi = lo + 0x10000u;
  const double x = float_of(mag), a = float_of(lo);
  const double b = hi >= 0x7f800000u ? std::ldexp(1.0, 128) : double(float_of(hi));
  const double below = x - a, above = b - x;
  uint32_t pick;
  if (below < above) pick = lo;
  else if (above < below) pick = hi;
  else pick = ((lo >> 16) & 1u) ? hi : lo;
  return static_cast<uint16_t>((sign | pick) >> 16);
}
double ref_from_bf16(uint16_t h) { return float_of(uint32_t(h) << 16); }

TEST(CpuOps, CastBf16RoundTrip) {
  // Random bit patterns over every exponent, and the interesting cases by hand.
  std::mt19937_64 gen(5);
  std::vector<float> v;
  while (v.size() < 20000) {
    const float f = float_of(static_cast<uint32_t>(gen()));
    if (!std::isnan(f)) v.push_back(f);
  }
  const float specials[] = {0.0f, -0.0f, 1.0f, -1.0f,
                            1.00390625f,  // 1 + 2^-8: tie between 1 and 1 + 2^-7, even is 1
                            1.01171875f,  // 1 + 3*2^-8: tie, even is 1 + 2^-6 (rounds up)
                            -1.01171875f, std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(),  // rounds to inf
                            3.38953139e38f,                     // largest bf16, exact
                            1e-40f, float_of(0x3f808000u), float_of(0x3f818000u), float_of(0x3f808001u)};
  v.insert(v.end(), std::begin(specials), std::end(specials));
  const int64_t n = static_cast<int64_t>(v.size());
  Owned f32 = make(DType::F32, {n}), h = make(DType::BF16, {n}), back = make(DType::F32, {n}),
        f64 = make(DType::F64, {n});
  cpu().copy_from_host(v.data(), f32.t);
  cpu().cast(f32.t, h.t);
  std::vector<uint16_t> got(n);
  cpu().copy_to_host(h.t, got.data());
  int bad = 0;
  for (int64_t i = 0; i < n; ++i)
    if (got[i] != ref_bf16(v[i]) && bad++ < 5)
      ADD_FAILURE() << "f32->bf16 of " << v[i] << " (0x" << std::hex << bits_of(v[i]) << "): got 0x" << got[i]
                    << " want 0x" << ref_bf16(v[i]) << std::dec;
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(ref_bf16(1.00390625f), 0x3f80);  // the reference itself on the documented ties
  EXPECT_EQ(ref_bf16(1.01171875f), 0x3f82);

  // bf16 -> f32 and -> f64 are exact: widen the bits.
  cpu().cast(h.t, back.t);
  cpu().cast(h.t, f64.t);
  std::vector<float> wide(n);
  cpu().copy_to_host(back.t, wide.data());
  const auto wide64 = get(f64.t);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(bits_of(wide[i]), uint32_t(got[i]) << 16) << i;
    ASSERT_EQ(wide64[i], ref_from_bf16(got[i])) << i;
  }

  // NaN stays NaN.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Owned one = make(DType::F32, {1}), oneh = make(DType::BF16, {1});
  cpu().copy_from_host(&nan, one.t);
  cpu().cast(one.t, oneh.t);
  uint16_t nb;
  cpu().copy_to_host(oneh.t, &nb);
  EXPECT_EQ(nb & 0x7f80, 0x7f80);
  EXPECT_NE(nb & 0x007f, 0);
}

TEST(CpuOps, CastF32F64) {
  const auto v = randn(999, 6, 1e3);
  Owned d = make_from(DType::F64, {999}, v), f = make(DType::F32, {999}), d2 = make(DType::F64, {999});
  cpu().cast(d.t, f.t);
  cpu().cast(f.t, d2.t);
  std::vector<double> want(999);
  for (int i = 0; i < 999; ++i) want[i] = static_cast<float>(v[i]);  // C++ conversion rounds to nearest
  expect_close(want, get(f.t), 0, 0, "f64->f32");
  expect_close(want, get(d2.t), 0, 0, "f32->f64 exact");
  // f64 -> bf16 on values that are exact floats.
  Owned h = make(DType::BF16, {999});
  cpu().cast(d2.t, h.t);
  std::vector<uint16_t> bits(999);
  cpu().copy_to_host(h.t, bits.data());
  for (int i = 0; i < 999; ++i) ASSERT_EQ(bits[i], ref_bf16(static_cast<float>(want[i]))) << i;
}

// ---- init_normal ------------------------------------------------------------------------

TEST(CpuOps, InitNormalStatistics) {
  const int64_t n = 100000;
  const double stdv = 0.5;
  Owned x = make(DType::F64, {n});
  cpu().init_normal(x.t, 1234, 77, stdv, 0);
  auto v = get(x.t);
  double mean = 0.0;
  for (double a : v) mean += a;
  mean /= n;
  double var = 0.0, third = 0.0, fourth = 0.0;
  for (double a : v) {
    var += (a - mean) * (a - mean);
    third += std::pow(a - mean, 3);
    fourth += std::pow(a - mean, 4);
  }
  var /= n;
  const double sd = std::sqrt(var);
  EXPECT_LT(std::fabs(mean), 5 * stdv / std::sqrt(double(n)));
  EXPECT_LT(std::fabs(sd / stdv - 1.0), 5 / std::sqrt(2.0 * n));
  EXPECT_LT(std::fabs(third / n / std::pow(sd, 3)), 5 * std::sqrt(6.0 / n)) << "skewness";
  EXPECT_LT(std::fabs(fourth / n / (var * var) - 3.0), 5 * std::sqrt(24.0 / n)) << "kurtosis";
  // Kolmogorov-Smirnov distance to N(0, std^2), 0.1% critical value.
  std::sort(v.begin(), v.end());
  double ks = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double cdf = 0.5 * std::erfc(-v[i] / (stdv * std::sqrt(2.0)));
    ks = std::max({ks, std::fabs(cdf - double(i) / n), std::fabs(cdf - double(i + 1) / n)});
  }
  EXPECT_LT(ks, 1.95 / std::sqrt(double(n)));
}

TEST(CpuOps, InitNormalShardsAndStreams) {
  const int64_t n = 1000;
  Owned whole = make(DType::F64, {n}), shard = make(DType::F64, {300}), again = make(DType::F64, {n}),
        other = make(DType::F64, {n}), seed2 = make(DType::F64, {n}), twice = make(DType::F64, {n}),
        f32 = make(DType::F32, {n});
  cpu().init_normal(whole.t, 9, 42, 1.0, 0);
  cpu().init_normal(shard.t, 9, 42, 1.0, 200);
  cpu().init_normal(again.t, 9, 42, 1.0, 0);
  cpu().init_normal(other.t, 9, 43, 1.0, 0);
  cpu().init_normal(seed2.t, 10, 42, 1.0, 0);
  cpu().init_normal(twice.t, 9, 42, 2.0, 0);
  cpu().init_normal(f32.t, 9, 42, 1.0, 0);
  const auto w = get(whole.t);
  expect_close(std::vector<double>(w.begin() + 200, w.begin() + 500), get(shard.t), 0, 0, "shard == range of whole");
  expect_close(w, get(again.t), 0, 0, "deterministic");
  std::vector<double> doubled(n), as_float(n);
  for (int64_t i = 0; i < n; ++i) {
    doubled[i] = 2.0 * w[i];
    as_float[i] = static_cast<float>(w[i]);
  }
  expect_close(doubled, get(twice.t), 0, 0, "std scales the values");
  expect_close(as_float, get(f32.t), 0, 0, "f32 is the rounded f64 draw");
  for (const Owned* o : {&other, &seed2}) {
    const auto u = get(o->t);
    double dot = 0, nu = 0, nw = 0;
    for (int64_t i = 0; i < n; ++i) dot += u[i] * w[i], nu += u[i] * u[i], nw += w[i] * w[i];
    EXPECT_LT(std::fabs(dot / std::sqrt(nu * nw)), 0.15) << "streams and seeds must decorrelate";
  }
}

// ---- GEMM -------------------------------------------------------------------------------

// C = alpha op(A) op(B) + beta C (beta == 0 ignores C, as BLAS does) and a bound on the
// magnitudes summed, for the tolerance.
void ref_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, const double* b,
              double beta, double* c, double* mag) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0, sa = 0.0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = ta ? a[p * m + i] : a[i * k + p], bv = tb ? b[j * k + p] : b[p * n + j];
        s += av * bv;
        sa += std::fabs(av * bv);
      }
      const double old = beta == 0.0 ? 0.0 : beta * c[i * n + j];
      c[i * n + j] = alpha * s + old;
      mag[i * n + j] = std::fabs(alpha) * sa + std::fabs(old);
    }
}

double gemm_rtol(DType dt, int64_t k) { return dt == DType::F32 ? 2e-7 * double(k + 4) : 1e-15 * double(k + 4); }

TEST_P(CpuOpsTest, GemmAllTransposesAlphaBeta) {
  const DType dt = GetParam();
  struct Shape { int64_t m, n, k; };
  for (Shape sh : {Shape{5, 7, 11}, Shape{67, 45, 129}, Shape{1, 9, 3}})
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (double beta : {-0.5, 0.0}) {
          const int64_t m = sh.m, n = sh.n, k = sh.k;
          const auto av = rounded(dt, randn(m * k, 10 + m + ta)), bv = rounded(dt, randn(k * n, 20 + n + tb));
          auto cv = rounded(dt, randn(m * n, 30 + k));
          Owned a = make_from(dt, {m * k}, av), b = make_from(dt, {k * n}, bv), c = make_from(dt, {m, n}, cv);
          // With beta == 0 the output must not read C: fill it with NaN.
          if (beta == 0.0) cpu().fill(c.t, std::numeric_limits<double>::quiet_NaN());
          std::vector<double> mag(m * n);
          ref_gemm(ta, tb, m, n, k, 0.75, av.data(), bv.data(), beta, cv.data(), mag.data());
          cpu().gemm(ta, tb, m, n, k, 0.75, a.t, b.t, beta, c.t);
          for (double& x : mag) x *= gemm_rtol(dt, k);
          expect_within(cv, get(c.t), mag,
                        fmt::format("gemm {} ta={} tb={} {}x{}x{} beta={}", dname(dt), ta, tb, m, n, k, beta));
        }
}

// Shapes large enough for the backend to split C across threads: by rows (tall C, or
// rows of at least 128 per thread), by columns (short, wide C), uneven parts, and a
// batch handed out whole GEMMs per thread. Three threads even on fewer cores, so the
// splits happen wherever the test runs.
TEST_P(CpuOpsTest, GemmThreadSplitsMatchReference) {
  const DType dt = GetParam();
  auto threaded = make_cpu_backend(3);
  struct Shape { int64_t m, n, k, count; };
  for (Shape sh : {Shape{301, 70, 40, 1}, Shape{40, 301, 40, 1}, Shape{389, 400, 9, 1}, Shape{33, 35, 37, 5}})
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (double beta : {0.5, 0.0}) {
          const int64_t m = sh.m, n = sh.n, k = sh.k, count = sh.count;
          const GemmBatch batch{count, m * k, k * n, m * n};
          const auto av = rounded(dt, randn(count * m * k, 80 + m + ta)),
                     bv = rounded(dt, randn(count * k * n, 81 + n + tb));
          auto cv = rounded(dt, randn(count * m * n, 82 + k));
          if (beta == 0.0) std::fill(cv.begin(), cv.end(), std::numeric_limits<double>::quiet_NaN());
          Owned a = make_from(dt, {count * m * k}, av), b = make_from(dt, {count * k * n}, bv),
                c = make_from(dt, {count * m * n}, cv);
          std::vector<double> mag(count * m * n);
          for (int64_t i = 0; i < count; ++i)
            ref_gemm(ta, tb, m, n, k, 0.5, av.data() + i * m * k, bv.data() + i * k * n, beta, cv.data() + i * m * n,
                     mag.data() + i * m * n);
          threaded->gemm(ta, tb, m, n, k, 0.5, a.t, b.t, beta, c.t, batch);
          for (double& x : mag) x *= gemm_rtol(dt, k);
          expect_within(cv, get(c.t), mag,
                        fmt::format("threaded gemm {} ta={} tb={} {} x {}x{}x{} beta={}", dname(dt), ta, tb, count, m,
                                    n, k, beta));
        }
}

// Our AVX-512 GEMM in its three forms (A B^T, A B, A^T B): row and column tails around
// its 6 x 64 tile (and, for A^T B, around the 64-row panels of C^T), k below, at and
// between the 16-wide transpose blocks and across the 256-step inner blocks, padded
// leading dimensions (so offsets must come from them), and padding that must stay
// untouched. Then the same shapes through the backend, which splits them over its threads
// and hands each slice to the kernel where the kernel applies.
TEST(CpuOps, GemmAvx512KernelMatchesReference) {
  if (!cpu::cpu_supports_gemm_avx512()) GTEST_SKIP() << "no AVX-512 on this CPU";
  struct Shape { int64_t m, n, k; };
  const Shape shapes[] = {{6, 64, 1},  {13, 131, 17}, {128, 128, 32}, {7, 200, 64},
                          {50, 65, 33}, {11, 64, 16},  {70, 70, 300},  {130, 192, 520}};
  for (const auto& [ta, tb] : {std::pair{false, true}, std::pair{false, false}, std::pair{true, false}})
    for (Shape sh : shapes) {
      const int64_t m = sh.m, n = sh.n, k = sh.k;
      const std::string form = ta ? "A^T B" : tb ? "A B^T" : "A B";
      // Row-major op(A) is m x k: A itself is k x m when transposed; likewise B.
      const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
      const int64_t lda = a_cols + 3, ldb = b_cols + 5, ldc = n + 7;
      for (double beta : {0.0, -0.5}) {
        const auto av = rounded(DType::F32, randn(a_rows * lda, 90 + m));
        const auto bv = rounded(DType::F32, randn(b_rows * ldb, 91 + n));
        auto cv = rounded(DType::F32, randn(m * ldc, 92 + k));
        std::vector<float> a(av.begin(), av.end()), b(bv.begin(), bv.end()), c(cv.begin(), cv.end());
        if (beta == 0.0)
          for (int64_t i = 0; i < m; ++i) std::fill_n(c.data() + i * ldc, n, std::numeric_limits<float>::quiet_NaN());
        cpu::gemm_avx512(ta, tb, m, n, k, 0.75f, a.data(), lda, b.data(), ldb, float(beta), c.data(), ldc);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < ldc; ++j) {
            if (j >= n) {
              ASSERT_EQ(c[i * ldc + j], float(cv[i * ldc + j])) << form << ": padding written at " << i << "," << j;
              continue;
            }
            double want = 0.0, mag = 0.0;
            for (int64_t d = 0; d < k; ++d) {
              const double x = (ta ? av[d * lda + i] : av[i * lda + d]) * (tb ? bv[j * ldb + d] : bv[d * ldb + j]);
              want += x;
              mag += std::fabs(x);
            }
            want *= 0.75;
            mag *= 0.75;
            if (beta != 0.0) {
              want += beta * cv[i * ldc + j];
              mag += std::fabs(beta * cv[i * ldc + j]);
            }
            ASSERT_NEAR(c[i * ldc + j], want, mag * gemm_rtol(DType::F32, k) + 1e-30)
                << form << " " << m << "x" << n << "x" << k << " beta=" << beta << " at " << i << "," << j;
          }
      }
      // Through the backend (contiguous operands, a batch of two as the attention heads run).
      const GemmBatch batch{2, m * k, n * k, m * n};
      const auto av = rounded(DType::F32, randn(2 * m * k, 93)), bv = rounded(DType::F32, randn(2 * n * k, 94));
      std::vector<double> cv(2 * m * n, 0.0), mag(2 * m * n);
      for (int64_t i = 0; i < 2; ++i)
        ref_gemm(ta, tb, m, n, k, 1.0, av.data() + i * m * k, bv.data() + i * n * k, 0.0, cv.data() + i * m * n,
                 mag.data() + i * m * n);
      Owned a = make_from(DType::F32, {2 * m * k}, av), b = make_from(DType::F32, {2 * n * k}, bv),
            c = make(DType::F32, {2 * m * n});
      cpu().gemm(ta, tb, m, n, k, 1.0, a.t, b.t, 0.0, c.t, batch);
      for (double& x : mag) x *= gemm_rtol(DType::F32, k);
      expect_within(cv, get(c.t), mag, fmt::format("backend gemm {} {}x{}x{}", form, m, n, k));
    }
}

TEST_P(CpuOpsTest, GemmKZeroScalesByBeta) {
  const DType dt = GetParam();
  Owned a = make(dt, {1}), b = make(dt, {1});
  const auto cv = rounded(dt, randn(12, 3));
  Owned c = make_from(dt, {3, 4}, cv);
  cpu().gemm(false, false, 3, 4, 0, 1.0, a.t, b.t, 0.5, c.t);
  std::vector<double> want(12);
  for (int i = 0; i < 12; ++i) want[i] = 0.5 * cv[i];
  expect_close(want, get(c.t), 0, elem_rtol(dt), "k=0, beta=0.5");
  cpu().fill(c.t, std::numeric_limits<double>::quiet_NaN());
  cpu().gemm(false, false, 3, 4, 0, 1.0, a.t, b.t, 0.0, c.t);
  expect_close(std::vector<double>(12, 0.0), get(c.t), 0, 0, "k=0, beta=0 zeroes C");
}

TEST_P(CpuOpsTest, GemmStridedBatch) {
  const DType dt = GetParam();
  const int64_t m = 4, n = 6, k = 5, count = 3;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (bool shared_b : {false, true}) {
        // Padded strides (and a stride-0, shared B) so that offsets must come from the strides.
        const GemmBatch batch{count, m * k + 3, shared_b ? 0 : k * n + 2, m * n + 7};
        const int64_t na = count * batch.stride_a, nb = shared_b ? k * n : count * batch.stride_b,
                      nc = count * batch.stride_c;
        const auto av = rounded(dt, randn(na, 40 + ta)), bv = rounded(dt, randn(nb, 41 + tb));
        auto cv = rounded(dt, randn(nc, 42));
        Owned a = make_from(dt, {na}, av), b = make_from(dt, {nb}, bv), c = make_from(dt, {nc}, cv);
        std::vector<double> mag(nc, 0.0);
        for (int64_t i = 0; i < count; ++i)
          ref_gemm(ta, tb, m, n, k, -1.5, av.data() + i * batch.stride_a, bv.data() + i * batch.stride_b, 0.25,
                   cv.data() + i * batch.stride_c, mag.data() + i * batch.stride_c);
        cpu().gemm(ta, tb, m, n, k, -1.5, a.t, b.t, 0.25, c.t, batch);
        for (double& x : mag) x *= gemm_rtol(dt, k);  // padding: mag 0, must be untouched exactly
        expect_within(cv, get(c.t), mag, fmt::format("batched gemm ta={} tb={} shared_b={}", ta, tb, shared_b));
      }
}

TEST_P(CpuOpsTest, GroupedGemmWithEmptyGroups) {
  const DType dt = GetParam();
  struct G { int64_t m, n, k; };
  const std::vector<G> shapes = {{3, 4, 5}, {0, 4, 5}, {2, 0, 3}, {4, 3, 0}, {6, 2, 7}, {0, 0, 0}, {1, 1, 1}};
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (double beta : {0.5, 0.0}) {
        std::vector<Owned> as, bs, cs;
        std::vector<std::vector<double>> want, mags;
        std::vector<GemmGroup> groups;
        for (size_t g = 0; g < shapes.size(); ++g) {
          const auto [m, n, k] = shapes[g];
          // At least 4 elements each, so empty groups point at memory whose contents must survive.
          const int64_t na = std::max<int64_t>(4, m * k), nb = std::max<int64_t>(4, k * n),
                        nc = std::max<int64_t>(4, m * n);
          const auto av = rounded(dt, randn(na, 50 + g)), bv = rounded(dt, randn(nb, 60 + g));
          auto cv = rounded(dt, randn(nc, 70 + g));
          // With beta == 0 the output must not be read: NaN in C (not in the padding after it).
          if (beta == 0.0)
            for (int64_t i = 0; i < m * n; ++i) cv[i] = std::numeric_limits<double>::quiet_NaN();
          as.push_back(make_from(dt, {na}, av));
          bs.push_back(make_from(dt, {nb}, bv));
          cs.push_back(make_from(dt, {nc}, cv));
          std::vector<double> mag(nc, 0.0);
          ref_gemm(ta, tb, m, n, k, 1.25, av.data(), bv.data(), beta, cv.data(), mag.data());
          for (double& x : mag) x *= gemm_rtol(dt, k);
          want.push_back(cv);
          mags.push_back(mag);
          groups.push_back(GemmGroup{as.back().t.data, bs.back().t.data, cs.back().t.data, m, n, k});
        }
        cpu().grouped_gemm(ta, tb, dt, 1.25, groups, beta);
        for (size_t g = 0; g < shapes.size(); ++g)
          expect_within(want[g], get(cs[g].t), mags[g],
                        fmt::format("grouped gemm ta={} tb={} beta={} group {} ({}x{}x{})", ta, tb, beta, g,
                                    shapes[g].m, shapes[g].n, shapes[g].k));
      }
}

TEST(CpuOps, GemmBf16InputsF32Output) {
  const int64_t m = 9, n = 13, k = 21, count = 2;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      const GemmBatch batch{count, m * k, k * n, m * n};
      const auto af = randn(count * m * k, 80 + ta), bf = randn(count * k * n, 90 + tb);
      std::vector<uint16_t> ah(af.size()), bh(bf.size());
      std::vector<double> ar(af.size()), br(bf.size());
      for (size_t i = 0; i < af.size(); ++i) ar[i] = ref_from_bf16(ah[i] = ref_bf16(float(af[i])));
      for (size_t i = 0; i < bf.size(); ++i) br[i] = ref_from_bf16(bh[i] = ref_bf16(float(bf[i])));
      Owned a = make(DType::BF16, {count * m * k}), b = make(DType::BF16, {count * k * n});
      cpu().copy_from_host(ah.data(), a.t);
      cpu().copy_from_host(bh.data(), b.t);
      auto cv = rounded(DType::F32, randn(count * m * n, 100));
      Owned c = make_from(DType::F32, {count * m * n}, cv);
      std::vector<double> mag(cv.size());
      for (int64_t i = 0; i < count; ++i)
        ref_gemm(ta, tb, m, n, k, 0.5, ar.data() + i * m * k, br.data() + i * k * n, 1.0, cv.data() + i * m * n,
                 mag.data() + i * m * n);
      cpu().gemm(ta, tb, m, n, k, 0.5, a.t, b.t, 1.0, c.t, batch);
      for (double& x : mag) x *= gemm_rtol(DType::F32, k);
      expect_within(cv, get(c.t), mag, fmt::format("bf16 gemm ta={} tb={}", ta, tb));
    }
}

// ---- embedding, norm, activation --------------------------------------------------------

TEST_P(CpuOpsTest, EmbeddingForwardBackward) {
  const DType dt = GetParam();
  const int64_t v = 13, d = 6, t = 20;
  std::vector<int32_t> ids = randint(t, 0, v, 7);
  ids[3] = ids[9] = ids[15] = 4;  // repeated ids must accumulate
  ids[0] = 0;
  ids[19] = v - 1;
  ids[5] = ids[11] = -1;  // rows on another rank: zero output, no gradient
  const auto table = rounded(dt, randn(v * d, 8)), dout = rounded(dt, randn(t * d, 9)),
             dtable0 = rounded(dt, randn(v * d, 10));
  Owned idt = make(DType::I32, {t}), tab = make_from(dt, {v, d}, table), out = make(dt, {t, d}),
        g = make_from(dt, {t, d}, dout), dtab = make_from(dt, {v, d}, dtable0);
  put_i32(idt.t, ids);
  cpu().embedding_forward(idt.t, tab.t, out.t);
  std::vector<double> want(t * d), dwant = dtable0, tol(v * d, 0.0);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < d; ++j) {
      if (ids[i] < 0) continue;  // want stays 0
      want[i * d + j] = table[ids[i] * d + j];
      dwant[ids[i] * d + j] += dout[i * d + j];
      tol[ids[i] * d + j] += 4 * elem_rtol(dt) * (std::fabs(dout[i * d + j]) + std::fabs(dtable0[ids[i] * d + j]));
    }
  expect_close(want, get(out.t), 0, 0, "embedding forward");
  cpu().embedding_backward(idt.t, g.t, dtab.t);
  expect_within(dwant, get(dtab.t), tol, "embedding backward accumulates");
}

TEST_P(CpuOpsTest, RmsNormForward) {
  const DType dt = GetParam();
  const int64_t t = 7, d = 33;
  const double eps = 1e-5;
  auto x = rounded(dt, randn(t * d, 11, 2.0, 0.3));
  for (int64_t j = 0; j < d; ++j) x[2 * d + j] = 0.0;  // an all-zero row: rstd = 1/sqrt(eps)
  const auto w = rounded(dt, randn(d, 12, 0.5, 1.0));
  Owned xt = make_from(dt, {t, d}, x), wt = make_from(dt, {d}, w), y = make(dt, {t, d}), rstd = make(dt, {t});
  cpu().rmsnorm_forward(xt.t, wt.t, eps, y.t, rstd.t);
  std::vector<double> yw(t * d), rw(t);
  for (int64_t r = 0; r < t; ++r) {
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += x[r * d + j] * x[r * d + j];
    rw[r] = 1.0 / std::sqrt(ms / d + eps);
    for (int64_t j = 0; j < d; ++j) yw[r * d + j] = x[r * d + j] * rw[r] * w[j];
  }
  expect_close(rw, get(rstd.t), 0, 4 * elem_rtol(dt), "rstd");
  expect_close(yw, get(y.t), 1e-300, 4 * elem_rtol(dt), "rmsnorm y");
}

TEST_P(CpuOpsTest, SwigluForward) {
  const DType dt = GetParam();
  const int64_t t = 5, f = 17;
  auto gu = rounded(dt, randn(t * 2 * f, 13, 3.0));
  gu[0] = 40.0;
  gu[1] = -40.0;
  gu[2] = 0.0;
  Owned g = make_from(dt, {t, 2 * f}, gu), out = make(dt, {t, f});
  cpu().swiglu_forward(g.t, out.t);
  std::vector<double> want(t * f);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < f; ++i) {
      const double a = gu[r * 2 * f + i], u = gu[r * 2 * f + f + i];
      want[r * f + i] = a / (1.0 + std::exp(-a)) * u;
    }
  expect_close(want, get(out.t), 1e-300, 4 * elem_rtol(dt), "swiglu");
}

// ---- attention layouts, rope, softmax ---------------------------------------------------

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

TEST_P(CpuOpsTest, QkvAndHeadPermutations) {
  const DType dt = GetParam();
  const int64_t b = 2, s = 3, h = 2, dh = 4, n = b * s * h * dh;
  const auto qkv = rounded(dt, randn(3 * n, 14));
  Owned packed = make_from(dt, {b * s, 3 * h * dh}, qkv), q = make(dt, {b, h, s, dh}), k = make(dt, {b, h, s, dh}),
        v = make(dt, {b, h, s, dh});
  cpu().split_qkv(packed.t, q.t, k.t, v.t);
  const Owned* parts[3] = {&q, &k, &v};
  for (int p = 0; p < 3; ++p) {
    std::vector<double> want(n);
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t hi = 0; hi < h; ++hi)
        for (int64_t si = 0; si < s; ++si)
          for (int64_t di = 0; di < dh; ++di)
            want[((bi * h + hi) * s + si) * dh + di] = qkv[(((bi * s + si) * 3 + p) * h + hi) * dh + di];
    expect_close(want, get(parts[p]->t), 0, 0, fmt::format("split_qkv part {}", p));
  }
  // join_qkv is the adjoint of split_qkv: <join(a), x> == <a, split(x)>.
  const auto aq = rounded(dt, randn(n, 15)), ak = rounded(dt, randn(n, 16)), av = rounded(dt, randn(n, 17));
  Owned dq = make_from(dt, {b, h, s, dh}, aq), dk = make_from(dt, {b, h, s, dh}, ak),
        dv = make_from(dt, {b, h, s, dh}, av), joined = make(dt, {b * s, 3 * h * dh});
  cpu().fill(joined.t, std::numeric_limits<double>::quiet_NaN());  // every element must be written
  cpu().join_qkv(dq.t, dk.t, dv.t, joined.t);
  const double lhs = dot(get(joined.t), qkv);
  const double rhs = dot(aq, get(q.t)) + dot(ak, get(k.t)) + dot(av, get(v.t));
  EXPECT_NEAR(lhs, rhs, 1e-12 * (std::fabs(lhs) + 10));
  // join(split(x)) == x
  cpu().join_qkv(q.t, k.t, v.t, joined.t);
  expect_close(qkv, get(joined.t), 0, 0, "join(split(x))");

  // merge_heads [B,H,S,Dh] -> [B,S,H,Dh]; split_heads is its inverse.
  const auto xh = rounded(dt, randn(n, 18));
  Owned x = make_from(dt, {b, h, s, dh}, xh), y = make(dt, {b, s, h, dh}), x2 = make(dt, {b, h, s, dh});
  cpu().merge_heads(x.t, y.t);
  std::vector<double> want(n);
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t hi = 0; hi < h; ++hi)
      for (int64_t si = 0; si < s; ++si)
        for (int64_t di = 0; di < dh; ++di)
          want[((bi * s + si) * h + hi) * dh + di] = xh[((bi * h + hi) * s + si) * dh + di];
  expect_close(want, get(y.t), 0, 0, "merge_heads");
  cpu().split_heads(y.t, x2.t);
  expect_close(xh, get(x2.t), 0, 0, "split_heads(merge_heads(x))");
}

TEST_P(CpuOpsTest, RopeRotatesPairsAndInverts) {
  const DType dt = GetParam();
  const int64_t b = 2, h = 3, s = 5, dh = 8, half = dh / 2, n = b * h * s * dh;
  for (double theta : {10000.0, 7.5}) {
    const auto xv = rounded(dt, randn(n, 19));
    Owned x = make_from(dt, {b, h, s, dh}, xv);
    cpu().rope(x.t, theta, +1);
    std::vector<double> want(n);
    for (int64_t r = 0; r < b * h; ++r)
      for (int64_t pos = 0; pos < s; ++pos)
        for (int64_t i = 0; i < half; ++i) {
          const double ang = double(pos) * std::pow(theta, -2.0 * double(i) / double(dh));
          const double* row = xv.data() + (r * s + pos) * dh;
          double* out = want.data() + (r * s + pos) * dh;
          out[i] = row[i] * std::cos(ang) - row[i + half] * std::sin(ang);
          out[i + half] = row[i] * std::sin(ang) + row[i + half] * std::cos(ang);
        }
    expect_close(want, get(x.t), 4 * elem_rtol(dt), 4 * elem_rtol(dt), fmt::format("rope theta={}", theta));
    cpu().rope(x.t, theta, -1);
    expect_close(xv, get(x.t), 8 * elem_rtol(dt), 8 * elem_rtol(dt), "rope -1 inverts rope +1");
  }
}

TEST_P(CpuOpsTest, CausalSoftmaxForward) {
  const DType dt = GetParam();
  const int64_t n = 3, s = 6;
  const double scale = 0.37;
  auto sc = rounded(dt, randn(n * s * s, 20, 4.0));
  sc[1 * s * s + 4 * s + 2] = 900.0;  // stability: a huge logit
  Owned x = make_from(dt, {n, s, s}, sc);
  cpu().causal_softmax_forward(x.t, scale);
  std::vector<double> want(n * s * s, 0.0);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < s; ++i) {
      const double* row = sc.data() + (b * s + i) * s;
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, scale * row[j]);
      for (int64_t j = 0; j <= i; ++j) sum += std::exp(scale * row[j] - mx);
      for (int64_t j = 0; j <= i; ++j) want[(b * s + i) * s + j] = std::exp(scale * row[j] - mx) / sum;
    }
  // probabilities are in [0, 1]: f32 may flush e^-300 to 0, hence the absolute floor
  expect_close(want, get(x.t), dt == DType::F32 ? 1e-7 : 1e-300, 8 * elem_rtol(dt), "causal softmax (masked entries 0)");
}

TEST_P(CpuOpsTest, CrossEntropyForward) {
  const DType dt = GetParam();
  const int64_t t = 6, v = 37;
  auto lg = rounded(dt, randn(t * v, 21, 3.0));
  for (int64_t j = 0; j < v; ++j) lg[2 * v + j] = static_cast<float>(lg[2 * v + j] + 300.0);  // large offset row
  const std::vector<int32_t> tgt = {0, 36, 5, -1, Backend::kTargetOnOtherShard, 3};
  Owned logits = make_from(dt, {t, v}, lg), targets = make(DType::I32, {t}), losses = make(dt, {t}),
        lse = make(dt, {t});
  put_i32(targets.t, tgt);
  cpu().cross_entropy_forward(logits.t, targets.t, losses.t, lse.t);
  std::vector<double> lw(t), lossw(t);
  for (int64_t r = 0; r < t; ++r) {
    double mx = -1e300, sum = 0;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, lg[r * v + j]);
    for (int64_t j = 0; j < v; ++j) sum += std::exp(lg[r * v + j] - mx);
    lw[r] = mx + std::log(sum);
    lossw[r] = tgt[r] == Backend::kTargetOnOtherShard ? lw[r] : tgt[r] < 0 ? 0.0 : lw[r] - lg[r * v + tgt[r]];
  }
  const double tol = dt == DType::F32 ? 3e-6 : 1e-12;
  expect_close(lw, get(lse.t), tol, tol, "lse");
  // the loss is a difference of two O(lse) numbers: absolute tolerance relative to lse
  std::vector<double> ltol(t);
  for (int64_t r = 0; r < t; ++r) ltol[r] = tol * (1.0 + std::fabs(lw[r]));
  expect_within(lossw, get(losses.t), ltol, "per-token loss (ignored target -> 0, other shard -> lse)");
  EXPECT_EQ(get(losses.t)[3], 0.0);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CpuOpsTest, ::testing::Values(DType::F32, DType::F64), dtype_param_name);

}  // namespace
}  // namespace sdmoe::test
