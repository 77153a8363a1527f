// bf16 GEMMs through cuBLASLt: row-major C[m,n] (fp32) = alpha op(A) op(B) + beta C with A
// and B in bf16 and fp32 accumulation (CUBLAS_COMPUTE_32F), single or strided-batched.
//
// Why cuBLASLt rather than cublasGemmEx: the algorithm is chosen once per problem (shape,
// transposes, batch, strides and pointer alignment) by cuBLASLt's heuristic and cached, so
// a training step's few dozen distinct GEMMs pay the heuristic once per run, and the
// workspace is ours (32 MiB, what cuBLAS itself gives Hopper), which the split-K and
// stream-K kernels use. The alignment is part of the key because an algorithm chosen for
// 256-byte-aligned operands may assume it: the preference states the real alignment.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "core/cuda/cuda_check.h"

namespace sdmoe::cuda {

struct LtProblem {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  int64_t count = 1, stride_a = 0, stride_b = 0, stride_c = 0;  // elements
};

class LtGemm {
 public:
  explicit LtGemm(cudaStream_t stream);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Enqueues the product on the stream. False (nothing enqueued) when cuBLASLt has no
  // algorithm for this problem; the caller then uses cublasGemmEx.
  bool run(const LtProblem& p, float alpha, const void* a_bf16, const void* b_bf16, float beta, void* c_f32);

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t layout_first = nullptr, layout_second = nullptr, layout_c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool found = false;
  };
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int>;
  Plan make_plan(const LtProblem& p, int align_a, int align_b, int align_c);

  cudaStream_t stream_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, Plan> plans_;
};

}  // namespace sdmoe::cuda
