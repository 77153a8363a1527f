// The bf16 GEMMs (core/cpu/gemm_bf16_avx512.h): the vdpbf16ps kernel and the portable
// version against a double-precision reference computed from the same bf16 inputs, on the
// model's shapes and on edge shapes (odd k, partial tiles, sub-block views), for the
// three (ta, tb) cases.
//
// Tolerance. bf16 x bf16 is exact in fp32 (8 + 8 significand bits), so both sides sum the
// same exact products and differ only by fp32 rounding of the sums: recursive summation of
// k terms errs by at most about k u sum_d |a_d b_d| (u = 2^-24), in any order and with any
// blocking. The epilogue adds a rounding of alpha * sum and one of the beta * C fma. We
// allow four times that:
//   |got - want| <= 4 (k + 2) u (|alpha| sum_d |a_d b_d| + |beta c|) + 1e-30
// (the tiny term for vdpbf16ps flushing denormal results; the inputs here are normal).
// A dropped or doubled product, of typical size sum / k, exceeds this for every k here
// (at k = 1024 the bound is sum / 4000).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/cpu/gemm_bf16_avx512.h"

namespace sdmoe::cpu {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // fp32 unit roundoff
// Written into C's padding (columns past n of each row): must survive every call.
constexpr float kGuard = 12345.0f;

struct Shape {
  bool ta, tb;
  int64_t m, n, k;
  float alpha, beta;
  int64_t pad;  // extra leading-dimension columns of A, B and C: a sub-block view
};

std::string describe(const Shape& s) {
  return std::string(s.ta ? "A^T" : "A") + (s.tb ? " B^T" : " B") + " m=" + std::to_string(s.m) +
         " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k) + " alpha=" + std::to_string(s.alpha) +
         " beta=" + std::to_string(s.beta) + " pad=" + std::to_string(s.pad);
}

// Operands in memory, op(A) = [m, k] and op(B) = [k, n], with their leading dimensions.
struct Problem {
  Shape s;
  int64_t lda, ldb, ldc;
  std::vector<float> a32, b32;  // unrounded values
  std::vector<bf16> a, b;       // the same, rounded to bf16
  std::vector<float> c0;        // C before the call, [m, ldc]
  float op_a(int64_t i, int64_t d, bool rounded) const {
    const int64_t at = s.ta ? d * lda + i : i * lda + d;
    return rounded ? bf16_to_float(a[at]) : a32[at];
  }
  float op_b(int64_t d, int64_t j, bool rounded) const {
    const int64_t at = s.tb ? j * ldb + d : d * ldb + j;
    return rounded ? bf16_to_float(b[at]) : b32[at];
  }
};

Problem make_problem(const Shape& s, uint32_t seed) {
  Problem p{s, 0, 0, 0, {}, {}, {}, {}, {}};
  p.lda = (s.ta ? s.m : s.k) + s.pad;
  p.ldb = (s.tb ? s.k : s.n) + s.pad;
  p.ldc = s.n + s.pad;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  // Exactly sized: a read past the last row is a heap overflow (run under ASan).
  const int64_t a_rows = s.ta ? s.k : s.m, b_rows = s.tb ? s.n : s.k;
  p.a32.resize(a_rows * p.lda);
  p.b32.resize(b_rows * p.ldb);
  for (float& x : p.a32) x = normal(rng);
  for (float& x : p.b32) x = normal(rng);
  for (float x : p.a32) p.a.push_back(float_to_bf16(x));
  for (float x : p.b32) p.b.push_back(float_to_bf16(x));
  // beta == 0 must not read C: NaN there would poison any read.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  p.c0.resize(s.m * p.ldc);
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t j = 0; j < p.ldc; ++j) p.c0[i * p.ldc + j] = j >= s.n ? kGuard : s.beta == 0.0f ? nan : normal(rng);
  return p;
}

// The reference (double) and each element's bound scale, both [m, n]:
// want = alpha sum_d a b + beta c, magnitude = |alpha| sum_d |a b| + |beta c|.
struct Reference {
  std::vector<double> want, magnitude;
};

Reference reference(const Problem& p, bool rounded) {
  const Shape& s = p.s;
  Reference r{std::vector<double>(s.m * s.n, 0.0), std::vector<double>(s.m * s.n, 0.0)};
  std::vector<double> op_b(s.k * s.n);  // [k, n]
  for (int64_t d = 0; d < s.k; ++d)
    for (int64_t j = 0; j < s.n; ++j) op_b[d * s.n + j] = p.op_b(d, j, rounded);
  for (int64_t i = 0; i < s.m; ++i) {
    double* want = r.want.data() + i * s.n;
    double* mag = r.magnitude.data() + i * s.n;
    for (int64_t d = 0; d < s.k; ++d) {
      const double av = p.op_a(i, d, rounded);
      const double* b_row = op_b.data() + d * s.n;
      for (int64_t j = 0; j < s.n; ++j) {
        want[j] += av * b_row[j];  // exact: 24 x 24 significand bits fit in a double
        mag[j] += std::abs(av * b_row[j]);
      }
    }
    for (int64_t j = 0; j < s.n; ++j) {
      const double c = s.beta == 0.0f ? 0.0 : p.c0[i * p.ldc + j];
      want[j] = s.alpha * want[j] + s.beta * c;
      mag[j] = std::abs(s.alpha) * mag[j] + std::abs(s.beta * c);
    }
  }
  return r;
}

using Gemm = void (*)(bool, bool, int64_t, int64_t, int64_t, float, const bf16*, int64_t, const bf16*, int64_t, float,
                      float*, int64_t);

std::vector<float> run(Gemm gemm, const Problem& p) {
  std::vector<float> c = p.c0;
  const Shape& s = p.s;
  gemm(s.ta, s.tb, s.m, s.n, s.k, s.alpha, p.a.data(), p.lda, p.b.data(), p.ldb, s.beta, c.data(), p.ldc);
  return c;
}

// Checks C against the reference within `relative` * magnitude (+ tiny), and that the
// padding past n is untouched. Stops at the first few failures so a sweep stays readable.
void expect_close(const Problem& p, const Reference& ref, const std::vector<float>& c, double relative,
                  const std::string& what) {
  const Shape& s = p.s;
  int failures = 0;
  for (int64_t i = 0; i < s.m && failures < 3; ++i)
    for (int64_t j = 0; j < p.ldc && failures < 3; ++j) {
      const float got = c[i * p.ldc + j];
      if (j >= s.n) {
        if (got != kGuard) {
          ADD_FAILURE() << what << " " << describe(s) << ": wrote C[" << i << "," << j << "] past n";
          ++failures;
        }
        continue;
      }
      const double want = ref.want[i * s.n + j];
      const double tol = relative * ref.magnitude[i * s.n + j] + 1e-30;
      if (!(std::abs(got - want) <= tol)) {  // also fails on NaN
        ADD_FAILURE() << what << " " << describe(s) << ": C[" << i << "," << j << "] = " << got << ", want " << want
                      << " +- " << tol;
        ++failures;
      }
    }
}

double accumulation_bound(int64_t k) { return 4.0 * double(k + 2) * kU; }

void check(Gemm gemm, const char* name, const Shape& s, uint32_t seed) {
  const Problem p = make_problem(s, seed);
  expect_close(p, reference(p, true), run(gemm, p), accumulation_bound(s.k), name);
}

struct Case {
  bool ta, tb;
  bool kernel;  // gemm_bf16_avx512, else gemm_bf16_portable
};
const Case kCases[] = {{false, true, true},  {false, false, true},  {true, false, true},
                       {false, true, false}, {false, false, false}, {true, false, false}};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return std::string(info.param.kernel ? "Avx512Bf16_" : "Portable_") + (info.param.ta ? "At" : "A") +
         (info.param.tb ? "Bt" : "B");
}

class GemmBf16Test : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (GetParam().kernel && !cpu_supports_avx512_bf16()) GTEST_SKIP() << "CPU lacks AVX512_BF16";
    gemm_ = GetParam().kernel ? gemm_bf16_avx512 : gemm_bf16_portable;
    name_ = GetParam().kernel ? "avx512_bf16" : "portable";
  }
  Gemm gemm_ = nullptr;
  const char* name_ = "";
};

// The model's shapes: C = [m, n] whatever the transposes (for A^T B, A is [k, m]).
TEST_P(GemmBf16Test, ModelShapes) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  const Shape shapes[] = {
      {ta, tb, 1024, 576, 192, 1.0f, 0.0f, 0},   // expert up-projection
      {ta, tb, 1024, 192, 576, 1.0f, 1.0f, 0},   // expert down-projection
      {ta, tb, 576, 192, 1024, 1.0f, 1.0f, 0},   // weight gradient (tokens inner)
      {ta, tb, 8192, 128, 64, 0.125f, 0.0f, 0},  // attention scores
      {ta, tb, 64, 64, 64, 1.0f, 0.5f, 0},       // one head
      {ta, tb, 1024, 5000, 192, 1.0f, 0.0f, 0},  // a slice of the output head
  };
  uint32_t seed = 1;
  for (const Shape& s : shapes) check(gemm_, name_, s, seed++);
}

// Every combination of small m, n and k: partial row tiles, partial and multiple column
// panels, odd k (vdpbf16ps takes k in pairs), k across a block edge (513). alpha != 1,
// beta cycles through {0, 1, 0.5} and the leading dimensions through tight and padded
// (odd ones make the pairs unaligned).
TEST_P(GemmBf16Test, EdgeShapes) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  const float betas[] = {0.0f, 1.0f, 0.5f};
  const int64_t pads[] = {0, 3, 16};
  uint32_t seed = 100;
  int index = 0;
  for (int64_t m : {1, 5, 6, 7, 13})
    for (int64_t n : {1, 15, 16, 17, 63, 64, 65, 130})
      for (int64_t k : {1, 2, 3, 31, 32, 33, 65, 257, 513}) {
        check(gemm_, name_, {ta, tb, m, n, k, -0.75f, betas[index % 3], pads[(index / 3) % 3]}, seed++);
        ++index;
      }
}

// Against the unrounded fp32 inputs the only extra error is bf16 rounding of each input
// (relative 2^-9 each, so 2^-8 + 2^-18 per product) on top of the accumulation bound: a
// kernel that mixed up operands or lost precision elsewhere would exceed it.
TEST_P(GemmBf16Test, CloseToFp32Gemm) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  const Shape s{ta, tb, 67, 130, 257, 1.5f, 0.5f, 5};
  const Problem p = make_problem(s, 7);
  const Reference exact = reference(p, false);
  const double rounding = 1.0 / 256 + 1.0 / (1 << 18);
  const std::vector<float> c = run(gemm_, p);
  expect_close(p, exact, c, rounding + accumulation_bound(s.k), std::string(name_) + " vs fp32");
  // The comparison is not vacuous: the bf16 result does differ from the fp32 one.
  double max_diff = 0;
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t j = 0; j < s.n; ++j)
      max_diff = std::max(max_diff, std::abs(c[i * p.ldc + j] - exact.want[i * s.n + j]));
  EXPECT_GT(max_diff, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Cases, GemmBf16Test, ::testing::ValuesIn(kCases), case_name);

TEST(GemmBf16Portable, BothTransposed) {
  for (int64_t k : {1, 33, 200})
    check(gemm_bf16_portable, "portable", {true, true, 13, 70, k, 2.0f, 0.5f, 2}, 500 + uint32_t(k));
}

TEST(GemmBf16, EmptyInnerDimensionScalesC) {
  std::vector<float> c = {1.0f, 2.0f, std::numeric_limits<float>::quiet_NaN(), 4.0f};
  gemm_bf16_portable(false, true, 2, 2, 0, 1.0f, nullptr, 1, nullptr, 1, 0.5f, c.data(), 2);
  EXPECT_EQ(c[0], 0.5f);
  EXPECT_EQ(c[1], 1.0f);
  EXPECT_EQ(c[3], 2.0f);
  if (!cpu_supports_avx512_bf16()) GTEST_SKIP() << "CPU lacks AVX512_BF16";
  std::vector<float> z = {std::numeric_limits<float>::quiet_NaN(), 3.0f};
  gemm_bf16_avx512(false, false, 1, 2, 0, 1.0f, nullptr, 1, nullptr, 2, 0.0f, z.data(), 2);
  EXPECT_EQ(z[0], 0.0f);
  EXPECT_EQ(z[1], 0.0f);
}

TEST(GemmBf16, PeakAndRule) {
  const double peak = measure_cpu_bf16_dot_peak(1);
  if (!cpu_supports_avx512_bf16()) {
    EXPECT_EQ(peak, 0.0);
    EXPECT_FALSE(gemm_bf16_applies(false, true, 1024, 576, 192));
    GTEST_SKIP() << "CPU lacks AVX512_BF16";
  }
  // One vdpbf16ps every few cycles at 1 GHz is already 1e10 FLOP/s: below that the
  // measurement is broken.
  EXPECT_GT(peak, 1e10);
  EXPECT_TRUE(gemm_bf16_applies(false, true, 1024, 576, 192));
  EXPECT_FALSE(gemm_bf16_applies(true, true, 1024, 576, 192));
}

}  // namespace
}  // namespace sdmoe::cpu
