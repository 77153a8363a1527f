// exp for float kernels in a form GCC vectorises (no libm call in the loop). Cody-Waite
// range reduction and a degree-6 polynomial: relative error below 2e-7, i.e. within a
// couple of float ulps, for x in [-87, 88]. The F64 oracle paths use std::exp.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sdmoe::cpu {

inline float fast_expf(float x) {
  // Clamped by comparisons that are false for NaN, so a NaN stays NaN (std::max would
  // return the bound).
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln2) with the 1.5 * 2^23 trick (vectorises without SSE4.1).
  float n = x * 1.44269504088896341f + 12582912.0f;
  n -= 12582912.0f;
  float r = x - n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <typename T>
inline T exp_of(T x) {
  if constexpr (std::is_same_v<T, float>) return fast_expf(x);
  else return std::exp(x);
}

}  // namespace sdmoe::cpu
