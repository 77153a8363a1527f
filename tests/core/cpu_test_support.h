// Helpers for the CPU backend tests: owned tensors, host <-> tensor transfers through the
// Backend interface, seeded random data and tolerance checks. Expected values in the tests
// come from plain double-precision loops written next to each test, never from the
// backend itself.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "tests/support/host_tensors.h"

namespace sdmoe::test {

inline Backend& cpu() {
  static std::unique_ptr<Backend> backend = make_cpu_backend(0);
  return *backend;
}

using Owned = test_support::OwnedTensor;
using test_support::randint;
using test_support::randn;

inline Owned make(DType dtype, std::initializer_list<int64_t> dims) {
  return test_support::make_owned(cpu(), dtype, dims);
}
// Writes doubles into a float tensor, converting to its dtype (F32 rounds).
inline void put(const Tensor& t, const std::vector<double>& v) { test_support::upload(cpu(), t, v); }
inline void put_i32(const Tensor& t, const std::vector<int32_t>& v) { test_support::upload_i32(cpu(), t, v); }
inline std::vector<double> get(const Tensor& t) { return test_support::download(cpu(), t); }
inline std::vector<int32_t> get_i32(const Tensor& t) { return test_support::download_i32(cpu(), t); }

inline Owned make_from(DType dtype, std::initializer_list<int64_t> dims, const std::vector<double>& v) {
  Owned o = make(dtype, dims);
  put(o.t, v);
  return o;
}

// Values as the tensor holds them (rounded to float for F32), so references start from
// exactly the inputs the backend sees.
inline std::vector<double> rounded(DType dtype, std::vector<double> v) {
  if (dtype == DType::F32)
    for (double& x : v) x = static_cast<float>(x);
  return v;
}

inline const char* dname(DType d) { return d == DType::F32 ? "f32" : d == DType::F64 ? "f64" : "other"; }

// |got - want| <= atol + rtol * |want| for every element; reports the first offenders.
inline void expect_close(const std::vector<double>& want, const std::vector<double>& got, double atol, double rtol,
                         const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t bad = 0;
  double worst = 0.0;
  std::string first;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= atol + rtol * std::fabs(want[i]))) {
      if (bad < 5) first += " [" + std::to_string(i) + "] want " + std::to_string(want[i]) + " got " + std::to_string(got[i]) + ";";
      ++bad;
    }
    if (std::isfinite(err)) worst = std::max(worst, err);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " elements differ (max abs err " << worst
                    << "):" << first;
}

// Per-element tolerances (for sums whose error scales with the magnitudes involved).
inline void expect_within(const std::vector<double>& want, const std::vector<double>& got,
                          const std::vector<double>& tol, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  ASSERT_EQ(want.size(), tol.size()) << what;
  int64_t bad = 0;
  std::string first;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tol[i])) {
      if (bad < 5)
        first += " [" + std::to_string(i) + "] want " + std::to_string(want[i]) + " got " + std::to_string(got[i]) +
                 " tol " + std::to_string(tol[i]) + ";";
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " elements out of tolerance:" << first;
}

// Relative tolerance for elementwise kernels that compute in double and store in dtype.
inline double elem_rtol(DType d) { return d == DType::F32 ? 2e-6 : 1e-13; }

class CpuOpsTest : public ::testing::TestWithParam<DType> {};

inline std::string dtype_param_name(const ::testing::TestParamInfo<DType>& info) { return dname(info.param); }

}  // namespace sdmoe::test
