// Measured fp32 FMA peak of the device: the GPU twin of measure_cpu_fma_peak. The "% of
// peak" figures divide by what this device actually sustains (clock limits, power caps),
// not by a data-sheet number.
#include <cuda_runtime.h>

#include "core/cuda/cuda_kernels.cuh"

namespace sdmoe::cuda {
namespace {

constexpr int kChains = 8;  // independent FMA chains per thread hide the FMA latency

__global__ void fma_peak_kernel(float* sink, int iterations, float a, float b) {
  float x[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) x[c] = float(threadIdx.x + c);
  for (int i = 0; i < iterations; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) x[c] = fmaf(x[c], a, b);
  }
  float total = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) total += x[c];
  // Never true for the arguments used; keeps the chains alive without a memory store each.
  if (total == -1.2345e-30f) sink[0] = total;
}

}  // namespace

double measure_fma_peak(int device, cudaStream_t stream) {
  cudaDeviceProp props{};
  SDMOE_CHECK_CUDA(cudaGetDeviceProperties(&props, device));
  const int threads = 256, blocks = props.multiProcessorCount * 8, iterations = 1 << 14;
  float* sink = nullptr;
  SDMOE_CHECK_CUDA(cudaMallocAsync(&sink, sizeof(float), stream));
  cudaEvent_t start, stop;
  SDMOE_CHECK_CUDA(cudaEventCreate(&start));
  SDMOE_CHECK_CUDA(cudaEventCreate(&stop));
  fma_peak_kernel<<<blocks, threads, 0, stream>>>(sink, iterations / 8, 0.999999f, 1e-7f);  // warm-up, clocks up
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    SDMOE_CHECK_CUDA(cudaEventRecord(start, stream));
    fma_peak_kernel<<<blocks, threads, 0, stream>>>(sink, iterations, 0.999999f, 1e-7f);
    SDMOE_CHECK_CUDA(cudaEventRecord(stop, stream));
    SDMOE_CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.f;
    SDMOE_CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    const double flops = 2.0 * kChains * double(iterations) * threads * blocks;
    best = std::max(best, flops / (double(ms) * 1e-3));
  }
  SDMOE_CHECK_CUDA(cudaGetLastError());
  SDMOE_CHECK_CUDA(cudaEventDestroy(start));
  SDMOE_CHECK_CUDA(cudaEventDestroy(stop));
  SDMOE_CHECK_CUDA(cudaFreeAsync(sink, stream));
  SDMOE_CHECK_CUDA(cudaStreamSynchronize(stream));
  return best;
}

}  // namespace sdmoe::cuda
