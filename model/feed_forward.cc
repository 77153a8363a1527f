// Feed-forward sublayers: the dense SwiGLU MLP and the MoE layer (router, local token
// dispatcher, experts as one grouped GEMM, weighted combine).
#include <algorithm>
#include <cmath>

#include "model/layers.h"

namespace sdmoe {

namespace {
char* at(const Tensor& t, int64_t elements) { return static_cast<char*>(t.data) + elements * dtype_size(t.dtype); }
}  // namespace

// ---- dense SwiGLU MLP -------------------------------------------------------------------

void SwigluMlp::declare(ParamRegistry& registry, const std::string& prefix, int64_t dim, int64_t ffn, double std,
                        double out_std, TensorParallel tp) {
  dim_ = dim;
  ffn_ = ffn / tp.size();
  tp_ = tp;
  // [2, F, D] is the [2F, D] matrix of gate then up rows; a tp part keeps its hidden units'
  // rows of both, so it is itself a [gate | up] matrix.
  gate_up_.id = registry.add_part(prefix + ".gate_up", {2, ffn, dim}, 1, tp.size(), tp.rank(), ParamRole::DENSE, std, true);
  down_.id = registry.add_part(prefix + ".down", {dim, ffn}, 1, tp.size(), tp.rank(), ParamRole::DENSE, out_std, true);
}

void SwigluMlp::bind(const ParamBuffers& buffers) {
  policy_ = buffers.policy;
  gate_up_ = buffers.bind(gate_up_.id);
  down_ = buffers.bind(down_.id);
}

void SwigluMlp::plan(Arena& internal, int64_t tokens, const TpScratch& tp_scratch) {
  hidden_ = internal.take(policy_.master, {tokens, 2 * ffn_});
  act_ = internal.take(policy_.operand, {tokens, ffn_});
  tps_ = tp_scratch;
}

void SwigluMlp::recompute(Backend& be, const Tensor& h) {
  be.gemm(false, true, h.rows(), 2 * ffn_, dim_, 1.0, h, gate_up_.operand, 0.0, hidden_);
  be.swiglu_forward(hidden_, act_);
}

void SwigluMlp::forward(Backend& be, const Tensor& h, const Tensor& out) {
  const int64_t t = h.rows();
  recompute(be, h);  // hidden_ and act_
  if (!tp_.active()) {
    be.gemm(false, true, t, dim_, ffn_, 1.0, act_, down_.operand, 1.0, out);
    return;
  }
  // Row-parallel down projection: each rank's hidden units contribute a partial sum.
  const Tensor partial = tps_.partial.prefix({t, dim_});
  be.gemm(false, true, t, dim_, ffn_, 1.0, act_, down_.operand, 0.0, partial);
  if (tp_.split_sequence()) {
    const Tensor local = tps_.local.prefix({out.rows(), dim_});
    tp_.reduce_scatter_rows(partial, local);
    be.axpy(1.0, local, out);
  } else {
    tp_.sum(partial);
    be.axpy(1.0, partial, out);
  }
}

void SwigluMlp::backward(Backend& be, const Tensor& h, const Tensor& d_out, const Tensor& d_h, double beta,
                         Scratch& sc) {
  const int64_t t = h.rows();
  Tensor d_act = sc.d_act.prefix({t, ffn_}), d_hidden = sc.d_hidden.prefix({t, 2 * ffn_});
  Tensor d_out_all = d_out;
  if (tp_.split_sequence()) {
    d_out_all = tps_.gathered.prefix({t, dim_});
    tp_.gather_rows(d_out, d_out_all, be);
  }
  const Tensor d_out_operand = policy_.as_operand(be, d_out_all, sc.operand_rows);
  be.gemm(false, false, t, ffn_, dim_, 1.0, d_out_operand, down_.operand, 0.0, d_act);
  be.gemm(true, false, dim_, ffn_, t, 1.0, d_out_operand, act_, 1.0, down_.grad);
  be.swiglu_backward(hidden_, d_act, d_hidden);
  if (!tp_.active()) {
    be.gemm(false, false, t, dim_, 2 * ffn_, 1.0, d_hidden, gate_up_.operand, beta, d_h);
  } else {
    // Column-parallel gate_up: the input gradient is the sum of every rank's part.
    const Tensor partial = tps_.partial.prefix({t, dim_});
    be.gemm(false, false, t, dim_, 2 * ffn_, 1.0, d_hidden, gate_up_.operand, 0.0, partial);
    Tensor summed = partial;
    if (tp_.split_sequence()) {
      summed = tps_.local.prefix({d_h.rows(), dim_});
      tp_.reduce_scatter_rows(partial, summed);
    } else {
      tp_.sum(partial);
    }
    if (beta == 0.0) {
      be.copy(summed, d_h);
    } else {
      if (beta != 1.0) be.scale(d_h, beta);
      be.axpy(1.0, summed, d_h);
    }
  }
  be.gemm(true, false, 2 * ffn_, dim_, t, 1.0, d_hidden, h, 1.0, gate_up_.grad);
}

// ---- routing plan -----------------------------------------------------------------------

void RoutingPlan::build(const std::vector<int32_t>& topk_index, int64_t tokens, int top_k, int experts) {
  expert_offset.assign(experts + 1, 0);
  for (int32_t e : topk_index) {
    SDMOE_ASSERT(e >= 0 && e < experts, "router chose expert {}", e);
    ++expert_offset[e + 1];
  }
  for (int e = 0; e < experts; ++e) expert_offset[e + 1] += expert_offset[e];
  std::vector<int64_t> cursor(expert_offset.begin(), expert_offset.end() - 1);
  row_token.resize(tokens * top_k);
  slot_row.resize(tokens * top_k);
  // Stable: rows of one expert keep token order, so every backend sees the same layout.
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < top_k; ++j) {
      const int64_t row = cursor[topk_index[t * top_k + j]]++;
      row_token[row] = static_cast<int32_t>(t);
      slot_row[t * top_k + j] = static_cast<int32_t>(row);
    }
}

// ---- MoE --------------------------------------------------------------------------------

void MoeFeedForward::declare(ParamRegistry& registry, const std::string& prefix, const ModelSpec& spec,
                             std::shared_ptr<TokenDispatcher> dispatcher, TensorParallel tp) {
  moe_ = spec.moe;
  tp_ = tp;
  dim_ = spec.dim;
  dispatcher_ = std::move(dispatcher);
  SDMOE_ASSERT(dispatcher_ && dispatcher_->local_experts() * dispatcher_->ep_size() == moe_.num_experts,
               "MoE layer {}: the dispatcher is for another expert count", prefix);
  const int64_t e = moe_.num_experts, f = moe_.expert_ffn_dim, d = spec.dim;
  const double out_std = spec.init_std / std::sqrt(2.0 * spec.layers);
  router_.id = registry.add(prefix + ".moe.router", {e, d}, ParamRole::ROUTER, spec.init_std);
  // This rank's experts (a block of the stack over ep) and, with etp, its block of each
  // expert's hidden units: gate_up is [E, 2, Fe, D] (gate rows, then up rows), down [E, D, Fe].
  const ParamRegistry::Split over_ep{0, dispatcher_->ep_size(), dispatcher_->ep_rank()};
  const int etp = dispatcher_->etp_size(), etp_rank = dispatcher_->etp_rank();
  SDMOE_ASSERT(f % etp == 0, "MoE layer {}: expert_ffn_dim {} does not split over {} ranks", prefix, f, etp);
  expert_ffn_local_ = f / etp;
  gate_up_.id = registry.add_block(prefix + ".moe.experts.gate_up", {e, 2, f, d}, {over_ep, {2, etp, etp_rank}},
                                   ParamRole::EXPERT, spec.init_std, false);
  down_.id = registry.add_block(prefix + ".moe.experts.down", {e, d, f}, {over_ep, {2, etp, etp_rank}},
                                ParamRole::EXPERT, out_std, false);
  has_shared_ = moe_.shared_expert_ffn_dim > 0;
  if (has_shared_)
    shared_.declare(registry, prefix + ".moe.shared_expert", d, moe_.shared_expert_ffn_dim, spec.init_std, out_std, tp);
}

void MoeFeedForward::bind(const ParamBuffers& buffers) {
  policy_ = buffers.policy;
  dtype_ = policy_.master;
  router_ = buffers.bind(router_.id);
  gate_up_ = buffers.bind(gate_up_.id);
  down_ = buffers.bind(down_.id);
  if (has_shared_) shared_.bind(buffers);
}

void MoeFeedForward::plan(Arena& kept, Arena& internal, int64_t tokens, const TpScratch& tp_scratch) {
  tokens_ = tokens;
  tps_ = tp_scratch;
  SDMOE_ASSERT(tokens % tp_.size() == 0, "{} tokens do not split over {} tensor-parallel ranks", tokens, tp_.size());
  slice_tokens_ = tokens / tp_.size();
  slice_begin_ = slice_tokens_ * tp_.rank();
  const int64_t e = moe_.num_experts, k = moe_.top_k, f = expert_ffn_local_, n = tokens * k, d = dim_;
  logits_ = kept.take(dtype_, {tokens, e});
  topk_index_ = kept.take(DType::I32, {tokens, k});
  topk_weight_ = kept.take(dtype_, {tokens, k});
  aux_probs_ = kept.take(dtype_, {tokens, e});
  lse_ = kept.take(dtype_, {tokens});
  row_token_ = kept.take(DType::I32, {n});
  slot_row_ = kept.take(DType::I32, {tokens, k});
  const DType op = policy_.operand;
  routed_in_ = kept.take(op, {n, d});
  hidden_ = internal.take(dtype_, {n, 2 * f});
  act_ = internal.take(op, {n, f});
  routed_out_ = kept.take(dtype_, {n, d});
  d_routed_ = internal.take(dtype_, {n, d});
  d_hidden_ = internal.take(op, {n, 2 * f});
  d_act_ = internal.take(dtype_, {n, f});
  d_weight_ = internal.take(dtype_, {tokens, k});
  d_logits_ = internal.take(dtype_, {tokens, e});
  aux_grad_ = internal.take(dtype_, {e});
  if (policy_.separate_operands()) {
    d_routed_operand_ = internal.take(op, {n, d});
    d_logits_operand_ = internal.take(op, {tokens, e});
  }
  if (has_shared_) shared_.plan(internal, tokens, tp_scratch);
}

template <typename MakeGroup>
void MoeFeedForward::run_experts(Backend& be, bool trans_a, bool trans_b, double beta, MakeGroup&& make) {
  const std::vector<int64_t>& offset = dispatcher_->local_expert_offsets();
  std::vector<GemmGroup> groups;
  groups.reserve(dispatcher_->local_experts());
  for (int e = 0; e < dispatcher_->local_experts(); ++e) groups.push_back(make(e, offset[e], offset[e + 1] - offset[e]));
  be.grouped_gemm(trans_a, trans_b, policy_.operand, 1.0, groups, beta);
}

ExpertRows MoeFeedForward::expert_rows(Backend& be, int64_t rows) {
  const int64_t f = expert_ffn_local_, d = dim_;
  if (dispatcher_->local_only()) {
    // The sorted rows are already expert-major: work on them in place.
    const Tensor x = routed_in_.prefix({rows, d}), y = routed_out_.prefix({rows, d}), dy = d_routed_.prefix({rows, d});
    return ExpertRows{x, hidden_.prefix({rows, 2 * f}), act_.prefix({rows, f}), y, dy,
                      d_hidden_.prefix({rows, 2 * f}), d_act_.prefix({rows, f}), dy,
                      policy_.separate_operands() ? d_routed_operand_.prefix({rows, d}) : Tensor{}};
  }
  // x, y, dy/dx (shared, as in place) and hidden, act, d_hidden, d_act per row. The same
  // two passes as the activations: plan to size the buffer, then carve it.
  auto carve = [&](Arena& arena, int64_t n) {
    ExpertRows r;
    const DType op = policy_.operand;
    r.x = arena.take(op, {n, d});
    r.y = arena.take(dtype_, {n, d});
    r.dy = r.dx = arena.take(dtype_, {n, d});
    r.hidden = arena.take(dtype_, {n, 2 * f});
    r.act = arena.take(op, {n, f});
    r.d_hidden = arena.take(op, {n, 2 * f});
    r.d_act = arena.take(dtype_, {n, f});
    if (policy_.separate_operands()) r.dy_operand = arena.take(op, {n, d});
    return r;
  };
  if (rows > expert_side_rows_) {
    expert_side_rows_ = rows + rows / 4;
    Arena planner(be.device());
    carve(planner, expert_side_rows_);
    expert_side_ = Buffer(be, planner.used());
  }
  Arena arena(be.device(), expert_side_);
  ExpertRows r = carve(arena, rows);
  return r;
}

void MoeFeedForward::expert_hidden(Backend& be) {
  const int64_t f = expert_ffn_local_, d = dim_;
  run_experts(be, false, true, 0.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(rows_.x, row * d), at(gate_up_.operand, x * 2 * f * d), at(rows_.hidden, row * 2 * f), rows, 2 * f, d};
  });
  if (rows_.hidden.numel() > 0) be.swiglu_forward(rows_.hidden, rows_.act);
}

void MoeFeedForward::recompute(Backend& be, const Tensor& h) {
  // The routed rows this rank's experts received are kept (rows_.x), so no exchange.
  expert_hidden(be);
  if (has_shared_) shared_.recompute(be, h);
}

MoeStats MoeFeedForward::forward(Backend& be, const Tensor& h, const Tensor& out) {
  const int64_t t = tokens_, e = moe_.num_experts, k = moe_.top_k, f = expert_ffn_local_, d = dim_;
  // Route.
  be.gemm(false, true, t, e, d, 1.0, h, router_.operand, 0.0, logits_);
  be.router_forward(logits_, moe_.router_score, moe_.normalize_topk, topk_index_, topk_weight_, aux_probs_, lse_);
  std::vector<int32_t> topk(t * k);
  be.copy_to_host(topk_index_, topk.data());
  // This rank's tokens (all of them without tensor parallelism).
  const int64_t ts = slice_tokens_, t0 = slice_begin_, n = ts * k;
  plan_.build(std::vector<int32_t>(topk.begin() + t0 * k, topk.begin() + (t0 + ts) * k), ts, static_cast<int>(k),
              static_cast<int>(e));
  const Tensor row_token = row_token_.prefix({n}), slot_row = slot_row_.prefix({ts, k});
  be.copy_from_host(plan_.row_token.data(), row_token);
  be.copy_from_host(plan_.slot_row.data(), slot_row);
  // Permute tokens by expert, send each row to its expert's rank, run the local experts
  // as one grouped GEMM, send the results back, combine with the router weights.
  be.gather_rows(h.slice_rows(t0, ts), row_token, routed_in_.prefix({n, d}));
  std::vector<int64_t> rows_per_expert(e);
  for (int x = 0; x < e; ++x) rows_per_expert[x] = plan_.expert_offset[x + 1] - plan_.expert_offset[x];
  dispatcher_->exchange_counts(rows_per_expert);
  rows_ = expert_rows(be, dispatcher_->received_rows());
  dispatcher_->dispatch(routed_in_, rows_.x);
  expert_hidden(be);
  run_experts(be, false, true, 0.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(rows_.act, row * f), at(down_.operand, x * d * f), at(rows_.y, row * d), rows, d, f};
  });
  dispatcher_->combine(rows_.y, routed_out_);
  const Tensor weight_slice = topk_weight_.slice_rows(t0, ts);
  if (!tp_.active() || tp_.split_sequence()) {
    // out holds exactly this rank's tokens (all of them without tp).
    be.combine_rows(routed_out_, slot_row, &weight_slice, 1.0, out);
  } else {
    const Tensor slice = tps_.partial.slice_rows(t0, ts);
    be.combine_rows(routed_out_, slot_row, &weight_slice, 0.0, slice);
    tp_.group->all_gather(slice, tps_.partial);
    be.axpy(1.0, tps_.partial, out);
  }
  if (has_shared_) shared_.forward(be, h, out);

  // Load-balancing loss E * sum_e f_e P_e (f_e: share of routed rows, P_e: mean
  // probability) and z-loss mean(lse^2), both over this micro-batch's tokens.
  MoeStats stats;
  std::vector<double> prob_sum = be.column_sums(aux_probs_);
  expert_load_.assign(e, 0.0);
  stats.min_load = 1.0;
  std::vector<int64_t> rows_of(e, 0);  // over all T tokens, not only this rank's slice
  for (int32_t x : topk) ++rows_of[x];
  for (int x = 0; x < e; ++x) {
    expert_load_[x] = double(rows_of[x]) / double(t * k);
    stats.aux_loss += expert_load_[x] * prob_sum[x] / double(t);
    stats.min_load = std::min(stats.min_load, expert_load_[x]);
    stats.max_load = std::max(stats.max_load, expert_load_[x]);
  }
  stats.load = expert_load_;
  stats.aux_loss *= moe_.aux_loss_coef * double(e);
  stats.z_loss = moe_.z_loss_coef * be.sum_squares(lse_) / double(t);
  return stats;
}

void MoeFeedForward::backward(Backend& be, const Tensor& h, const Tensor& d_out, const Tensor& d_h, double loss_scale,
                              Scratch& sc) {
  const int64_t t = tokens_, e = moe_.num_experts, f = expert_ffn_local_, d = dim_;
  const int64_t ts = slice_tokens_, t0 = slice_begin_, k = moe_.top_k;
  const Tensor slot_row = slot_row_.prefix({ts, k}), d_weight_slice = d_weight_.slice_rows(t0, ts);
  // d_out: this rank's rows already with sequence parallelism, else all T.
  const Tensor d_out_mine = tp_.split_sequence() ? d_out : d_out.slice_rows(t0, ts);
  be.combine_rows_backward(d_out_mine, routed_out_, slot_row, topk_weight_.slice_rows(t0, ts), d_routed_,
                           d_weight_slice);
  dispatcher_->dispatch(d_routed_, rows_.dy);
  const Tensor dy = policy_.as_operand(be, rows_.dy, rows_.dy_operand);
  run_experts(be, false, false, 0.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(dy, row * d), at(down_.operand, x * d * f), at(rows_.d_act, row * f), rows, f, d};
  });
  run_experts(be, true, false, 1.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(dy, row * d), at(rows_.act, row * f), at(down_.grad, x * d * f), d, f, rows};
  });
  if (rows_.hidden.numel() > 0) be.swiglu_backward(rows_.hidden, rows_.d_act, rows_.d_hidden);
  run_experts(be, false, false, 0.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(rows_.d_hidden, row * 2 * f), at(gate_up_.operand, x * 2 * f * d), at(rows_.dx, row * d), rows, d, 2 * f};
  });
  run_experts(be, true, false, 1.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(rows_.d_hidden, row * 2 * f), at(rows_.x, row * d), at(gate_up_.grad, x * 2 * f * d), 2 * f, d, rows};
  });
  dispatcher_->combine(rows_.dx, d_routed_);
  // Un-permute: each token sums the input gradients of its K rows. With tensor
  // parallelism every rank then gathers the other slices' gradients and top-k weight
  // gradients, so that the router's backward sees the whole micro-batch.
  if (!tp_.active() || tp_.split_sequence()) {
    be.combine_rows(d_routed_, slot_row, nullptr, 0.0, d_h);
  } else {
    const Tensor slice = tps_.partial.slice_rows(t0, ts);
    be.combine_rows(d_routed_, slot_row, nullptr, 0.0, slice);
    tp_.group->all_gather(slice, tps_.partial);
    be.copy(tps_.partial, d_h);
    tp_.group->all_gather(d_weight_slice, d_weight_);
  }

  // Router: top-k weights, load-balancing and z-loss gradients.
  std::vector<double> aux_grad(e);
  for (int x = 0; x < e; ++x) aux_grad[x] = moe_.aux_loss_coef * double(e) * expert_load_[x] / double(t) * loss_scale;
  Tensor aux_host_view = aux_grad_;
  if (dtype_ == DType::F32) {
    std::vector<float> g(aux_grad.begin(), aux_grad.end());
    be.copy_from_host(g.data(), aux_host_view);
  } else {
    be.copy_from_host(aux_grad.data(), aux_host_view);
  }
  const double z_grad_scale = moe_.z_loss_coef * 2.0 / double(t) * loss_scale;
  if (tp_.split_sequence()) {
    // This rank's tokens only: its rows of d_h and a partial sum of the router's gradient
    // (completed over tp with the other replicated gradients). The auxiliary gradient and
    // the z-loss scale are the whole micro-batch's.
    const Tensor d_logits = d_logits_.slice_rows(t0, ts);
    be.router_backward(logits_.slice_rows(t0, ts), moe_.router_score, moe_.normalize_topk,
                       topk_index_.slice_rows(t0, ts), topk_weight_.slice_rows(t0, ts), d_weight_slice, aux_grad_,
                       lse_.slice_rows(t0, ts), z_grad_scale, d_logits);
    const Tensor d_logits_operand = policy_.as_operand(be, d_logits, d_logits_operand_);
    be.gemm(false, false, ts, d, e, 1.0, d_logits_operand, router_.operand, 1.0, d_h);
    be.gemm(true, false, e, d, ts, 1.0, d_logits_operand, h.slice_rows(t0, ts), 1.0, router_.grad);
  } else {
    be.router_backward(logits_, moe_.router_score, moe_.normalize_topk, topk_index_, topk_weight_, d_weight_,
                       aux_grad_, lse_, z_grad_scale, d_logits_);
    const Tensor d_logits_operand = policy_.as_operand(be, d_logits_, d_logits_operand_);
    be.gemm(false, false, t, d, e, 1.0, d_logits_operand, router_.operand, 1.0, d_h);
    be.gemm(true, false, e, d, t, 1.0, d_logits_operand, h, 1.0, router_.grad);
  }
  if (has_shared_) shared_.backward(be, h, d_out, d_h, 1.0, sc);
}

}  // namespace sdmoe
