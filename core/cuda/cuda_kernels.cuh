// Private to the CUDA backend: device helpers shared by the kernel files, the scratch
// workspace, and one host launcher per op. Launchers take raw device pointers and sizes,
// enqueue on the given stream and never synchronise; the backend (cuda_backend.cu) owns
// the dtype and shape checks.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/cuda_check.h"
#include "core/dtype.h"

namespace sdmoe::cuda {

// ---- scratch memory ---------------------------------------------------------------------
// One growing device allocation reused by every op that needs temporaries. Everything runs
// on one stream, so a region handed out by get() stays valid until the next get(); growth
// frees the old block stream-ordered (cudaFreeAsync), so kernels still queued keep it.
class Workspace {
 public:
  Workspace() = default;
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  void* get(size_t bytes);

 private:
  cudaStream_t stream_ = nullptr;
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

// Carves aligned sub-regions out of one workspace request: call take() for every region
// with a null base to size it, then again on the real base.
class Carver {
 public:
  explicit Carver(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(size_t count) {
    size_t offset = (used_ + 255) / 256 * 256;
    used_ = offset + count * sizeof(T);
    return base_ ? reinterpret_cast<T*>(base_ + offset) : nullptr;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride elementwise kernel over n items.
inline unsigned elementwise_blocks(int64_t n, int threads = 256) {
  int64_t blocks = ceil_div(n, threads);
  if (blocks < 1) blocks = 1;
  if (blocks > 65535 * 16) blocks = 65535 * 16;
  return static_cast<unsigned>(blocks);
}

#if defined(__CUDACC__)
// ---- device helpers -----------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum with a fixed reduction tree (deterministic for a fixed block size).
// `shared` holds at least 32 values; every thread of the block must call it; all threads
// receive the result.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = lane < warps ? shared[lane] : T(0);
  r = warp_sum(r);
  return r;
}

template <typename T>
__device__ __forceinline__ T block_max(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = lane < warps ? shared[lane] : shared[0];
  r = warp_max(r);
  return r;
}

// bf16 conversions bit-identical to core/dtype.h (round to nearest even, quiet NaN).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

// Storage element <-> float: kernels that read or write GEMM operands are templates over
// the storage type, float or uint16_t (bf16 bits), and compute in float or double.
__device__ __forceinline__ float load_as_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_as_float(const uint16_t* p, int64_t i) { return bf16_bits_to_f32(p[i]); }
__device__ __forceinline__ void store_float(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_float(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16_bits(v); }
#endif

// Host side: calls fn(float{}) for F32 and fn(uint16_t{}) for BF16, the storage types of
// the operand kernels; any other dtype is a fatal error naming the op.
template <typename Fn>
void dispatch_storage(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(float{}); return;
    case DType::BF16: fn(uint16_t{}); return;
    default:
      SDMOE_FATAL("cuda", fmt::format("{}: dtype {} is not supported by the CUDA backend (f32 or bf16 here; f64 is "
                                      "CPU-only)",
                                      op, dtype_name(dtype)));
  }
}

// ---- launchers: elementwise, reductions, norms, optimizer (kernels_elementwise.cu) -------
void launch_fill(void* x, DType dtype, int64_t n, double value, cudaStream_t s);
// device[i] = host[i] for i < count, in stream order: the pointers travel as kernel
// arguments, so no pinned staging buffer and no host synchronisation is needed.
void launch_write_pointers(const void* const* host, int64_t count, const void** device, cudaStream_t s);

// Sustained fp32 FMA FLOP/s of the device, timed on `stream` (synchronises it).
double measure_fma_peak(int device, cudaStream_t stream);
void launch_scale(float* x, int64_t n, float alpha, cudaStream_t s);
void launch_axpy(float alpha, const float* x, float* y, int64_t n, cudaStream_t s);
// Deterministic sum of squares into *result (device); partials needs sum_squares_partials(n).
int64_t sum_squares_partials(int64_t n);
void launch_sum_squares(const void* x, DType dtype, int64_t n, double* partials, double* result, cudaStream_t s);
// Deterministic column sums of x [rows, cols] into out [cols] (device doubles).
int64_t column_partials(int64_t rows, int64_t cols);
void launch_column_sums(const float* x, int64_t rows, int64_t cols, double* partials, double* out, cudaStream_t s);
void launch_cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, cudaStream_t s);
// Backend::cholesky_inverse on `batch` k x k matrices (f32 or f64).
void launch_cholesky_inverse(const void* gram, void* inv, DType dtype, int64_t batch, int k, double relative_ridge,
                             cudaStream_t s);
void launch_init_normal(void* x, DType dtype, int64_t n, uint64_t seed, uint64_t stream, double std,
                        int64_t index_offset, cudaStream_t s);
// out[c * rows + r] = in[r * cols + c]
void launch_transpose(const float* in, float* out, int64_t rows, int64_t cols, cudaStream_t s);
// table in F32, or BF16 (the weights' working copy); out fp32.
void launch_embedding_forward(const int32_t* ids, const void* table, DType table_dtype, float* out, int64_t tokens,
                              int64_t vocab, int64_t dim, cudaStream_t s);
// Workspace bytes for embedding_backward (a stable radix sort of the ids).
size_t embedding_backward_workspace(int64_t tokens);
void launch_embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t tokens, int64_t vocab,
                               int64_t dim, void* workspace, size_t workspace_bytes, cudaStream_t s);
// y in y_dtype (F32, or BF16 as a GEMM operand) and w in w_dtype (F32, or BF16: the
// weights' working copy); x, the statistics and the gradients in fp32.
void launch_rmsnorm_forward(const float* x, const void* w, DType w_dtype, float eps, void* y, DType y_dtype,
                            float* rstd, int64_t rows, int64_t dim, cudaStream_t s);
void launch_rmsnorm_backward(const float* x, const void* w, DType w_dtype, const float* rstd, const float* dy,
                             float* dx, float* dw, int64_t rows, int64_t dim, double* partials, cudaStream_t s);
// out and dgate_up in F32 or BF16 (GEMM operands); gate_up and dout fp32.
void launch_swiglu_forward(const float* gate_up, void* out, DType out_dtype, int64_t rows, int64_t f,
                           cudaStream_t s);
void launch_swiglu_backward(const float* gate_up, const float* dout, void* dgate_up, DType dgate_up_dtype,
                            int64_t rows, int64_t f, cudaStream_t s);
struct AdamWArgs {
  double lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2, grad_scale;
};
void launch_adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWArgs& a, cudaStream_t s);
struct SdmoePartArgs {
  AdamWArgs adam;
  double lr_common, lr_unique, decay_shift, decay_common;
  bool sgd;
};
// Backend::sdmoe_part_step over `count` matrices of `elements` (w, g, m_c, v_c at `stride`).
void launch_sdmoe_part_step(float* w, const float* g, float* m_c, float* v_c, const float* g_common, float* m_u,
                            float* v_u, float* diff, int64_t count, int64_t elements, int64_t stride,
                            const SdmoePartArgs& a, cudaStream_t s);

// ---- attention (kernels_attention.cu) ----------------------------------------------------
// packed [B,S,parts,H,Dh] <-> heads[p] [B,H,S,Dh] for p < parts (heads[1..] may be null
// when parts == 1). to_heads: packed -> heads, else heads -> packed. Each side F32 or
// BF16; a float value written to a bf16 side is rounded to nearest even.
void launch_heads_copy(void* packed, DType packed_dtype, void* const* heads, DType heads_dtype, int parts, int64_t b,
                       int64_t s, int64_t h, int64_t dh, bool to_heads, cudaStream_t stream);
// x F32 or BF16 (q and k kept as bf16 operands), rotated in double.
void launch_rope(void* x, DType dtype, int64_t bh, int64_t s, int64_t dh, double theta, int direction,
                 cudaStream_t stream);
void launch_causal_softmax_forward(float* scores, int64_t n, int64_t s, float scale, cudaStream_t stream);
// probs F32 or BF16 (the operand the forward kept); grad fp32.
void launch_causal_softmax_backward(const void* probs, DType probs_dtype, float* grad, int64_t n, int64_t s,
                                    float scale, cudaStream_t stream);

// ---- loss (kernels_loss.cu) --------------------------------------------------------------
void launch_cross_entropy_forward(const float* logits, const int32_t* targets, float* losses, float* lse,
                                  int64_t rows, int64_t vocab, cudaStream_t s);
void launch_cross_entropy_backward(float* logits, const int32_t* targets, const float* lse, float scale,
                                   int64_t rows, int64_t vocab, cudaStream_t s);

// ---- MoE (kernels_moe.cu) ----------------------------------------------------------------
void launch_router_forward(const float* logits, bool sigmoid, bool normalize_topk, int32_t* topk_index,
                           float* topk_weight, float* aux_probs, float* lse, int64_t tokens, int64_t experts,
                           int64_t k, cudaStream_t s);
void launch_router_backward(const float* logits, bool sigmoid, bool normalize_topk, const int32_t* topk_index,
                            const float* topk_weight, const float* dtopk_weight, const float* aux_grad,
                            const float* lse, double z_grad_scale, float* dlogits, int64_t tokens, int64_t experts,
                            int64_t k, cudaStream_t s);
// A copy of rows of any 2- or 4-byte storage dtype (routed rows are bf16 operands under BF16).
void launch_gather_rows(const void* src, const int32_t* index, void* dst, DType dtype, int64_t n, int64_t src_rows,
                        int64_t dim, cudaStream_t s);
void launch_combine_rows(const float* rows, const int32_t* slot_row, const float* slot_weight, double beta,
                         float* out, int64_t tokens, int64_t k, int64_t dim, int64_t n_rows, cudaStream_t s);
void launch_combine_rows_backward(const float* dout, const float* rows, const int32_t* slot_row,
                                  const float* slot_weight, float* drows, float* dweight, int64_t tokens, int64_t k,
                                  int64_t dim, int64_t n_rows, cudaStream_t s);

}  // namespace sdmoe::cuda
