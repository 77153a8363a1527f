// bf16 GEMM on vdpbf16ps. _mm512_dpbf16_ps(acc, a, b) adds, per fp32 lane i,
// a[2i] b[2i] + a[2i+1] b[2i+1] (exact products, fp32 adds), so both operands are read as
// k-pairs: a 32-bit word holding the bf16 values at inner indices (d, d+1).
//   B's panel is packed as kPanel columns x pairs: panel[p * kPanel + c] = the pair
//   (op(B)[2p, c], op(B)[2p+1, c]), a vector of 16 such words per 16 columns.
//     A B^T: a pair of column c is already one word of B's row c: a 16x16 word transpose.
//     A B:   rows 2p and 2p+1 of B are interleaved (zero-extend and shift).
//   A's pair of row r is broadcast as one word (memory-operand broadcast).
//     A B, A B^T: A is row-major in k, its pairs are read in place.
//     A^T B: A = [k x m]; a block of its rows is interleaved like B in A B,
//            apack[p * mb + r], so a tile's broadcasts share a cache line.
// An odd k pads the last pair with a zero: B's packed high half is zero, and the in-place
// A reads only the last bf16 (zero-extended), so nothing past the matrices is read.
// The micro-kernel keeps kTileRows x (16 kTileVectors) of C in registers for one k-block
// and writes it once; k is blocked so that the packed B panel stays in L2. 6 x 64 was the
// fastest tile tried (8 x 48, 12 x 32 and 4 x 64 ran 1 to 10% slower; 8 x 48 and 12 x 32
// also lose a partial panel on the attention shapes).
#include "core/cpu/cpu_backend.h"
#include "core/cpu/avx512_transpose.h"
#include "core/cpu/gemm_bf16_avx512.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#define SDMOE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace sdmoe::cpu {
namespace {

constexpr int kTileRows = 6;
constexpr int kTileVectors = 4;  // 16 fp32 lanes each: 64 columns per panel
constexpr int64_t kPanel = 16 * kTileVectors;
// Inner pairs per pass over C: the packed panel is 64 KiB, in L2 (its 4 loads per 24
// vdpbf16ps need little bandwidth). Against 128 pairs (32 KiB, inside L1D) it was 1 to 3%
// faster on the k = 512 and 1024 shapes, from half the passes over C, and equal elsewhere.
constexpr int64_t kInnerPairs = 256;
// Rows of A^T packed at a time (A^T B): 512 rows x 256 pairs is 512 KiB, inside L2.
constexpr int64_t kPackedRowsA = 512;

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

inline uint32_t load_pair(const bf16* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// The pair (row[d], row[d+1]) of a row of kb values, the second zero past the end.
inline uint32_t pair_or_pad(const bf16* row, int64_t d, int64_t kb) {
  return uint32_t(row[d].bits) | (d + 1 < kb ? uint32_t(row[d + 1].bits) << 16 : 0u);
}


// A B^T: b = B's rows j0.. at inner offset p0, b(c, d) = b[c * ldb + d].
// panel[p * kPanel + c] = (b(c, 2p), b(c, 2p+1)) for c < width, p < ceil(kb / 2), the
// second zero when 2p+1 == kb; zero for c >= width.
SDMOE_BF16_TARGET void pack_panel_transposed(int64_t width, int64_t kb, const bf16* b, int64_t ldb, uint32_t* panel) {
  const int64_t pairs = (kb + 1) / 2, full_pairs = kb / 2;
  int64_t c = 0;
  for (; c + 16 <= width; c += 16) {
    int64_t p = 0;
    for (; p + 16 <= full_pairs; p += 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(b + (c + i) * ldb + 2 * p));
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(panel + (p + i) * kPanel + c, _mm512_castps_si512(r[i]));
    }
    for (; p < pairs; ++p)
      for (int64_t i = 0; i < 16; ++i) panel[p * kPanel + c + i] = pair_or_pad(b + (c + i) * ldb, 2 * p, kb);
  }
  for (; c < width; ++c)
    for (int64_t p = 0; p < pairs; ++p) panel[p * kPanel + c] = pair_or_pad(b + c * ldb, 2 * p, kb);
  for (int64_t p = 0; p < pairs; ++p) std::fill(panel + p * kPanel + width, panel + (p + 1) * kPanel, 0u);
}

// Rows of a row-major x (x(d, c) = x[d * ldx + c]) interleaved in pairs:
// out[p * ld_out + c] = (x(2p, c), x(2p+1, c)) for c < width, p < ceil(kb / 2), the second
// zero when 2p+1 == kb; zero for width <= c < ld_out.
SDMOE_BF16_TARGET void pack_rows_interleaved(int64_t width, int64_t ld_out, int64_t kb, const bf16* x, int64_t ldx,
                                             uint32_t* out) {
  for (int64_t p = 0; 2 * p < kb; ++p) {
    const bf16* lo = x + 2 * p * ldx;
    const bf16* hi = lo + ldx;
    const bool has_hi = 2 * p + 1 < kb;
    for (int64_t c = 0; c < ld_out; c += 16) {
      const __mmask16 in = __mmask16(width - c >= 16 ? 0xFFFF : width > c ? (1u << (width - c)) - 1 : 0);
      const __mmask16 store = __mmask16(ld_out - c >= 16 ? 0xFFFF : (1u << (ld_out - c)) - 1);
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, lo + c));
      const __m512i h = has_hi ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, hi + c)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(out + p * ld_out + c, store, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
  }
}

// One Rows x kPanel tile of C over `pairs` k-pairs, plus the last lone k when `odd`.
// A's pair p of row r is the word at a + r * a_rs + p * a_ps (bf16 units); the lone k is
// the bf16 at the same place. The panel's pair p of column c is panel[p * kPanel + c].
// mask[v]: the columns of vector v that exist in C.
template <int Rows>
SDMOE_BF16_TARGET inline void tile(int64_t pairs, bool odd, const bf16* a, int64_t a_rs, int64_t a_ps,
                                   const uint32_t* panel, float* c, int64_t ldc, float alpha, float beta,
                                   const __mmask16* mask) {
  // Loops over rows and vectors are unrolled so the accumulators stay in registers.
  __m512 acc[Rows][kTileVectors];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kTileVectors; ++v) acc[r][v] = _mm512_setzero_ps();
  const auto step = [&](int64_t p, auto load_a) SDMOE_BF16_TARGET {
    __m512bh bv[kTileVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kTileVectors; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(panel + p * kPanel + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(load_a(a + r * a_rs + p * a_ps)));
#pragma GCC unroll 4
      for (int v = 0; v < kTileVectors; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  };
#pragma GCC unroll 2
  for (int64_t p = 0; p < pairs; ++p) step(p, [](const bf16* x) { return load_pair(x); });
  if (odd) step(pairs, [](const bf16* x) { return uint32_t(x->bits); });
  const __m512 alpha_v = _mm512_set1_ps(alpha), beta_v = _mm512_set1_ps(beta);
  const bool scale = alpha != 1.0f, accumulate = beta != 0.0f;
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kTileVectors; ++v) {
      float* out = c + r * ldc + 16 * v;
      __m512 x = scale ? _mm512_mul_ps(acc[r][v], alpha_v) : acc[r][v];
      if (accumulate) x = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask[v], out), x);
      _mm512_mask_storeu_ps(out, mask[v], x);
    }
}

template <int Rows>
void tile_rows(int rows, int64_t pairs, bool odd, const bf16* a, int64_t a_rs, int64_t a_ps, const uint32_t* panel,
               float* c, int64_t ldc, float alpha, float beta, const __mmask16* mask) {
  if constexpr (Rows > 0) {
    if (rows == Rows) return tile<Rows>(pairs, odd, a, a_rs, a_ps, panel, c, ldc, alpha, beta, mask);
    tile_rows<Rows - 1>(rows, pairs, odd, a, a_rs, a_ps, panel, c, ldc, alpha, beta, mask);
  }
}

void panel_mask(int64_t width, __mmask16* mask) {
  for (int v = 0; v < kTileVectors; ++v) {
    const int64_t w = std::clamp<int64_t>(width - 16 * v, 0, 16);
    mask[v] = w == 16 ? __mmask16(0xFFFF) : __mmask16((1u << w) - 1);
  }
}

void gemm_packed(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a, int64_t lda,
                 const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // Equal even k-blocks (1024 = 2 x 512, 600 = 2 x 300, not 512 + 88): the last may be odd.
  const int64_t blocks = (k + 2 * kInnerPairs - 1) / (2 * kInnerPairs);
  const int64_t kc = ((k + blocks - 1) / blocks + 1) / 2 * 2;
  const int64_t mb_max = ta ? std::min(m, kPackedRowsA) : 0;
  thread_local std::vector<uint32_t> bpack, apack;
  if (bpack.size() < size_t(kc / 2 * kPanel)) bpack.resize(kc / 2 * kPanel);
  if (apack.size() < size_t(kc / 2 * mb_max)) apack.resize(kc / 2 * mb_max);
  for (int64_t p0 = 0; p0 < k; p0 += kc) {
    const int64_t kb = std::min(kc, k - p0);
    const float block_beta = p0 == 0 ? beta : 1.0f;
    for (int64_t i0 = 0; i0 < m; i0 += ta ? kPackedRowsA : m) {
      const int64_t mb = ta ? std::min(kPackedRowsA, m - i0) : m;
      // A's pairs: in place (row stride lda, pair stride 2), or packed with the lone k
      // zero-padded (row stride 2, pair stride 2 mb, all pairs full).
      const bf16* a_base = a + i0 * lda + p0;
      int64_t a_rs = lda, a_ps = 2, pairs = kb / 2;
      bool odd = kb % 2 != 0;
      if (ta) {
        pack_rows_interleaved(mb, mb, kb, a + p0 * lda + i0, lda, apack.data());
        a_base = reinterpret_cast<const bf16*>(apack.data());
        a_rs = 2, a_ps = 2 * mb, pairs = (kb + 1) / 2, odd = false;
      }
      for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
        const int64_t width = std::min(kPanel, n - j0);
        __mmask16 mask[kTileVectors];
        panel_mask(width, mask);
        if (tb)
          pack_panel_transposed(width, kb, b + j0 * ldb + p0, ldb, bpack.data());
        else
          pack_rows_interleaved(width, kPanel, kb, b + p0 * ldb + j0, ldb, bpack.data());
        for (int64_t i = 0; i < mb; i += kTileRows) {
          const int rows = int(std::min<int64_t>(kTileRows, mb - i));
          tile_rows<kTileRows>(rows, pairs, odd, a_base + i * a_rs, a_rs, a_ps, bpack.data(), c + (i0 + i) * ldc + j0,
                               ldc, alpha, block_beta, mask);
        }
      }
    }
  }
}

// ---- portable ---------------------------------------------------------------------------

// Columns of op(B) widened per block: k x 256 floats (256 KiB at k = 256).
constexpr int64_t kPortableColumns = 256;

void scale_c(int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
}

// ---- peak -------------------------------------------------------------------------------

constexpr int kChains = 12;  // independent chains, enough to cover vdpbf16ps latency x ports

SDMOE_BF16_TARGET float dot_loop(int64_t iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  // Pairs (1, 1) and (~1e-7, ~1e-7): each step adds ~2e-7, so the sums stay finite and
  // normal.
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x33d633d6);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

}  // namespace

bool cpu_supports_avx512_bf16() { return cpu_has_avx512_bf16(); }

bool gemm_bf16_applies(bool ta, bool tb, int64_t m, int64_t n, int64_t k) {
  // Below one register tile the packing and masked edges dominate.
  return cpu_has_avx512_bf16() && !(ta && tb) && m >= kTileRows && n >= kPanel && k >= 1;
}

void gemm_bf16_avx512(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a, int64_t lda,
                      const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) return scale_c(m, n, beta, c, ldc);
  if (ta && tb) return gemm_bf16_portable(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  gemm_packed(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm_bf16_portable(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a, int64_t lda,
                        const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) return scale_c(m, n, beta, c, ldc);
  thread_local std::vector<float> b_wide, a_row, c_row;  // [k, nb], [k], [nb]
  const int64_t nb_max = std::min(n, kPortableColumns);
  b_wide.resize(k * nb_max);
  a_row.resize(k);
  c_row.resize(nb_max);
  for (int64_t j0 = 0; j0 < n; j0 += kPortableColumns) {
    const int64_t nb = std::min(kPortableColumns, n - j0);
    float* bw = b_wide.data();
    for (int64_t d = 0; d < k; ++d)
      for (int64_t j = 0; j < nb; ++j) bw[d * nb + j] = bf16_to_float(tb ? b[(j0 + j) * ldb + d] : b[d * ldb + j0 + j]);
    for (int64_t i = 0; i < m; ++i) {
      float* ar = a_row.data();
      float* cr = c_row.data();
      for (int64_t d = 0; d < k; ++d) ar[d] = bf16_to_float(ta ? a[d * lda + i] : a[i * lda + d]);
      std::fill(cr, cr + nb, 0.0f);
      for (int64_t d = 0; d < k; ++d) {
        const float av = ar[d];
        const float* brow = bw + d * nb;
        for (int64_t j = 0; j < nb; ++j) cr[j] += av * brow[j];
      }
      float* out = c + i * ldc + j0;
      for (int64_t j = 0; j < nb; ++j) out[j] = alpha * cr[j] + (beta == 0.0f ? 0.0f : beta * out[j]);
    }
  }
}

double measure_cpu_bf16_dot_peak(int threads) {
  if (!cpu_has_avx512_bf16()) return 0.0;
  // Half the iterations of the fp32 FMA measurement: each instruction does twice the work.
  return measure_loop_peak(threads, 10'000'000, double(kChains) * 16 * 2 * 2, dot_loop);
}

}  // namespace sdmoe::cpu
