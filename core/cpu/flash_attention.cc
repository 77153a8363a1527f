// Fused causal attention (core/cpu/flash_attention.h): tile products, row kernels and
// the forward and backward loops first, the two checked launchers last.
//
// Shapes in this file: T = kFlashTile (Br = Bc = 64), Dh = head dim. A work item holds
//   score tiles     [T, T]   leading dim T   (scores, then probabilities or dS, in place)
//   operand tiles   [T, Dh]  leading dim Dh  (rows of q, k, v, dout: read in place when
//                                             stored in the compute type, else widened)
//   transposed tile [Dh, T]  leading dim T   (an operand that stays fixed over the item)
//   accumulator     [T, Dh]  leading dim Dh  (the forward's unnormalised out; dk and dv
//                                             accumulate in place in their outputs)
// Partial tiles (S not a multiple of T) use the leading rows and columns of each.
//
// Every product reads its right operand B row-major in place, with A or A^T on the left:
// C = A B or C = A^T B (our micro-kernels below; gemm_avx512 would pack a tile for every
// A B^T). The operand that stays fixed over a work item (q's tile in the forward, k's and
// v's in the backward) is transposed once per item, so nothing is packed per tile pair.
// That fixes the layouts: the forward computes S^T = k q^T ([keys, queries]: the online
// softmax runs down its columns, 16 queries per vector, no horizontal reductions) and
// out += (P^T)^T v; the backward computes S = q k^T and dP = dout v^T ([queries, keys]),
// then dv += P^T dout, dk += scale dS^T q and dq += scale dS k.
//
// The backward is one pass over (head, key tile) items: an item owns its dk and dv rows,
// and its dq terms (for the queries at and after its keys) go to a per-thread [S, Dh]
// buffer that is added into dq in item order (omp ordered), so every dq element sums its
// key tiles' terms in key-tile order whatever the thread count, with no atomics. A second
// pass over query tiles for dq would recompute S and dP: seven tile products per pair
// instead of five.
//
// Masked (non-causal) entries of a computed tile are set to zero explicitly before they
// enter any sum: exp is never asked for exp(-inf), which fast_expf clamps to 1.6e-38.
#include "core/cpu/avx512_transpose.h"
#include "core/cpu/avx512_exp.h"
#include "core/cpu/flash_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/cpu/cpu_dispatch.h"
#include "core/cpu/fast_math.h"

namespace sdmoe::cpu {
namespace {

constexpr int64_t kT = kFlashTile;
constexpr int kLanes = 16;

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// Lanes [0, left) of a 16-lane chunk, left clamped to [0, 16].
inline __mmask16 first_lanes(int64_t left) {
  return left >= kLanes ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
}

// ---------------------------------------------------------------------------------------
// AVX-512 tile products (fp32). The library is built for baseline x86-64; these run 16
// lanes wide with FMA where the CPU has AVX-512, chosen at run time.
//
// One Rows x (16 Vecs) block of C in registers over the whole inner dimension: per step,
// Vecs loads of a row of B, Rows broadcasts of A and Rows x Vecs FMAs. 6 x 64 for wide
// outputs, 12 x 32 for Dh = 32 (24 accumulators either way). A's element (r, p) is
// a[r * lda + p], or a[p * lda + r] for TransA: contiguous along r, so A^T B needs no
// transposed copy of A. Every loop over rows and vectors is unrolled: indexing acc at run
// time would send the accumulators through the stack.
template <int Rows, int Vecs, bool TransA, bool Full, int64_t Inner>
__attribute__((target("avx512f"))) inline void micro_tile(int64_t k, const float* a, int64_t lda, const float* b,
                                                          int64_t ldb, float* c, int64_t ldc, float alpha,
                                                          bool accumulate, const __mmask16* mask) {
  __m512 acc[Rows][Vecs];
#pragma GCC unroll 12
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < Vecs; ++v) acc[r][v] = _mm512_setzero_ps();
  if constexpr (Inner > 0) k = Inner;
#pragma GCC unroll 4
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[Vecs];
#pragma GCC unroll 4
    for (int v = 0; v < Vecs; ++v)
      bv[v] = Full ? _mm512_loadu_ps(b + p * ldb + kLanes * v) : _mm512_maskz_loadu_ps(mask[v], b + p * ldb + kLanes * v);
#pragma GCC unroll 12
    for (int r = 0; r < Rows; ++r) {
      const __m512 av = _mm512_set1_ps(TransA ? a[p * lda + r] : a[r * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < Vecs; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 12
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < Vecs; ++v) {
      float* out = c + r * ldc + kLanes * v;
      __m512 x = _mm512_mul_ps(acc[r][v], scale);
      if (Full) {
        if (accumulate) x = _mm512_add_ps(x, _mm512_loadu_ps(out));
        _mm512_storeu_ps(out, x);
      } else {
        if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask[v], out));
        _mm512_mask_storeu_ps(out, mask[v], x);
      }
    }
}

// The last rows of a panel, fewer than the block's: Rows counts down to the ones left.
template <int Rows, int Vecs, bool TransA, bool Full, int64_t Inner>
void micro_rows(int rows, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                float alpha, bool accumulate, const __mmask16* mask) {
  if constexpr (Rows > 0) {
    if (rows == Rows)
      return micro_tile<Rows, Vecs, TransA, Full, Inner>(k, a, lda, b, ldb, c, ldc, alpha, accumulate, mask);
    micro_rows<Rows - 1, Vecs, TransA, Full, Inner>(rows, k, a, lda, b, ldb, c, ldc, alpha, accumulate, mask);
  }
}

// All row blocks of one column panel of C (16 Vecs columns, the first `width` real).
// Full: all of them real, so loads and stores need no mask. Inner: k known at compile
// time (the tile size and the head dims 32 and 64, the loop then unrolled; 0: any k).
template <int Vecs, bool TransA, bool Full, int64_t Inner>
void micro_panel(int64_t m, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc, float alpha, bool accumulate, const __mmask16* mask) {
  constexpr int kRows = Vecs == 4 ? 6 : 12;
  for (int64_t i = 0; i < m; i += kRows) {
    const int rows = int(std::min<int64_t>(kRows, m - i));
    micro_rows<kRows, Vecs, TransA, Full, Inner>(rows, k, TransA ? a + i : a + i * lda, lda, b, ldb, c + i * ldc, ldc,
                                                 alpha, accumulate, mask);
  }
}

template <int Vecs, bool TransA>
void micro_panel_any(int64_t m, int64_t width, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc, float alpha, bool accumulate) {
  __mmask16 mask[Vecs];
  for (int v = 0; v < Vecs; ++v) mask[v] = first_lanes(width - kLanes * v);
  if (width < kLanes * Vecs) return micro_panel<Vecs, TransA, false, 0>(m, k, a, lda, b, ldb, c, ldc, alpha, accumulate, mask);
  switch (k) {
    case 32: return micro_panel<Vecs, TransA, true, 32>(m, k, a, lda, b, ldb, c, ldc, alpha, accumulate, mask);
    case 64: return micro_panel<Vecs, TransA, true, 64>(m, k, a, lda, b, ldb, c, ldc, alpha, accumulate, mask);
    default: return micro_panel<Vecs, TransA, true, 0>(m, k, a, lda, b, ldb, c, ldc, alpha, accumulate, mask);
  }
}

// C[m, n] = alpha op(A) B (+ C when accumulate), op(A) = A [m, k] or A^T with A stored
// [k, m]; B [k, n] row-major, read in place.
template <bool TransA>
void product_avx512(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t width = std::min<int64_t>(64, n - j);
    if (width <= 32) micro_panel_any<2, TransA>(m, width, k, a, lda, b + j, ldb, c + j, ldc, alpha, accumulate);
    else micro_panel_any<4, TransA>(m, width, k, a, lda, b + j, ldb, c + j, ldc, alpha, accumulate);
  }
}

// ---------------------------------------------------------------------------------------
// AVX-512 row kernels (fp32).


// Forward online softmax down the columns of a transposed score tile st[keys, queries]
// (ld T): column c (query i0 + c) sees row r (key j0 + r) when r + shift <= c, shift =
// j0 - i0. Per column: max <- max(max, its causal entries); entries <- exp(entry - max)
// there and 0 elsewhere; sum <- sum * factor + column sum; factor = exp(old max - new
// max), which the query's output row must be multiplied by (0 before the first key).
// All T columns at once (T / 16 vectors per row), so that the row loop carries T / 16
// independent max and sum chains.
template <bool Diagonal>
__attribute__((target("avx512f"))) void softmax_columns_avx512(float* st, int64_t rows, int64_t cols, int64_t shift,
                                                                float* max, float* sum, float* factor) {
  constexpr int kVecs = int(kT / kLanes);
  // Below the diagonal every column sees every row and the masks are the tile's width
  // alone; on it they also drop the keys after each query.
  const auto causal = [&](int64_t r, int v, __mmask16 in_tile) {
    if constexpr (Diagonal) return __mmask16(in_tile & ~first_lanes(r + shift - kLanes * v));
    else return in_tile;
  };
  __mmask16 in_tile[kVecs];
  __m512 old_max[kVecs], top[kVecs], total[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    in_tile[v] = first_lanes(cols - kLanes * v);
    old_max[v] = top[v] = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), in_tile[v],
                                               max + kLanes * v);
    total[v] = _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      const __mmask16 m = causal(r, v, in_tile[v]);
      top[v] = _mm512_mask_max_ps(top[v], m, top[v], _mm512_maskz_loadu_ps(m, st + r * kT + kLanes * v));
    }
  for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      float* x = st + r * kT + kLanes * v;
      const __mmask16 m = causal(r, v, in_tile[v]);
      if (Diagonal && m == 0) {  // 16 queries before this key: no exp
        _mm512_mask_storeu_ps(x, in_tile[v], _mm512_setzero_ps());
        continue;
      }
      __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(in_tile[v], x), top[v]));
      if constexpr (Diagonal) p = _mm512_maskz_mov_ps(m, p);
      _mm512_mask_storeu_ps(x, in_tile[v], p);
      total[v] = _mm512_add_ps(total[v], p);
    }
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int v = 0; v < kVecs; ++v) {
    // 1 where the max did not move (also -inf to -inf: no key yet), 0 where it left -inf.
    const __mmask16 moved = _mm512_cmp_ps_mask(old_max[v], top[v], _CMP_NEQ_OQ);
    const __mmask16 first_key = _mm512_cmp_ps_mask(old_max[v], minus_inf, _CMP_EQ_OQ);
    __m512 f = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), moved, exp16(_mm512_sub_ps(old_max[v], top[v])));
    f = _mm512_mask_mov_ps(f, first_key, _mm512_setzero_ps());
    float* sv = sum + kLanes * v;
    _mm512_mask_storeu_ps(sv, in_tile[v], _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in_tile[v], sv), f, total[v]));
    _mm512_mask_storeu_ps(max + kLanes * v, in_tile[v], top[v]);
    _mm512_mask_storeu_ps(factor + kLanes * v, in_tile[v], f);
  }
}

// Backward, one row of the score tiles (query i against keys j0 + c, causal for c <
// valid): p = exp(s[c] - lse) there, else 0; s[c] <- p and dp[c] <- p * (dp[c] - delta).
__attribute__((target("avx512f"))) void grad_row_avx512(float* s, float* dp, int64_t valid, int64_t width, float lse,
                                                         float delta) {
  const __m512 l = _mm512_set1_ps(lse), d = _mm512_set1_ps(delta);
  for (int64_t c = 0; c < width; c += kLanes) {
    const __mmask16 in_tile = first_lanes(width - c), causal = first_lanes(valid - c);
    if (causal == 0) {  // 16 keys after this query: P = dS = 0, no exp
      _mm512_mask_storeu_ps(s + c, in_tile, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(dp + c, in_tile, _mm512_setzero_ps());
      continue;
    }
    const __m512 p = _mm512_maskz_mov_ps(causal, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(in_tile, s + c), l)));
    _mm512_mask_storeu_ps(s + c, in_tile, p);
    _mm512_mask_storeu_ps(dp + c, in_tile, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(in_tile, dp + c), d)));
  }
}

__attribute__((target("avx512f"))) void scale_row_avx512(float* x, int64_t n, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  for (int64_t c = 0; c < n; c += kLanes) {
    const __mmask16 m = first_lanes(n - c);
    _mm512_mask_storeu_ps(x + c, m, _mm512_mul_ps(f, _mm512_maskz_loadu_ps(m, x + c)));
  }
}

__attribute__((target("avx512f"))) void add_rows_avx512(float* dst, const float* src, int64_t n) {
  for (int64_t c = 0; c < n; c += kLanes) {
    const __mmask16 m = first_lanes(n - c);
    _mm512_mask_storeu_ps(dst + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + c), _mm512_maskz_loadu_ps(m, src + c)));
  }
}


// dst[d, r] (ld T) = src[r, d] (ld Dh) for r < rows <= T, d < Dh, by 16 x 16 blocks.
__attribute__((target("avx512f"))) void transpose_tile_avx512(const float* src, int64_t rows, int64_t dh, float* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    const int64_t block_rows = std::min<int64_t>(kLanes, rows - r0);
    const __mmask16 row_lanes = first_lanes(block_rows);
    for (int64_t d0 = 0; d0 < dh; d0 += kLanes) {
      const int64_t block_cols = std::min<int64_t>(kLanes, dh - d0);
      const __mmask16 col_lanes = first_lanes(block_cols);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < block_rows ? _mm512_maskz_loadu_ps(col_lanes, src + (r0 + i) * dh + d0) : _mm512_setzero_ps();
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        if (i < block_cols) _mm512_mask_storeu_ps(dst + (d0 + i) * kT + r0, row_lanes, r[i]);
    }
  }
}

// sum_d x[d] y[d] in double, 8 lanes at a time (D: its error is that of the fp32 inputs).
__attribute__((target("avx512f"))) double dot_double_avx512(const float* x, const float* y, int64_t n) {
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  for (int64_t d = 0; d < n; d += kLanes) {
    const __mmask16 m = first_lanes(n - d);
    const __m512 a = _mm512_maskz_loadu_ps(m, x + d), b = _mm512_maskz_loadu_ps(m, y + d);
    acc0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)), _mm512_cvtps_pd(_mm512_castps512_ps256(b)), acc0);
    acc1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))),
                           _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1))), acc1);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
}

// ---------------------------------------------------------------------------------------
// The same as plain loops: the F64 path (std::exp), and fp32 without AVX-512.

template <typename C>
void product_plain(bool trans_a, int64_t m, int64_t n, int64_t k, C alpha, const C* a, int64_t lda, const C* b,
                   int64_t ldb, C* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      C dot = 0;
      for (int64_t p = 0; p < k; ++p) dot += (trans_a ? a[p * lda + i] : a[i * lda + p]) * b[p * ldb + j];
      c[i * ldc + j] = alpha * dot + (accumulate ? c[i * ldc + j] : C(0));
    }
}

template <typename C>
C rescale_factor(C old_max, C new_max) {
  if (old_max == new_max) return C(1);
  if (old_max == -std::numeric_limits<C>::infinity()) return C(0);
  return exp_of<C>(old_max - new_max);
}

template <typename C>
void softmax_columns_plain(C* st, int64_t rows, int64_t cols, int64_t shift, C* max, C* sum, C* factor) {
  for (int64_t c = 0; c < cols; ++c) {
    C top = max[c];
    for (int64_t r = 0; r < rows && r + shift <= c; ++r) top = std::max(top, st[r * kT + c]);
    factor[c] = rescale_factor(max[c], top);
    C total = 0;
    for (int64_t r = 0; r < rows; ++r) {
      C& x = st[r * kT + c];
      x = r + shift <= c ? exp_of<C>(x - top) : C(0);
      total += x;
    }
    sum[c] = sum[c] * factor[c] + total;
    max[c] = top;
  }
}

template <typename C>
void grad_row_plain(C* s, C* dp, int64_t valid, int64_t width, C lse, C delta) {
  for (int64_t c = 0; c < width; ++c) {
    const C p = c < valid ? exp_of<C>(s[c] - lse) : C(0);
    s[c] = p;
    dp[c] = p * (dp[c] - delta);
  }
}

// ---------------------------------------------------------------------------------------
// Tile math in the compute type C, each piece on AVX-512 when C is float and the CPU has it.
template <typename C>
struct TileMath {
  bool avx512 = std::is_same_v<C, float> && cpu_has_avx512();

  // C[m, n] = alpha op(A) B (+ C when accumulate); see product_avx512.
  void product(bool trans_a, int64_t m, int64_t n, int64_t k, C alpha, const C* a, int64_t lda, const C* b,
               int64_t ldb, C* c, int64_t ldc, bool accumulate) const {
    if constexpr (std::is_same_v<C, float>) {
      if (avx512) {
        if (trans_a) return product_avx512<true>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
        return product_avx512<false>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
      }
    }
    product_plain(trans_a, m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
  }

  void softmax_columns(C* st, int64_t rows, int64_t cols, int64_t shift, C* max, C* sum, C* factor) const {
    if constexpr (std::is_same_v<C, float>) {
      if (avx512) {
        if (rows - 1 + shift <= 0) return softmax_columns_avx512<false>(st, rows, cols, shift, max, sum, factor);
        return softmax_columns_avx512<true>(st, rows, cols, shift, max, sum, factor);
      }
    }
    softmax_columns_plain(st, rows, cols, shift, max, sum, factor);
  }

  void grad_row(C* s, C* dp, int64_t valid, int64_t width, C lse, C delta) const {
    if constexpr (std::is_same_v<C, float>) {
      if (avx512) return grad_row_avx512(s, dp, valid, width, lse, delta);
    }
    grad_row_plain(s, dp, valid, width, lse, delta);
  }

  void scale_row(C* x, int64_t n, C factor) const {
    if constexpr (std::is_same_v<C, float>) {
      if (avx512) return scale_row_avx512(x, n, factor);
    }
    for (int64_t d = 0; d < n; ++d) x[d] *= factor;
  }

  void add_rows(C* dst, const C* src, int64_t n) const {
    if constexpr (std::is_same_v<C, float>) {
      if (avx512) return add_rows_avx512(dst, src, n);
    }
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  }
};

// ---------------------------------------------------------------------------------------
// Operand tiles.

// rows x Dh contiguous stored elements in the compute type: the tensor itself when it
// already is, else widened into buf.
template <typename C, typename T>
const C* as_compute(const T* src, int64_t count, C* buf) {
  if constexpr (std::is_same_v<T, C>) {
    return src;
  } else {
    if constexpr (std::is_same_v<T, bf16> && std::is_same_v<C, float>)
      for (int64_t i = 0; i < count; ++i) buf[i] = bf16_to_float(src[i]);
    else
      for (int64_t i = 0; i < count; ++i) buf[i] = C(widen(src[i]));
    return buf;
  }
}

// dst[d, r] (ld T) = src[r, d] for r < rows, d < Dh, widened to C. Once per work item.
template <typename C, typename T>
void transpose_tile(const T* src, int64_t rows, int64_t dh, C* dst) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<C, float>) {
    if (cpu_has_avx512()) return transpose_tile_avx512(src, rows, dh, dst);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < dh; ++d) dst[d * kT + r] = C(widen(src[r * dh + d]));
}

template <typename T, typename C>
inline T to_storage(C x) {
  if constexpr (std::is_same_v<T, C>) return x;
  else return narrow<T>(double(x));
}

// ---------------------------------------------------------------------------------------
// Per-thread scratch: one allocation carved into tiles. scratch_elements sizes it and
// Scratch lays it out from the same counts.
constexpr int64_t kScoreTiles = 2;    // [T, T]
constexpr int64_t kOperandTiles = 7;  // [T, Dh] or [Dh, T]
constexpr int64_t kRowVectors = 3;    // [T]
constexpr int64_t kAlign = 64;        // bytes; every region is a whole number of cache lines

// dq_rows: rows of the backward's dq terms (S); 0 in the forward.
int64_t scratch_elements(int64_t dh, int64_t dq_rows) {
  return kScoreTiles * kT * kT + kOperandTiles * kT * dh + kRowVectors * kT + dq_rows * dh;
}

template <typename C>
struct Scratch {
  std::vector<C> storage;
  C *s, *dp;                      // [T, T] score tiles
  C *fixed_t, *fixed2_t;          // [Dh, T] the item's fixed operands transposed: q^T; k^T and v^T
  C *q, *k, *v, *dout;            // [T, Dh] operand tiles widened, when not stored in C
  C* acc;                         // [T, Dh] out, unnormalised
  C *row_max, *row_sum, *factor;  // [T] online softmax state per query
  C* dq_terms;                    // [dq_rows, Dh] an item's dq terms, from its first key's row on

  Scratch(int64_t dh, int64_t dq_rows) : storage(scratch_elements(dh, dq_rows) + kAlign / sizeof(C)) {
    C* p = storage.data();
    while (reinterpret_cast<uintptr_t>(p) % kAlign != 0) ++p;
    const auto take = [&](int64_t n) {
      C* region = p;
      p += n;
      return region;
    };
    s = take(kT * kT);
    dp = take(kT * kT);
    for (C** tile : {&fixed_t, &fixed2_t, &q, &k, &v, &dout, &acc}) *tile = take(kT * dh);
    row_max = take(kT);
    row_sum = take(kT);
    factor = take(kT);
    dq_terms = take(dq_rows * dh);
  }
};

struct Dims {
  int64_t n, s, dh;
  int64_t tiles() const { return (s + kT - 1) / kT; }
  int64_t rows_in(int64_t first) const { return std::min(kT, s - first); }
};

// ---------------------------------------------------------------------------------------
// Forward. Work item (head n, query tile at i0), the longest first (schedule(dynamic)
// then balances the causal triangle). Per key tile j0 <= the item's last query:
//   S^T = scale k q^T [bc, br]; online softmax down its columns; out = out * factor + P v.
template <typename T, typename C>
void forward_tiles(const T* q, const T* k, const T* v, T* out, C* lse, Dims dm, C scale) {
  const int64_t tiles = dm.tiles(), dh = dm.dh, items = dm.n * tiles;
  const TileMath<C> math;
#pragma omp parallel
  {
    Scratch<C> sc(dh, 0);
#pragma omp for schedule(dynamic)
    for (int64_t w = 0; w < items; ++w) {
      const int64_t n = w % dm.n, i0 = (tiles - 1 - w / dm.n) * kT, br = dm.rows_in(i0);
      const int64_t head = n * dm.s * dh;
      transpose_tile(q + head + i0 * dh, br, dh, sc.fixed_t);  // q^T [Dh, br]
      C* o = sc.acc;                                           // [br, Dh] unnormalised out
      std::fill(o, o + br * dh, C(0));
      std::fill(sc.row_max, sc.row_max + br, -std::numeric_limits<C>::infinity());
      std::fill(sc.row_sum, sc.row_sum + br, C(0));
      for (int64_t j0 = 0; j0 < i0 + br; j0 += kT) {
        const int64_t bc = dm.rows_in(j0);
        const C* k_t = as_compute(k + head + j0 * dh, bc * dh, sc.k);
        const C* v_t = as_compute(v + head + j0 * dh, bc * dh, sc.v);
        math.product(false, bc, br, dh, scale, k_t, dh, sc.fixed_t, kT, sc.s, kT, false);
        math.softmax_columns(sc.s, bc, br, j0 - i0, sc.row_max, sc.row_sum, sc.factor);
        for (int64_t r = 0; r < br; ++r)
          if (sc.factor[r] != C(1)) math.scale_row(o + r * dh, dh, sc.factor[r]);
        math.product(true, br, dh, bc, C(1), sc.s, kT, v_t, dh, o, dh, true);
      }
      for (int64_t r = 0; r < br; ++r) {
        // Every query sees key 0, so its sum is at least 1 (exp(0) at its max).
        const C inv = C(1) / sc.row_sum[r];
        T* dst = out + head + (i0 + r) * dh;
        for (int64_t d = 0; d < dh; ++d) dst[d] = to_storage<T>(o[r * dh + d] * inv);
        lse[n * dm.s + i0 + r] = sc.row_max[r] + std::log(sc.row_sum[r]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward.

// delta[r] = sum_d dout[r, d] out[r, d] over all N x S rows, summed in double.
template <typename O, typename G, typename C>
void delta_rows(const O* out, const G* dout, int64_t rows, int64_t dh, C* delta) {
  [[maybe_unused]] const bool avx512 = cpu_has_avx512();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<O, float> && std::is_same_v<G, float>) {
      if (avx512) {
        delta[r] = C(dot_double_avx512(out + r * dh, dout + r * dh, dh));
        continue;
      }
    }
    double acc = 0.0;
    for (int64_t d = 0; d < dh; ++d) acc += widen(out[r * dh + d]) * widen(dout[r * dh + d]);
    delta[r] = C(acc);
  }
}

// Work item (head n, key tile at j0), key tile 0 (the most work) first; items ordered by
// key tile, then head. Per query tile i0 >= j0, in order:
//   S = scale q k^T, dP = dout v^T [br, bc]; P and dS = P (dP - D) in place;
//   dv += P^T dout, dk += scale dS^T q (into dk and dv, assigned by the first query tile);
//   dq terms for rows i0.. = scale dS k.
// Key tile 0 writes its dq terms into dq itself (it is the first to touch those rows);
// the others keep them in scratch and add them into dq in item order.
template <typename T, typename G, typename C>
void backward_tiles(const T* q, const T* k, const T* v, const G* dout, const C* lse, const C* delta, Dims dm, C scale,
                    C* dq, C* dk, C* dv) {
  const int64_t tiles = dm.tiles(), dh = dm.dh, items = dm.n * tiles;
  const TileMath<C> math;
#pragma omp parallel
  {
    Scratch<C> sc(dh, dm.s);
#pragma omp for ordered schedule(dynamic)
    for (int64_t w = 0; w < items; ++w) {
      const int64_t n = w % dm.n, j0 = (w / dm.n) * kT, bc = dm.rows_in(j0);
      const int64_t head = n * dm.s * dh;
      const C* k_t = as_compute(k + head + j0 * dh, bc * dh, sc.k);
      transpose_tile(k + head + j0 * dh, bc, dh, sc.fixed_t);   // k^T [Dh, bc]
      transpose_tile(v + head + j0 * dh, bc, dh, sc.fixed2_t);  // v^T [Dh, bc]
      C *dk_t = dk + head + j0 * dh, *dv_t = dv + head + j0 * dh;
      C* dq_terms = j0 == 0 ? dq + head : sc.dq_terms;  // rows from j0 on
      for (int64_t i0 = j0; i0 < dm.s; i0 += kT) {
        const int64_t br = dm.rows_in(i0);
        const C* q_t = as_compute(q + head + i0 * dh, br * dh, sc.q);
        const C* do_t = as_compute(dout + head + i0 * dh, br * dh, sc.dout);
        math.product(false, br, bc, dh, scale, q_t, dh, sc.fixed_t, kT, sc.s, kT, false);
        math.product(false, br, bc, dh, C(1), do_t, dh, sc.fixed2_t, kT, sc.dp, kT, false);
        for (int64_t r = 0; r < br; ++r) {
          // Query i0 + r sees keys j0 .. i0 + r of the tile.
          const int64_t i = n * dm.s + i0 + r, valid = std::clamp<int64_t>(i0 + r - j0 + 1, 0, bc);
          math.grad_row(sc.s + r * kT, sc.dp + r * kT, valid, bc, lse[i], delta[i]);
        }
        const bool first = i0 == j0;
        math.product(true, bc, dh, br, C(1), sc.s, kT, do_t, dh, dv_t, dh, !first);
        math.product(true, bc, dh, br, scale, sc.dp, kT, q_t, dh, dk_t, dh, !first);
        math.product(false, br, dh, bc, scale, sc.dp, kT, k_t, dh, dq_terms + (i0 - j0) * dh, dh, false);
      }
      // Items reach this in w order, so each dq row sums its key tiles' terms in key-tile
      // order, one item at a time.
#pragma omp ordered
      if (j0 > 0) math.add_rows(dq + head + j0 * dh, sc.dq_terms, (dm.s - j0) * dh);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launchers.

// [..., S, Dh] with the leading dims flattened into N.
Dims attention_dims(const Tensor& q) {
  SDMOE_ASSERT(q.ndim >= 2, "flash attention: q must be [N, S, Dh], got {}", q.shape_string());
  Dims dm{0, q.dim(-2), q.dim(-1)};
  SDMOE_ASSERT(dm.s >= 1 && dm.dh >= 1 && q.numel() >= 1, "flash attention: empty q {}", q.shape_string());
  dm.n = q.numel() / (dm.s * dm.dh);
  return dm;
}

void expect_rows(const Tensor& t, const Dims& dm, const char* what) {
  SDMOE_ASSERT(t.ndim >= 2 && t.dim(-1) == dm.dh && t.dim(-2) == dm.s && t.numel() == dm.n * dm.s * dm.dh,
               "flash attention: {} {} does not match q's [N={}, S={}, Dh={}]", what, t.shape_string(), dm.n, dm.s,
               dm.dh);
}

DType compute_dtype(DType q) { return q == DType::F64 ? DType::F64 : DType::F32; }

void expect_lse(const Tensor& lse, const Tensor& q, const Dims& dm) {
  const DType cd = compute_dtype(q.dtype);
  SDMOE_ASSERT(lse.numel() == dm.n * dm.s && lse.dtype == cd, "flash attention: lse must be [N={}, S={}] {}, got {} {}",
               dm.n, dm.s, dtype_name(cd), lse.shape_string(), dtype_name(lse.dtype));
}

}  // namespace

size_t flash_attention_scratch_bytes(DType q_dtype, int64_t seq, int64_t head_dim) {
  const size_t element = compute_dtype(q_dtype) == DType::F64 ? sizeof(double) : sizeof(float);
  return size_t(scratch_elements(head_dim, seq)) * element + kAlign;
}

void flash_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& out,
                             const Tensor& lse) {
  const Dims dm = attention_dims(q);
  expect_rows(k, dm, "k");
  expect_rows(v, dm, "v");
  expect_rows(out, dm, "out");
  expect_same(q, k, "flash_attention_forward");
  expect_same(q, v, "flash_attention_forward");
  expect_same(q, out, "flash_attention_forward");
  expect_lse(lse, q, dm);
  dispatch_storage(q.dtype, [&](auto z) {
    using T = decltype(z);
    using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
    forward_tiles<T, C>(q.ptr<T>(), k.ptr<T>(), v.ptr<T>(), out.ptr<T>(), lse.ptr<C>(), dm, C(scale));
  });
}

void flash_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
                              const Tensor& lse, double scale, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const Dims dm = attention_dims(q);
  expect_rows(k, dm, "k");
  expect_rows(v, dm, "v");
  expect_rows(out, dm, "out");
  expect_rows(dout, dm, "dout");
  expect_rows(dq, dm, "dq");
  expect_rows(dk, dm, "dk");
  expect_rows(dv, dm, "dv");
  expect_same(q, k, "flash_attention_backward");
  expect_same(q, v, "flash_attention_backward");
  expect_lse(lse, q, dm);
  const DType cd = compute_dtype(q.dtype);
  SDMOE_ASSERT(dq.dtype == cd && dk.dtype == cd && dv.dtype == cd,
               "flash attention: dq, dk, dv must be {} for q in {} (got {}, {}, {})", dtype_name(cd),
               dtype_name(q.dtype), dtype_name(dq.dtype), dtype_name(dk.dtype), dtype_name(dv.dtype));
  dispatch_float(cd, [&](auto zc) {
    using C = decltype(zc);
    // D, one value per query row: with lse the only [N, S] state the backward keeps.
    std::vector<C> delta(dm.n * dm.s);
    dispatch_storage(out.dtype, [&](auto zo) {
      dispatch_storage(dout.dtype, [&](auto zg) {
        using O = decltype(zo);
        using G = decltype(zg);
        delta_rows<O, G, C>(out.ptr<O>(), dout.ptr<G>(), dm.n * dm.s, dm.dh, delta.data());
      });
    });
    dispatch_storage(q.dtype, [&](auto zt) {
      dispatch_storage(dout.dtype, [&](auto zg) {
        using T = decltype(zt);
        using G = decltype(zg);
        // F64 q computes in double and the others in float; the two other pairings never run.
        if constexpr (std::is_same_v<T, double> == std::is_same_v<C, double>)
          backward_tiles<T, G, C>(q.ptr<T>(), k.ptr<T>(), v.ptr<T>(), dout.ptr<G>(), lse.ptr<C>(), delta.data(), dm,
                                  C(scale), dq.ptr<C>(), dk.ptr<C>(), dv.ptr<C>());
      });
    });
  });
}

}  // namespace sdmoe::cpu
