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
#include "tests/core/gemm_bf16_problem.h"

namespace sdmoe::cpu {
namespace {

using namespace gemm_test;

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
