// The AMX bf16 GEMM (core/cpu/gemm_bf16_amx.h) against a double-precision reference
// computed from the same bf16 inputs, on the model's shapes and on edge shapes (partial
// tiles, k not a multiple of 32, k across a block edge, padded and odd leading
// dimensions), for all four (ta, tb), plus calls from two threads at once. Every test that
// touches the tiles skips on a CPU without AMX-BF16 or a Linux that does not grant it.
//
// Tolerance, as for the AVX-512 bf16 kernel (tests/core/test_gemm_bf16.cc): bf16 x bf16 is
// exact in fp32, so the kernel and the reference sum the same exact products and differ
// only by fp32 rounding of the sums, at most about k u sum_d |a_d b_d| (u = 2^-24) in any
// order and blocking, plus a rounding each for alpha * sum and the beta * C fma. We allow
// four times that:
//   |got - want| <= 4 (k + 2) u (|alpha| sum_d |a_d b_d| + |beta c|) + 1e-30
// (the tiny term for TDPBF16PS flushing denormals; the inputs here are normal). A dropped
// or doubled product, of typical size sum / k, exceeds this for every k here.
//
// Operands live at the very end of a page followed by an inaccessible one, so a tile load
// past a matrix (the kernel reads A in place) faults instead of reading a neighbour; the
// asm tile loads are invisible to sanitizers.
#include <cpuid.h>
#include <gtest/gtest.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/cpu/gemm_bf16_amx.h"
#include "tests/core/gemm_bf16_problem.h"

namespace sdmoe::cpu {
namespace {

using namespace gemm_test;

void check(const Shape& s, uint32_t seed) {
  const Problem p = make_problem(s, seed);
  expect_close(p, reference(p, true), run(gemm_bf16_amx, p), accumulation_bound(s.k), "amx");
}

struct Case {
  bool ta, tb;
};
const Case kCases[] = {{false, true}, {false, false}, {true, false}, {true, true}};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return std::string(info.param.ta ? "At" : "A") + (info.param.tb ? "Bt" : "B");
}

class GemmBf16AmxTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!cpu_supports_amx_bf16()) GTEST_SKIP() << "CPU or OS lacks AMX-BF16 (or the tile data grant)";
  }
};

// The model's shapes: C = [m, n] whatever the transposes (for A^T B, A is [k, m]).
// k = 576 and 1024 span two k blocks, n = 5000 two B panels.
TEST_P(GemmBf16AmxTest, ModelShapes) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  const Shape shapes[] = {
      {ta, tb, 1024, 576, 192, 1.0f, 0.0f, 0},   // expert up-projection
      {ta, tb, 1024, 192, 576, 1.0f, 1.0f, 0},   // expert down-projection
      {ta, tb, 576, 192, 1024, 1.0f, 1.0f, 0},   // weight gradient (tokens inner)
      {ta, tb, 8192, 128, 64, 0.125f, 0.0f, 0},  // attention scores
      {ta, tb, 8192, 64, 128, 1.0f, 0.0f, 0},    // attention values
      {ta, tb, 64, 64, 64, 1.0f, 0.5f, 0},       // one head
      {ta, tb, 1024, 5000, 192, 1.0f, 0.0f, 0},  // a slice of the output head
  };
  uint32_t seed = 1;
  for (const Shape& s : shapes) check(s, seed++);
}

// Every combination of small m, n and k: partial tiles (16) and blocks (32) of rows and
// columns, several column blocks, k not a multiple of 32 (a zero-padded last step), k
// across a block edge (769: two k blocks of at most 768). alpha != 1, beta cycles through
// {0, 1, 0.5} and the leading dimensions through tight and padded (odd ones leave tile
// rows unaligned).
TEST_P(GemmBf16AmxTest, EdgeShapes) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  const float betas[] = {0.0f, 1.0f, 0.5f};
  const int64_t pads[] = {0, 3, 16};
  uint32_t seed = 100;
  int index = 0;
  for (int64_t m : {1, 5, 15, 16, 17, 33})
    for (int64_t n : {1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130})
      for (int64_t k : {1, 2, 3, 31, 32, 33, 63, 64, 65, 257, 513, 769}) {
        check({ta, tb, m, n, k, -0.75f, betas[index % 3], pads[(index / 3) % 3]}, seed++);
        ++index;
      }
}

// k across one, two and three k blocks (at most 768 each; each block after the first adds
// to what the one before wrote, whatever beta), with and without a partial last step,
// beta in {0, 1}, alpha = 1; n = 1400 spans two B panels (of 1 MiB: 832 to 896 columns
// at these k past 512).
TEST_P(GemmBf16AmxTest, KBlocksAndPanels) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  uint32_t seed = 300;
  for (int64_t k : {32, 40, 600, 1100, 1700})
    for (float beta : {0.0f, 1.0f}) {
      check({ta, tb, 64, 96, k, 1.0f, beta, 0}, seed++);
      check({ta, tb, 70, 1400, k, 1.0f, beta, 7}, seed++);
    }
}

// A C of more than 32 MiB with beta = 0 is written with non-temporal stores, but only in
// whole, 64-byte aligned 32-column rows: the padding (ldc = n + 3) leaves rows on every
// alignment, and n = 7700 ends on a partial block. k = 40 keeps the reference cheap.
TEST_P(GemmBf16AmxTest, LargeOutputStreams) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  check({ta, tb, 1100, 7700, 40, 1.5f, 0.0f, 3}, 400);
}

// Against the unrounded fp32 inputs the only extra error is bf16 rounding of each input
// (relative 2^-9 each, so 2^-8 + 2^-18 per product) on top of the accumulation bound: a
// kernel that mixed up operands or lost precision elsewhere would exceed it.
TEST_P(GemmBf16AmxTest, CloseToFp32Gemm) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  const Shape s{ta, tb, 67, 130, 257, 1.5f, 0.5f, 5};
  const Problem p = make_problem(s, 7);
  const Reference exact = reference(p, false);
  const double rounding = 1.0 / 256 + 1.0 / (1 << 18);
  const std::vector<float> c = run(gemm_bf16_amx, p);
  expect_close(p, exact, c, rounding + accumulation_bound(s.k), "amx vs fp32");
  // The comparison is not vacuous: the bf16 result does differ from the fp32 one.
  double max_diff = 0;
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t j = 0; j < s.n; ++j)
      max_diff = std::max(max_diff, std::abs(c[i * p.ldc + j] - exact.want[i * s.n + j]));
  EXPECT_GT(max_diff, 1e-4);
}

// The OpenMP worker threads start here, before any test runs: Linux copies a thread's
// tile configuration into threads it creates, so workers started after a GEMM that left
// its tiles configured would hide a kernel that configures tiles only once per process.
const int kWorkersStarted = [] {
  int n = 0;
#pragma omp parallel num_threads(2) reduction(+ : n)
  n = 1;
  return n;
}();

// Two OpenMP threads at once, each on its own half of C's rows (with A's rows to match),
// many times over: each thread must configure its own tiles, and neither may disturb the
// other's tiles or packing buffers.
TEST_P(GemmBf16AmxTest, TwoThreadsAtOnce) {
  const bool ta = GetParam().ta, tb = GetParam().tb;
  const Shape s{ta, tb, 160, 200, 300, 0.5f, 1.0f, 2};
  const Problem p = make_problem(s, 11);
  const Reference ref = reference(p, true);
  const int64_t half = 80;  // rows per thread
  int threads_seen = 0;
  std::vector<std::vector<float>> results(2);
#pragma omp parallel num_threads(2) reduction(+ : threads_seen)
  {
    const int t = omp_get_thread_num();
    threads_seen = 1;
    for (int rep = 0; rep < 20; ++rep) {
      std::vector<float> c = p.c0;
      const bf16* a_rows = p.a->data() + (ta ? t * half : t * half * p.lda);
      gemm_bf16_amx(ta, tb, half, s.n, s.k, s.alpha, a_rows, p.lda, p.b->data(), p.ldb, s.beta,
                    c.data() + t * half * p.ldc, p.ldc);
      if (rep == 19) results[t] = std::move(c);
    }
  }
  ASSERT_EQ(threads_seen, 2) << "the runtime gave fewer than two threads";
  ASSERT_EQ(kWorkersStarted, 2);
  for (int t = 0; t < 2; ++t)
    expect_close(p, ref, results[t], accumulation_bound(s.k), "thread " + std::to_string(t), t * half,
                 (t + 1) * half);
}

INSTANTIATE_TEST_SUITE_P(Cases, GemmBf16AmxTest, ::testing::ValuesIn(kCases), case_name);

TEST(GemmBf16Amx, EmptyInnerDimensionScalesC) {
  // k = 0 touches no tiles, so it holds on every CPU.
  // C = [2, 1] with ldc = 2: column 1 is past n and must stay as it is.
  std::vector<float> c = {1.0f, 2.0f, 4.0f, std::numeric_limits<float>::quiet_NaN()};
  gemm_bf16_amx(false, true, 2, 1, 0, 1.0f, nullptr, 1, nullptr, 1, 0.5f, c.data(), 2);
  EXPECT_EQ(c[0], 0.5f);
  EXPECT_EQ(c[1], 2.0f);
  EXPECT_EQ(c[2], 2.0f);
  EXPECT_TRUE(std::isnan(c[3]));
  std::vector<float> z = {std::numeric_limits<float>::quiet_NaN(), 3.0f};
  gemm_bf16_amx(false, false, 1, 2, 0, 1.0f, nullptr, 1, nullptr, 2, 0.0f, z.data(), 2);
  EXPECT_EQ(z[0], 0.0f);  // beta = 0 never reads C, NaN included
  EXPECT_EQ(z[1], 0.0f);
}

// A call leaves no tile state behind (the header's promise): XINUSE (XGETBV with ECX = 1)
// shows the tile configuration (bit 17) and tile data (bit 18) back in their initial
// state.
TEST(GemmBf16Amx, ReleasesTiles) {
  if (!cpu_supports_amx_bf16()) GTEST_SKIP() << "CPU or OS lacks AMX-BF16 (or the tile data grant)";
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(0xD, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 2)))
    GTEST_SKIP() << "CPU lacks XGETBV with ECX = 1";
  const auto tiles_in_use = [] {
    uint32_t lo = 0, hi = 0;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(1));
    return (lo >> 17) & 3u;
  };
  const Problem p = make_problem({false, true, 40, 40, 40, 1.0f, 0.0f, 0}, 9);
  run(gemm_bf16_amx, p);
  EXPECT_EQ(tiles_in_use(), 0u);
}

TEST(GemmBf16Amx, Peak) {
  const double peak = measure_cpu_amx_bf16_peak(1);
  if (!cpu_supports_amx_bf16()) {
    EXPECT_EQ(peak, 0.0);
    GTEST_SKIP() << "CPU or OS lacks AMX-BF16 (or the tile data grant)";
  }
  // One TDPBF16PS (16384 FLOP) every 100 cycles at 1 GHz is already 1.6e11 FLOP/s: below
  // that the measurement is broken.
  EXPECT_GT(peak, 1.6e11);
}

}  // namespace
}  // namespace sdmoe::cpu
