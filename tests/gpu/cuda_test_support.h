// What the CUDA tests share: the two backends (the CPU oracle and the GPU, created on first
// use and released before static destruction), twin tensors holding one logical tensor on
// each, random inputs and the comparisons with their failure reports.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"

namespace sdmoe::cuda_test {

// ---- backends, created on first use and released before static destruction --------------
class Backends : public ::testing::Environment {
 public:
  void TearDown() override {
    gpu_.reset();
    cpu_.reset();
  }
  static Backend& cpu() {
    if (!cpu_) cpu_ = make_cpu_backend();
    return *cpu_;
  }
  static Backend& gpu() {
    if (!gpu_) gpu_ = make_cuda_backend(0);
    return *gpu_;
  }

 private:
  static inline std::unique_ptr<Backend> cpu_, gpu_;
};

inline Backend& cpu() { return Backends::cpu(); }
inline Backend& gpu() { return Backends::gpu(); }

// ---- twins: one logical tensor on the CPU oracle and on the GPU --------------------------
struct Twin {
  Buffer cbuf, gbuf;
  Tensor c, g;
};

inline Twin twin(DType dtype, std::initializer_list<int64_t> dims, const void* host = nullptr) {
  Twin t;
  Tensor shape(nullptr, dtype, Device::CPU, dims);
  t.cbuf = Buffer(cpu(), shape.bytes());
  t.gbuf = Buffer(gpu(), shape.bytes());
  t.c = shape;
  t.c.data = t.cbuf.data();
  t.g = shape;
  t.g.device = Device::CUDA;
  t.g.data = t.gbuf.data();
  if (host && shape.bytes()) {
    std::memcpy(t.c.data, host, shape.bytes());
    gpu().copy_from_host(host, t.g);
  }
  return t;
}
inline Twin twin(std::initializer_list<int64_t> dims, const std::vector<float>& v) {
  Twin t = twin(DType::F32, dims, v.data());
  EXPECT_EQ(static_cast<int64_t>(v.size()), t.c.numel());
  return t;
}
inline Twin twin(std::initializer_list<int64_t> dims, const std::vector<int32_t>& v) {
  Twin t = twin(DType::I32, dims, v.data());
  EXPECT_EQ(static_cast<int64_t>(v.size()), t.c.numel());
  return t;
}

template <typename T>
inline std::vector<T> read(Backend& b, const Tensor& t) {
  std::vector<T> out(t.bytes() / sizeof(T));
  if (t.bytes()) b.copy_to_host(t, out.data());
  return out;
}
inline std::vector<float> cpu_f(const Twin& t) { return read<float>(cpu(), t.c); }
inline std::vector<float> gpu_f(const Twin& t) { return read<float>(gpu(), t.g); }

inline std::vector<float> randn(int64_t n, uint32_t seed, float scale = 1.0f, float shift = 0.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = shift + scale * dist(gen);
  return v;
}

inline std::vector<int32_t> randint(int64_t n, int32_t lo, int32_t hi, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int32_t> dist(lo, hi - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// |got - want| <= atol + rtol * |want| elementwise; reports the worst offenders.
inline void expect_close(const std::vector<float>& want, const std::vector<float>& got, double atol, double rtol,
                         const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t bad = 0;
  double worst = 0.0;
  std::string first;
  for (size_t i = 0; i < want.size(); ++i) {
    const double w = want[i], g = got[i];
    const bool both_nan = std::isnan(w) && std::isnan(g);
    const double err = std::fabs(g - w);
    if (both_nan) continue;
    if (!(err <= atol + rtol * std::fabs(w))) {
      if (bad < 5) first += fmt::format(" [{}] want {} got {};", i, w, g);
      ++bad;
    }
    if (std::isfinite(err)) worst = std::max(worst, err);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " elements differ (max abs err " << worst
                    << "):" << first;
}

// Elementwise tolerance from a per-element magnitude bound.
inline void expect_within(const std::vector<float>& want, const std::vector<float>& got,
                          const std::vector<double>& tol, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t bad = 0;
  std::string first;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(want[i]) && std::isnan(got[i])) continue;  // e.g. untouched NaN padding
    const double err = std::fabs(double(got[i]) - double(want[i]));
    if (!(err <= tol[i])) {
      if (bad < 5) first += fmt::format(" [{}] want {} got {} tol {};", i, want[i], got[i], tol[i]);
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " elements out of tolerance:" << first;
}

template <typename T>
inline void expect_equal(const std::vector<T>& want, const std::vector<T>& got, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i)
    if (std::memcmp(&want[i], &got[i], sizeof(T)) != 0) {
      if (bad < 5) ADD_FAILURE() << what << ": element " << i << " differs: want " << +want[i] << " got " << +got[i];
      ++bad;
    }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " elements differ";
}

inline std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = float_to_bf16(v[i]).bits;
  return out;
}


// Host bound |alpha| |op(A)| |op(B)| + |beta| |C0| for the tolerance of one product.
inline std::vector<double> gemm_bound(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                                      const float* a, const float* b, double beta, const float* c0) {
  std::vector<double> out(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = ta ? a[p * m + i] : a[i * k + p], bv = tb ? b[j * k + p] : b[p * n + j];
        s += std::fabs(av * bv);
      }
      const double cv = std::isfinite(c0[i * n + j]) ? c0[i * n + j] : 0.0;
      out[i * n + j] = std::fabs(alpha) * s + std::fabs(beta) * std::fabs(cv);
    }
  return out;
}

inline std::vector<double> scaled(const std::vector<double>& bound, double rel, double abs) {
  std::vector<double> t(bound.size());
  for (size_t i = 0; i < t.size(); ++i) t[i] = rel * bound[i] + abs;
  return t;
}

}  // namespace sdmoe::cuda_test
