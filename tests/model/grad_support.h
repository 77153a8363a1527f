// Helpers for the gradient tests: a single-threaded CPU backend, owned F64 tensors, seeded
// random data and a central-difference checker. Expected gradients always come from
// finite differences of a forward computation, never from another backward.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "core/backend.h"
#include "core/buffer.h"
#include "tests/support/host_tensors.h"

namespace sdmoe::gradtest {

inline Backend& be() {
  static std::unique_ptr<Backend> backend = make_cpu_backend(1);
  return *backend;
}

using Owned = test_support::OwnedTensor;
using test_support::randn;

inline Owned make(DType dtype, std::initializer_list<int64_t> dims) {
  return test_support::make_owned(be(), dtype, dims);
}
// Gradient checks run in double precision only.
inline void put(const Tensor& t, const std::vector<double>& v) {
  ASSERT_EQ(t.dtype, DType::F64);
  test_support::upload(be(), t, v);
}
inline void put_i32(const Tensor& t, const std::vector<int32_t>& v) { test_support::upload_i32(be(), t, v); }
inline std::vector<double> get(const Tensor& t) {
  EXPECT_EQ(t.dtype, DType::F64);
  return test_support::download(be(), t);
}
inline std::vector<int32_t> get_i32(const Tensor& t) { return test_support::download_i32(be(), t); }
inline Owned make_from(std::initializer_list<int64_t> dims, const std::vector<double>& v) {
  Owned o = make(DType::F64, dims);
  put(o.t, v);
  return o;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

inline bool grad_close(double analytic, double fd, double rtol, double atol) {
  return std::fabs(analytic - fd) <= atol + rtol * std::max(std::fabs(analytic), std::fabs(fd));
}

// Central difference with one Richardson step: D(h) = (f(x+h) - f(x-h)) / 2h has error
// c2 h^2 + O(h^4), so (4 D(h/2) - D(h)) / 3 is accurate to O(h^4). With h = 1e-4 the
// truncation error is ~1e-16 and the rounding error ~|f| 1e-16 / h ~ 1e-11, which lets
// the check use a relative tolerance of 1e-6 with an absolute floor of 1e-9.
inline double richardson(const std::function<double(double)>& f_at_offset, double h) {
  const double d1 = (f_at_offset(h) - f_at_offset(-h)) / (2 * h);
  const double d2 = (f_at_offset(h / 2) - f_at_offset(-h / 2)) / h;
  return (4 * d2 - d1) / 3;
}

// Compares analytic[i] with the finite-difference derivative of f along x[i] for every i
// (x is host data that f reads; it is restored after each probe). Fails with the worst
// offenders, and when the loss does not depend on x at all (a vacuous check).
inline void check_fd(const std::string& what, std::vector<double>& x, const std::vector<double>& analytic,
                     const std::function<double()>& f, double h = 1e-4, double rtol = 1e-6, double atol = 1e-9) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  int bad = 0;
  std::string first;
  double max_abs = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    const double fd = richardson(
        [&](double off) {
          x[i] = x0 + off;
          return f();
        },
        h);
    x[i] = x0;
    max_abs = std::max(max_abs, std::fabs(fd));
    if (!grad_close(analytic[i], fd, rtol, atol)) {
      if (bad < 6) first += fmt::format(" [{}] analytic {:.12g} fd {:.12g};", i, analytic[i], fd);
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << x.size() << " gradient entries differ from finite differences:"
                    << first;
  EXPECT_GT(max_abs, 1e-3) << what << ": the loss barely depends on these inputs; the check would be vacuous";
}

}  // namespace sdmoe::gradtest
