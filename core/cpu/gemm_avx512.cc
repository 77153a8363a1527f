// AVX-512 fp32 GEMM for the model's shapes. The micro-kernel keeps a 6-row x
// 64-column tile of C in 24 registers for a whole inner block of up to 256
// steps and writes it once: per step, 4 loads of a 64-wide row of the (packed
// or in-place) B panel, 6 broadcasts of A and 24 FMAs.
//   A B^T: each 64-row panel of B is packed as B^T (16x16 register transposes
//   built from
//          in-lane unpacks and lane shuffles, cheaper on this CPU than
//          two-source permutes) and every row tile of A runs over it.
//   A B:   B's rows already are the panel's rows; nothing is packed.
//   A^T B: with A = [k x m] and m large (the embedding gradient, m =
//   vocabulary), reading a
//          tile's 6 rows of A^T strides across A's rows. It is computed as C^T
//          = B^T A instead: 64 columns of A are copied into a contiguous panel,
//          each 6-column strip of B runs over it for the whole inner dimension,
//          and the C^T tile is written transposed once.
#include "core/cpu/avx512_transpose.h"
#include "core/cpu/gemm_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace sdmoe::cpu {
namespace {

constexpr int kTileRows = 6;
constexpr int kTileVectors = 4;  // 16 floats each: 64 columns per panel
constexpr int64_t kPanel = 16 * kTileVectors;
// Inner steps per pass over C: a packed 256 x 64 panel (64 KiB) stays in L2.
constexpr int64_t kInnerBlock = 256;
// Above this many columns of B^T, packing B per call costs more than OpenBLAS
// loses: the output head's 1024 x 50304 x 192 logits ran at 81 to 83% here and
// 84 to 86% there.
constexpr int64_t kMaxPackedColumns = 8192;

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}


// pack[d * kPanel + c] = b[(j0 + c) * ldb + d] for c < width, d < k; other
// columns zero.
__attribute__((target("avx512f"))) void pack_panel_transposed(int64_t width, int64_t k, const float* b, int64_t ldb,
                                                              float* pack) {
  int64_t c = 0;
  for (; c + 16 <= width; c += 16) {
    int64_t d = 0;
    for (; d + 16 <= k; d += 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(b + (c + i) * ldb + d);
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(pack + (d + i) * kPanel + c, r[i]);
    }
    for (; d < k; ++d)
      for (int64_t i = 0; i < 16; ++i) pack[d * kPanel + c + i] = b[(c + i) * ldb + d];
  }
  for (; c < width; ++c)
    for (int64_t d = 0; d < k; ++d) pack[d * kPanel + c] = b[c * ldb + d];
  for (int64_t d = 0; d < k; ++d) std::fill(pack + d * kPanel + width, pack + (d + 1) * kPanel, 0.0f);
}

// One Rows x 64 tile of C over k inner steps: A's element (r, d) is a[r * lda +
// d], or a[r + d * lda] when TransA; the panel's element (d, c) is panel[d *
// ld_panel + c]. Full: all 64 columns exist, so loads need no mask. Inner = 0:
// k known only at run time; otherwise the loop unrolls fully (head sizes 32 and
// 64 gain about 10% from it).
template <int Rows, int64_t Inner, bool TransA, bool Full>
__attribute__((target("avx512f"))) inline void tile(int64_t k, const float* a, int64_t lda, const float* panel,
                                                    int64_t ld_panel, float* c, int64_t ldc, float alpha, float beta,
                                                    const __mmask16* mask) {
  // Every loop over rows and vectors is unrolled: a rolled one indexes acc at run time,
  // which sends the accumulators through the stack (the scores GEMM lost 5% to it).
  __m512 acc[Rows][kTileVectors];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kTileVectors; ++v) acc[r][v] = _mm512_setzero_ps();
  if constexpr (Inner > 0) k = Inner;
#pragma GCC unroll 4
  for (int64_t d = 0; d < k; ++d) {
    __m512 bt[kTileVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kTileVectors; ++v)
      bt[v] = Full ? _mm512_loadu_ps(panel + d * ld_panel + 16 * v)
                   : _mm512_maskz_loadu_ps(mask[v], panel + d * ld_panel + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const __m512 av = _mm512_set1_ps(TransA ? a[r + d * lda] : a[r * lda + d]);
#pragma GCC unroll 4
      for (int v = 0; v < kTileVectors; ++v) acc[r][v] = _mm512_fmadd_ps(av, bt[v], acc[r][v]);
    }
  }
  const __m512 alpha_v = _mm512_set1_ps(alpha), beta_v = _mm512_set1_ps(beta);
  const bool scale = alpha != 1.0f, accumulate = beta != 0.0f;
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kTileVectors; ++v) {
      float* out = c + r * ldc + 16 * v;
      __m512 x = scale ? _mm512_mul_ps(acc[r][v], alpha_v) : acc[r][v];
      if (Full) {
        if (accumulate) x = _mm512_fmadd_ps(beta_v, _mm512_loadu_ps(out), x);
        _mm512_storeu_ps(out, x);
      } else {
        if (accumulate) x = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask[v], out), x);
        _mm512_mask_storeu_ps(out, mask[v], x);
      }
    }
}

template <int Rows, int64_t Inner, bool TransA, bool Full>
void tile_rows(int rows, int64_t k, const float* a, int64_t lda, const float* panel, int64_t ld_panel, float* c,
               int64_t ldc, float alpha, float beta, const __mmask16* mask) {
  if constexpr (Rows > 0) {
    if (rows == Rows) return tile<Rows, Inner, TransA, Full>(k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
    tile_rows<Rows - 1, Inner, TransA, Full>(rows, k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
  }
}

// All row tiles of one 64-column panel of C.
template <int64_t Inner, bool TransA, bool Full>
void panel_tiles(int64_t m, int64_t k, const float* a, int64_t lda, const float* panel, int64_t ld_panel, float* c,
                 int64_t ldc, float alpha, float beta, const __mmask16* mask) {
  for (int64_t i = 0; i < m; i += kTileRows) {
    const int rows = int(std::min<int64_t>(kTileRows, m - i));
    tile_rows<kTileRows, Inner, TransA, Full>(rows, k, a + (TransA ? i : i * lda), lda, panel, ld_panel, c + i * ldc,
                                              ldc, alpha, beta, mask);
  }
}

void panel_mask(int64_t width, __mmask16* mask) {
  for (int v = 0; v < kTileVectors; ++v) {
    const int64_t w = std::clamp<int64_t>(width - 16 * v, 0, 16);
    mask[v] = w == 16 ? __mmask16(0xFFFF) : __mmask16((1u << w) - 1);
  }
}

template <bool TransA, bool Full>
void run_panel_k(int64_t m, int64_t k, const float* a, int64_t lda, const float* panel, int64_t ld_panel, float* c,
                 int64_t ldc, float alpha, float beta, const __mmask16* mask) {
  switch (k) {
    case 32:
      return panel_tiles<32, TransA, Full>(m, k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
    case 64:
      return panel_tiles<64, TransA, Full>(m, k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
    default:
      return panel_tiles<0, TransA, Full>(m, k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
  }
}
void run_panel(bool trans_a, int64_t m, int64_t k, const float* a, int64_t lda, const float* panel, int64_t ld_panel,
               float* c, int64_t ldc, float alpha, float beta, const __mmask16* mask) {
  const bool full = mask[kTileVectors - 1] == __mmask16(0xFFFF);
  if (trans_a) {
    if (full) return run_panel_k<true, true>(m, k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
    return run_panel_k<true, false>(m, k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
  }
  if (full) return run_panel_k<false, true>(m, k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
  return run_panel_k<false, false>(m, k, a, lda, panel, ld_panel, c, ldc, alpha, beta, mask);
}

void gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
             float beta, float* c, int64_t ldc) {
  thread_local std::vector<float> pack;
  const int64_t kc_max = std::min(k, kInnerBlock);
  if (pack.size() < size_t(kc_max * kPanel)) pack.resize(kc_max * kPanel);
  for (int64_t j = 0; j < n; j += kPanel) {
    const int64_t width = std::min(kPanel, n - j);
    __mmask16 mask[kTileVectors];
    panel_mask(width, mask);
    for (int64_t p = 0; p < k; p += kInnerBlock) {
      const int64_t kc = std::min(kInnerBlock, k - p);
      pack_panel_transposed(width, kc, b + j * ldb + p, ldb, pack.data());
      run_panel(false, m, kc, a + p, lda, pack.data(), kPanel, c + j, ldc, alpha, p == 0 ? beta : 1.0f, mask);
    }
  }
}

__attribute__((target("avx512f"))) void gemm_xn(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                                int64_t lda, const float* b, int64_t ldb, float beta, float* c_out,
                                                int64_t ldc) {
  float* c = c_out;
  if (!ta) {
    for (int64_t p = 0; p < k; p += kInnerBlock) {
      const int64_t kc = std::min(kInnerBlock, k - p);
      for (int64_t j = 0; j < n; j += kPanel) {
        __mmask16 mask[kTileVectors];
        panel_mask(std::min(kPanel, n - j), mask);
        run_panel(false, m, kc, a + p, lda, b + p * ldb + j, ldb, c + j, ldc, alpha, p == 0 ? beta : 1.0f, mask);
      }
    }
    return;
  }
  // op(A) = A^T, with m large and n small (the embedding gradient): computed as
  // C^T = B^T A so that A's rows are read contiguously. A panel of 64 columns
  // of A (all k rows, packed contiguously) stays in L2 while every 6-column
  // strip of B runs over it, and each C^T tile is accumulated over the whole
  // inner dimension and written (transposed) once.
  thread_local std::vector<float> pack;
  if (pack.size() < size_t(k * kPanel)) pack.resize(k * kPanel);
  for (int64_t i0 = 0; i0 < m; i0 += kPanel) {
    const int64_t width = std::min(kPanel, m - i0);
    __mmask16 mask[kTileVectors];
    panel_mask(width, mask);
    for (int64_t d = 0; d < k; ++d)
      for (int v = 0; v < kTileVectors; ++v)
        _mm512_storeu_ps(pack.data() + d * kPanel + 16 * v, _mm512_maskz_loadu_ps(mask[v], a + d * lda + i0 + 16 * v));
    for (int64_t j0 = 0; j0 < n; j0 += kTileRows) {
      const int rows = int(std::min<int64_t>(kTileRows, n - j0));
      alignas(64) float ct[kTileRows * kPanel];
      tile_rows<kTileRows, 0, true, true>(rows, k, b + j0, ldb, pack.data(), kPanel, ct, kPanel, alpha, 0.0f, mask);
      for (int64_t c = 0; c < width; ++c) {
        float* out = c_out + (i0 + c) * ldc + j0;
        for (int r = 0; r < rows; ++r) out[r] = ct[r * kPanel + c] + (beta == 0.0f ? 0.0f : beta * out[r]);
      }
    }
  }
}
}  // namespace

bool cpu_supports_gemm_avx512() { return cpu_has_avx512(); }

bool gemm_avx512_applies(bool ta, bool tb, int64_t m, int64_t n, int64_t k) {
  if (!cpu_has_avx512() || (ta && tb) || n < kPanel || m < kTileRows || k < 1) return false;
  // A^T B runs C^T's tiles: 64 of C's rows per panel.
  if (ta) return m >= kPanel;
  return !tb || n <= kMaxPackedColumns;
}

void gemm_avx512(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (tb) return gemm_nt(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  gemm_xn(ta, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace sdmoe::cpu
