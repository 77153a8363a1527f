// Dtype dispatch for the CPU backend: kernels are templates over float and double (the
// compute types), and the kernels that read or write GEMM operands also over bf16 as a
// storage type (docs/architecture.md, precision policy).
#pragma once
#include <type_traits>

#include "core/tensor.h"

namespace sdmoe::cpu {

// Storage element -> double, and double -> storage element (bf16 rounded to nearest even
// through float; the double rounding differs from a direct one only on exact ties of the
// float, far below bf16's own rounding error).
inline double widen(float x) { return x; }
inline double widen(double x) { return x; }
inline double widen(bf16 x) { return bf16_to_float(x); }
template <typename U>
inline U narrow(double v) {
  if constexpr (std::is_same_v<U, bf16>) return float_to_bf16(static_cast<float>(v));
  else return static_cast<U>(v);
}

// Storage types: float, double and bf16.
template <typename Fn>
void dispatch_storage(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(float{}); return;
    case DType::F64: fn(double{}); return;
    case DType::BF16: fn(bf16{}); return;
    default: SDMOE_FATAL("cpu", fmt::format("op does not support dtype {}", dtype_name(dtype)));
  }
}

template <typename Fn>
void dispatch_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(float{}); return;
    case DType::F64: fn(double{}); return;
    default: SDMOE_FATAL("cpu", fmt::format("op does not support dtype {}", dtype_name(dtype)));
  }
}

inline void expect_same(const Tensor& a, const Tensor& b, const char* what) {
  SDMOE_ASSERT(a.dtype == b.dtype, "{}: dtype mismatch {} vs {}", what, dtype_name(a.dtype), dtype_name(b.dtype));
}

}  // namespace sdmoe::cpu
