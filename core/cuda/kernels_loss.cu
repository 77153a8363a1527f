// Cross-entropy over the vocabulary. Kernels first, host launchers last.
#include <cmath>

#include "core/backend.h"
#include "core/cuda/cuda_kernels.cuh"

namespace sdmoe::cuda {
namespace {

constexpr int kThreads = 512;

// One block per token. Each thread keeps an online (max, sum of exp) over its strided
// share of the row; the block then rescales to the common max and adds (fixed tree).
__global__ void cross_entropy_forward_kernel(const float* logits, const int32_t* targets, float* losses,
                                             float* lse_out, int64_t vocab) {
  __shared__ float shared_f[32];
  const int64_t r = blockIdx.x;
  const float* row = logits + r * vocab;
  float m = -INFINITY, s = 0.0f;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float x = row[v];
    if (x > m) {
      s = s * expf(m - x) + 1.0f;
      m = x;
    } else if (x != -INFINITY) {
      s += expf(x - m);
    }
  }
  const float mx = block_max(m, shared_f);
  const float scaled = (m == -INFINITY) ? 0.0f : s * expf(m - mx);
  const float total = block_sum(scaled, shared_f);
  if (threadIdx.x == 0) {
    const double l = double(mx) + log(double(total));
    lse_out[r] = static_cast<float>(l);
    const int32_t t = targets[r];
    // A target beyond the vocabulary cannot abort from a kernel: its loss becomes NaN. A
    // target on another vocabulary shard contributes lse alone.
    losses[r] = t == Backend::kTargetOnOtherShard ? static_cast<float>(l)
                : t < 0                           ? 0.0f
                : t < vocab                       ? static_cast<float>(l - double(row[t]))
                                                  : NAN;
  }
}

// logits <- scale * (softmax - onehot(target)); ignored tokens get a zero row.
__global__ void cross_entropy_backward_kernel(float* logits, const int32_t* targets, const float* lse, float scale,
                                              int64_t vocab) {
  const int64_t r = blockIdx.x;
  float* row = logits + r * vocab;
  const int32_t t = targets[r];
  if (t < 0 && t != Backend::kTargetOnOtherShard) {
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) row[v] = 0.0f;
    return;
  }
  const float l = lse[r];
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    float g = scale * expf(row[v] - l);
    if (v == t) g -= scale;
    row[v] = g;
  }
}

}  // namespace

// ============================== host launchers ==============================================

void launch_cross_entropy_forward(const float* logits, const int32_t* targets, float* losses, float* lse,
                                  int64_t rows, int64_t vocab, cudaStream_t s) {
  if (rows == 0) return;
  SDMOE_ASSERT(vocab > 0, "cross_entropy: empty vocabulary");
  cross_entropy_forward_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(logits, targets, losses, lse, vocab);
  SDMOE_CHECK_LAUNCH();
}

void launch_cross_entropy_backward(float* logits, const int32_t* targets, const float* lse, float scale,
                                   int64_t rows, int64_t vocab, cudaStream_t s) {
  if (rows == 0) return;
  cross_entropy_backward_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(logits, targets, lse, scale, vocab);
  SDMOE_CHECK_LAUNCH();
}

}  // namespace sdmoe::cuda
