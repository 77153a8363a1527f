// Attention layout changes, rotary embedding and the causal softmax. Kernels first, host
// launchers last.
#include <cmath>
#include <type_traits>

#include "core/cuda/cuda_kernels.cuh"

namespace sdmoe::cuda {
namespace {

constexpr int kThreads = 256;

template <typename H>
struct HeadPtrs {
  H* p[3];
};

// packed [B,S,parts,H,Dh] <-> heads[part] [B,H,S,Dh]; one thread per packed element, so
// reads (to_heads) or writes (!to_heads) of the packed side are contiguous. The two sides
// may differ in storage type (an fp32 result rounded into a bf16 operand, or back).
template <typename P, typename H>
__global__ void heads_copy_kernel(P* packed, HeadPtrs<H> heads, int parts, int64_t b, int64_t s, int64_t h,
                                  int64_t dh, bool to_heads) {
  const int64_t n = b * s * parts * h * dh;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rest = i;
    const int64_t d = rest % dh;
    rest /= dh;
    const int64_t hi = rest % h;
    rest /= h;
    const int part = static_cast<int>(rest % parts);
    rest /= parts;
    const int64_t si = rest % s;
    const int64_t bi = rest / s;
    H* dst = heads.p[part] + ((bi * h + hi) * s + si) * dh + d;
    if constexpr (std::is_same_v<P, H>) {
      if (to_heads) *dst = packed[i];
      else packed[i] = *dst;
    } else if (to_heads) {
      store_float(dst, 0, load_as_float(packed, i));
    } else {
      store_float(packed, i, load_as_float(dst, 0));
    }
  }
}

// One thread per rotated pair (i, i + Dh/2) of one row (n, pos). The angle and its sine
// and cosine are computed in double, as on the CPU: positions reach thousands of radians,
// where a float angle would already be off in the third decimal.
template <typename T>
__global__ void rope_kernel(T* x, int64_t bh, int64_t s, int64_t dh, double theta, int direction) {
  const int64_t half = dh / 2, n = bh * s * half;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half, row = idx / half, pos = row % s;
    const double angle = double(pos) * pow(theta, -2.0 * double(i) / double(dh));
    double sn, c;
    sincos(angle, &sn, &c);
    sn *= direction;
    T* r = x + row * dh;
    const double a = double(load_as_float(r, i)), bv = double(load_as_float(r, i + half));
    store_float(r, i, static_cast<float>(a * c - bv * sn));
    store_float(r, i + half, static_cast<float>(a * sn + bv * c));
  }
}

// One warp per score row; row i of each [S,S] matrix sees keys j <= i.
__global__ void causal_softmax_forward_kernel(float* scores, int64_t rows, int64_t s, float scale) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t i = row % s;
  float* p = scores + row * s;
  float mx = -INFINITY;
  for (int64_t j = lane; j <= i; j += 32) mx = fmaxf(mx, scale * p[j]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int64_t j = lane; j <= i; j += 32) sum += expf(scale * p[j] - mx);
  sum = warp_sum(sum);
  for (int64_t j = lane; j <= i; j += 32) p[j] = expf(scale * p[j] - mx) / sum;
  for (int64_t j = i + 1 + lane; j < s; j += 32) p[j] = 0.0f;
}

template <typename P>
__global__ void causal_softmax_backward_kernel(const P* probs, float* grad, int64_t rows, int64_t s, float scale) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t i = row % s;
  const P* p = probs + row * s;
  float* g = grad + row * s;
  float dot = 0.0f;
  for (int64_t j = lane; j <= i; j += 32) dot += load_as_float(p, j) * g[j];
  dot = warp_sum(dot);
  for (int64_t j = lane; j <= i; j += 32) g[j] = scale * load_as_float(p, j) * (g[j] - dot);
  for (int64_t j = i + 1 + lane; j < s; j += 32) g[j] = 0.0f;
}

}  // namespace

// ============================== host launchers ==============================================

void launch_heads_copy(void* packed, DType packed_dtype, void* const* heads, DType heads_dtype, int parts, int64_t b,
                       int64_t s, int64_t h, int64_t dh, bool to_heads, cudaStream_t stream) {
  SDMOE_ASSERT(parts >= 1 && parts <= 3, "heads_copy: {} parts", parts);
  const int64_t n = b * s * parts * h * dh;
  if (n == 0) return;
  dispatch_storage(packed_dtype, "heads_copy", [&](auto zp) {
    using P = decltype(zp);
    dispatch_storage(heads_dtype, "heads_copy", [&](auto zh) {
      using H = decltype(zh);
      HeadPtrs<H> ptrs{{static_cast<H*>(heads[0]), parts > 1 ? static_cast<H*>(heads[1]) : nullptr,
                        parts > 2 ? static_cast<H*>(heads[2]) : nullptr}};
      heads_copy_kernel<P, H><<<elementwise_blocks(n), kThreads, 0, stream>>>(static_cast<P*>(packed), ptrs, parts, b,
                                                                               s, h, dh, to_heads);
    });
  });
  SDMOE_CHECK_LAUNCH();
}

void launch_rope(void* x, DType dtype, int64_t bh, int64_t s, int64_t dh, double theta, int direction,
                 cudaStream_t stream) {
  SDMOE_ASSERT(dh % 2 == 0, "rope: head dim {} must be even", dh);
  SDMOE_ASSERT(direction == 1 || direction == -1, "rope: direction {} must be +1 or -1", direction);
  const int64_t n = bh * s * (dh / 2);
  if (n == 0) return;
  dispatch_storage(dtype, "rope", [&](auto z) {
    using T = decltype(z);
    rope_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(static_cast<T*>(x), bh, s, dh, theta, direction);
  });
  SDMOE_CHECK_LAUNCH();
}

void launch_causal_softmax_forward(float* scores, int64_t n, int64_t s, float scale, cudaStream_t stream) {
  const int64_t rows = n * s;
  if (rows == 0) return;
  constexpr int kWarps = kThreads / 32;
  causal_softmax_forward_kernel<<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(scores, rows,
                                                                                                        s, scale);
  SDMOE_CHECK_LAUNCH();
}

void launch_causal_softmax_backward(const void* probs, DType probs_dtype, float* grad, int64_t n, int64_t s,
                                    float scale, cudaStream_t stream) {
  const int64_t rows = n * s;
  if (rows == 0) return;
  constexpr int kWarps = kThreads / 32;
  dispatch_storage(probs_dtype, "causal_softmax_backward", [&](auto zp) {
    using P = decltype(zp);
    causal_softmax_backward_kernel<P><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(
        static_cast<const P*>(probs), grad, rows, s, scale);
  });
  SDMOE_CHECK_LAUNCH();
}

}  // namespace sdmoe::cuda
