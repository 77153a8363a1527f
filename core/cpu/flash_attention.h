// Fused causal attention for the CPU backend, FlashAttention-2 style: the forward never
// materialises the [S, S] scores, it runs tiles of queries against tiles of keys with an
// online softmax and keeps only the row log-sum-exp; the backward recomputes the
// probabilities tile by tile from it. Memory is O(S): out, lse and D ([N, S]) plus a
// per-thread scratch of a few tiles and one [S, Dh] buffer, where the unfused path keeps
// [N, S, S] probabilities and their gradient.
//
// Shapes: N = batch x heads, S = sequence, Dh = head dim; every tensor row-major.
//   q, k, v, out, dout, dq, dk, dv: [N, S, Dh]    lse: [N, S]
// Activation gradients are assigned (=), as everywhere in the backward.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/tensor.h"

namespace sdmoe::cpu {

// q, k, v, out: [N, S, Dh] row-major, one storage dtype among F64, F32, BF16.
// lse: [N, S], F64 when q is F64, else F32: the row log-sum-exp of scale * q k^T over keys
// j <= i. Causal: query i attends keys j <= i. Computes in double for F64 inputs, in fp32
// otherwise (bf16 widened). Never materialises an S x S matrix: tiles of Br queries against
// tiles of Bc keys with an online softmax (running max and sum), the output rescaled as the
// max grows.
void flash_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& out,
                             const Tensor& lse);

// The backward from the saved lse: probabilities recomputed tile by tile,
// P = exp(scale q k^T - lse). out and dout: [N, S, Dh], any of the three storage dtypes
// (out may be bf16 while dout is fp32); dq, dk, dv: [N, S, Dh] assigned, F64 when q is
// F64, else F32.
//   D_i = sum_d dout[i,d] out[i,d];  dS = P * (dP - D_i) with dP = dout v^T;
//   dq = scale dS k,  dk = scale dS^T q,  dv = P^T dout.
// Deterministic whatever the thread count, without atomics: one pass parallel over
// (n, key tile) items; an item owns its dk and dv rows, and its dq terms are added into
// dq in item order (omp ordered), so every element sums its terms in a fixed order.
void flash_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
                              const Tensor& lse, double scale, const Tensor& dq, const Tensor& dk, const Tensor& dv);

// Query and key tile size (Br = Bc): a 64 x 64 fp32 score tile is 16 KiB, and an item's
// tiles (two score tiles, seven [64, Dh] operand tiles) stay in L2 at Dh = 128.
inline constexpr int64_t kFlashTile = 64;

// Bytes of scratch each thread allocates (the larger, the backward's), for q's dtype:
// (2 T^2 + 7 T Dh + 3 T + S Dh) elements of the compute dtype plus 64 for alignment,
// T = kFlashTile. The S Dh term holds an item's dq terms; nothing grows as S^2. The
// functions allocate exactly this (the same layout code sizes and carves it); besides
// it the backward keeps D, [N, S] in the compute dtype.
size_t flash_attention_scratch_bytes(DType q_dtype, int64_t seq, int64_t head_dim);

}  // namespace sdmoe::cpu
