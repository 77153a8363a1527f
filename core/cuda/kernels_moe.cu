// MoE routing (top-k router forward and backward), row gather and weighted combine.
// Kernels first, host launchers last.
//
// The router works in double like the CPU oracle: scores that differ only in the last
// float bit must still rank the same way on both backends, and a router row is short.
#include <climits>
#include <cmath>

#include "core/cuda/cuda_kernels.cuh"

namespace sdmoe::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ double token_score(float z, bool sigmoid, double lse) {
  return sigmoid ? 1.0 / (1.0 + exp(-double(z))) : exp(double(z) - lse);
}

// One warp per token; the token's E scores live in shared memory (E doubles per warp).
__global__ void router_forward_kernel(const float* logits, bool sigmoid, bool normalize, int32_t* topk_index,
                                      float* topk_weight, float* aux_probs, float* lse_out, int64_t tokens,
                                      int experts, int k) {
  extern __shared__ double router_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (t >= tokens) return;  // whole warps leave together; no block barriers below
  double* s = router_smem + int64_t(warp) * experts;
  const float* z = logits + t * experts;

  double mx = -INFINITY;
  for (int e = lane; e < experts; e += 32) mx = fmax(mx, double(z[e]));
  mx = warp_max(mx);
  double sum = 0.0;
  for (int e = lane; e < experts; e += 32) sum += exp(double(z[e]) - mx);
  sum = warp_sum(sum);
  const double l = mx + log(sum);
  if (lane == 0) lse_out[t] = static_cast<float>(l);

  double row_sum = 0.0;
  for (int e = lane; e < experts; e += 32) {
    const double v = token_score(z[e], sigmoid, l);
    s[e] = v;
    row_sum += v;
  }
  row_sum = warp_sum(row_sum);
  __syncwarp();

  // Successive maxima under the total order (score descending, index ascending): round j
  // only considers entries strictly after round j-1's winner, which excludes all earlier
  // winners without marking them. Equal scores go to the lower index, as on the CPU.
  double prev_v = INFINITY, chosen_sum = 0.0, my_v = 0.0;
  int prev_e = -1, my_e = 0;
  for (int j = 0; j < k; ++j) {
    double bv = -INFINITY;
    int be = INT_MAX;
    for (int e = lane; e < experts; e += 32) {
      const double v = s[e];
      const bool after_prev = v < prev_v || (v == prev_v && e > prev_e);
      if (after_prev && (be == INT_MAX || v > bv)) {
        bv = v;
        be = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const double ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oe = __shfl_xor_sync(0xffffffffu, be, o);
      if (oe != INT_MAX && (be == INT_MAX || ov > bv || (ov == bv && oe < be))) {
        bv = ov;
        be = oe;
      }
    }
    prev_v = bv;
    prev_e = be;
    chosen_sum += bv;
    if (lane == j) {
      my_v = bv;
      my_e = be;
    }
  }
  if (lane < k) {
    topk_index[t * k + lane] = my_e;
    topk_weight[t * k + lane] = static_cast<float>(my_v / (normalize ? chosen_sum : 1.0));
  }
  for (int e = lane; e < experts; e += 32)
    aux_probs[t * experts + e] = static_cast<float>(sigmoid ? s[e] / row_sum : s[e]);
}

// One warp per token; shared memory holds scores s and score gradients g (2E doubles).
__global__ void router_backward_kernel(const float* logits, bool sigmoid, bool normalize, const int32_t* topk_index,
                                       const float* topk_weight, const float* dtopk_weight, const float* aux,
                                       const float* lse, double z_grad_scale, float* dlogits, int64_t tokens,
                                       int experts, int k) {
  extern __shared__ double router_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (t >= tokens) return;
  double* s = router_smem + int64_t(warp) * 2 * experts;
  double* g = s + experts;
  const float* z = logits + t * experts;
  const double l = double(lse[t]);
  for (int e = lane; e < experts; e += 32) {
    s[e] = token_score(z[e], sigmoid, l);
    g[e] = 0.0;
  }
  __syncwarp();

  // Top-k path, w_j = s_j / S (S the chosen sum when normalising). Lane 0 scatters in j
  // order, the CPU's order.
  if (lane == 0) {
    const int32_t* idx = topk_index + t * k;
    const float* w = topk_weight + t * k;
    const float* dw = dtopk_weight + t * k;
    if (normalize) {
      double chosen_sum = 0.0, dot = 0.0;
      for (int j = 0; j < k; ++j) {
        if (idx[j] >= 0 && idx[j] < experts) chosen_sum += s[idx[j]];
        dot += double(dw[j]) * double(w[j]);
      }
      for (int j = 0; j < k; ++j)
        if (idx[j] >= 0 && idx[j] < experts) g[idx[j]] += (double(dw[j]) - dot) / chosen_sum;
    } else {
      for (int j = 0; j < k; ++j)
        if (idx[j] >= 0 && idx[j] < experts) g[idx[j]] += double(dw[j]);
    }
  }
  __syncwarp();

  // Load-balancing path through aux_probs.
  if (!sigmoid) {
    for (int e = lane; e < experts; e += 32) g[e] += double(aux[e]);
  } else {
    double row_sum = 0.0;
    for (int e = lane; e < experts; e += 32) row_sum += s[e];
    row_sum = warp_sum(row_sum);
    double cq = 0.0;
    for (int e = lane; e < experts; e += 32) cq += double(aux[e]) * s[e] / row_sum;
    cq = warp_sum(cq);
    for (int e = lane; e < experts; e += 32) g[e] += (double(aux[e]) - cq) / row_sum;
  }

  double dot = 0.0;
  if (!sigmoid) {
    for (int e = lane; e < experts; e += 32) dot += g[e] * s[e];
    dot = warp_sum(dot);
  }
  float* dz = dlogits + t * experts;
  for (int e = lane; e < experts; e += 32) {
    float d = static_cast<float>(sigmoid ? g[e] * s[e] * (1.0 - s[e]) : s[e] * (g[e] - dot));
    // z-loss: d lse / d z = softmax(z).
    d += static_cast<float>(z_grad_scale * l * exp(double(z[e]) - l));
    dz[e] = d;
  }
}

// dst[i] = src[index[i]]; an index outside [0, src_rows) gives a zero row.
// A row copy, so any storage type of the same width: float, or uint16_t for bf16 (whose
// zero is the bit pattern 0 too).
template <typename T>
__global__ void gather_rows_kernel(const T* src, const int32_t* index, T* dst, int64_t src_rows, int64_t dim) {
  const int64_t i = blockIdx.x;
  const int32_t r = index[i];
  const bool ok = r >= 0 && r < src_rows;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[i * dim + d] = ok ? src[int64_t(r) * dim + d] : T(0);
}

// One block per token: out[t] = beta * out[t] + sum_j w_j rows[slot_row[t,j]], in double,
// slots in order. Slots with a row outside [0, n_rows) contribute nothing.
__global__ void combine_rows_kernel(const float* rows, const int32_t* slot_row, const float* slot_weight,
                                    double beta, float* out, int k, int64_t dim, int64_t n_rows) {
  const int64_t t = blockIdx.x;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    double acc = beta == 0.0 ? 0.0 : beta * double(out[t * dim + d]);
    for (int j = 0; j < k; ++j) {
      const int32_t r = slot_row[t * k + j];
      if (r < 0 || r >= n_rows) continue;
      const double w = slot_weight ? double(slot_weight[t * k + j]) : 1.0;
      acc += w * double(rows[int64_t(r) * dim + d]);
    }
    out[t * dim + d] = static_cast<float>(acc);
  }
}

// One block per slot (t, j): drows[r] = w * dout[t], dweight[t,j] = <dout[t], rows[r]>.
__global__ void combine_rows_backward_kernel(const float* dout, const float* rows, const int32_t* slot_row,
                                             const float* slot_weight, float* drows, float* dweight, int k,
                                             int64_t dim, int64_t n_rows) {
  __shared__ double shared[32];
  const int64_t slot = blockIdx.x, t = slot / k;
  const int32_t r = slot_row[slot];
  if (r < 0 || r >= n_rows) {
    if (threadIdx.x == 0) dweight[slot] = 0.0f;
    return;
  }
  const double w = double(slot_weight[slot]);
  const float* g = dout + t * dim;
  const float* row = rows + int64_t(r) * dim;
  float* dr = drows + int64_t(r) * dim;
  double dot = 0.0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const float gd = g[d];
    dot += double(gd) * double(row[d]);
    dr[d] = static_cast<float>(w * double(gd));
  }
  dot = block_sum(dot, shared);
  if (threadIdx.x == 0) dweight[slot] = static_cast<float>(dot);
}

// Warps per block for the router: shared memory per warp is `per_warp` bytes.
int router_warps(size_t per_warp) {
  constexpr size_t kMaxShared = 48 * 1024;
  SDMOE_ASSERT(per_warp <= kMaxShared, "router: {} bytes of scores per token exceed shared memory", per_warp);
  int w = static_cast<int>(kMaxShared / per_warp);
  return w > 4 ? 4 : w;
}

}  // namespace

// ============================== host launchers ==============================================

void launch_router_forward(const float* logits, bool sigmoid, bool normalize_topk, int32_t* topk_index,
                           float* topk_weight, float* aux_probs, float* lse, int64_t tokens, int64_t experts,
                           int64_t k, cudaStream_t s) {
  SDMOE_ASSERT(k >= 1 && k <= experts, "top-k {} with {} experts", k, experts);
  SDMOE_ASSERT(k <= 32, "router: top-k {} > 32 is not supported on CUDA", k);
  if (tokens == 0) return;
  const size_t per_warp = size_t(experts) * sizeof(double);
  const int warps = router_warps(per_warp);
  router_forward_kernel<<<static_cast<unsigned>(ceil_div(tokens, warps)), warps * 32, warps * per_warp, s>>>(
      logits, sigmoid, normalize_topk, topk_index, topk_weight, aux_probs, lse, tokens, static_cast<int>(experts),
      static_cast<int>(k));
  SDMOE_CHECK_LAUNCH();
}

void launch_router_backward(const float* logits, bool sigmoid, bool normalize_topk, const int32_t* topk_index,
                            const float* topk_weight, const float* dtopk_weight, const float* aux_grad,
                            const float* lse, double z_grad_scale, float* dlogits, int64_t tokens, int64_t experts,
                            int64_t k, cudaStream_t s) {
  if (tokens == 0) return;
  const size_t per_warp = 2 * size_t(experts) * sizeof(double);
  const int warps = router_warps(per_warp);
  router_backward_kernel<<<static_cast<unsigned>(ceil_div(tokens, warps)), warps * 32, warps * per_warp, s>>>(
      logits, sigmoid, normalize_topk, topk_index, topk_weight, dtopk_weight, aux_grad, lse, z_grad_scale, dlogits,
      tokens, static_cast<int>(experts), static_cast<int>(k));
  SDMOE_CHECK_LAUNCH();
}

void launch_gather_rows(const void* src, const int32_t* index, void* dst, DType dtype, int64_t n, int64_t src_rows,
                        int64_t dim, cudaStream_t s) {
  if (n == 0 || dim == 0) return;
  dispatch_storage(dtype, "gather_rows", [&](auto z) {
    using T = decltype(z);
    gather_rows_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, s>>>(static_cast<const T*>(src), index,
                                                                          static_cast<T*>(dst), src_rows, dim);
  });
  SDMOE_CHECK_LAUNCH();
}

void launch_combine_rows(const float* rows, const int32_t* slot_row, const float* slot_weight, double beta,
                         float* out, int64_t tokens, int64_t k, int64_t dim, int64_t n_rows, cudaStream_t s) {
  if (tokens == 0 || dim == 0) return;
  combine_rows_kernel<<<static_cast<unsigned>(tokens), kThreads, 0, s>>>(rows, slot_row, slot_weight, beta, out,
                                                                          static_cast<int>(k), dim, n_rows);
  SDMOE_CHECK_LAUNCH();
}

void launch_combine_rows_backward(const float* dout, const float* rows, const int32_t* slot_row,
                                  const float* slot_weight, float* drows, float* dweight, int64_t tokens, int64_t k,
                                  int64_t dim, int64_t n_rows, cudaStream_t s) {
  if (tokens * k == 0) return;
  combine_rows_backward_kernel<<<static_cast<unsigned>(tokens * k), kThreads, 0, s>>>(
      dout, rows, slot_row, slot_weight, drows, dweight, static_cast<int>(k), dim, n_rows);
  SDMOE_CHECK_LAUNCH();
}

}  // namespace sdmoe::cuda
