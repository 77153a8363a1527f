// Whole-array conversions between fp32 and bf16. Under BF16 these run on every weight after
// each optimizer step and on the gradients staged as GEMM operands (the output head's
// logits gradient alone is tokens x vocabulary), and the scalar loop, a branch per element
// for NaN, cost a tenth of a small-cpu step. These run 16 lanes wide where the CPU allows.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace sdmoe::cpu {

// dst[i] = bf16 of src[i], rounded to nearest even, NaN kept a quiet NaN (the same bits as
// float_to_bf16 in core/dtype.h for every input). Single-threaded; the caller splits.
void float_to_bf16_array(const float* src, bf16* dst, int64_t n);
// dst[i] = src[i] widened (exact).
void bf16_to_float_array(const bf16* src, float* dst, int64_t n);

}  // namespace sdmoe::cpu
