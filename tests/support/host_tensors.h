// Tensors owned by a test, host <-> tensor transfers through the Backend interface, and
// seeded random data: the pieces every unit test needs, whichever backend it drives.
// Each test family keeps its own thin wrappers that name its backend.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <random>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"

namespace sdmoe::test_support {

// A tensor that owns its memory on the backend that allocated it.
struct OwnedTensor {
  Buffer buffer;
  Tensor t;
};

inline OwnedTensor make_owned(Backend& backend, DType dtype, std::initializer_list<int64_t> dims) {
  OwnedTensor o;
  o.t = Tensor(nullptr, dtype, backend.device(), dims);
  o.buffer = Buffer(backend, o.t.bytes());
  o.t.data = o.buffer.data();
  return o;
}

// Writes doubles into a float tensor, converting to its dtype (F32 and BF16 round to
// nearest even).
inline void upload(Backend& backend, const Tensor& t, const std::vector<double>& v) {
  ASSERT_EQ(static_cast<int64_t>(v.size()), t.numel());
  if (t.dtype == DType::F64) {
    backend.copy_from_host(v.data(), t);
  } else if (t.dtype == DType::F32) {
    std::vector<float> f(v.begin(), v.end());
    backend.copy_from_host(f.data(), t);
  } else if (t.dtype == DType::BF16) {
    std::vector<bf16> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = float_to_bf16(static_cast<float>(v[i]));
    backend.copy_from_host(h.data(), t);
  } else {
    FAIL() << "upload: float tensors only";
  }
}

inline void upload_i32(Backend& backend, const Tensor& t, const std::vector<int32_t>& v) {
  ASSERT_EQ(t.dtype, DType::I32);
  ASSERT_EQ(static_cast<int64_t>(v.size()), t.numel());
  backend.copy_from_host(v.data(), t);
}

inline std::vector<double> download(Backend& backend, const Tensor& t) {
  std::vector<double> out(t.numel());
  if (t.dtype == DType::F64) {
    backend.copy_to_host(t, out.data());
  } else if (t.dtype == DType::F32) {
    std::vector<float> f(t.numel());
    backend.copy_to_host(t, f.data());
    for (size_t i = 0; i < f.size(); ++i) out[i] = f[i];
  } else if (t.dtype == DType::BF16) {
    std::vector<bf16> h(t.numel());
    backend.copy_to_host(t, h.data());
    for (size_t i = 0; i < h.size(); ++i) out[i] = bf16_to_float(h[i]);
  } else {
    ADD_FAILURE() << "download: float tensors only";
  }
  return out;
}

inline std::vector<int32_t> download_i32(Backend& backend, const Tensor& t) {
  std::vector<int32_t> out(t.numel());
  EXPECT_EQ(t.dtype, DType::I32);
  backend.copy_to_host(t, out.data());
  return out;
}

inline std::vector<double> randn(int64_t n, uint64_t seed, double scale = 1.0, double shift = 0.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> v(n);
  for (double& x : v) x = shift + scale * dist(gen);
  return v;
}

inline std::vector<int32_t> randint(int64_t n, int32_t lo, int32_t hi, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> dist(lo, hi - 1);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = dist(gen);
  return v;
}

}  // namespace sdmoe::test_support
