// cuBLASLt bf16 GEMMs (lt_gemm.cuh). Row-major C = op(A) op(B) is computed as the
// column-major C^T = op(B)^T op(A)^T, as CudaBackend::gemm_raw does for cuBLAS: the stored
// bytes of row-major B are the column-major matrix cuBLASLt takes as its first operand.
#include "core/cuda/lt_gemm.cuh"

namespace sdmoe::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

// The largest power of two up to 256 dividing the byte address (and every batch stride).
int alignment_of(const void* p, int64_t stride_elements, size_t element_bytes) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(p) | uintptr_t(256);
  if (stride_elements) bits |= uintptr_t(stride_elements) * element_bytes;
  return int(bits & (~bits + 1));
}

cublasLtMatrixLayout_t make_layout(cudaDataType type, int64_t rows, int64_t cols, int64_t ld, int64_t count,
                                   int64_t stride) {
  cublasLtMatrixLayout_t layout = nullptr;
  SDMOE_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&layout, type, uint64_t(rows), uint64_t(cols), ld));
  if (count > 1) {
    const int32_t batch = int32_t(count);
    SDMOE_CHECK_CUBLAS(
        cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
    SDMOE_CHECK_CUBLAS(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                        sizeof(stride)));
  }
  return layout;
}

}  // namespace

LtGemm::LtGemm(cudaStream_t stream) : stream_(stream), workspace_bytes_(kWorkspaceBytes) {
  SDMOE_CHECK_CUBLAS(cublasLtCreate(&handle_));
  SDMOE_CHECK_CUDA(cudaMalloc(&workspace_, workspace_bytes_));
}

LtGemm::~LtGemm() {
  for (auto& [key, plan] : plans_) {
    if (plan.layout_c) cublasLtMatrixLayoutDestroy(plan.layout_c);
    if (plan.layout_second) cublasLtMatrixLayoutDestroy(plan.layout_second);
    if (plan.layout_first) cublasLtMatrixLayoutDestroy(plan.layout_first);
    if (plan.desc) cublasLtMatmulDescDestroy(plan.desc);
  }
  if (workspace_) {
    cudaStreamSynchronize(stream_);  // teardown: errors ignored
    cudaFree(workspace_);
  }
  if (handle_) cublasLtDestroy(handle_);
}

LtGemm::Plan LtGemm::make_plan(const LtProblem& p, int align_a, int align_b, int align_c) {
  Plan plan;
  // First operand: B's storage, [n,k] column-major (ld n) untransposed, or [k,n] (ld k)
  // when trans_b; second: A's storage, [k,m] (ld k), or [m,k] (ld m) when trans_a.
  const cublasOperation_t op_first = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  SDMOE_CHECK_CUBLAS(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  SDMOE_CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  SDMOE_CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  plan.layout_first = p.trans_b ? make_layout(CUDA_R_16BF, p.k, p.n, p.k, p.count, p.stride_b)
                                : make_layout(CUDA_R_16BF, p.n, p.k, p.n, p.count, p.stride_b);
  plan.layout_second = p.trans_a ? make_layout(CUDA_R_16BF, p.m, p.k, p.m, p.count, p.stride_a)
                                 : make_layout(CUDA_R_16BF, p.k, p.m, p.k, p.count, p.stride_a);
  plan.layout_c = make_layout(CUDA_R_32F, p.n, p.m, p.n, p.count, p.stride_c);

  cublasLtMatmulPreference_t pref = nullptr;
  SDMOE_CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = workspace_bytes_;
  const uint32_t first = uint32_t(align_b), second = uint32_t(align_a), c = uint32_t(align_c);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &first, sizeof(first));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &second, sizeof(second));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c, sizeof(c));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &c, sizeof(c));
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle_, plan.desc, plan.layout_first,
                                                               plan.layout_second, plan.layout_c, plan.layout_c, pref,
                                                               1, &result, &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  plan.found = status == CUBLAS_STATUS_SUCCESS && returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (plan.found) plan.algo = result.algo;
  return plan;
}

bool LtGemm::run(const LtProblem& problem, float alpha, const void* a, const void* b, float beta, void* c) {
  LtProblem p = problem;
  if (p.count <= 1) p.count = 1, p.stride_a = p.stride_b = p.stride_c = 0;  // one plan whatever the strides
  const int align_a = alignment_of(a, p.count > 1 ? p.stride_a : 0, 2);
  const int align_b = alignment_of(b, p.count > 1 ? p.stride_b : 0, 2);
  const int align_c = alignment_of(c, p.count > 1 ? p.stride_c : 0, 4);
  const Key key{p.trans_a, p.trans_b, p.m, p.n, p.k, p.count, p.stride_a, p.stride_b, p.stride_c,
                align_a, align_b, align_c};
  auto it = plans_.find(key);
  if (it == plans_.end()) it = plans_.emplace(key, make_plan(p, align_a, align_b, align_c)).first;
  const Plan& plan = it->second;
  if (!plan.found) return false;
  SDMOE_CHECK_CUBLAS(cublasLtMatmul(handle_, plan.desc, &alpha, b, plan.layout_first, a, plan.layout_second, &beta, c,
                                    plan.layout_c, c, plan.layout_c, &plan.algo, workspace_, workspace_bytes_,
                                    stream_));
  return true;
}

}  // namespace sdmoe::cuda
