// Dtype dispatch for the CPU backend: kernels are templates over float and double.
#pragma once
#include "core/tensor.h"

namespace sdmoe::cpu {

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
