// Fused causal attention (FlashAttention-2) for the CUDA backend: the launchers behind
// Backend::attention_forward / attention_backward (core/backend.h, "fused attention").
//
// Shapes: N = batch x heads, S = sequence, Dh = head dim; every tensor row-major.
//   q, k, v, out, dout: [N, S, Dh] in one storage dtype, F32 or BF16 (bf16 as uint16_t bits)
//   lse:                [N, S] F32, the row log-sum-exp of scale * q k^T over keys j <= i
//   dq, dk, dv:         [N, S, Dh] F32, assigned (=)
// Causal: query i attends keys j <= i. Nothing [S, S] is ever stored: the forward runs a
// tile of queries against tiles of keys with an online softmax (running max and sum, the
// output rescaled as the max grows) and keeps only lse; the backward recomputes the
// probabilities tile by tile as P = exp(scale q k^T - lse), with D_i = sum_d dout out.
//
// Two implementations, chosen per call:
//  - tensor cores (BF16 storage, Dh 32, 64 or 128, every pointer 16-byte aligned):
//    mma.sync m16n8k16 bf16 x bf16 -> fp32 (sm_80 and later), K/V tiles staged in shared
//    memory with cp.async. As in FlashAttention, the probabilities P (and in the backward
//    dS) are rounded to bf16 before their products with v, dout, q or k: one bf16
//    rounding (2^-8 relative) per term of out, dq, dk and dv. lse, D and every
//    accumulation stay fp32.
//  - SIMT (every other case: F32 at any Dh, BF16 at other head dims or misaligned views),
//    fp32 CUDA-core math only (no TF32, no bf16 rounding of intermediates), the same
//    tiling; the FP32 training mode runs this one.
// Both limit Dh to kFlashMaxHeadDim.
//
// The backward is deterministic (no atomics; every output element is summed by one thread
// block in a fixed order): after a pass for D it runs one kernel per (head, key tile) for
// dk and dv, looping over the query tiles at or after it, and one kernel per (head, query
// tile) for dq, looping over the key tiles at or before it. dq's kernel recomputes P and
// dP = dout v^T, which FlashAttention-2 avoids with floating-point atomics on dq.
//
// Launchers take raw device pointers, enqueue on `stream` and never synchronise; the
// backend checks dtypes and shapes.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace sdmoe::cuda {

inline constexpr int64_t kFlashMaxHeadDim = 256;

// Whether (dtype, head_dim) has the tensor-core kernels (BF16 at 32, 64 and 128). A call
// with such a pair still runs the SIMT path when a pointer is not 16-byte aligned.
bool flash_attention_uses_tensor_cores(DType dtype, int64_t head_dim);

// out = softmax(scale q k^T, causal) v, lse its row log-sum-exp. q, k, v, out [n, s, dh]
// in `dtype` (F32 or BF16); lse [n, s] F32.
void launch_flash_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse, DType dtype,
                                    int64_t n, int64_t s, int64_t dh, float scale, cudaStream_t stream);

// Bytes of workspace the backward needs: D, one fp32 per query row ([n, s]).
size_t flash_attention_backward_workspace(int64_t n, int64_t s, int64_t dh);

// dq, dk, dv (F32, assigned) of the forward above: q, k, v, out, dout [n, s, dh] in
// `dtype`, lse [n, s] F32 from the forward. workspace: at least
// flash_attention_backward_workspace(n, s, dh) bytes of device memory, 4-byte aligned.
void launch_flash_attention_backward(const void* q, const void* k, const void* v, const void* out, const void* dout,
                                     const float* lse, DType dtype, int64_t n, int64_t s, int64_t dh, float scale,
                                     float* dq, float* dk, float* dv, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream);

}  // namespace sdmoe::cuda
