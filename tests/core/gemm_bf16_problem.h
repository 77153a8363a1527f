// Problems for the bf16 GEMM kernels' tests (tests/core/test_gemm_bf16.cc for AVX512_BF16,
// test_gemm_bf16_amx.cc for AMX): random operands rounded to bf16, each ending exactly
// where an inaccessible page begins (a read past a matrix faults instead of reading a
// neighbour; AMX's asm tile loads are invisible to sanitizers), C pre-filled with NaN when
// beta is 0 and a guard value past n, and a double reference from the same bf16 inputs
// with each element's magnitude sum for the tolerance (see the tests' headers).
#pragma once
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace sdmoe::cpu::gemm_test {

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

inline std::string describe(const Shape& s) {
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

inline Problem make_problem(const Shape& s, uint32_t seed) {
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

inline Reference reference(const Problem& p, bool rounded) {
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

inline std::vector<float> run(Gemm gemm, const Problem& p) {
  std::vector<float> c = p.c0;
  const Shape& s = p.s;
  gemm(s.ta, s.tb, s.m, s.n, s.k, s.alpha, p.a->data(), p.lda, p.b->data(), p.ldb, s.beta, c.data(), p.ldc);
  return c;
}

// Checks rows [row0, row1) of C against the reference within `relative` * magnitude
// (+ tiny), and that the padding past n is untouched. Stops at the first few failures so
// a sweep stays readable.
inline void expect_close(const Problem& p, const Reference& ref, const std::vector<float>& c, double relative,
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

inline double accumulation_bound(int64_t k) { return 4.0 * double(k + 2) * kU; }

}  // namespace sdmoe::cpu::gemm_test
