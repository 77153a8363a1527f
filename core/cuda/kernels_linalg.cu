// Small dense linear algebra the cuSOLVER API has no batched form for.
#include "core/cholesky_inverse.h"
#include "core/cuda/cuda_kernels.cuh"

namespace sdmoe::cuda {
namespace {

// One thread per matrix: k is small (the SD-MoE rank) and the batch is a handful of
// experts, so the work is latency, not throughput; the point is to stay on the device.
template <typename T, int KMax>
__global__ void cholesky_inverse_kernel(const T* gram, T* inv, int64_t batch, int k, double relative_ridge) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double l[KMax * KMax], li[KMax * KMax];
  cholesky_inverse_lower(gram + b * k * k, inv + b * k * k, k, relative_ridge, l, li);
}

template <typename T>
void launch_typed(const T* gram, T* inv, int64_t batch, int k, double relative_ridge, cudaStream_t s) {
  const unsigned threads = 32, blocks = unsigned((batch + threads - 1) / threads);
  if (k <= 16) cholesky_inverse_kernel<T, 16><<<blocks, threads, 0, s>>>(gram, inv, batch, k, relative_ridge);
  else if (k <= 32) cholesky_inverse_kernel<T, 32><<<blocks, threads, 0, s>>>(gram, inv, batch, k, relative_ridge);
  else if (k <= 64) cholesky_inverse_kernel<T, 64><<<blocks, threads, 0, s>>>(gram, inv, batch, k, relative_ridge);
  else cholesky_inverse_kernel<T, 128><<<blocks, threads, 0, s>>>(gram, inv, batch, k, relative_ridge);
}

}  // namespace

void launch_cholesky_inverse(const void* gram, void* inv, DType dtype, int64_t batch, int k, double relative_ridge,
                             cudaStream_t s) {
  if (batch == 0) return;
  if (dtype == DType::F32)
    launch_typed(static_cast<const float*>(gram), static_cast<float*>(inv), batch, k, relative_ridge, s);
  else if (dtype == DType::F64)
    launch_typed(static_cast<const double*>(gram), static_cast<double*>(inv), batch, k, relative_ridge, s);
  else
    SDMOE_FATAL("cuda", fmt::format("cholesky_inverse: dtype {} (f32 or f64)", dtype_name(dtype)));
  SDMOE_CHECK_LAUNCH();
}

}  // namespace sdmoe::cuda
