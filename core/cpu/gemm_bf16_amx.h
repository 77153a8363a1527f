// GEMM with bf16 inputs and fp32 accumulation and output on AMX tiles (TDPBF16PS, Intel
// Sapphire Rapids and later): one instruction multiplies a 16x32 bf16 tile by a 32x16 one
// into a 16x16 fp32 tile, 16384 FLOP. Measured on one Sapphire Rapids class core: a peak
// of about 3.1 TFLOP/s (2.2 at a lower clock) against 0.21 for fp32 FMA and 0.11 for
// vdpbf16ps; this kernel reaches 1.0-1.6 TFLOP/s on the model's GEMMs with k >= 192
// (5-7x the fp32 FMA peak), 0.55-0.95 on the attention shapes and the output head, where
// writing the fp32 C bounds it (see gemm_bf16_amx.cc).
// Single-threaded and callable from any thread: the backend splits C over its threads.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace sdmoe::cpu {

// True when the CPU has AMX-TILE and AMX-BF16 (and the AVX-512 subsets the packing uses)
// and Linux grants this process the tile data state. The grant is requested once per
// process (arch_prctl ARCH_REQ_XCOMP_PERM), thread-safely, on the first call; every later
// call is a load.
bool cpu_supports_amx_bf16();

// Row-major C[m,n] (fp32) = alpha op(A) op(B) + beta C with A, B bf16 and leading
// dimensions lda, ldb, ldc; op(A) = [m,k] is A [m,k] or, when ta, A^T with A [k,m]; op(B)
// = [k,n] is B [k,n] or, when tb, B^T with B [n,k]. All four (ta, tb) run on the tiles.
// fp32 accumulation; beta == 0 never reads C; k == 0 gives C = beta C; any m, n, k >= 0.
// Each call loads its tile configuration on entry and releases the tiles on return (about
// 0.1 us), so it composes with any other AMX code on the thread and leaves no tile state
// behind. Needs cpu_supports_amx_bf16() (checked: aborts without it).
void gemm_bf16_amx(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a, int64_t lda,
                   const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Measured TDPBF16PS peak (FLOP/s, 2 per multiply-add: 16384 per instruction) of
// `threads` threads (<= 0: omp_get_max_threads()): independent accumulator tiles fed from
// tiles that stay loaded, best of 3 repetitions. 0 when cpu_supports_amx_bf16() is false.
double measure_cpu_amx_bf16_peak(int threads);

}  // namespace sdmoe::cpu
