// Pre-norm causal self-attention with RoPE: out = in + proj(attn(rope(qkv(norm(in))))).
#include <cmath>

#include "model/layers.h"

namespace sdmoe {

namespace {
Param bind_param(const ParamRegistry& r, int id, const Buffer& params, const Buffer& grads, DType dtype, Device dev) {
  return Param{id, r.view(params, id, dtype, dev), r.view(grads, id, dtype, dev)};
}
}  // namespace

void Scratch::plan(Arena& arena, const ModelSpec& spec, int batch, DType dtype_) {
  const int64_t t = int64_t(batch) * spec.seq_len, d = spec.dim, h = spec.heads, s = spec.seq_len;
  const int64_t f = std::max<int64_t>(spec.ffn_dim, spec.moe.shared_expert_ffn_dim);
  d_normed = arena.take(dtype_, {t, d});
  d_x = arena.take(dtype_, {t, d});
  d_ctx = arena.take(dtype_, {t, d});
  d_ctx_heads = arena.take(dtype_, {batch, h, s, d / h});
  dq = arena.take(dtype_, {batch, h, s, d / h});
  dk = arena.take(dtype_, {batch, h, s, d / h});
  dv = arena.take(dtype_, {batch, h, s, d / h});
  d_probs = arena.take(dtype_, {batch * h, s, s});
  d_qkv = arena.take(dtype_, {t, 3 * d});
  d_hidden = arena.take(dtype_, {t, 2 * f});
  d_act = arena.take(dtype_, {t, f});
}

void Attention::declare(ParamRegistry& registry, const std::string& prefix, const ModelSpec& spec) {
  const int64_t d = spec.dim;
  norm_.id = registry.add(prefix + ".attn_norm", {d}, ParamRole::NORM, 0.0);
  qkv_.id = registry.add(prefix + ".attn.qkv", {3 * d, d}, ParamRole::DENSE, spec.init_std);
  proj_.id = registry.add(prefix + ".attn.proj", {d, d}, ParamRole::DENSE, spec.init_std / std::sqrt(2.0 * spec.layers));
  rope_theta_ = spec.rope_theta;
  eps_ = spec.norm_eps;
}

void Attention::bind(const ParamRegistry& r, const Buffer& params, const Buffer& grads, DType dtype, Device dev) {
  norm_ = bind_param(r, norm_.id, params, grads, dtype, dev);
  qkv_ = bind_param(r, qkv_.id, params, grads, dtype, dev);
  proj_ = bind_param(r, proj_.id, params, grads, dtype, dev);
}

void Attention::plan(Arena& arena, const LayerDims& dims) {
  dims_ = dims;
  const DType dt = norm_.value.dtype;
  const int64_t t = dims.tokens(), d = dims.dim, b = dims.batch, h = dims.heads, s = dims.seq, dh = dims.head_dim;
  normed_ = arena.take(dt, {t, d});
  rstd_ = arena.take(dt, {t});
  qkv_out_ = arena.take(dt, {t, 3 * d});
  q_ = arena.take(dt, {b, h, s, dh});
  k_ = arena.take(dt, {b, h, s, dh});
  v_ = arena.take(dt, {b, h, s, dh});
  probs_ = arena.take(dt, {b * h, s, s});
  ctx_heads_ = arena.take(dt, {b, h, s, dh});
  ctx_ = arena.take(dt, {t, d});
}

void Attention::forward(Backend& be, const Tensor& in, const Tensor& out) {
  const int64_t t = dims_.tokens(), d = dims_.dim, s = dims_.seq, dh = dims_.head_dim;
  const int64_t bh = dims_.batch * dims_.heads;
  be.rmsnorm_forward(in, norm_.value, eps_, normed_, rstd_);
  be.gemm(false, true, t, 3 * d, d, 1.0, normed_, qkv_.value, 0.0, qkv_out_);
  be.split_qkv(qkv_out_, q_, k_, v_);
  be.rope(q_, rope_theta_, +1);
  be.rope(k_, rope_theta_, +1);
  const GemmBatch heads{bh, s * dh, s * dh, s * s};
  be.gemm(false, true, s, s, dh, 1.0, q_, k_, 0.0, probs_, heads);  // scores = q k^T
  be.causal_softmax_forward(probs_, 1.0 / std::sqrt(double(dh)));
  be.gemm(false, false, s, dh, s, 1.0, probs_, v_, 0.0, ctx_heads_, {bh, s * s, s * dh, s * dh});
  be.merge_heads(ctx_heads_, ctx_.view({dims_.batch, s, dims_.heads, dh}));
  be.copy(in, out);
  be.gemm(false, true, t, d, d, 1.0, ctx_, proj_.value, 1.0, out);
}

void Attention::backward(Backend& be, const Tensor& in, const Tensor& dres, Scratch& sc) {
  const int64_t t = dims_.tokens(), d = dims_.dim, s = dims_.seq, dh = dims_.head_dim;
  const int64_t bh = dims_.batch * dims_.heads;
  const double scale = 1.0 / std::sqrt(double(dh));
  // out = in + ctx proj^T
  be.gemm(false, false, t, d, d, 1.0, dres, proj_.value, 0.0, sc.d_ctx);
  be.gemm(true, false, d, d, t, 1.0, dres, ctx_, 1.0, proj_.grad);
  be.split_heads(sc.d_ctx.view({dims_.batch, s, dims_.heads, dh}), sc.d_ctx_heads);
  // ctx = P v
  be.gemm(false, true, s, s, dh, 1.0, sc.d_ctx_heads, v_, 0.0, sc.d_probs, {bh, s * dh, s * dh, s * s});
  be.gemm(true, false, s, dh, s, 1.0, probs_, sc.d_ctx_heads, 0.0, sc.dv, {bh, s * s, s * dh, s * dh});
  // P = softmax(scale * q k^T)
  be.causal_softmax_backward(probs_, sc.d_probs, scale);
  be.gemm(false, false, s, dh, s, 1.0, sc.d_probs, k_, 0.0, sc.dq, {bh, s * s, s * dh, s * dh});
  be.gemm(true, false, s, dh, s, 1.0, sc.d_probs, q_, 0.0, sc.dk, {bh, s * s, s * dh, s * dh});
  be.rope(sc.dq, rope_theta_, -1);
  be.rope(sc.dk, rope_theta_, -1);
  be.join_qkv(sc.dq, sc.dk, sc.dv, sc.d_qkv);
  be.gemm(false, false, t, d, 3 * d, 1.0, sc.d_qkv, qkv_.value, 0.0, sc.d_normed);
  be.gemm(true, false, 3 * d, d, t, 1.0, sc.d_qkv, normed_, 1.0, qkv_.grad);
  be.rmsnorm_backward(in, norm_.value, rstd_, sc.d_normed, sc.d_x, norm_.grad);
  be.axpy(1.0, sc.d_x, dres);
}

}  // namespace sdmoe
