// Pre-norm causal self-attention with RoPE: out = in + proj(attn(rope(qkv(norm(in))))).
#include <cmath>

#include "model/layers.h"

namespace sdmoe {

void Scratch::plan(Arena& arena, const ModelSpec& spec, int batch, const PrecisionPolicy& policy,
                   bool fused_attention) {
  const int64_t t = int64_t(batch) * spec.seq_len, d = spec.dim, h = spec.heads, s = spec.seq_len;
  const int64_t f = std::max<int64_t>(spec.ffn_dim, spec.moe.shared_expert_ffn_dim);
  const DType master = policy.master, operand = policy.operand;
  qkv = arena.take(master, {t, 3 * d});
  ctx_heads = arena.take(master, {batch, h, s, d / h});
  d_normed = arena.take(master, {t, d});
  d_x = arena.take(master, {t, d});
  d_ctx = arena.take(master, {t, d});
  d_ctx_heads = arena.take(operand, {batch, h, s, d / h});
  dq = arena.take(master, {batch, h, s, d / h});
  dk = arena.take(master, {batch, h, s, d / h});
  dv = arena.take(master, {batch, h, s, d / h});
  if (!fused_attention) d_probs = arena.take(master, {batch * h, s, s});
  d_qkv = arena.take(operand, {t, 3 * d});
  d_hidden = arena.take(operand, {t, 2 * f});
  d_act = arena.take(master, {t, f});
  if (policy.separate_operands()) {
    operand_rows = arena.take(operand, {t, d});
    if (!fused_attention) {
      scores = arena.take(master, {batch * h, s, s});
      operand_scores = arena.take(operand, {batch * h, s, s});
    }
  }
}

void Attention::declare(ParamRegistry& registry, const std::string& prefix, const ModelSpec& spec, TensorParallel tp,
                        bool fused) {
  const int64_t d = spec.dim;
  tp_ = tp;
  fused_ = fused;
  norm_.id = registry.add(prefix + ".attn_norm", {d}, ParamRole::NORM, 0.0);
  // [3, D, D] is the [3D, D] matrix of q, k and v rows; a tp part keeps its heads' rows of
  // each, so the part is itself a [q | k | v] matrix for those heads.
  qkv_.id = registry.add_part(prefix + ".attn.qkv", {3, d, d}, 1, tp.size(), tp.rank(), ParamRole::DENSE,
                              spec.init_std, true);
  proj_.id = registry.add_part(prefix + ".attn.proj", {d, d}, 1, tp.size(), tp.rank(), ParamRole::DENSE,
                               spec.init_std / std::sqrt(2.0 * spec.layers), true);
  rope_theta_ = spec.rope_theta;
  eps_ = spec.norm_eps;
}

void Attention::bind(const ParamBuffers& buffers) {
  policy_ = buffers.policy;
  norm_ = buffers.bind(norm_.id);
  qkv_ = buffers.bind(qkv_.id);
  proj_ = buffers.bind(proj_.id);
}

void Attention::configure(const LayerDims& dims, const TpScratch& tp_scratch) {
  dims_ = dims;
  dims_.heads = dims.heads / tp_.size();
  tps_ = tp_scratch;
}

Attention::Activations Attention::plan_activations(Arena& kept, Arena& internal) const {
  const DType op = policy_.operand;
  const int64_t t = dims_.tokens(), d = dims_.dim, b = dims_.batch, h = dims_.heads, s = dims_.seq, dh = dims_.head_dim;
  Activations a;
  a.normed = kept.take(op, {t, d});
  a.rstd = kept.take(policy_.master, {tp_.split_sequence() ? t / tp_.size() : t});
  a.q = internal.take(op, {b, h, s, dh});
  a.k = internal.take(op, {b, h, s, dh});
  a.v = internal.take(op, {b, h, s, dh});
  if (fused_) a.lse = internal.take(policy_.master, {b * h, s});
  else a.probs = internal.take(op, {b * h, s, s});
  a.ctx = internal.take(op, {t, h * dh});
  return a;
}

void Attention::recompute(Backend& be, Activations& a, Scratch& sc) {
  const int64_t t = dims_.tokens(), d = dims_.dim, s = dims_.seq, dh = dims_.head_dim;
  const int64_t bh = dims_.batch * dims_.heads, dl = dims_.heads * dh;  // dl: this rank's heads' width
  const Tensor qkv_out = sc.qkv.prefix({t, 3 * dl});
  be.gemm(false, true, t, 3 * dl, d, 1.0, a.normed, qkv_.operand, 0.0, qkv_out);
  be.split_qkv(qkv_out, a.q, a.k, a.v);
  be.rope(a.q, rope_theta_, +1);
  be.rope(a.k, rope_theta_, +1);
  const Tensor ctx_heads = sc.ctx_heads.prefix({dims_.batch, dims_.heads, s, dh});
  const double scale = 1.0 / std::sqrt(double(dh));
  if (fused_) {
    // The kernel writes its output in q's dtype (the operand dtype): into the operand-dtype
    // heads scratch, which the forward does not otherwise use.
    const Tensor out_heads = sc.d_ctx_heads.prefix({dims_.batch, dims_.heads, s, dh});
    be.attention_forward(a.q.view({bh, s, dh}), a.k.view({bh, s, dh}), a.v.view({bh, s, dh}), scale,
                         out_heads.view({bh, s, dh}), a.lse);
    be.merge_heads(out_heads, a.ctx.view({dims_.batch, s, dims_.heads, dh}));
    return;
  }
  // The softmax runs in master dtype: in place on the kept probabilities, or (with separate
  // operands) on fp32 scores that are then rounded into them.
  const Tensor scores = policy_.separate_operands() ? sc.scores.prefix({bh, s, s}) : a.probs;
  const GemmBatch heads{bh, s * dh, s * dh, s * s};
  be.gemm(false, true, s, s, dh, 1.0, a.q, a.k, 0.0, scores, heads);  // scores = q k^T
  be.causal_softmax_forward(scores, scale);
  if (scores.data != a.probs.data) be.cast(scores, a.probs);
  be.gemm(false, false, s, dh, s, 1.0, a.probs, a.v, 0.0, ctx_heads, {bh, s * s, s * dh, s * dh});
  be.merge_heads(ctx_heads, a.ctx.view({dims_.batch, s, dims_.heads, dh}));
}

void Attention::forward(Backend& be, Activations& a, const Tensor& in, const Tensor& out, Scratch& sc) {
  const int64_t t = dims_.tokens(), d = dims_.dim, s = dims_.seq, dh = dims_.head_dim;
  const int64_t bh = dims_.batch * dims_.heads, dl = dims_.heads * dh;  // dl: this rank's heads' width
  if (tp_.split_sequence()) {
    // in: this rank's rows. Normalise them, then gather every rank's.
    const Tensor mine = a.normed.slice_rows(int64_t(tp_.rank()) * in.rows(), in.rows());
    be.rmsnorm_forward(in, norm_.operand, eps_, mine, a.rstd);
    tp_.gather_rows(mine, a.normed, be);
  } else {
    be.rmsnorm_forward(in, norm_.operand, eps_, a.normed, a.rstd);
  }
  recompute(be, a, sc);  // q, k, v, probabilities and context from the normalised input
  be.copy(in, out);
  if (!tp_.active()) {
    be.gemm(false, true, t, d, dl, 1.0, a.ctx, proj_.operand, 1.0, out);
    return;
  }
  // Row-parallel projection: each rank's heads contribute a partial sum.
  be.gemm(false, true, t, d, dl, 1.0, a.ctx, proj_.operand, 0.0, tps_.partial);
  if (tp_.split_sequence()) {
    const Tensor local = tps_.local.prefix({out.rows(), d});
    tp_.reduce_scatter_rows(tps_.partial, local);
    be.axpy(1.0, local, out);
  } else {
    tp_.sum(tps_.partial);
    be.axpy(1.0, tps_.partial, out);
  }
}

void Attention::backward(Backend& be, Activations& a, const Tensor& in, const Tensor& dres, Scratch& sc) {
  const int64_t t = dims_.tokens(), d = dims_.dim, s = dims_.seq, dh = dims_.head_dim, h = dims_.heads;
  const int64_t bh = dims_.batch * h, dl = h * dh;
  const double scale = 1.0 / std::sqrt(double(dh));
  const Tensor d_ctx = sc.d_ctx.prefix({t, dl}), d_ctx_heads = sc.d_ctx_heads.prefix({dims_.batch, h, s, dh});
  const Tensor dq = sc.dq.prefix({dims_.batch, h, s, dh}), dk = sc.dk.prefix({dims_.batch, h, s, dh}),
               dv = sc.dv.prefix({dims_.batch, h, s, dh}), d_qkv = sc.d_qkv.prefix({t, 3 * dl});
  // out = in + ctx proj^T; with sequence parallelism dres holds this rank's rows only.
  Tensor dres_all = dres;
  if (tp_.split_sequence()) {
    dres_all = tps_.gathered;
    tp_.gather_rows(dres, dres_all, be);
  }
  const Tensor dres_operand = policy_.as_operand(be, dres_all, sc.operand_rows);
  be.gemm(false, false, t, dl, d, 1.0, dres_operand, proj_.operand, 0.0, d_ctx);
  be.gemm(true, false, d, dl, t, 1.0, dres_operand, a.ctx, 1.0, proj_.grad);
  be.split_heads(d_ctx.view({dims_.batch, s, h, dh}), d_ctx_heads);
  if (fused_) {
    // The kernel needs the output per head: the kept context, split back into heads.
    const Tensor out_heads = sc.ctx_heads.prefix({dims_.batch, h, s, dh});
    be.split_heads(a.ctx.view({dims_.batch, s, h, dh}), out_heads);
    auto heads = [&](const Tensor& x) { return x.view({bh, s, dh}); };
    be.attention_backward(heads(a.q), heads(a.k), heads(a.v), heads(out_heads), heads(d_ctx_heads), a.lse, scale, heads(dq),
                          heads(dk), heads(dv));
  } else {
    const Tensor d_probs = sc.d_probs.prefix({bh, s, s});
    // ctx = P v
    be.gemm(false, true, s, s, dh, 1.0, d_ctx_heads, a.v, 0.0, d_probs, {bh, s * dh, s * dh, s * s});
    be.gemm(true, false, s, dh, s, 1.0, a.probs, d_ctx_heads, 0.0, dv, {bh, s * s, s * dh, s * dh});
    // P = softmax(scale * q k^T)
    be.causal_softmax_backward(a.probs, d_probs, scale);
    const Tensor d_scores = policy_.as_operand(be, d_probs, sc.operand_scores);
    be.gemm(false, false, s, dh, s, 1.0, d_scores, a.k, 0.0, dq, {bh, s * s, s * dh, s * dh});
    be.gemm(true, false, s, dh, s, 1.0, d_scores, a.q, 0.0, dk, {bh, s * s, s * dh, s * dh});
  }
  be.rope(dq, rope_theta_, -1);
  be.rope(dk, rope_theta_, -1);
  be.join_qkv(dq, dk, dv, d_qkv);
  // Column-parallel qkv: the input gradient is the sum of every rank's heads' parts.
  be.gemm(false, false, t, d, 3 * dl, 1.0, d_qkv, qkv_.operand, 0.0, sc.d_normed);
  be.gemm(true, false, 3 * dl, d, t, 1.0, d_qkv, a.normed, 1.0, qkv_.grad);
  Tensor d_normed = sc.d_normed;
  if (tp_.split_sequence()) {
    // This rank's rows of the summed gradient; its norm gain's gradient is then a partial
    // sum over tokens, completed over tp with the other replicated gradients.
    d_normed = tps_.local.prefix({in.rows(), d});
    tp_.reduce_scatter_rows(sc.d_normed, d_normed);
  } else {
    tp_.sum(sc.d_normed);
  }
  const Tensor d_x = sc.d_x.prefix({in.rows(), d});
  be.rmsnorm_backward(in, norm_.operand, a.rstd, d_normed, d_x, norm_.grad);
  be.axpy(1.0, d_x, dres);
}

}  // namespace sdmoe
