// Fused causal attention (core/cuda/flash_attention.cuh): PTX wrappers, the warp-level
// tile products, the tensor-core kernels (bf16, Dh 32/64/128), the SIMT kernels (every
// other case), and the host launchers last.
//
// Every kernel runs 128 threads (four warps) and takes its tile from a flattened
// blockIdx.x (head n = item % N, so N may exceed gridDim.y's 65535), the longest items
// first: the forward's and dq's last query tiles, dk/dv's first key tile.
//
// Tensor-core fragments (mma.sync m16n8k16, bf16 inputs, fp32 accumulators), per the PTX
// ISA, for lane l with g = l / 4 and t = l % 4; a 32-bit register holds two bf16, the
// lower column (or k index) in its low half:
//   A (16 x 16, row-major)  a[0]: row g,   cols 2t, 2t+1     a[1]: row g+8, cols 2t, 2t+1
//                           a[2]: row g,   cols 2t+8, 2t+9   a[3]: row g+8, cols 2t+8, 2t+9
//   B (16 x 8, k x n)       b[0]: k 2t, 2t+1 at col g        b[1]: k 2t+8, 2t+9 at col g
//   C (16 x 8, fp32)        c[0], c[1]: row g, cols 2t, 2t+1   c[2], c[3]: row g+8, cols 2t, 2t+1
// A tile of C fragments "acc[nt][i]" is 16 rows x 8 kNTiles columns, n-tile nt holding
// columns 8 nt .. 8 nt + 7.
//
// Masking: a masked score becomes -INFINITY (forward) or its probability 0 (backward)
// before any sum. Every real query row sees key 0, and the forward starts each row at its
// diagonal tile, so its running max is finite from the first tile on; the exp2 of a row
// max that is still -inf subtracts 0 instead, which keeps every exponent -inf or finite
// and no NaN can appear. Rows and keys past S are zero-filled in shared memory (never
// garbage: 0 * NaN would poison a sum) and never written out.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/cuda/cuda_kernels.cuh"
#include "core/cuda/flash_attention.cuh"

namespace sdmoe::cuda {
namespace {

constexpr int kThreads = 128;  // four warps per block, every kernel
constexpr int kBlock = 64;     // tensor cores: query rows of a forward / dq block, keys of a dk/dv block (16 per warp)
constexpr int kPad = 8;        // bf16 per shared row of padding: rows 16 bytes apart mod 128, so ldmatrix is conflict-free
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t tiles_of(int64_t s, int tile) { return (s + tile - 1) / tile; }

// ============================== PTX wrappers (sm_80+) ======================================

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without blocking the thread. inside == false zero-fills the
// destination without reading the source.
__device__ __forceinline__ void cp_async_16(void* dst_shared, const void* src_global, bool inside) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst_shared)),
               "l"(src_global), "r"(inside ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// This thread's copies have landed (a __syncthreads must follow before others read them).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8 x 8 bf16 matrices: lanes 8j .. 8j+7 give the addresses of matrix j's rows 0..7;
// r[j] receives matrix j's (row g, cols 2t, 2t+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
// The same, transposed: r[j] receives matrix j's (rows 2t, 2t+1, col g).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// c += A B for one 16 x 8 x 16 block (fragments as in the file comment).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to nearest-even bf16, lo in the low half (cvt puts its first source high).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// ============================== warp-level tile products ===================================
// A warp's 16-row slice of a product, operands in shared memory with row stride kStride
// (bf16 elements). ldmatrix.x4 reads a 16 x 16 block as four 8 x 8 matrices, lane l giving
// the address of one row of matrix l / 8; which rows make which matrix decides what the
// four registers hold:
//   "A order": matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
//     (rows 8-15, cols 8-15). Plain, from an [m][k] block: the A fragment a[0..3]. With
//     .trans, from a [k][n] block: b[0], b[1] of n-tile 0, then b[0], b[1] of n-tile 1.
//   "B order": matrices (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 0-7),
//     (rows 8-15, cols 8-15). Plain, from an [n][k] block: b[0], b[1] of n-tile 0 (rows
//     0-7), then of n-tile 1 (rows 8-15).
__device__ __forceinline__ int a_order_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int a_order_col(int lane) { return (lane >> 4) * 8; }
__device__ __forceinline__ int b_order_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int b_order_col(int lane) { return ((lane >> 3) & 1) * 8; }

// acc [16 x 8 kNTiles] += A B^T: A [16 x 16 kSteps] at `a` and B [8 kNTiles x 16 kSteps] at
// `b`, both row-major with the reduced dim contiguous (q k^T, dout v^T, k q^T, v dout^T on
// the tiles as loaded).
template <int kStride, int kSteps, int kNTiles>
__device__ __forceinline__ void warp_product_abt(float (&acc)[kNTiles][4], const uint16_t* a, const uint16_t* b,
                                                 int lane) {
  static_assert(kNTiles % 2 == 0, "n-tiles are loaded in pairs");
  const uint16_t* a_lane = a + a_order_row(lane) * kStride + a_order_col(lane);
  const uint16_t* b_lane = b + b_order_row(lane) * kStride + b_order_col(lane);
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) {
    uint32_t af[4];  // a[0..3] of columns 16 ks .. 16 ks + 15
    ldmatrix_x4(af, a_lane + ks * 16);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t bf[4];  // bf[0..1]: b[0..1] of n-tile 2 np; bf[2..3]: of n-tile 2 np + 1
      ldmatrix_x4(bf, b_lane + np * 16 * kStride + ks * 16);
      mma_bf16(acc[2 * np], af, bf[0], bf[1]);
      mma_bf16(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc [16 x 8 kNTiles] += P B: P [16 x 16 kSteps] in A fragments (registers), B
// [16 kSteps x 8 kNTiles] row-major at `b` with the output dim contiguous (P v, P^T dout,
// dS^T q, dS k on the tiles as loaded), read transposed by ldmatrix.
template <int kStride, int kSteps, int kNTiles>
__device__ __forceinline__ void warp_product_pb(float (&acc)[kNTiles][4], const uint32_t (&p)[kSteps][4],
                                                const uint16_t* b, int lane) {
  static_assert(kNTiles % 2 == 0, "n-tiles are loaded in pairs");
  const uint16_t* b_lane = b + a_order_row(lane) * kStride + a_order_col(lane);
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t bf[4];  // bf[0..1]: b[0..1] of n-tile 2 np; bf[2..3]: of n-tile 2 np + 1
      ldmatrix_x4_trans(bf, b_lane + ks * 16 * kStride + np * 16);
      mma_bf16(acc[2 * np], p[ks], bf[0], bf[1]);
      mma_bf16(acc[2 * np + 1], p[ks], bf[2], bf[3]);
    }
}

// C fragments of a 16 x 8 kNTiles fp32 tile as bf16 A fragments of the same tile, one per
// 16 columns: a[ks][0] = c[2ks][0..1] (row g), a[ks][1] = c[2ks][2..3] (row g+8),
// a[ks][2] = c[2ks+1][0..1], a[ks][3] = c[2ks+1][2..3] (columns 16 ks + 8 + 2t, +1).
template <int kNTiles>
__device__ __forceinline__ void to_a_fragments(const float (&c)[kNTiles][4], uint32_t (&a)[kNTiles / 2][4]) {
#pragma unroll
  for (int ks = 0; ks < kNTiles / 2; ++ks) {
    a[ks][0] = pack_bf16x2(c[2 * ks][0], c[2 * ks][1]);
    a[ks][1] = pack_bf16x2(c[2 * ks][2], c[2 * ks][3]);
    a[ks][2] = pack_bf16x2(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[ks][3] = pack_bf16x2(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}

// Rows [row0, row0 + kRows) of one head's [s, kDh] bf16 matrix into a shared tile with row
// stride kDh + kPad, 16 bytes per cp.async. Rows at or past s are zero-filled.
template <int kDh, int kRows>
__device__ __forceinline__ void load_rows_async(uint16_t* tile, const uint16_t* head, int64_t row0, int64_t s) {
  constexpr int kChunksPerRow = kDh / 8, kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = int(threadIdx.x) + i * kThreads, r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool inside = row0 + r < s;
    cp_async_16(tile + r * (kDh + kPad) + col, head + (inside ? row0 + r : 0) * kDh + col, inside);
  }
}

// ============================== tensor-core kernels ========================================

// Forward: block = (head n, 64 queries from q0); warp w owns query rows q0 + 16w .. +15.
// Key tiles from the diagonal one down to 0; K[j] is loaded while P V of tile j+1 runs and
// V[j] while S = q K[j]^T runs, one buffer each. Scores are kept in log2 units
// (scale log2(e) q k), so P = exp2(s - max). Launch bounds (128, 1) let ptxas take up to
// 255 registers: with its default heuristic it caps this kernel at 128 at Dh 64 and spills.
template <int kDh>
__global__ void __launch_bounds__(kThreads, 1)
    forward_mma_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                       uint16_t* __restrict__ out, float* __restrict__ lse, int64_t heads, int64_t s,
                       float scale_log2) {
  constexpr int kStride = kDh + kPad, kDTiles = kDh / 8, kKeyTiles = kBlock / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* sq = reinterpret_cast<uint16_t*>(smem);  // [64][kStride] queries; later the staged output
  uint16_t* sk = sq + kBlock * kStride;               // [64][kStride] keys
  uint16_t* sv = sk + kBlock * kStride;               // [64][kStride] values
  const int64_t item = blockIdx.x, n = item % heads, q0 = (tiles_of(s, kBlock) - 1 - item / heads) * kBlock;
  const int64_t head = n * s * kDh;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;

  load_rows_async<kDh, kBlock>(sq, q + head, q0, s);
  load_rows_async<kDh, kBlock>(sk, k + head, q0, s);
  cp_async_commit();

  float o[kDTiles][4] = {};                                 // out rows g, g+8 (C fragments), unnormalised
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // rows g, g+8; sum: this lane's columns
  const uint16_t* warp_q = sq + warp * 16 * kStride;
  for (int64_t k0 = q0; k0 >= 0; k0 -= kBlock) {
    cp_async_wait_all();
    __syncthreads();  // K[k0] is in; every warp is done reading V of the previous tile
    load_rows_async<kDh, kBlock>(sv, v + head, k0, s);
    cp_async_commit();

    float sc[kKeyTiles][4] = {};  // scores: rows g, g+8 x keys k0 + 8 nt + 2t, +1
    warp_product_abt<kStride, kDh / 16, kKeyTiles>(sc, warp_q, sk, lane);
    const bool diagonal = k0 == q0;
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        // Causal: key k0 + col against query q0 + row; on the diagonal tile k0 == q0. Keys past
        // s only occur there, beyond every real row.
        const int row = warp * 16 + g + 8 * (e >> 1), col = nt * 8 + 2 * t + (e & 1);
        sc[nt][e] = diagonal && col > row ? -INFINITY : sc[nt][e] * scale_log2;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float top = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) top = fmaxf(top, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
      top = fmaxf(top, __shfl_xor_sync(kFullMask, top, 1));  // the four lanes of a row: g * 4 .. g * 4 + 3
      top = fmaxf(top, __shfl_xor_sync(kFullMask, top, 2));
      const float base = top == -INFINITY ? 0.f : top;
      const float factor = exp2f(row_max[r] - base);  // 0 on the first tile (old max -inf), 1 when unchanged
      row_max[r] = top;
      row_sum[r] *= factor;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][2 * r] *= factor;
        o[dt][2 * r + 1] *= factor;
      }
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          sc[nt][e] = exp2f(sc[nt][e] - base);
          row_sum[r] += sc[nt][e];  // the fp32 probabilities; P V uses them rounded to bf16
        }
    }

    cp_async_wait_all();
    __syncthreads();  // V[k0] is in; every warp is done reading K[k0]
    if (k0 > 0) {
      load_rows_async<kDh, kBlock>(sk, k + head, k0 - kBlock, s);
      cp_async_commit();
    }
    uint32_t pf[kKeyTiles / 2][4];
    to_a_fragments<kKeyTiles>(sc, pf);
    warp_product_pb<kStride, kKeyTiles / 2, kDTiles>(o, pf, sv, lane);
  }

  // Normalise and stage the bf16 rows in this warp's 16 rows of sq (only this warp ever read
  // them), then write them out 16 bytes per lane.
  uint16_t* stage = sq + warp * 16 * kStride;
  __syncwarp();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    const float inv = 1.f / sum;  // sum >= 1: exp2(0) at the row's max
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
      *reinterpret_cast<uint32_t*>(stage + (g + 8 * r) * kStride + dt * 8 + 2 * t) =
          pack_bf16x2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    const int64_t row = q0 + warp * 16 + g + 8 * r;
    if (t == 0 && row < s) lse[n * s + row] = row_max[r] * kLn2 + logf(sum);
  }
  __syncwarp();
  constexpr int kChunksPerRow = kDh / 8;
#pragma unroll
  for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
    const int c = lane + 32 * i, r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int64_t row = q0 + warp * 16 + r;
    if (row < s)
      *reinterpret_cast<uint4*>(out + head + row * kDh + col) = *reinterpret_cast<const uint4*>(stage + r * kStride + col);
  }
}

// dk, dv: block = (head n, 64 keys from k0); warp w owns keys k0 + 16w .. +15 and their dk,
// dv rows in registers. It computes the transposed tiles S^T = k q^T and dP^T = v dout^T
// ([keys x queries]), so P^T and dS^T come out as C fragments whose rows are the warp's keys:
// they are the A operands of dv += P^T dout and dk += dS^T q as they stand, no shared-memory
// transpose. Query blocks of kQueries from k0 on; the next block's q, dout, lse and D load
// into the other buffer while this one computes.
template <int kDh, int kQueries>
__global__ void __launch_bounds__(kThreads)
    dkdv_mma_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                    const uint16_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                    float* __restrict__ dk, float* __restrict__ dv, int64_t heads, int64_t s, float scale,
                    float scale_log2) {
  constexpr int kStride = kDh + kPad, kDTiles = kDh / 8, kQueryTiles = kQueries / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* sk = reinterpret_cast<uint16_t*>(smem);  // [64][kStride]
  uint16_t* sv = sk + kBlock * kStride;               // [64][kStride]
  uint16_t* sq = sv + kBlock * kStride;               // [2][kQueries][kStride]
  uint16_t* sdo = sq + 2 * kQueries * kStride;        // [2][kQueries][kStride]
  float* slse = reinterpret_cast<float*>(sdo + 2 * kQueries * kStride);  // [2][kQueries] lse log2(e)
  float* sdelta = slse + 2 * kQueries;                                   // [2][kQueries]
  const int64_t item = blockIdx.x, n = item % heads, k0 = (item / heads) * kBlock;
  const int64_t head = n * s * kDh;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;

  // One query block's operands into buffer b: rows past s get zeros (and are masked).
  const auto load_queries = [&](int64_t q0, int b) {
    load_rows_async<kDh, kQueries>(sq + b * kQueries * kStride, q + head, q0, s);
    load_rows_async<kDh, kQueries>(sdo + b * kQueries * kStride, dout + head, q0, s);
    if (const int i = int(threadIdx.x); i < kQueries) {
      const int64_t row = q0 + i;
      slse[b * kQueries + i] = row < s ? lse[n * s + row] * kLog2e : 0.f;
      sdelta[b * kQueries + i] = row < s ? delta[n * s + row] : 0.f;
    }
  };
  load_rows_async<kDh, kBlock>(sk, k + head, k0, s);
  load_rows_async<kDh, kBlock>(sv, v + head, k0, s);
  load_queries(k0, 0);
  cp_async_commit();

  float dk_acc[kDTiles][4] = {}, dv_acc[kDTiles][4] = {};  // keys g, g+8 of the warp x dims 8 dt + 2t, +1
  const uint16_t* warp_k = sk + warp * 16 * kStride;
  const uint16_t* warp_v = sv + warp * 16 * kStride;
  const int64_t key_lo = k0 + warp * 16 + g;  // the key of accumulator rows c[0..1]; c[2..3]: key_lo + 8
  int b = 0;
  for (int64_t q0 = k0; q0 < s; q0 += kQueries, b ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // buffer b is in; every warp is done with buffer b ^ 1
    if (q0 + kQueries < s) {
      load_queries(q0 + kQueries, b ^ 1);
      cp_async_commit();
    }
    const uint16_t* bq = sq + b * kQueries * kStride;
    const uint16_t* bdo = sdo + b * kQueries * kStride;
    const float* blse = slse + b * kQueries;
    const float* bdelta = sdelta + b * kQueries;

    float st[kQueryTiles][4] = {}, dpt[kQueryTiles][4] = {};  // keys g, g+8 x queries q0 + 8 nt + 2t, +1
    warp_product_abt<kStride, kDh / 16, kQueryTiles>(st, warp_k, bq, lane);
    warp_product_abt<kStride, kDh / 16, kQueryTiles>(dpt, warp_v, bdo, lane);
    // Some key of the block may follow some query, or a query may be past s.
    const bool edge = q0 < k0 + kBlock || q0 + kQueries > s;
#pragma unroll
    for (int nt = 0; nt < kQueryTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1);
        const int64_t query = q0 + col, key = key_lo + 8 * (e >> 1);
        float p = exp2f(fmaf(st[nt][e], scale_log2, -blse[col]));
        if (edge && (query < key || query >= s)) p = 0.f;
        st[nt][e] = p;
        dpt[nt][e] = p * (dpt[nt][e] - bdelta[col]);  // dS^T
      }
    uint32_t af[kQueryTiles / 2][4];
    to_a_fragments<kQueryTiles>(st, af);
    warp_product_pb<kStride, kQueryTiles / 2, kDTiles>(dv_acc, af, bdo, lane);
    to_a_fragments<kQueryTiles>(dpt, af);
    warp_product_pb<kStride, kQueryTiles / 2, kDTiles>(dk_acc, af, bq, lane);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = key_lo + 8 * r;
    if (key >= s) continue;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const int64_t at = head + key * kDh + dt * 8 + 2 * t;
      *reinterpret_cast<float2*>(dk + at) = make_float2(scale * dk_acc[dt][2 * r], scale * dk_acc[dt][2 * r + 1]);
      *reinterpret_cast<float2*>(dv + at) = make_float2(dv_acc[dt][2 * r], dv_acc[dt][2 * r + 1]);
    }
  }
}

// dq: block = (head n, 64 queries from q0); warp w owns query rows q0 + 16w .. +15 and their
// dq rows in registers. Key blocks of kKeys from 0 up to the tile's last real query,
// recomputing S = q k^T and dP = dout v^T; the next block's k and v load into the other
// buffer while this one computes.
template <int kDh, int kKeys>
__global__ void __launch_bounds__(kThreads)
    dq_mma_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                  const uint16_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                  float* __restrict__ dq, int64_t heads, int64_t s, float scale, float scale_log2) {
  constexpr int kStride = kDh + kPad, kDTiles = kDh / 8, kKeyTiles = kKeys / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* sq = reinterpret_cast<uint16_t*>(smem);  // [64][kStride]
  uint16_t* sdo = sq + kBlock * kStride;              // [64][kStride]
  uint16_t* sk = sdo + kBlock * kStride;              // [2][kKeys][kStride]
  uint16_t* sv = sk + 2 * kKeys * kStride;            // [2][kKeys][kStride]
  const int64_t item = blockIdx.x, n = item % heads, q0 = (tiles_of(s, kBlock) - 1 - item / heads) * kBlock;
  const int64_t head = n * s * kDh;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;

  load_rows_async<kDh, kBlock>(sq, q + head, q0, s);
  load_rows_async<kDh, kBlock>(sdo, dout + head, q0, s);
  load_rows_async<kDh, kKeys>(sk, k + head, 0, s);
  load_rows_async<kDh, kKeys>(sv, v + head, 0, s);
  cp_async_commit();

  const int64_t row_lo = q0 + warp * 16 + g;  // the query of accumulator rows c[0..1]; c[2..3]: row_lo + 8
  float lse_log2[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row_lo + 8 * r;
    lse_log2[r] = row < s ? lse[n * s + row] * kLog2e : 0.f;
    row_delta[r] = row < s ? delta[n * s + row] : 0.f;
  }
  float dq_acc[kDTiles][4] = {};
  const uint16_t* warp_q = sq + warp * 16 * kStride;
  const uint16_t* warp_do = sdo + warp * 16 * kStride;
  const int64_t key_end = min_i64(q0 + kBlock, s);  // keys any real row of the tile can see
  int b = 0;
  for (int64_t k0 = 0; k0 < key_end; k0 += kKeys, b ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // buffer b is in; every warp is done with buffer b ^ 1
    if (k0 + kKeys < key_end) {
      load_rows_async<kDh, kKeys>(sk + (b ^ 1) * kKeys * kStride, k + head, k0 + kKeys, s);
      load_rows_async<kDh, kKeys>(sv + (b ^ 1) * kKeys * kStride, v + head, k0 + kKeys, s);
      cp_async_commit();
    }
    const uint16_t* bk = sk + b * kKeys * kStride;
    const uint16_t* bv = sv + b * kKeys * kStride;

    float sc[kKeyTiles][4] = {}, dp[kKeyTiles][4] = {};  // rows g, g+8 x keys k0 + 8 nt + 2t, +1
    warp_product_abt<kStride, kDh / 16, kKeyTiles>(sc, warp_q, bk, lane);
    warp_product_abt<kStride, kDh / 16, kKeyTiles>(dp, warp_do, bv, lane);
    const bool edge = k0 + kKeys > q0;  // some key of the block may follow some query of the tile
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t key = k0 + nt * 8 + 2 * t + (e & 1);
        float p = exp2f(fmaf(sc[nt][e], scale_log2, -lse_log2[r]));
        if (edge && key > row_lo + 8 * r) p = 0.f;  // keys past s are past every real row
        sc[nt][e] = p * (dp[nt][e] - row_delta[r]);  // dS
      }
    uint32_t af[kKeyTiles / 2][4];
    to_a_fragments<kKeyTiles>(sc, af);
    warp_product_pb<kStride, kKeyTiles / 2, kDTiles>(dq_acc, af, bk, lane);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row_lo + 8 * r;
    if (row >= s) continue;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
      *reinterpret_cast<float2*>(dq + head + row * kDh + dt * 8 + 2 * t) =
          make_float2(scale * dq_acc[dt][2 * r], scale * dq_acc[dt][2 * r + 1]);
  }
}

// ============================== SIMT kernels ===============================================
// fp32 math on CUDA cores for any storage type T (float, or bf16 bits as uint16_t) and any
// head dim up to kDhMax. A block holds kTile rows; each row is split over kLanes consecutive
// lanes of one warp, lane `part` owning keys (or queries) part + kLanes m and dims
// part + kLanes dd. Shared tiles are fp32 with row stride dh + 1 (odd for even dh, so a
// warp's rows fall in different banks).

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(uint16_t x) { return bf16_bits_to_f32(x); }
template <typename T>
__device__ __forceinline__ T from_f32(float x) {
  if constexpr (sizeof(T) == 2) return f32_to_bf16_bits(x);
  else return x;
}

// Rows [row0, row0 + rows) of one head's [s, dh] matrix, widened, into a tile with row
// stride dh + 1; rows at or past s are zeros. The caller synchronises.
template <typename T>
__device__ __forceinline__ void load_rows_f32(float* tile, const T* head, int64_t row0, int rows, int64_t s, int dh) {
  for (int i = int(threadIdx.x); i < rows * dh; i += kThreads) {
    const int r = i / dh, d = i % dh;
    tile[r * (dh + 1) + d] = row0 + r < s ? to_f32(head[(row0 + r) * dh + d]) : 0.f;
  }
}

// Sum (or max) over the kLanes lanes of one row.
template <int kLanes>
__device__ __forceinline__ float row_lanes_sum(float x) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}
template <int kLanes>
__device__ __forceinline__ float row_lanes_max(float x) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

template <int kTile, int kDhMax>
struct SimtShape {
  static constexpr int kLanes = kThreads / kTile;      // lanes per row
  static constexpr int kPerLane = kTile / kLanes;      // keys (or queries) per lane
  static constexpr int kDimsPerLane = kDhMax / kLanes;  // output dims per lane
  static_assert(kThreads % kTile == 0 && 32 % kLanes == 0 && kTile % kLanes == 0 && kDhMax % kLanes == 0);
};

// Forward: block = (head n, kTile queries from q0), key tiles 0 .. q0 in order. K and V share
// one buffer; P goes through shared memory [kTile][kTile + 1].
template <typename T, int kTile, int kDhMax>
__global__ void __launch_bounds__(kThreads)
    forward_simt_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        T* __restrict__ out, float* __restrict__ lse, int64_t heads, int64_t s, int dh, float scale) {
  using Shape = SimtShape<kTile, kDhMax>;
  constexpr int kLanes = Shape::kLanes;
  extern __shared__ __align__(16) unsigned char smem[];
  const int stride = dh + 1;
  float* sq = reinterpret_cast<float*>(smem);  // [kTile][stride]
  float* skv = sq + kTile * stride;            // [kTile][stride] keys, then values
  float* sp = skv + kTile * stride;            // [kTile][kTile + 1]
  const int64_t item = blockIdx.x, n = item % heads, q0 = (tiles_of(s, kTile) - 1 - item / heads) * kTile;
  const int64_t head = n * s * dh;
  const int r = int(threadIdx.x) / kLanes, part = int(threadIdx.x) % kLanes;
  const int64_t row = q0 + r;

  load_rows_f32(sq, q + head, q0, kTile, s, dh);
  float o[Shape::kDimsPerLane] = {};
  float row_max = -INFINITY, row_sum = 0.f;  // row_sum: this lane's keys
  for (int64_t k0 = 0; k0 <= q0; k0 += kTile) {
    __syncthreads();  // q is in; every lane is done reading the previous V
    load_rows_f32(skv, k + head, k0, kTile, s, dh);
    __syncthreads();
    float x[Shape::kPerLane];
    float top = row_max;
#pragma unroll
    for (int m = 0; m < Shape::kPerLane; ++m) {
      const int c = part + kLanes * m;
      float dot = 0.f;
      for (int d = 0; d < dh; ++d) dot = fmaf(sq[r * stride + d], skv[c * stride + d], dot);
      const int64_t key = k0 + c;
      x[m] = key <= row && key < s ? scale * dot : -INFINITY;
      top = fmaxf(top, x[m]);
    }
    top = row_lanes_max<kLanes>(top);
    const float base = top == -INFINITY ? 0.f : top;
    const float factor = expf(row_max - base);  // 0 on the first tile, 1 when the max holds
    row_max = top;
    row_sum *= factor;
#pragma unroll
    for (int m = 0; m < Shape::kPerLane; ++m) {
      const float p = expf(x[m] - base);
      row_sum += p;
      sp[r * (kTile + 1) + part + kLanes * m] = p;
    }
#pragma unroll
    for (int dd = 0; dd < Shape::kDimsPerLane; ++dd) o[dd] *= factor;
    __syncthreads();  // every lane is done reading K; P is in
    load_rows_f32(skv, v + head, k0, kTile, s, dh);
    __syncthreads();
#pragma unroll
    for (int dd = 0; dd < Shape::kDimsPerLane; ++dd) {
      const int d = part + kLanes * dd;
      if (d >= dh) break;
      float acc = o[dd];
      for (int c = 0; c < kTile; ++c) acc = fmaf(sp[r * (kTile + 1) + c], skv[c * stride + d], acc);
      o[dd] = acc;
    }
  }
  row_sum = row_lanes_sum<kLanes>(row_sum);
  if (row >= s) return;
  const float inv = 1.f / row_sum;  // >= 1: exp(0) at the row's max
#pragma unroll
  for (int dd = 0; dd < Shape::kDimsPerLane; ++dd) {
    const int d = part + kLanes * dd;
    if (d >= dh) break;
    out[head + row * dh + d] = from_f32<T>(o[dd] * inv);
  }
  if (part == 0) lse[n * s + row] = row_max + logf(row_sum);
}

// dk, dv: block = (head n, kTile keys from k0), row r of the block is key k0 + r; query tiles
// from k0 to the end. P^T and dS^T [keys][queries] go through shared memory.
template <typename T, int kTile, int kDhMax>
__global__ void __launch_bounds__(kThreads)
    dkdv_simt_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                     const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                     float* __restrict__ dk, float* __restrict__ dv, int64_t heads, int64_t s, int dh, float scale) {
  using Shape = SimtShape<kTile, kDhMax>;
  constexpr int kLanes = Shape::kLanes;
  extern __shared__ __align__(16) unsigned char smem[];
  const int stride = dh + 1;
  float* sk = reinterpret_cast<float*>(smem);  // [kTile][stride] the block's keys
  float* sv = sk + kTile * stride;             // [kTile][stride]
  float* sq = sv + kTile * stride;             // [kTile][stride] the current query tile
  float* sdo = sq + kTile * stride;            // [kTile][stride]
  float* sp = sdo + kTile * stride;            // [kTile][kTile + 1] P^T
  float* sds = sp + kTile * (kTile + 1);       // [kTile][kTile + 1] dS^T
  float* slse = sds + kTile * (kTile + 1);     // [kTile]
  float* sdelta = slse + kTile;                // [kTile]
  const int64_t item = blockIdx.x, n = item % heads, k0 = (item / heads) * kTile;
  const int64_t head = n * s * dh;
  const int r = int(threadIdx.x) / kLanes, part = int(threadIdx.x) % kLanes;
  const int64_t key = k0 + r;

  load_rows_f32(sk, k + head, k0, kTile, s, dh);
  load_rows_f32(sv, v + head, k0, kTile, s, dh);
  float dk_acc[Shape::kDimsPerLane] = {}, dv_acc[Shape::kDimsPerLane] = {};
  for (int64_t q0 = k0; q0 < s; q0 += kTile) {
    __syncthreads();  // every lane is done with the previous query tile
    load_rows_f32(sq, q + head, q0, kTile, s, dh);
    load_rows_f32(sdo, dout + head, q0, kTile, s, dh);
    if (const int i = int(threadIdx.x); i < kTile) {
      const int64_t query = q0 + i;
      slse[i] = query < s ? lse[n * s + query] : 0.f;
      sdelta[i] = query < s ? delta[n * s + query] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < Shape::kPerLane; ++m) {
      const int c = part + kLanes * m;
      float qk = 0.f, dov = 0.f;
      for (int d = 0; d < dh; ++d) {
        qk = fmaf(sk[r * stride + d], sq[c * stride + d], qk);
        dov = fmaf(sv[r * stride + d], sdo[c * stride + d], dov);
      }
      const int64_t query = q0 + c;
      const float p = key <= query && query < s ? expf(scale * qk - slse[c]) : 0.f;
      sp[r * (kTile + 1) + c] = p;
      sds[r * (kTile + 1) + c] = p * (dov - sdelta[c]);
    }
    __syncwarp();  // row r's P^T and dS^T come from its own lanes, all in this warp
#pragma unroll
    for (int dd = 0; dd < Shape::kDimsPerLane; ++dd) {
      const int d = part + kLanes * dd;
      if (d >= dh) break;
      float a = dv_acc[dd], b = dk_acc[dd];
      for (int c = 0; c < kTile; ++c) {
        a = fmaf(sp[r * (kTile + 1) + c], sdo[c * stride + d], a);
        b = fmaf(sds[r * (kTile + 1) + c], sq[c * stride + d], b);
      }
      dv_acc[dd] = a;
      dk_acc[dd] = b;
    }
  }
  if (key >= s) return;
#pragma unroll
  for (int dd = 0; dd < Shape::kDimsPerLane; ++dd) {
    const int d = part + kLanes * dd;
    if (d >= dh) break;
    dk[head + key * dh + d] = scale * dk_acc[dd];
    dv[head + key * dh + d] = dv_acc[dd];
  }
}

// dq: block = (head n, kTile queries from q0), key tiles 0 .. q0; dS goes through shared memory.
template <typename T, int kTile, int kDhMax>
__global__ void __launch_bounds__(kThreads)
    dq_simt_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                   float* __restrict__ dq, int64_t heads, int64_t s, int dh, float scale) {
  using Shape = SimtShape<kTile, kDhMax>;
  constexpr int kLanes = Shape::kLanes;
  extern __shared__ __align__(16) unsigned char smem[];
  const int stride = dh + 1;
  float* sq = reinterpret_cast<float*>(smem);  // [kTile][stride] the block's queries
  float* sdo = sq + kTile * stride;            // [kTile][stride]
  float* sk = sdo + kTile * stride;            // [kTile][stride] the current key tile
  float* sv = sk + kTile * stride;             // [kTile][stride]
  float* sds = sv + kTile * stride;            // [kTile][kTile + 1] dS
  const int64_t item = blockIdx.x, n = item % heads, q0 = (tiles_of(s, kTile) - 1 - item / heads) * kTile;
  const int64_t head = n * s * dh;
  const int r = int(threadIdx.x) / kLanes, part = int(threadIdx.x) % kLanes;
  const int64_t row = q0 + r;
  const float row_lse = row < s ? lse[n * s + row] : 0.f, row_delta = row < s ? delta[n * s + row] : 0.f;

  load_rows_f32(sq, q + head, q0, kTile, s, dh);
  load_rows_f32(sdo, dout + head, q0, kTile, s, dh);
  float dq_acc[Shape::kDimsPerLane] = {};
  for (int64_t k0 = 0; k0 <= q0; k0 += kTile) {
    __syncthreads();  // every lane is done with the previous key tile
    load_rows_f32(sk, k + head, k0, kTile, s, dh);
    load_rows_f32(sv, v + head, k0, kTile, s, dh);
    __syncthreads();
#pragma unroll
    for (int m = 0; m < Shape::kPerLane; ++m) {
      const int c = part + kLanes * m;
      float qk = 0.f, dov = 0.f;
      for (int d = 0; d < dh; ++d) {
        qk = fmaf(sq[r * stride + d], sk[c * stride + d], qk);
        dov = fmaf(sdo[r * stride + d], sv[c * stride + d], dov);
      }
      const int64_t key = k0 + c;
      const float p = key <= row && row < s ? expf(scale * qk - row_lse) : 0.f;
      sds[r * (kTile + 1) + c] = p * (dov - row_delta);
    }
    __syncwarp();  // row r's dS comes from its own lanes, all in this warp
#pragma unroll
    for (int dd = 0; dd < Shape::kDimsPerLane; ++dd) {
      const int d = part + kLanes * dd;
      if (d >= dh) break;
      float a = dq_acc[dd];
      for (int c = 0; c < kTile; ++c) a = fmaf(sds[r * (kTile + 1) + c], sk[c * stride + d], a);
      dq_acc[dd] = a;
    }
  }
  if (row >= s) return;
#pragma unroll
  for (int dd = 0; dd < Shape::kDimsPerLane; ++dd) {
    const int d = part + kLanes * dd;
    if (d >= dh) break;
    dq[head + row * dh + d] = scale * dq_acc[dd];
  }
}

// D_i = sum_d dout[i, d] out[i, d] in fp32, one warp per row (a fixed reduction tree).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    delta_kernel(const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ delta, int64_t rows,
                 int dh) {
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  const int lane = int(threadIdx.x) % 32;
  float acc = 0.f;
  for (int d = lane; d < dh; d += 32) acc = fmaf(to_f32(out[row * dh + d]), to_f32(dout[row * dh + d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

}  // namespace

// ============================== host launchers =============================================
namespace {

struct Problem {
  int64_t n, s;
  int dh;
  float scale, scale_log2;
};

// Launches `kernel` on `blocks` x kThreads with `smem` bytes of dynamic shared memory, raising
// the kernel's limit past the default 48 KiB when it needs more (every sm_80+ part allows at
// least 99 KiB; the largest here is 74 KiB).
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, size_t smem, cudaStream_t stream, Args... args) {
  SDMOE_ASSERT(blocks >= 1 && blocks <= 0x7fffffff, "flash attention: {} blocks exceed the grid", blocks);
  if (smem > 48 * 1024)
    SDMOE_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<unsigned(blocks), kThreads, smem, stream>>>(args...);
  SDMOE_CHECK_LAUNCH();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Tensor-core tile shapes: the backward's query (dk/dv) and key (dq) block is 32 at Dh 128,
// which keeps the two [16 x 128] fp32 accumulators of dk/dv in registers.
template <int kDh>
constexpr int kMmaBackwardBlock = kDh == 128 ? 32 : 64;
template <int kDh>
constexpr size_t mma_tile_bytes(int rows) {
  return size_t(rows) * (kDh + kPad) * sizeof(uint16_t);
}

template <int kDh>
void forward_mma(const void* q, const void* k, const void* v, void* out, float* lse, const Problem& p,
                 cudaStream_t stream) {
  launch(forward_mma_kernel<kDh>, p.n * ceil_div(p.s, kBlock), 3 * mma_tile_bytes<kDh>(kBlock), stream,
         static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
         static_cast<uint16_t*>(out), lse, p.n, p.s, p.scale_log2);
}

template <int kDh>
void backward_mma(const void* q, const void* k, const void* v, const void* dout, const float* lse, const float* delta,
                  float* dq, float* dk, float* dv, const Problem& p, cudaStream_t stream) {
  constexpr int kSub = kMmaBackwardBlock<kDh>;
  const auto* q16 = static_cast<const uint16_t*>(q);
  const auto* k16 = static_cast<const uint16_t*>(k);
  const auto* v16 = static_cast<const uint16_t*>(v);
  const auto* do16 = static_cast<const uint16_t*>(dout);
  const int64_t blocks = p.n * ceil_div(p.s, kBlock);
  const size_t dkdv_smem = 2 * mma_tile_bytes<kDh>(kBlock) + 4 * mma_tile_bytes<kDh>(kSub) + 4 * kSub * sizeof(float);
  launch(dkdv_mma_kernel<kDh, kSub>, blocks, dkdv_smem, stream, q16, k16, v16, do16, lse, delta, dk, dv, p.n, p.s,
         p.scale, p.scale_log2);
  const size_t dq_smem = 2 * mma_tile_bytes<kDh>(kBlock) + 4 * mma_tile_bytes<kDh>(kSub);
  launch(dq_mma_kernel<kDh, kSub>, blocks, dq_smem, stream, q16, k16, v16, do16, lse, delta, dq, p.n, p.s, p.scale,
         p.scale_log2);
}

// SIMT shapes by head dim: 32-row tiles up to Dh 128, 16-row tiles up to 256 (shared memory).
template <typename Body>
void with_simt_shape(int dh, Body&& body) {
  if (dh <= 64) body(std::integral_constant<int, 32>{}, std::integral_constant<int, 64>{});
  else if (dh <= 128) body(std::integral_constant<int, 32>{}, std::integral_constant<int, 128>{});
  else body(std::integral_constant<int, 16>{}, std::integral_constant<int, 256>{});
}

size_t simt_tiles_bytes(int tile, int dh, int operand_tiles, int score_tiles, int vectors) {
  return sizeof(float) * (size_t(operand_tiles) * tile * (dh + 1) + size_t(score_tiles) * tile * (tile + 1) +
                          size_t(vectors) * tile);
}

template <typename T>
void forward_simt(const void* q, const void* k, const void* v, void* out, float* lse, const Problem& p,
                  cudaStream_t stream) {
  with_simt_shape(p.dh, [&](auto tile, auto dh_max) {
    launch(forward_simt_kernel<T, decltype(tile)::value, decltype(dh_max)::value>, p.n * ceil_div(p.s, decltype(tile)::value),
           simt_tiles_bytes(decltype(tile)::value, p.dh, 2, 1, 0), stream, static_cast<const T*>(q), static_cast<const T*>(k),
           static_cast<const T*>(v), static_cast<T*>(out), lse, p.n, p.s, p.dh, p.scale);
  });
}

template <typename T>
void backward_simt(const void* q, const void* k, const void* v, const void* dout, const float* lse,
                   const float* delta, float* dq, float* dk, float* dv, const Problem& p, cudaStream_t stream) {
  const auto* qt = static_cast<const T*>(q);
  const auto* kt = static_cast<const T*>(k);
  const auto* vt = static_cast<const T*>(v);
  const auto* dot = static_cast<const T*>(dout);
  with_simt_shape(p.dh, [&](auto tile, auto dh_max) {
    const int64_t blocks = p.n * ceil_div(p.s, decltype(tile)::value);
    launch(dkdv_simt_kernel<T, decltype(tile)::value, decltype(dh_max)::value>, blocks, simt_tiles_bytes(decltype(tile)::value, p.dh, 4, 2, 2), stream, qt, kt,
           vt, dot, lse, delta, dk, dv, p.n, p.s, p.dh, p.scale);
    launch(dq_simt_kernel<T, decltype(tile)::value, decltype(dh_max)::value>, blocks, simt_tiles_bytes(decltype(tile)::value, p.dh, 4, 1, 0), stream, qt, kt, vt,
           dot, lse, delta, dq, p.n, p.s, p.dh, p.scale);
  });
}

Problem make_problem(DType dtype, int64_t n, int64_t s, int64_t dh, float scale) {
  SDMOE_ASSERT(dtype == DType::F32 || dtype == DType::BF16, "flash attention: storage dtype {} (F32 or BF16)",
               dtype_name(dtype));
  SDMOE_ASSERT(n >= 0 && s >= 0 && dh >= 1 && dh <= kFlashMaxHeadDim, "flash attention: N={} S={} Dh={} (Dh <= {})",
               n, s, dh, kFlashMaxHeadDim);
  return Problem{n, s, int(dh), scale, float(double(scale) * 1.4426950408889634)};
}

}  // namespace

bool flash_attention_uses_tensor_cores(DType dtype, int64_t head_dim) {
  return dtype == DType::BF16 && (head_dim == 32 || head_dim == 64 || head_dim == 128);
}

void launch_flash_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse, DType dtype,
                                    int64_t n, int64_t s, int64_t dh, float scale, cudaStream_t stream) {
  const Problem p = make_problem(dtype, n, s, dh, scale);
  if (n == 0 || s == 0) return;
  const bool mma = flash_attention_uses_tensor_cores(dtype, dh) && aligned16(q) && aligned16(k) && aligned16(v) &&
                   aligned16(out);
  if (mma) {
    switch (dh) {
      case 32: return forward_mma<32>(q, k, v, out, lse, p, stream);
      case 64: return forward_mma<64>(q, k, v, out, lse, p, stream);
      default: return forward_mma<128>(q, k, v, out, lse, p, stream);
    }
  }
  if (dtype == DType::BF16) return forward_simt<uint16_t>(q, k, v, out, lse, p, stream);
  forward_simt<float>(q, k, v, out, lse, p, stream);
}

size_t flash_attention_backward_workspace(int64_t n, int64_t s, int64_t /*dh*/) {
  return size_t(n) * size_t(s) * sizeof(float);
}

void launch_flash_attention_backward(const void* q, const void* k, const void* v, const void* out, const void* dout,
                                     const float* lse, DType dtype, int64_t n, int64_t s, int64_t dh, float scale,
                                     float* dq, float* dk, float* dv, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream) {
  const Problem p = make_problem(dtype, n, s, dh, scale);
  if (n == 0 || s == 0) return;
  SDMOE_ASSERT(workspace_bytes >= flash_attention_backward_workspace(n, s, dh) &&
                   reinterpret_cast<uintptr_t>(workspace) % alignof(float) == 0,
               "flash attention backward: workspace of {} bytes for {} needed", workspace_bytes,
               flash_attention_backward_workspace(n, s, dh));
  float* delta = static_cast<float*>(workspace);
  const int64_t rows = n * s;
  if (dtype == DType::BF16)
    launch(delta_kernel<uint16_t>, ceil_div(rows, kThreads / 32), 0, stream, static_cast<const uint16_t*>(out),
           static_cast<const uint16_t*>(dout), delta, rows, p.dh);
  else
    launch(delta_kernel<float>, ceil_div(rows, kThreads / 32), 0, stream, static_cast<const float*>(out),
           static_cast<const float*>(dout), delta, rows, p.dh);

  const auto aligned8 = [](const float* x) { return reinterpret_cast<uintptr_t>(x) % 8 == 0; };
  const bool mma = flash_attention_uses_tensor_cores(dtype, dh) && aligned16(q) && aligned16(k) && aligned16(v) &&
                   aligned16(dout) && aligned8(dq) && aligned8(dk) && aligned8(dv);
  if (mma) {
    switch (dh) {
      case 32: return backward_mma<32>(q, k, v, dout, lse, delta, dq, dk, dv, p, stream);
      case 64: return backward_mma<64>(q, k, v, dout, lse, delta, dq, dk, dv, p, stream);
      default: return backward_mma<128>(q, k, v, dout, lse, delta, dq, dk, dv, p, stream);
    }
  }
  if (dtype == DType::BF16) return backward_simt<uint16_t>(q, k, v, dout, lse, delta, dq, dk, dv, p, stream);
  backward_simt<float>(q, k, v, dout, lse, delta, dq, dk, dv, p, stream);
}

}  // namespace sdmoe::cuda
