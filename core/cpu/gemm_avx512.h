// Our own fp32 GEMM for the model's shapes on AVX-512 CPUs. OpenBLAS packs both operands on
// every call and runs these skinny shapes (one side 192 to 1024 wide) at 80 to 88% of the
// measured peak; this kernel keeps a 6 x 64 tile of C in registers over a whole inner
// block and reads B's rows in place where they already are row-major, and runs them at 84
// to 97% (docs/performance.md). Single-threaded: the backend splits the work.
#pragma once

#include <cstdint>

namespace sdmoe::cpu {

// True when the CPU has AVX-512, which the kernel needs.
bool cpu_supports_gemm_avx512();

// True when the backend hands this row-major C[m,n] = alpha op(A) op(B) + beta
// C to the kernel: AVX-512, not both operands transposed, and a shape where it
// beats OpenBLAS (C at least 64 wide; for A B^T, B small enough to pack per
// call: not the output head's logits).
bool gemm_avx512_applies(bool ta, bool tb, int64_t m, int64_t n, int64_t k);

// Row-major C[m,n] = alpha op(A) op(B) + beta C with leading dimensions lda,
// ldb, ldc, for (ta, tb) = (false, true), (false, false) or (true, false); any
// shape on an AVX-512 CPU (the rule above is about speed, not correctness).
// beta == 0 never reads C.
void gemm_avx512(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace sdmoe::cpu
