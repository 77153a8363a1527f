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

namespace sdmoe::cpu {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // fp32 unit roundoff
// Written into C's padding (columns past n of each row): must survive every call.
constexpr float kGuard = 12345.0f;

// `count` bf16 ending exactly where an inaccessible page begins.
class GuardedBf16 {
 public:
  explicit GuardedBf16(size_t count) : count_(count) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t data_pages = (count * sizeof(bf16) + page - 1) / page;
    bytes_ = (data_pages + 1) * page;
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char*>(p);
    mprotect(base_ + data_pages * page, page, PROT_NONE);
    data_ = reinterpret_cast<bf16*>(base_ + data_pages * page) - count;
  }
  ~GuardedBf16() { munmap(base_, bytes_); }
  GuardedBf16(const GuardedBf16&) = delete;
  GuardedBf16& operator=(const GuardedBf16&) = delete;
  bf16* data() const { return data_; }
  bf16& operator[](size_t i) const { return data_[i]; }
  size_t size() const { return count_; }

 private:
  size_t count_, bytes_ = 0;
  char* base_ = nullptr;
  bf16* data_ = nullptr;
};

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
  std::unique_ptr<GuardedBf16> a, b;  // the same, rounded to bf16
  std::vector<float> c0;              // C before the call, [m, ldc]
  float op_a(int64_t i, int64_t d, bool rounded) const {
    const int64_t at = s.ta ? d * lda + i : i * lda + d;
    return rounded ? bf16_to_float((*a)[at]) : a32[at];
  }
  float op_b(int64_t d, int64_t j, bool rounded) const {
    const int64_t at = s.tb ? j * ldb + d : d * ldb + j;
    return rounded ? bf16_to_float((*b)[at]) : b32[at];
  }
};

Problem make_problem(const Shape& s, uint32_t seed) {
  Problem p{s, 0, 0, 0, {}, {}, {}, {}, {}};
  p.lda = (s.ta ? s.m : s.k) + s.pad;
  p.ldb = (s.tb ? s.k : s.n) + s.pad;
  p.ldc = s.n + s.pad;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  // The last row is exactly as long as the view needs: its padding would hide an
  // over-read.
  const int64_t a_rows = s.ta ? s.k : s.m, b_rows = s.tb ? s.n : s.k;
  const int64_t a_width = s.ta ? s.m : s.k, b_width = s.tb ? s.k : s.n;
  p.a32.resize(a_rows == 0 ? 0 : (a_rows - 1) * p.lda + a_width);
  p.b32.resize(b_rows == 0 ? 0 : (b_rows - 1) * p.ldb + b_width);
  for (float& x : p.a32) x = normal(rng);
  for (float& x : p.b32) x = normal(rng);
  p.a = std::make_unique<GuardedBf16>(p.a32.size());
  p.b = std::make_unique<GuardedBf16>(p.b32.size());
  for (size_t i = 0; i < p.a32.size(); ++i) (*p.a)[i] = float_to_bf16(p.a32[i]);
  for (size_t i = 0; i < p.b32.size(); ++i) (*p.b)[i] = float_to_bf16(p.b32[i]);
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

std::vector<float> run(const Problem& p) {
  std::vector<float> c = p.c0;
  const Shape& s = p.s;
  gemm_bf16_amx(s.ta, s.tb, s.m, s.n, s.k, s.alpha, p.a->data(), p.lda, p.b->data(), p.ldb, s.beta, c.data(), p.ldc);
  return c;
}

// Checks rows [row0, row1) of C against the reference within `relative` * magnitude
// (+ tiny), and that the padding past n is untouched. Stops at the first few failures so
// a sweep stays readable.
void expect_close(const Problem& p, const Reference& ref, const std::vector<float>& c, double relative,
                  const std::string& what, int64_t row0 = 0, int64_t row1 = -1) {
  const Shape& s = p.s;
  if (row1 < 0) row1 = s.m;
  int failures = 0;
  for (int64_t i = row0; i < row1 && failures < 3; ++i)
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

void check(const Shape& s, uint32_t seed) {
  const Problem p = make_problem(s, seed);
  expect_close(p, reference(p, true), run(p), accumulation_bound(s.k), "amx");
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
  const std::vector<float> c = run(p);
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
  run(p);
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
