// The precision policy: the one place that turns `training.precision` into the dtype of
// each kind of tensor. Layers ask it which dtype to give a tensor and stage a GEMM operand
// through `as_operand`; they never test a dtype themselves.
//
// FP32 (and F64 in the gradient checks): every tensor in the master dtype.
// BF16 (mixed precision, as Megatron's and PyTorch AMP's bf16 mode):
//   - master dtype (fp32): parameters, gradients (accumulated over micro-batches and reduced
//     over ranks), AdamW and SD-MoE state, the residual stream, norm statistics, softmax,
//     router scores and top-k, the losses and every reduction;
//   - operand dtype (bf16): a working copy of the weights, refreshed whenever the master
//     weights change and the only copy the step reads (the norm gains and the embedding
//     rows too, widened exactly; so ZeRO-1 all-gathers this copy, and the master is read
//     whole only by checkpoints), and every GEMM operand: the activations the backward
//     keeps for its GEMMs (normalised inputs, q, k, v, attention probabilities, context,
//     SwiGLU outputs, routed rows) and the activation gradients fed to GEMMs;
//   - GEMM outputs are accumulated and written in fp32.
#pragma once
#include <string_view>

#include "core/backend.h"

namespace sdmoe {

enum class Precision : uint8_t { FP32, BF16 };

constexpr std::string_view precision_name(Precision p) { return p == Precision::BF16 ? "BF16" : "FP32"; }

struct PrecisionPolicy {
  Precision mode = Precision::FP32;
  DType master = DType::F32;   // parameters, gradients, optimizer state, reductions
  DType operand = DType::F32;  // GEMM operands: weight working copy, saved activations

  // Every tensor in `dtype` (F32 training, F64 gradient checks).
  static PrecisionPolicy uniform(DType dtype) { return {Precision::FP32, dtype, dtype}; }
  static PrecisionPolicy of(Precision p) {
    return p == Precision::BF16 ? PrecisionPolicy{Precision::BF16, DType::F32, DType::BF16} : uniform(DType::F32);
  }
  // Whether GEMM operands live in a copy of their own (a weight copy, staging casts).
  bool separate_operands() const { return operand != master; }

  // `x` (master dtype) as a GEMM operand: itself when operands are master dtype, else
  // rounded into `staging` (operand dtype, at least x's size) and returned with x's shape.
  Tensor as_operand(Backend& be, const Tensor& x, const Tensor& staging) const {
    if (x.dtype == operand) return x;
    Tensor out = staging;
    SDMOE_ASSERT(staging.dtype == operand && staging.numel() >= x.numel(), "operand staging {} too small for {}",
                 staging.shape_string(), x.shape_string());
    out.ndim = x.ndim;
    out.shape = x.shape;
    be.cast(x, out);
    return out;
  }
};

}  // namespace sdmoe
