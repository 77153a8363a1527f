// bf16 GEMM on AMX tiles. TDPBF16PS C += A B takes
//   A: 16 rows x 32 bf16 (64-byte rows), one row of op(A) per tile row, k contiguous;
//   B: 16 k-pairs x 16 columns in VNNI order, row q = the words (op(B)[2q, c], op(B)[2q+1, c])
//      for c = 0..15 (64-byte rows);
//   C: 16 x 16 fp32.
// Tile registers: the micro-kernel holds a 32 x 32 block of C in four tiles, C(r, c) =
// tmm(2r + c), and per 32-deep k step loads two A tiles (tmm4, tmm5: rows 0-15 and 16-31)
// and two B tiles (tmm6, tmm7: columns 0-15 and 16-31) for four TDPBF16PS, the most work
// per loaded tile that 8 tiles allow. C stays in its tiles for the whole k block.
//
// Operands (op(A) = [m,k] rows i, op(B) = [k,n] columns j; a "strip" is 32 of them):
//   B is always packed, a panel of strips: strip j, step s, tile t is 16 x 32 bf16 at
//     ((j * steps + s) * 2 + t) * 512, zero past n and k, so every B load is contiguous.
//     B [n,k] (tb): 16 rows of B are 16 columns of op(B), k contiguous: a 16x16 transpose
//     of 32-bit words (k-pairs) gives the VNNI rows. B [k,n]: rows 2q and 2q+1 interleaved.
//   A [m,k] is read in place (tile rows lda apart) for whole strips and whole steps; a
//     strip's last k step, when k is not a multiple of 32, and a strip with fewer than 32
//     rows are packed, zero-padded, so no load reads past the matrix.
//   A [k,m] (ta) is packed a strip at a time like B in the transposed case, the other way
//     round: rows 2q and 2q+1 interleaved, then transposed, gives tile rows of op(A).
// Loops: n in panels of about kPanelBytes of packed B (in L2), k in blocks of at most
// kDepth; inside, each A strip (kept in L1) meets every B strip of the panel (streamed
// from L2 with tileloaddt1, which does not displace the A strip from L1).
// Epilogue: each block's C tiles stay in their tiles until the next block's first step
// stores them to an L1 scratch; between its tile products that block then combines them
// with C (alpha, beta, edge masks) by AVX-512 stores, non-temporal for a huge C.
//
// What bounds it (one Sapphire Rapids class core, TDPBF16PS peak 2.2-3.1 TFLOP/s with the
// clock): with its operands in L1 the loop of tile loads and products reaches ~80% of it
// (a tile being loaded cannot feed a product, and 8 tiles leave none to double-buffer).
// Then C: each fp32 element gets 2k FLOP, so at k = 192 and 2 TFLOP/s C
// must be written at 21 GB/s, about what one core's stores reach beyond L2 (20-28 GB/s
// measured), and C's misses compete with the B tiles streaming from L2. Packing costs
// 50-80 cycles per 1 KiB tile against (the other dimension / 16) TDPBF16PS of 16 cycles
// that use it: 5-8% here, 10-30% for A^T B.
#include "core/cpu/cpu_backend.h"
#include "core/cpu/avx512_transpose.h"
#include "core/cpu/gemm_bf16_amx.h"

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "core/check.h"

#define SDMOE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))

// The tile instructions as asm: GCC 12's _tile_loadd declares no memory read (a packing
// store before it could be reordered past it) and its _tile_loadconfig passes only the
// configuration's first 8 bytes as an operand (the rest may never be written). These name
// the memory they touch. Tile numbers must be literals.
#define SDMOE_TILE_LOAD(t, base, stride)                                                   \
  asm volatile("{tileloadd\t(%0,%1,1), %%tmm" #t "|tileloadd\t%%tmm" #t ", [%0+%1*1]}" \
               :                                                                       \
               : "r"(base), "r"(int64_t(stride))                                       \
               : "memory")
// tileloaddt1: the same load with a hint not to keep the data in L1 (see block_32x32).
#define SDMOE_TILE_LOAD_T1(t, base, stride)                                                    \
  asm volatile("{tileloaddt1\t(%0,%1,1), %%tmm" #t "|tileloaddt1\t%%tmm" #t ", [%0+%1*1]}" \
               :                                                                           \
               : "r"(base), "r"(int64_t(stride))                                           \
               : "memory")
#define SDMOE_TILE_STORE(t, base, stride)                                                    \
  asm volatile("{tilestored\t%%tmm" #t ", (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm" #t "}" \
               :                                                                         \
               : "r"(base), "r"(int64_t(stride))                                         \
               : "memory")
#define SDMOE_TILE_DP(c, a, b) \
  asm volatile("{tdpbf16ps\t%%tmm" #b ", %%tmm" #a ", %%tmm" #c "|tdpbf16ps\t%%tmm" #c ", %%tmm" #a ", %%tmm" #b "}" ::)
#define SDMOE_TILE_ZERO(t) asm volatile("tilezero\t%%tmm" #t ::)

namespace sdmoe::cpu {
namespace {

constexpr int64_t kStep = 32;       // k per TDPBF16PS
constexpr int64_t kBlock = 32;      // rows and columns of C per micro-kernel
constexpr int64_t kTileElems = 512; // bf16 per packed tile (16 x 32)
constexpr int64_t kStripStep = 2 * kTileElems;  // one k step of a packed strip: two tiles

// Blocking (see the file comment), chosen by benchmark on a Sapphire Rapids class core.
// k per block, at most: the A strip (32 x k bf16, up to 48 KiB) should stay in L1, and
// each k block past the first rereads C. 768 runs k = 576 as one block (1.14x faster than
// two of 288) and k = 1024 as two of 512; 1024 (one 64 KiB strip) was 10-20% slower on
// A^T B.
constexpr int64_t kDepth = 768;
// The packed B panel, about 1 MiB (in L2): 2720 columns at k = 192, 1024 at k = 512
// (512 columns ran as fast; 2 MiB, all of L2, 15% slower on the output head).
constexpr int64_t kPanelBytes = 1 << 20;
// C larger than this, with beta = 0, is written with non-temporal stores: it cannot stay
// in cache anyway, and they skip the read for ownership (22 against 10 GB/s measured on a
// 1024 x 50304 C; the output head ran 1.9x faster). Smaller C stays cached for whoever
// reads it next: streaming the 4 MB C of 8192 x 128 x 64 made that GEMM 1.9x faster
// alone but 1.6x slower followed by one read of C.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// ---- tiles and permission ---------------------------------------------------------------

bool request_amx() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  if (!amx_bf16 || !amx_tile) return false;
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl"))
    return false;
  // Linux (5.16+) enables the 8 KiB tile data state per process on request; without the
  // grant the first tile instruction faults. ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Palette 1 with tiles 0-7 all 16 rows x 64 bytes: every tile this file uses is whole
// (edges are zero-padded in packing or go through the scratch), so one configuration
// serves every call.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static_assert(sizeof(TileConfig) == 64);

// Loads the configuration on construction and releases the tiles on destruction. The
// load is ~80 ns; a thread_local "configured" flag would save it but would go stale when
// other AMX code on the thread changes the configuration, and it would leave 8 KiB of
// tile state live in every thread that once ran a GEMM (saved on every context switch).
class TileScope {
 public:
  SDMOE_AMX_TARGET TileScope() {
    static const TileConfig config;
    asm volatile("ldtilecfg\t%0" : : "m"(config));
  }
  SDMOE_AMX_TARGET ~TileScope() { asm volatile("tilerelease" ::); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// A thread's packing buffer, 64-byte aligned (tile rows are 64 bytes), grown on demand.
class PackBuffer {
 public:
  ~PackBuffer() { std::free(data_); }
  bf16* get(int64_t elements) {
    const size_t bytes = (size_t(elements) * sizeof(bf16) + 63) / 64 * 64;
    if (bytes > bytes_) {
      std::free(data_);
      data_ = static_cast<bf16*>(std::aligned_alloc(64, bytes));
      SDMOE_ASSERT(data_ != nullptr, "AMX packing buffer of {} bytes", bytes);
      bytes_ = bytes;
    }
    return data_;
  }

 private:
  bf16* data_ = nullptr;
  size_t bytes_ = 0;
};

// ---- packing ----------------------------------------------------------------------------


// v[i] = the 32 bf16 x[i * ld + 0..31], for i < rows and elements < width; zero elsewhere.
SDMOE_AMX_TARGET inline void load_rows(const bf16* x, int64_t ld, int64_t rows, int64_t width, __m512i v[16]) {
  const __mmask32 mask = width >= 32 ? ~__mmask32(0) : (__mmask32(1) << width) - 1;
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) v[i] = i < rows ? _mm512_maskz_loadu_epi16(mask, x + i * ld) : _mm512_setzero_si512();
}

// v[q] = the 16 words (x[2q * ld + c], x[(2q + 1) * ld + c]), c = 0..15, for rows 2q, 2q+1
// < depth and c < width; zero elsewhere.
SDMOE_AMX_TARGET inline void load_pairs(const bf16* x, int64_t ld, int64_t depth, int64_t width, __m512i v[16]) {
  const __mmask16 mask = width >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1);
  // Element 2c of the result is element c of the low row, 2c+1 element c of the high
  // row (at 16 + c in the concatenation).
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
#pragma GCC unroll 16
  for (int q = 0; q < 16; ++q) {
    const __m256i lo = 2 * q < depth ? _mm256_maskz_loadu_epi16(mask, x + 2 * q * ld) : _mm256_setzero_si256();
    const __m256i hi =
        2 * q + 1 < depth ? _mm256_maskz_loadu_epi16(mask, x + (2 * q + 1) * ld) : _mm256_setzero_si256();
    v[q] = _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
  }
}

SDMOE_AMX_TARGET inline void store_tile(const __m512i v[16], bf16* out) {
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_store_si512(out + i * 32, v[i]);
}

// One packed strip of op(B): columns j0 .. j0 + 31 (those below n), k from p0, `steps`
// steps of which those below k are real. out: steps x 2 tiles.
SDMOE_AMX_TARGET void pack_b_strip(bool tb, const bf16* b, int64_t ldb, int64_t n, int64_t k, int64_t j0, int64_t p0,
                                   int64_t steps, bf16* out) {
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t p = p0 + kStep * s, depth = std::clamp<int64_t>(k - p, 0, kStep);
    bf16* tiles = out + 2 * s * kTileElems;
    for (int t = 0; t < 2; ++t) {
      const int64_t j = j0 + 16 * t, cols = std::clamp<int64_t>(n - j, 0, 16);
      __m512i v[16];
      if (cols == 0 || depth == 0) {
        for (auto& x : v) x = _mm512_setzero_si512();
      } else if (tb) {
        load_rows(b + j * ldb + p, ldb, cols, depth, v);
        transpose16(v);
      } else {
        load_pairs(b + p * ldb + j, ldb, depth, cols, v);
      }
      store_tile(v, tiles + t * kTileElems);
    }
  }
}

// One packed strip of op(A): rows i0 .. i0 + 31 (those below m), k from p0, `steps` steps
// of which those below k are real. out: steps x 2 tiles.
SDMOE_AMX_TARGET void pack_a_strip(bool ta, const bf16* a, int64_t lda, int64_t m, int64_t k, int64_t i0, int64_t p0,
                                   int64_t steps, bf16* out) {
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t p = p0 + kStep * s, depth = std::clamp<int64_t>(k - p, 0, kStep);
    bf16* tiles = out + 2 * s * kTileElems;
    for (int t = 0; t < 2; ++t) {
      const int64_t i = i0 + 16 * t, rows = std::clamp<int64_t>(m - i, 0, 16);
      __m512i v[16];
      if (rows == 0 || depth == 0) {
        for (auto& x : v) x = _mm512_setzero_si512();
      } else if (ta) {
        load_pairs(a + p * lda + i, lda, depth, rows, v);
        transpose16(v);
      } else {
        load_rows(a + i * lda + p, lda, rows, depth, v);
      }
      store_tile(v, tiles + t * kTileElems);
    }
  }
}

// ---- micro-kernel -----------------------------------------------------------------------

// Where a 32-row strip of op(A) is for one k block: `steps` steps at `base` (tile rows
// `ld` bytes apart, rows 16-31 `tile` elements after rows 0-15, step s at s * `step`
// elements), then, when `tail` is set, one more step packed there (two 16 x 32 tiles).
struct AStrip {
  const bf16* base;
  int64_t ld, tile, step, steps;
  const bf16* tail;
};

// A finished 32 x 32 product for `scratch` ([32, 32] fp32) still to be combined into
// C[rows, cols] at c: C = alpha scratch + beta C.
struct Epilogue {
  const float* scratch;
  float* c;
  int64_t ldc, rows, cols;
  float alpha, beta;
  bool stream;  // non-temporal stores where a row's 32 columns are two whole cache lines
};

// Rows [r0, r1) of a pending epilogue. beta == 0 never reads C.
SDMOE_AMX_TARGET inline void finish_rows(const Epilogue& e, int64_t r0, int64_t r1) {
  const __m512 alpha_v = _mm512_set1_ps(e.alpha), beta_v = _mm512_set1_ps(e.beta);
  const __mmask16 mask0 = e.cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << e.cols) - 1);
  const __mmask16 mask1 = e.cols >= 32 ? __mmask16(0xFFFF) : e.cols > 16 ? __mmask16((1u << (e.cols - 16)) - 1) : 0;
  for (int64_t r = r0; r < r1; ++r) {
    float* out = e.c + r * e.ldc;
    __m512 x0 = _mm512_mul_ps(alpha_v, _mm512_load_ps(e.scratch + r * kBlock));
    __m512 x1 = _mm512_mul_ps(alpha_v, _mm512_load_ps(e.scratch + r * kBlock + 16));
    if (e.stream && e.cols == kBlock && reinterpret_cast<uintptr_t>(out) % 64 == 0) {
      _mm512_stream_ps(out, x0);
      _mm512_stream_ps(out + 16, x1);
      continue;
    }
    if (e.beta != 0.0f) {
      x0 = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask0, out), x0);
      x1 = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask1, out + 16), x1);
    }
    _mm512_mask_storeu_ps(out, mask0, x0);
    _mm512_mask_storeu_ps(out + 16, mask1, x1);
  }
}

// One 32-deep step: C(r, c) += A(r) B(c), each load placed just before its first use.
#define SDMOE_AMX_STEP(a0, a1, a_ld, b0)          \
  do {                                            \
    SDMOE_TILE_LOAD(4, a0, a_ld);                 \
    SDMOE_TILE_LOAD_T1(6, b0, 64);                \
    SDMOE_TILE_DP(0, 4, 6);                       \
    SDMOE_TILE_LOAD_T1(7, (b0) + kTileElems, 64); \
    SDMOE_TILE_DP(1, 4, 7);                       \
    SDMOE_TILE_LOAD(5, a1, a_ld);                 \
    SDMOE_TILE_DP(2, 5, 6);                       \
    SDMOE_TILE_DP(3, 5, 7);                       \
  } while (0)

// A block's first step: each C tile, just before its first product here, is stored to
// `prev` (the previous block's result, when prev is set) and zeroed. Storing all four at
// the end of a block instead left the tile unit idle while the last products drained and
// the stores ran (74 against 52 ns per block at k = 64, 181 against 160 at k = 192).
#define SDMOE_AMX_FIRST_STEP(a0, a1, a_ld, b0, prev)                         \
  do {                                                                       \
    constexpr int64_t s_ld = kBlock * int64_t(sizeof(float));                \
    SDMOE_TILE_LOAD(4, a0, a_ld);                                            \
    SDMOE_TILE_LOAD_T1(6, b0, 64);                                           \
    if (prev != nullptr) SDMOE_TILE_STORE(0, prev, s_ld);                    \
    SDMOE_TILE_ZERO(0);                                                      \
    SDMOE_TILE_DP(0, 4, 6);                                                  \
    SDMOE_TILE_LOAD_T1(7, (b0) + kTileElems, 64);                            \
    if (prev != nullptr) SDMOE_TILE_STORE(1, prev + 16, s_ld);               \
    SDMOE_TILE_ZERO(1);                                                      \
    SDMOE_TILE_DP(1, 4, 7);                                                  \
    SDMOE_TILE_LOAD(5, a1, a_ld);                                            \
    if (prev != nullptr) SDMOE_TILE_STORE(2, prev + 16 * kBlock, s_ld);      \
    SDMOE_TILE_ZERO(2);                                                      \
    SDMOE_TILE_DP(2, 5, 6);                                                  \
    if (prev != nullptr) SDMOE_TILE_STORE(3, prev + 16 * kBlock + 16, s_ld); \
    SDMOE_TILE_ZERO(3);                                                      \
    SDMOE_TILE_DP(3, 5, 7);                                                  \
  } while (0)

// C tiles = A strip x B strip (b: steps x 2 packed tiles). When `pending` is set, the
// previous block's tiles go to its scratch during the first step, and its epilogue runs a
// few rows per step: the C rows, which miss in L1 and often in L2, are written by ordinary
// stores that overlap this block's tile products instead of stalling the tile unit.
// B is loaded with tileloaddt1, which keeps it out of L1, so the A strip that every block
// of the panel reuses stays there: 1.2-1.35x faster at k = 512 (a 32 KiB A strip), 1.04x
// at k = 192. Loading a panel small enough for L1 (attention) normally, or A with the
// hint, gained nothing or lost.
SDMOE_AMX_TARGET void block_32x32(const AStrip& a, const bf16* b, const Epilogue* pending) {
  float* prev = pending != nullptr ? const_cast<float*>(pending->scratch) : nullptr;
  const int64_t total_steps = a.steps + (a.tail != nullptr);
  int64_t steps_done = 0, rows_done = 0;
  const auto step_done = [&] SDMOE_AMX_TARGET {
    ++steps_done;
    if (pending == nullptr) return;
    const int64_t until = (pending->rows * steps_done + total_steps - 1) / total_steps;
    finish_rows(*pending, rows_done, until);
    rows_done = until;
  };
  const bf16* ap = a.base;
  const bf16* bp = b;
  int64_t s = 0;
  if (a.steps > 0) {
    SDMOE_AMX_FIRST_STEP(ap, ap + a.tile, a.ld, bp, prev);
    step_done();
    s = 1, ap += a.step, bp += kStripStep;
  }
  for (; s < a.steps; ++s, ap += a.step, bp += kStripStep) {
    SDMOE_AMX_STEP(ap, ap + a.tile, a.ld, bp);
    step_done();
  }
  if (a.tail != nullptr) {
    if (a.steps > 0)
      SDMOE_AMX_STEP(a.tail, a.tail + kTileElems, 64, bp);
    else
      SDMOE_AMX_FIRST_STEP(a.tail, a.tail + kTileElems, 64, bp, prev);
    step_done();
  }
}

// ---- driver -----------------------------------------------------------------------------

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Runs the blocks in order: each block's result stays in the C tiles until the next block
// stores it to the scratch and finishes its epilogue, or flush() does. Epilogues run in
// block order, so a later k block's read of C sees the earlier one's write.
class BlockPipeline {
 public:
  SDMOE_AMX_TARGET void run(const AStrip& a, const bf16* b, float* c, int64_t ldc, int64_t rows, int64_t cols,
                            float alpha, float beta, bool stream) {
    block_32x32(a, b, has_pending_ ? &pending_ : nullptr);
    pending_ = {scratch_, c, ldc, rows, cols, alpha, beta, stream && beta == 0.0f};
    has_pending_ = true;
  }
  // Also orders any non-temporal stores before the caller's later stores.
  SDMOE_AMX_TARGET void flush() {
    if (has_pending_) {
      constexpr int64_t s_ld = kBlock * int64_t(sizeof(float));
      SDMOE_TILE_STORE(0, scratch_, s_ld);
      SDMOE_TILE_STORE(1, scratch_ + 16, s_ld);
      SDMOE_TILE_STORE(2, scratch_ + 16 * kBlock, s_ld);
      SDMOE_TILE_STORE(3, scratch_ + 16 * kBlock + 16, s_ld);
      finish_rows(pending_, 0, pending_.rows);
    }
    has_pending_ = false;
    _mm_sfence();
  }

 private:
  // One scratch is enough: a block's epilogue is done before the next block stores into it.
  alignas(64) float scratch_[kBlock * kBlock];  // [32, 32]
  Epilogue pending_{};
  bool has_pending_ = false;
};

SDMOE_AMX_TARGET void gemm_tiles(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a,
                                 int64_t lda, const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // Equal k blocks of whole steps (1024 = 2 x 512, 1600 = 3 x 544), so no block is a sliver.
  const int64_t k_blocks = ceil_div(k, kDepth);
  const int64_t kc = ceil_div(ceil_div(k, k_blocks), kStep) * kStep;
  const int64_t max_steps = kc / kStep;
  const int64_t panel_columns = std::max(kBlock, kPanelBytes / (kc * int64_t(sizeof(bf16))) / kBlock * kBlock);
  const int64_t panel_strips = ceil_div(std::min(n, panel_columns), kBlock);
  const bool stream = m * n * int64_t(sizeof(float)) > kStreamBytes;
  thread_local PackBuffer b_buffer, a_buffer;
  bf16* b_pack = b_buffer.get(panel_strips * max_steps * kStripStep);
  // One A strip: all its steps packed (ta, or fewer than 32 rows) or its packed last step
  // (a k tail). Packed just before use, so the packing stores hit L1.
  bf16* a_pack = a_buffer.get(max_steps * kStripStep);
  BlockPipeline pipeline;
  const TileScope tiles;
  for (int64_t j0 = 0; j0 < n; j0 += panel_columns) {
    const int64_t nb = std::min(panel_columns, n - j0), n_strips = ceil_div(nb, kBlock);
    for (int64_t p0 = 0; p0 < k; p0 += kc) {
      const int64_t kb = std::min(kc, k - p0), steps = ceil_div(kb, kStep), whole_steps = kb / kStep;
      const float block_beta = p0 == 0 ? beta : 1.0f;
      for (int64_t js = 0; js < n_strips; ++js)
        pack_b_strip(tb, b, ldb, n, k, j0 + js * kBlock, p0, steps, b_pack + js * steps * kStripStep);
      // Each A strip (in L1) meets every B strip of the panel (from L2).
      for (int64_t i = 0; i < m; i += kBlock) {
        const int64_t rows = std::min(kBlock, m - i);
        AStrip strip;
        if (ta || rows < kBlock) {
          pack_a_strip(ta, a, lda, m, k, i, p0, steps, a_pack);
          strip = {a_pack, 64, kTileElems, kStripStep, steps, nullptr};
        } else {
          const bf16* tail = nullptr;
          if (whole_steps < steps) {
            pack_a_strip(false, a, lda, m, k, i, p0 + whole_steps * kStep, 1, a_pack);
            tail = a_pack;
          }
          strip = {a + i * lda + p0, lda * int64_t(sizeof(bf16)), 16 * lda, kStep, whole_steps, tail};
        }
        for (int64_t js = 0; js < n_strips; ++js) {
          const int64_t j = j0 + js * kBlock, cols = std::min(kBlock, n - j);
          pipeline.run(strip, b_pack + js * steps * kStripStep, c + i * ldc + j, ldc, rows, cols, alpha, block_beta,
                       stream);
        }
      }
    }
  }
  pipeline.flush();
}

void scale_c(int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
}

// ---- peak -------------------------------------------------------------------------------

// Four accumulators fed by two A and two B tiles loaded once, as in the GEMM's 2x2 block
// but without its loads. A = 1 and B = 2^-30: each TDPBF16PS adds 2^-25 per element, so
// the sums stay small and normal.
SDMOE_AMX_TARGET float amx_loop(int64_t iters) {
  alignas(64) bf16 ones[kTileElems], tiny[kTileElems];
  std::fill(ones, ones + kTileElems, bf16{0x3f80});
  std::fill(tiny, tiny + kTileElems, bf16{0x3080});
  alignas(64) float out[4][256];
  {
    const TileScope tiles;
    SDMOE_TILE_LOAD(4, ones, 64);
    SDMOE_TILE_LOAD(5, ones, 64);
    SDMOE_TILE_LOAD(6, tiny, 64);
    SDMOE_TILE_LOAD(7, tiny, 64);
    SDMOE_TILE_ZERO(0);
    SDMOE_TILE_ZERO(1);
    SDMOE_TILE_ZERO(2);
    SDMOE_TILE_ZERO(3);
    for (int64_t it = 0; it < iters; ++it) {
      SDMOE_TILE_DP(0, 4, 6);
      SDMOE_TILE_DP(1, 4, 7);
      SDMOE_TILE_DP(2, 5, 6);
      SDMOE_TILE_DP(3, 5, 7);
    }
    SDMOE_TILE_STORE(0, out[0], 64);
    SDMOE_TILE_STORE(1, out[1], 64);
    SDMOE_TILE_STORE(2, out[2], 64);
    SDMOE_TILE_STORE(3, out[3], 64);
  }
  float sum = 0.0f;
  for (const auto& tile : out)
    for (float x : tile) sum += x;
  return sum;
}

}  // namespace

bool cpu_supports_amx_bf16() {
  static const bool granted = request_amx();
  return granted;
}

void gemm_bf16_amx(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a, int64_t lda,
                   const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) return scale_c(m, n, beta, c, ldc);
  // Also makes sure the tile permission was requested before the first tile instruction.
  SDMOE_ASSERT(cpu_supports_amx_bf16(), "gemm_bf16_amx needs AMX-BF16 and the OS tile grant");
  gemm_tiles(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

double measure_cpu_amx_bf16_peak(int threads) {
  if (!cpu_supports_amx_bf16()) return 0.0;
  // 4 TDPBF16PS of 16 cycles per iteration: ~0.1 s per repetition at 2 GHz.
  return measure_loop_peak(threads, 3'000'000, 4.0 * 16 * 16 * 32 * 2, amx_loop);
}

}  // namespace sdmoe::cpu
