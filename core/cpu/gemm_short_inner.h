// Our own fp32 kernel for C = alpha A B^T + beta C when the inner dimension is short
// (the attention heads: k = head size). OpenBLAS packs both operands for every call and
// at k = 32 the packing and the C write dominate: 71% of peak on 48 x 128x128x32, where
// this kernel runs 3 to 8% faster (docs/performance.md).
#pragma once

#include <cstdint>

namespace sdmoe::cpu {

// True when the CPU has AVX-512, which the kernel needs.
bool cpu_supports_gemm_nt_short_inner();

// True when the backend's GEMM hands this shape to the kernel: AVX-512, 32 <= k <= 64
// (where it beats OpenBLAS), C at least one 6 x 64 tile, B^T small enough to stay in cache.
bool gemm_nt_short_inner_applies(int64_t m, int64_t n, int64_t k);

// Row-major C[m,n] = alpha A[m,k] B[n,k]^T + beta C, leading dimensions lda, ldb, ldc;
// any shape on an AVX-512 CPU (the limits above are about speed, not correctness).
// beta == 0 never reads C. Single-threaded: the caller splits the work.
void gemm_nt_short_inner(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                         int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace sdmoe::cpu
