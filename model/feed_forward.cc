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

SwigluMlp::Activations SwigluMlp::plan_activations(Arena& internal, int64_t tokens) const {
  return Activations{internal.take(policy_.master, {tokens, 2 * ffn_}), internal.take(policy_.operand, {tokens, ffn_})};
}

void SwigluMlp::recompute(Backend& be, Activations& a, const Tensor& h) {
  be.gemm(false, true, h.rows(), 2 * ffn_, dim_, 1.0, h, gate_up_.operand, 0.0, a.hidden);
  be.swiglu_forward(a.hidden, a.act);
}

void SwigluMlp::forward(Backend& be, Activations& a, const Tensor& h, const Tensor& out) {
  const int64_t t = h.rows();
  recompute(be, a, h);  // hidden and act
  if (!tp_.active()) {
    be.gemm(false, true, t, dim_, ffn_, 1.0, a.act, down_.operand, 1.0, out);
    return;
  }
  // Row-parallel down projection: each rank's hidden units contribute a partial sum.
  const Tensor partial = tps_.partial.prefix({t, dim_});
  be.gemm(false, true, t, dim_, ffn_, 1.0, a.act, down_.operand, 0.0, partial);
  if (tp_.split_sequence()) {
    const Tensor local = tps_.local.prefix({out.rows(), dim_});
    tp_.reduce_scatter_rows(partial, local);
    be.axpy(1.0, local, out);
  } else {
    tp_.sum(partial);
    be.axpy(1.0, partial, out);
  }
}

void SwigluMlp::backward(Backend& be, Activations& a, const Tensor& h, const Tensor& d_out, const Tensor& d_h,
                         double beta, Scratch& sc) {
  const int64_t t = h.rows();
  Tensor d_act = sc.d_act.prefix({t, ffn_}), d_hidden = sc.d_hidden.prefix({t, 2 * ffn_});
  Tensor d_out_all = d_out;
  if (tp_.split_sequence()) {
    d_out_all = tps_.gathered.prefix({t, dim_});
    tp_.gather_rows(d_out, d_out_all, be);
  }
  const Tensor d_out_operand = policy_.as_operand(be, d_out_all, sc.operand_rows);
  be.gemm(false, false, t, ffn_, dim_, 1.0, d_out_operand, down_.operand, 0.0, d_act);
  be.gemm(true, false, dim_, ffn_, t, 1.0, d_out_operand, a.act, 1.0, down_.grad);
  be.swiglu_backward(a.hidden, d_act, d_hidden);
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

void MoeFeedForward::configure(int64_t tokens, const TpScratch& tp_scratch) {
  tokens_ = tokens;
  tps_ = tp_scratch;
  SDMOE_ASSERT(tokens % tp_.size() == 0, "{} tokens do not split over {} tensor-parallel ranks", tokens, tp_.size());
  slice_tokens_ = tokens / tp_.size();
  slice_begin_ = slice_tokens_ * tp_.rank();
  if (has_shared_) shared_.configure(tp_scratch);
}

MoeFeedForward::Activations MoeFeedForward::plan_activations(Arena& kept, Arena& internal) const {
  const int64_t tokens = tokens_, e = moe_.num_experts, k = moe_.top_k, f = expert_ffn_local_, n = tokens * k, d = dim_;
  Activations a;
  a.logits = kept.take(dtype_, {tokens, e});
  a.topk_index = kept.take(DType::I32, {tokens, k});
  a.topk_weight = kept.take(dtype_, {tokens, k});
  a.aux_probs = kept.take(dtype_, {tokens, e});
  a.lse = kept.take(dtype_, {tokens});
  a.row_token = kept.take(DType::I32, {n});
  a.slot_row = kept.take(DType::I32, {tokens, k});
  const DType op = policy_.operand;
  a.routed_in = kept.take(op, {n, d});
  a.hidden = internal.take(dtype_, {n, 2 * f});
  a.act = internal.take(op, {n, f});
  a.routed_out = kept.take(dtype_, {n, d});
  a.d_routed = internal.take(dtype_, {n, d});
  a.d_hidden = internal.take(op, {n, 2 * f});
  a.d_act = internal.take(dtype_, {n, f});
  a.d_weight = internal.take(dtype_, {tokens, k});
  a.d_logits = internal.take(dtype_, {tokens, e});
  a.aux_grad = internal.take(dtype_, {e});
  if (policy_.separate_operands()) {
    a.d_routed_operand = internal.take(op, {n, d});
    a.d_logits_operand = internal.take(op, {tokens, e});
  }
  if (has_shared_) a.shared = shared_.plan_activations(internal, tokens);
  return a;
}

template <typename MakeGroup>
void MoeFeedForward::run_experts(Backend& be, const Activations& a, bool trans_a, bool trans_b, double beta,
                                 MakeGroup&& make) {
  const std::vector<int64_t>& offset = a.routing.local_expert_offsets();
  std::vector<GemmGroup> groups;
  groups.reserve(dispatcher_->local_experts());
  for (int e = 0; e < dispatcher_->local_experts(); ++e) groups.push_back(make(e, offset[e], offset[e + 1] - offset[e]));
  be.grouped_gemm(trans_a, trans_b, policy_.operand, 1.0, groups, beta);
}

ExpertRows MoeFeedForward::expert_rows(Backend& be, Activations& a, int64_t rows) {
  const int64_t f = expert_ffn_local_, d = dim_;
  if (dispatcher_->local_only()) {
    // The sorted rows are already expert-major: work on them in place.
    const Tensor x = a.routed_in.prefix({rows, d}), y = a.routed_out.prefix({rows, d}), dy = a.d_routed.prefix({rows, d});
    return ExpertRows{x, a.hidden.prefix({rows, 2 * f}), a.act.prefix({rows, f}), y, dy,
                      a.d_hidden.prefix({rows, 2 * f}), a.d_act.prefix({rows, f}), dy,
                      policy_.separate_operands() ? a.d_routed_operand.prefix({rows, d}) : Tensor{}};
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
  if (rows > a.expert_side_rows) {
    a.expert_side_rows = rows + rows / 4;
    Arena planner(be.device());
    carve(planner, a.expert_side_rows);
    a.expert_side = Buffer(be, planner.used());
  }
  Arena arena(be.device(), a.expert_side);
  ExpertRows r = carve(arena, rows);
  return r;
}

void MoeFeedForward::expert_hidden(Backend& be, Activations& a) {
  const int64_t f = expert_ffn_local_, d = dim_;
  run_experts(be, a, false, true, 0.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(a.rows.x, row * d), at(gate_up_.operand, x * 2 * f * d), at(a.rows.hidden, row * 2 * f), rows, 2 * f, d};
  });
  if (a.rows.hidden.numel() > 0) be.swiglu_forward(a.rows.hidden, a.rows.act);
}

void MoeFeedForward::recompute(Backend& be, Activations& a, const Tensor& h) {
  // The routed rows this rank's experts received are kept (a.rows.x), so no exchange.
  expert_hidden(be, a);
  if (has_shared_) shared_.recompute(be, a.shared, h);
}

MoeStats MoeFeedForward::forward(Backend& be, Activations& a, const Tensor& h, const Tensor& out) {
  const int64_t t = tokens_, e = moe_.num_experts, k = moe_.top_k, f = expert_ffn_local_, d = dim_;
  // Route.
  be.gemm(false, true, t, e, d, 1.0, h, router_.operand, 0.0, a.logits);
  be.router_forward(a.logits, moe_.router_score, moe_.normalize_topk, a.topk_index, a.topk_weight, a.aux_probs, a.lse);
  std::vector<int32_t> topk(t * k);
  be.copy_to_host(a.topk_index, topk.data());
  // This rank's tokens (all of them without tensor parallelism).
  const int64_t ts = slice_tokens_, t0 = slice_begin_, n = ts * k;
  a.plan.build(std::vector<int32_t>(topk.begin() + t0 * k, topk.begin() + (t0 + ts) * k), ts, static_cast<int>(k),
              static_cast<int>(e));
  const Tensor row_token = a.row_token.prefix({n}), slot_row = a.slot_row.prefix({ts, k});
  be.copy_from_host(a.plan.row_token.data(), row_token);
  be.copy_from_host(a.plan.slot_row.data(), slot_row);
  // Permute tokens by expert, send each row to its expert's rank, run the local experts
  // as one grouped GEMM, send the results back, combine with the router weights.
  be.gather_rows(h.slice_rows(t0, ts), row_token, a.routed_in.prefix({n, d}));
  std::vector<int64_t> rows_per_expert(e);
  for (int x = 0; x < e; ++x) rows_per_expert[x] = a.plan.expert_offset[x + 1] - a.plan.expert_offset[x];
  dispatcher_->exchange_counts(a.routing, rows_per_expert);
  a.rows = expert_rows(be, a, a.routing.received_rows());
  dispatcher_->dispatch(a.routing, a.routed_in, a.rows.x);
  expert_hidden(be, a);
  run_experts(be, a, false, true, 0.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(a.rows.act, row * f), at(down_.operand, x * d * f), at(a.rows.y, row * d), rows, d, f};
  });
  dispatcher_->combine(a.routing, a.rows.y, a.routed_out);
  const Tensor weight_slice = a.topk_weight.slice_rows(t0, ts);
  if (!tp_.active() || tp_.split_sequence()) {
    // out holds exactly this rank's tokens (all of them without tp).
    be.combine_rows(a.routed_out, slot_row, &weight_slice, 1.0, out);
  } else {
    const Tensor slice = tps_.partial.slice_rows(t0, ts);
    be.combine_rows(a.routed_out, slot_row, &weight_slice, 0.0, slice);
    tp_.group->all_gather(slice, tps_.partial);
    be.axpy(1.0, tps_.partial, out);
  }
  if (has_shared_) shared_.forward(be, a.shared, h, out);

  // Load-balancing loss E * sum_e f_e P_e (f_e: share of routed rows, P_e: mean
  // probability) and z-loss mean(lse^2), both over this micro-batch's tokens.
  MoeStats stats;
  std::vector<double> prob_sum = be.column_sums(a.aux_probs);
  a.expert_load.assign(e, 0.0);
  stats.min_load = 1.0;
  std::vector<int64_t> rows_of(e, 0);  // over all T tokens, not only this rank's slice
  for (int32_t x : topk) ++rows_of[x];
  for (int x = 0; x < e; ++x) {
    a.expert_load[x] = double(rows_of[x]) / double(t * k);
    stats.aux_loss += a.expert_load[x] * prob_sum[x] / double(t);
    stats.min_load = std::min(stats.min_load, a.expert_load[x]);
    stats.max_load = std::max(stats.max_load, a.expert_load[x]);
  }
  stats.load = a.expert_load;
  stats.aux_loss *= moe_.aux_loss_coef * double(e);
  stats.z_loss = moe_.z_loss_coef * be.sum_squares(a.lse) / double(t);
  return stats;
}

void MoeFeedForward::backward(Backend& be, Activations& a, const Tensor& h, const Tensor& d_out, const Tensor& d_h,
                              double loss_scale, Scratch& sc) {
  const int64_t t = tokens_, e = moe_.num_experts, f = expert_ffn_local_, d = dim_;
  const int64_t ts = slice_tokens_, t0 = slice_begin_, k = moe_.top_k;
  const Tensor slot_row = a.slot_row.prefix({ts, k}), d_weight_slice = a.d_weight.slice_rows(t0, ts);
  // d_out: this rank's rows already with sequence parallelism, else all T.
  const Tensor d_out_mine = tp_.split_sequence() ? d_out : d_out.slice_rows(t0, ts);
  be.combine_rows_backward(d_out_mine, a.routed_out, slot_row, a.topk_weight.slice_rows(t0, ts), a.d_routed,
                           d_weight_slice);
  dispatcher_->dispatch(a.routing, a.d_routed, a.rows.dy);
  const Tensor dy = policy_.as_operand(be, a.rows.dy, a.rows.dy_operand);
  run_experts(be, a, false, false, 0.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(dy, row * d), at(down_.operand, x * d * f), at(a.rows.d_act, row * f), rows, f, d};
  });
  run_experts(be, a, true, false, 1.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(dy, row * d), at(a.rows.act, row * f), at(down_.grad, x * d * f), d, f, rows};
  });
  if (a.rows.hidden.numel() > 0) be.swiglu_backward(a.rows.hidden, a.rows.d_act, a.rows.d_hidden);
  run_experts(be, a, false, false, 0.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(a.rows.d_hidden, row * 2 * f), at(gate_up_.operand, x * 2 * f * d), at(a.rows.dx, row * d), rows, d, 2 * f};
  });
  run_experts(be, a, true, false, 1.0, [&](int x, int64_t row, int64_t rows) {
    return GemmGroup{at(a.rows.d_hidden, row * 2 * f), at(a.rows.x, row * d), at(gate_up_.grad, x * 2 * f * d), 2 * f, d, rows};
  });
  dispatcher_->combine(a.routing, a.rows.dx, a.d_routed);
  // Un-permute: each token sums the input gradients of its K rows. With tensor
  // parallelism every rank then gathers the other slices' gradients and top-k weight
  // gradients, so that the router's backward sees the whole micro-batch.
  if (!tp_.active() || tp_.split_sequence()) {
    be.combine_rows(a.d_routed, slot_row, nullptr, 0.0, d_h);
  } else {
    const Tensor slice = tps_.partial.slice_rows(t0, ts);
    be.combine_rows(a.d_routed, slot_row, nullptr, 0.0, slice);
    tp_.group->all_gather(slice, tps_.partial);
    be.copy(tps_.partial, d_h);
    tp_.group->all_gather(d_weight_slice, a.d_weight);
  }

  // Router: top-k weights, load-balancing and z-loss gradients.
  std::vector<double> aux_grad(e);
  for (int x = 0; x < e; ++x) aux_grad[x] = moe_.aux_loss_coef * double(e) * a.expert_load[x] / double(t) * loss_scale;
  Tensor aux_host_view = a.aux_grad;
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
    const Tensor d_logits = a.d_logits.slice_rows(t0, ts);
    be.router_backward(a.logits.slice_rows(t0, ts), moe_.router_score, moe_.normalize_topk,
                       a.topk_index.slice_rows(t0, ts), a.topk_weight.slice_rows(t0, ts), d_weight_slice, a.aux_grad,
                       a.lse.slice_rows(t0, ts), z_grad_scale, d_logits);
    const Tensor d_logits_operand = policy_.as_operand(be, d_logits, a.d_logits_operand);
    be.gemm(false, false, ts, d, e, 1.0, d_logits_operand, router_.operand, 1.0, d_h);
    be.gemm(true, false, e, d, ts, 1.0, d_logits_operand, h.slice_rows(t0, ts), 1.0, router_.grad);
  } else {
    be.router_backward(a.logits, moe_.router_score, moe_.normalize_topk, a.topk_index, a.topk_weight, a.d_weight,
                       a.aux_grad, a.lse, z_grad_scale, a.d_logits);
    const Tensor d_logits_operand = policy_.as_operand(be, a.d_logits, a.d_logits_operand);
    be.gemm(false, false, t, d, e, 1.0, d_logits_operand, router_.operand, 1.0, d_h);
    be.gemm(true, false, e, d, t, 1.0, d_logits_operand, h, 1.0, router_.grad);
  }
  if (has_shared_) shared_.backward(be, a.shared, h, d_out, d_h, 1.0, sc);
}

}  // namespace sdmoe
