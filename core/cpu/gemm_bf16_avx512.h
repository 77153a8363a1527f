// GEMM with bf16 inputs and fp32 accumulation and output, on vdpbf16ps (AVX512_BF16): each
// instruction multiplies 16 lanes of k-pairs and adds both exact products into fp32, so
// the operands are packed as k-pairs (two bf16 of one column in one 32-bit lane) and the
// inputs are never widened to fp32 in memory. A portable version with the same contract
// serves CPUs without AVX512_BF16 and is the tests' second implementation.
// Single-threaded: the backend splits C over its threads.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace sdmoe::cpu {

// True when the CPU has AVX512_BF16 (vdpbf16ps) with AVX512F/BW/VL, which the kernel needs.
bool cpu_supports_avx512_bf16();

// True when the backend should hand this row-major C[m,n] = alpha op(A) op(B) + beta C
// to gemm_bf16_avx512: the CPU supports it, not both operands transposed, and C at least
// one register tile (the rule is about speed; any shape is correct). It says only that
// the kernel runs near measure_cpu_bf16_dot_peak, not that it beats the fp32 path: on the
// Sapphire Rapids class Xeon we measured, vdpbf16ps does half the multiply-adds per
// second that fp32 FMA does (103 against 205 GFLOP/s per core), so there widening to fp32
// and gemm_avx512 is faster. Compare the two peaks before preferring this kernel.
bool gemm_bf16_applies(bool ta, bool tb, int64_t m, int64_t n, int64_t k);

// Row-major C[m,n] (fp32) = alpha op(A) op(B) + beta C with A, B bf16 and leading
// dimensions lda, ldb, ldc, for (ta, tb) = (false, true) A B^T, (false, false) A B or
// (true, false) A^T B ((true, true) runs the portable version). fp32 accumulation;
// beta == 0 never reads C. Needs cpu_supports_avx512_bf16().
void gemm_bf16_avx512(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a, int64_t lda,
                      const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc);

// The same contract on any CPU and for any (ta, tb): op(B) widened to fp32 a column block
// at a time, then plain loops that the compiler vectorises, accumulating in fp32 in k order.
void gemm_bf16_portable(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a, int64_t lda,
                        const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Measured vdpbf16ps peak (FLOP/s, 2 per multiply-add: 64 per zmm instruction) of
// `threads` threads (<= 0: omp_get_max_threads()), the same method as
// measure_cpu_fma_peak (core/cpu/cpu_backend.h). 0 when the CPU lacks AVX512_BF16.
double measure_cpu_bf16_dot_peak(int threads);

}  // namespace sdmoe::cpu
