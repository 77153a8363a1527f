// Error checks and RAII handles for CUDA, cuBLAS, cuSOLVER and NCCL.
//
// Every failed library call goes through SDMOE_FATAL (core/check.h): it prints rank, host
// and file:line and aborts the whole MPI job, so that no rank hangs in a collective while
// another has died. Kernel launches are followed by SDMOE_CHECK_LAUNCH(), which catches
// launch-configuration errors immediately (asynchronous faults surface at the next
// synchronising call, which is also checked).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <memory>
#include <string>
#include <type_traits>

#if __has_include(<nccl.h>)
#include <nccl.h>
#define SDMOE_HAVE_NCCL_HEADER 1
#endif

#include "core/check.h"

namespace sdmoe::cuda {

inline const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "unknown cusolverStatus_t";
  }
}

}  // namespace sdmoe::cuda

#define SDMOE_CHECK_CUDA(call)                                                                  \
  do {                                                                                          \
    cudaError_t sdmoe_cuda_rc_ = (call);                                                        \
    if (sdmoe_cuda_rc_ != cudaSuccess)                                                          \
      SDMOE_FATAL("CUDA", fmt::format("{} returned {} ({})", #call, cudaGetErrorName(sdmoe_cuda_rc_), \
                                      cudaGetErrorString(sdmoe_cuda_rc_)));                     \
  } while (0)

// After every kernel launch: configuration errors (too many threads, too much shared
// memory, no kernel image for this device) are reported here, at the launch site.
#define SDMOE_CHECK_LAUNCH()                                                                    \
  do {                                                                                          \
    cudaError_t sdmoe_cuda_rc_ = cudaGetLastError();                                            \
    if (sdmoe_cuda_rc_ != cudaSuccess)                                                          \
      SDMOE_FATAL("CUDA", fmt::format("kernel launch failed: {} ({})", cudaGetErrorName(sdmoe_cuda_rc_), \
                                      cudaGetErrorString(sdmoe_cuda_rc_)));                     \
  } while (0)

#define SDMOE_CHECK_CUBLAS(call)                                                                \
  do {                                                                                          \
    cublasStatus_t sdmoe_cublas_rc_ = (call);                                                   \
    if (sdmoe_cublas_rc_ != CUBLAS_STATUS_SUCCESS)                                              \
      SDMOE_FATAL("cuBLAS", fmt::format("{} returned {} ({})", #call, static_cast<int>(sdmoe_cublas_rc_), \
                                        cublasGetStatusString(sdmoe_cublas_rc_)));              \
  } while (0)

#define SDMOE_CHECK_CUSOLVER(call)                                                              \
  do {                                                                                          \
    cusolverStatus_t sdmoe_cusolver_rc_ = (call);                                               \
    if (sdmoe_cusolver_rc_ != CUSOLVER_STATUS_SUCCESS)                                          \
      SDMOE_FATAL("cuSOLVER", fmt::format("{} returned {} ({})", #call, static_cast<int>(sdmoe_cusolver_rc_), \
                                          ::sdmoe::cuda::cusolver_status_name(sdmoe_cusolver_rc_))); \
  } while (0)

#ifdef SDMOE_HAVE_NCCL_HEADER
#define SDMOE_CHECK_NCCL(call)                                                                  \
  do {                                                                                          \
    ncclResult_t sdmoe_nccl_rc_ = (call);                                                       \
    if (sdmoe_nccl_rc_ != ncclSuccess)                                                          \
      SDMOE_FATAL("NCCL", fmt::format("{} returned {} ({})", #call, static_cast<int>(sdmoe_nccl_rc_), \
                                      ncclGetErrorString(sdmoe_nccl_rc_)));                     \
  } while (0)
#endif

namespace sdmoe::cuda {

// ---- RAII handles: unique_ptr over the opaque handle types with custom deleters. -------
// Deleters ignore errors: they run during teardown (possibly after a fatal error), where
// aborting again would only hide the first message.
struct StreamDeleter {
  void operator()(cudaStream_t s) const noexcept {
    if (s) cudaStreamDestroy(s);
  }
};
struct EventDeleter {
  void operator()(cudaEvent_t e) const noexcept {
    if (e) cudaEventDestroy(e);
  }
};
struct CublasDeleter {
  void operator()(cublasHandle_t h) const noexcept {
    if (h) cublasDestroy(h);
  }
};
struct CusolverDeleter {
  void operator()(cusolverDnHandle_t h) const noexcept {
    if (h) cusolverDnDestroy(h);
  }
};
struct CusolverParamsDeleter {
  void operator()(cusolverDnParams_t p) const {
    if (p) cusolverDnDestroyParams(p);
  }
};
struct DeviceMemoryDeleter {
  void operator()(void* p) const noexcept {
    if (p) cudaFree(p);
  }
};

using StreamHandle = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDeleter>;
using EventHandle = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;
using CublasHandle = std::unique_ptr<std::remove_pointer_t<cublasHandle_t>, CublasDeleter>;
using CusolverHandle = std::unique_ptr<std::remove_pointer_t<cusolverDnHandle_t>, CusolverDeleter>;
using CusolverParamsHandle = std::unique_ptr<std::remove_pointer_t<cusolverDnParams_t>, CusolverParamsDeleter>;
using DeviceMemory = std::unique_ptr<void, DeviceMemoryDeleter>;

// A non-blocking stream: it does not synchronise with the legacy default stream.
inline StreamHandle make_stream() {
  cudaStream_t s = nullptr;
  SDMOE_CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return StreamHandle(s);
}

inline EventHandle make_event(bool timing = false) {
  cudaEvent_t e = nullptr;
  SDMOE_CHECK_CUDA(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
  return EventHandle(e);
}

inline CublasHandle make_cublas(cudaStream_t stream) {
  cublasHandle_t h = nullptr;
  SDMOE_CHECK_CUBLAS(cublasCreate(&h));
  CublasHandle handle(h);
  SDMOE_CHECK_CUBLAS(cublasSetStream(h, stream));
  return handle;
}

inline CusolverHandle make_cusolver(cudaStream_t stream) {
  cusolverDnHandle_t h = nullptr;
  SDMOE_CHECK_CUSOLVER(cusolverDnCreate(&h));
  CusolverHandle handle(h);
  SDMOE_CHECK_CUSOLVER(cusolverDnSetStream(h, stream));
  return handle;
}

inline CusolverParamsHandle make_cusolver_params() {
  cusolverDnParams_t p = nullptr;
  SDMOE_CHECK_CUSOLVER(cusolverDnCreateParams(&p));
  return CusolverParamsHandle(p);
}

inline DeviceMemory make_device_memory(size_t bytes) {
  void* p = nullptr;
  if (bytes) SDMOE_CHECK_CUDA(cudaMalloc(&p, bytes));
  return DeviceMemory(p);
}

}  // namespace sdmoe::cuda
