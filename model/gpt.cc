#include "model/gpt.h"

#include <algorithm>
#include <cmath>

#include "core/rng.h"

namespace sdmoe {

struct GptModel::Block {
  Attention attention;
  Param ffn_norm;
  bool is_moe = false;
  SwigluMlp mlp;
  MoeFeedForward moe;
};

ModelPlacement placement_for(const ProcessGroups& groups, bool zero1, bool sequence_parallel) {
  ModelPlacement p;
  p.sequence_parallel = sequence_parallel;
  p.ep_group = groups.ep;
  p.tp_group = groups.tp;
  p.etp_group = groups.etp;
  if (zero1) {
    p.dense_multiple = 64 * int64_t(groups.dp->size());
    p.expert_multiple = 64 * int64_t(groups.edp->size());
  }
  return p;
}

int64_t GptModel::output_head_chunk(const ModelSpec& spec, int64_t tokens, int64_t bytes_per_logit) {
  // At most 256 MiB of logits at once (2^26 fp32 logits; under BF16 the fp32 logits and
  // their bf16 gradient copy, so 2/3 as many rows), in chunks of equal size. Smaller chunks
  // save memory but make the head's GEMMs skinnier: 333-row chunks ran them at 72 to 75%
  // of the CPU's fp32 peak, 1024-row chunks at 80 to 85%.
  const int64_t most = std::max<int64_t>((int64_t(1) << 28) / (bytes_per_logit * spec.vocab_size), 64);
  if (tokens <= most) return tokens;
  const int64_t chunks = (tokens + most - 1) / most;
  return (tokens + chunks - 1) / chunks;
}

GptModel::GptModel(const ModelSpec& spec, Backend& backend, DType dtype, int micro_batch,
                   const ModelPlacement& placement)
    : GptModel(spec, backend, PrecisionPolicy::uniform(dtype), micro_batch, placement) {}

GptModel::GptModel(const ModelSpec& spec, Backend& backend, const PrecisionPolicy& policy, int micro_batch,
                   const ModelPlacement& placement, const ModelExecution& execution)
    : spec_(spec),
      be_(backend),
      tp_group_(placement.tp_group),
      sequence_parallel_(placement.sequence_parallel && placement.tp_group && placement.tp_group->size() > 1),
      policy_(policy),
      execution_(execution),
      dtype_(policy.master),
      batch_(micro_batch) {
  spec_.validate();
  SDMOE_ASSERT(execution_.micro_batches_in_flight >= 1, "{} micro-batches in flight", execution_.micro_batches_in_flight);
  tokens_ = int64_t(batch_) * spec_.seq_len;
  head_chunk_ = output_head_chunk(spec_, tokens_,
                                  policy_.separate_operands() ? 4 + int64_t(dtype_size(policy_.operand)) : 4);
  const int64_t d = spec_.dim;
  // Vocabulary-parallel: each tp rank holds rows [vocab_begin_, vocab_begin_ + V/tp) of
  // the embedding (and of the output projection).
  const TensorParallel vocab_tp{tp_group_.get()};
  SDMOE_ASSERT(spec_.vocab_size % vocab_tp.size() == 0, "vocabulary {} does not split over {} ranks", spec_.vocab_size,
               vocab_tp.size());
  vocab_local_ = spec_.vocab_size / vocab_tp.size();
  vocab_begin_ = int64_t(vocab_tp.rank()) * vocab_local_;
  embedding_.id = registry_.add_part("embedding", {spec_.vocab_size, d}, 0, vocab_tp.size(), vocab_tp.rank(),
                                     ParamRole::EMBEDDING, spec_.init_std, true);
  ready_stage_.assign(registry_.specs().size(), spec_.layers + 1);  // the embedding
  for (int l = 0; l < spec_.layers; ++l) {
    auto block = std::make_unique<Block>();
    const std::string prefix = fmt::format("layers.{}", l);
    const TensorParallel tp{tp_group_.get(), placement.sequence_parallel};
    block->attention.declare(registry_, prefix, spec_, tp, execution_.fused_attention);
    block->ffn_norm.id = registry_.add(prefix + ".ffn_norm", {d}, ParamRole::NORM, 0.0);
    block->is_moe = spec_.moe.is_moe_layer(l);
    const double out_std = spec_.init_std / std::sqrt(2.0 * spec_.layers);
    if (block->is_moe)
      block->moe.declare(registry_, prefix, spec_,
                         std::make_shared<TokenDispatcher>(placement.ep_group, placement.etp_group, be_, spec_.moe.num_experts),
                         tp);
    else block->mlp.declare(registry_, prefix + ".mlp", d, spec_.ffn_dim, spec_.init_std, out_std, tp);
    blocks_.push_back(std::move(block));
    ready_stage_.resize(registry_.specs().size(), spec_.layers - l);
  }
  final_norm_.id = registry_.add("final_norm", {d}, ParamRole::NORM, 0.0);
  output_.id = spec_.tie_embeddings ? embedding_.id
                                    : registry_.add_part("output", {spec_.vocab_size, d}, 0, vocab_tp.size(),
                                                         vocab_tp.rank(), ParamRole::OUTPUT, spec_.init_std, true);

  ready_stage_.resize(registry_.specs().size(), 0);  // final norm, untied output
  registry_.finalize(placement.dense_multiple, placement.expert_multiple);
  const size_t bytes = registry_.total_elements() * dtype_size(dtype_);
  params_ = Buffer(be_, bytes);
  grads_ = Buffer(be_, bytes);
  if (policy_.separate_operands())
    operand_weights_ = Buffer(be_, registry_.total_elements() * dtype_size(policy_.operand));
  const ParamBuffers buffers{registry_, params_, grads_, operand_weights_, policy_, be_.device()};
  auto bind = [&](Param& p) { p = buffers.bind(p.id); };
  bind(embedding_);
  bind(final_norm_);
  bind(output_);
  for (auto& b : blocks_) {
    b->attention.bind(buffers);
    bind(b->ffn_norm);
    if (b->is_moe) b->moe.bind(buffers);
    else b->mlp.bind(buffers);
  }
  Arena planner(be_.device()), region_planner(be_.device());
  plan_activations(planner, execution_.recompute == Recompute::NONE ? planner : region_planner);
  activations_ = Buffer(be_, planner.used());
  if (execution_.recompute != Recompute::NONE) block_activations_ = Buffer(be_, region_planner.used());
  Arena arena(be_.device(), activations_), region(be_.device(), block_activations_);
  plan_activations(arena, execution_.recompute == Recompute::NONE ? arena : region);
  zero_grads();
}

GptModel::~GptModel() = default;

std::vector<GradientReadyRange> GptModel::gradient_ready_ranges() const {
  std::vector<GradientReadyRange> out;
  for (size_t id = 0; id < registry_.specs().size(); ++id) {
    const ParamSpec& s = registry_.spec(int(id));
    out.push_back({s.offset, s.offset + s.numel, ready_stage_[id]});
  }
  return out;
}

void GptModel::plan_activations(Arena& arena, Arena& region) {
  const int64_t t = tokens_, d = spec_.dim;
  // Rows of the residual stream this rank holds: all, or its T/tp with sequence parallelism.
  const int64_t rows = sequence_parallel_ ? t / tp_group_->size() : t;
  const LayerDims dims{batch_, spec_.seq_len, d, spec_.heads, spec_.head_dim()};
  const bool full = execution_.recompute == Recompute::FULL, shared_region = execution_.recompute != Recompute::NONE;
  tp_scratch_ = TpScratch{};
  if (tp_group_ && tp_group_->size() > 1) {
    tp_scratch_.partial = arena.take(dtype_, {t, d});
    if (sequence_parallel_) {
      tp_scratch_.gathered = arena.take(dtype_, {t, d});
      tp_scratch_.local = arena.take(dtype_, {rows, d});
    }
  }
  for (auto& b : blocks_) {
    b->attention.configure(dims, tp_scratch_);
    if (b->is_moe) b->moe.configure(t, tp_scratch_);
    else b->mlp.configure(tp_scratch_);
  }
  // Per micro-batch in flight: each block's activations, kept in `arena` without
  // recomputation; under SELECTIVE the recomputable ones in the shared region, under FULL
  // all of them (the region is shared by the blocks and by the micro-batches: what it
  // holds is recomputed before each block's backward).
  Arena& kept = full ? region : arena;
  const size_t region_start = region.position();
  size_t region_end = region_start;
  slots_.clear();
  slots_.resize(size_t(execution_.micro_batches_in_flight));
  region_slot_ = -1;
  for (MicroBatch& mb : slots_) {
    mb.ids = arena.take(DType::I32, {t});
    mb.targets = arena.take(DType::I32, {t});
    // Under FULL only the blocks' inputs (even entries) live through the step; the stream
    // between a block's attention and feed-forward (odd entries) is the block's own.
    mb.stream.assign(2 * spec_.layers + 1, Tensor{});
    for (int i = 0; i < 2 * spec_.layers + 1; i += 2) mb.stream[i] = arena.take(dtype_, {rows, d});
    mb.blocks.resize(size_t(spec_.layers));
    for (int l = 0; l < spec_.layers; ++l) {
      Block& b = *blocks_[l];
      BlockActivations& ba = mb.blocks[size_t(l)];
      if (shared_region) region.rewind(region_start);
      mb.stream[2 * l + 1] = kept.take(dtype_, {rows, d});
      ba.attention = b.attention.plan_activations(kept, region);
      ba.ffn_normed = kept.take(policy_.operand, {t, d});
      ba.ffn_rstd = kept.take(dtype_, {rows});
      if (b.is_moe) ba.moe = b.moe.plan_activations(kept, region);
      else ba.mlp = b.mlp.plan_activations(region, t);
      region_end = std::max(region_end, region.position());
    }
    mb.final_normed = arena.take(policy_.operand, {t, d});
    mb.final_rstd = arena.take(dtype_, {rows});
    mb.d_final = arena.take(dtype_, {t, d});
    mb.d_final_local = sequence_parallel_ ? arena.take(dtype_, {rows, d}) : mb.d_final;
  }
  if (shared_region) region.rewind(region_end);
  logits_ = arena.take(dtype_, {head_chunk_, vocab_local_});
  if (policy_.separate_operands()) logits_operand_ = arena.take(policy_.operand, {head_chunk_, vocab_local_});
  losses_ = arena.take(dtype_, {head_chunk_, 1});
  lse_ = arena.take(dtype_, {head_chunk_});
  d_stream_ = arena.take(dtype_, {rows, d});
  scratch_.plan(arena, spec_, batch_, policy_, execution_.fused_attention);
}

// The normalised residual stream for all T tokens: with sequence parallelism this rank
// normalises its rows and gathers the others'.
void GptModel::norm_all_rows(const Tensor& x, const Tensor& weight, const Tensor& normed, const Tensor& rstd) {
  if (!sequence_parallel_) {
    be_.rmsnorm_forward(x, weight, spec_.norm_eps, normed, rstd);
    return;
  }
  const TensorParallel tp{tp_group_.get(), true};
  const Tensor mine = normed.slice_rows(int64_t(tp.rank()) * x.rows(), x.rows());
  be_.rmsnorm_forward(x, weight, spec_.norm_eps, mine, rstd);
  tp.gather_rows(mine, normed, be_);
}

void GptModel::init_part_on_host(const ParamSpec& s, const Tensor& p, uint64_t seed) {
  const uint64_t stream = stream_of(s.name);
  std::vector<double> values(s.numel);
  for (int64_t i = 0; i < s.numel; ++i) values[i] = s.init_std * random_normal(seed, stream, s.logical_index(i));
  if (dtype_ == DType::F64) {
    be_.copy_from_host(values.data(), p);
  } else {
    // Through the backend's cast, so a part rounds exactly as the whole tensor would.
    Buffer wide(be_, values.size() * sizeof(double));
    const Tensor wide_t(wide.data(), DType::F64, be_.device(), {s.numel});
    be_.copy_from_host(values.data(), wide_t);
    be_.cast(wide_t, p);
  }
}

void GptModel::init_parameters(uint64_t seed) {
  for (size_t id = 0; id < registry_.specs().size(); ++id) {
    const ParamSpec& s = registry_.spec(static_cast<int>(id));
    Tensor p = param(static_cast<int>(id));
    if (s.init_std == 0.0) be_.fill(p, 1.0);
    // A function of the logical tensor: a part draws the elements it holds of the whole,
    // on the device when they are one range of it, else element by element on the host.
    else if (const int64_t first = s.contiguous_logical_offset(); first >= 0)
      be_.init_normal(p, seed, stream_of(s.name), s.init_std, first);
    else init_part_on_host(s, p, seed);
  }
  weights_changed();
}

void GptModel::weights_changed() {
  if (policy_.separate_operands()) be_.cast(params(), operand_weights());
}

void GptModel::weights_changed(const std::vector<ElementRange>& ranges) {
  if (!policy_.separate_operands()) return;
  const Tensor master = params(), working = operand_weights();
  auto slice = [](const Tensor& flat, const ElementRange& r) {
    return Tensor(static_cast<char*>(flat.data) + r.begin * int64_t(dtype_size(flat.dtype)), flat.dtype, flat.device,
                  {r.end - r.begin});
  };
  for (const ElementRange& r : ranges)
    if (r.end > r.begin) be_.cast(slice(master, r), slice(working, r));
}

double GptModel::combine_vocab_shards(const Tensor& losses, const Tensor& lse, const int32_t* targets,
                                      const TensorParallel& tp) {
  // Each shard has the log-sum-exp of its logits and, where it holds the target, loss =
  // lse - target logit (else loss = lse). The row's log-sum-exp is
  // M + log(sum_shards exp(lse_s - M)) with M the largest lse_s, and the target logit is
  // summed from the one shard that has it. The whole row's lse then replaces the shard's
  // on the device, for the backward's softmax.
  const int64_t rows = lse.numel();
  std::vector<double> shard_lse(rows), shard_loss(rows), target_logit(rows);
  copy_to_host_f64(lse, shard_lse);
  copy_to_host_f64(losses, shard_loss);
  std::vector<double> row_max = shard_lse, sum_exp(rows);
  tp.group->all_reduce_host(row_max, ReduceOp::MAX);
  for (int64_t r = 0; r < rows; ++r) {
    sum_exp[r] = std::exp(shard_lse[r] - row_max[r]);
    target_logit[r] = shard_lse[r] - shard_loss[r];  // 0 unless this shard holds the target
  }
  tp.group->all_reduce_host(sum_exp, ReduceOp::SUM);
  tp.group->all_reduce_host(target_logit, ReduceOp::SUM);
  double loss_sum = 0.0;
  std::vector<double> row_lse(rows);
  for (int64_t r = 0; r < rows; ++r) {
    row_lse[r] = row_max[r] + std::log(sum_exp[r]);
    if (targets[r] >= 0 || targets[r] == Backend::kTargetOnOtherShard) loss_sum += row_lse[r] - target_logit[r];
  }
  copy_from_host_f64(row_lse, lse);
  return loss_sum;
}

void GptModel::copy_to_host_f64(const Tensor& x, std::vector<double>& out) {
  out.resize(x.numel());
  if (x.dtype == DType::F64) {
    be_.copy_to_host(x, out.data());
    return;
  }
  std::vector<float> f(x.numel());
  be_.copy_to_host(x, f.data());
  std::copy(f.begin(), f.end(), out.begin());
}

void GptModel::copy_from_host_f64(const std::vector<double>& in, const Tensor& x) {
  if (x.dtype == DType::F64) {
    be_.copy_from_host(in.data(), x);
    return;
  }
  const std::vector<float> f(in.begin(), in.end());
  be_.copy_from_host(f.data(), x);
}

void GptModel::zero_grads() { be_.fill(grads(), 0.0); }

MicroBatchStats GptModel::forward_backward(const int32_t* tokens, double loss_scale) {
  MicroBatchStats stats = forward(0, tokens, true, loss_scale);
  backward(0, loss_scale);
  return stats;
}

MicroBatchStats GptModel::forward_only(const int32_t* tokens) { return forward(0, tokens, false, 0.0); }

void GptModel::forward_block(MicroBatch& mb, int l, MicroBatchStats* stats) {
  Block& b = *blocks_[l];
  BlockActivations& ba = mb.blocks[size_t(l)];
  const Tensor &in = mb.stream[2 * l], &mid = mb.stream[2 * l + 1], &out = mb.stream[2 * l + 2];
  b.attention.forward(be_, ba.attention, in, mid, scratch_);
  norm_all_rows(mid, b.ffn_norm.operand, ba.ffn_normed, ba.ffn_rstd);
  // A recomputation rewrites `out` (the next block's input) with the same values.
  be_.copy(mid, out);
  if (b.is_moe) {
    MoeStats m = b.moe.forward(be_, ba.moe, ba.ffn_normed, out);
    if (stats) {
      stats->aux_loss += m.aux_loss;
      stats->z_loss += m.z_loss;
      stats->moe.push_back(m);
    }
  } else {
    b.mlp.forward(be_, ba.mlp, ba.ffn_normed, out);
  }
}

MicroBatchStats GptModel::forward(int slot, const int32_t* tokens, bool train, double loss_scale) {
  SDMOE_ASSERT(slot >= 0 && slot < int(slots_.size()), "micro-batch slot {} of {}", slot, slots_.size());
  MicroBatch& mb = slots_[size_t(slot)];
  SDMOE_ASSERT(!mb.awaiting_backward, "forward on micro-batch slot {}, whose backward has not run", slot);
  const int64_t t = tokens_, d = spec_.dim, s = spec_.seq_len, v = spec_.vocab_size;
  std::vector<int32_t> ids(t), targets(t);
  for (int b = 0; b < batch_; ++b)
    for (int64_t i = 0; i < s; ++i) {
      ids[b * s + i] = tokens[b * (s + 1) + i];
      targets[b * s + i] = tokens[b * (s + 1) + i + 1];
    }
  for (int64_t i = 0; i < t; ++i) {
    if (ids[i] < 0 || ids[i] >= v) fail("token id {} is outside the model vocabulary of {}", ids[i], v);
    if (targets[i] >= v) fail("token id {} is outside the model vocabulary of {}", targets[i], v);
  }
  // Ids and targets as this rank's vocabulary shard sees them (unchanged without tp).
  const TensorParallel tp{tp_group_.get(), sequence_parallel_};
  if (tp.active())
    for (int64_t i = 0; i < t; ++i) {
      const bool id_here = ids[i] >= vocab_begin_ && ids[i] < vocab_begin_ + vocab_local_;
      ids[i] = id_here ? ids[i] - int32_t(vocab_begin_) : -1;
      const bool target_here = targets[i] >= vocab_begin_ && targets[i] < vocab_begin_ + vocab_local_;
      if (targets[i] >= 0) targets[i] = target_here ? targets[i] - int32_t(vocab_begin_) : Backend::kTargetOnOtherShard;
    }
  be_.copy_from_host(ids.data(), mb.ids);
  be_.copy_from_host(targets.data(), mb.targets);

  MicroBatchStats stats;
  stats.tokens = t;
  // Each token's row comes from the one vocabulary shard that holds it.
  if (tp.split_sequence()) {
    be_.embedding_forward(mb.ids, embedding_.operand, tp_scratch_.partial);
    tp.reduce_scatter_rows(tp_scratch_.partial, mb.stream[0]);
  } else {
    be_.embedding_forward(mb.ids, embedding_.operand, mb.stream[0]);
    tp.sum(mb.stream[0]);
  }
  for (int l = 0; l < spec_.layers; ++l) forward_block(mb, l, &stats);
  region_slot_ = slot;
  norm_all_rows(mb.stream[2 * spec_.layers], final_norm_.operand, mb.final_normed, mb.final_rstd);

  // Output projection and loss in chunks of rows, so the [T,V] logits never exist at
  // once. In training each chunk's backward runs right away.
  for (int64_t row = 0; row < t; row += head_chunk_) {
    const int64_t rows = std::min(head_chunk_, t - row), vl = vocab_local_;
    Tensor h = mb.final_normed.slice_rows(row, rows), logits = logits_.prefix({rows, vl});
    Tensor losses = losses_.prefix({rows, 1}), lse = lse_.prefix({rows}), tgt = mb.targets.slice_rows(row, rows);
    be_.gemm(false, true, rows, vl, d, 1.0, h, output_.operand, 0.0, logits);
    be_.cross_entropy_forward(logits, tgt, losses, lse);
    if (!tp.active()) stats.loss_sum += be_.column_sums(losses)[0];
    else stats.loss_sum += combine_vocab_shards(losses, lse, &targets[row], tp);
    if (!train) continue;
    be_.cross_entropy_backward(logits, tgt, lse, loss_scale / double(t));
    const Tensor d_h = mb.d_final.slice_rows(row, rows);
    const Tensor d_logits = policy_.as_operand(be_, logits, logits_operand_);
    be_.gemm(false, false, rows, d, vl, 1.0, d_logits, output_.operand, 0.0, d_h);
    if (!tp.split_sequence()) tp.sum(d_h);  // every shard's logits depend on h (summed below with SP)
    be_.gemm(true, false, vl, d, rows, 1.0, d_logits, h, 1.0, output_.grad);
  }
  mb.awaiting_backward = train;
  return stats;
}

void GptModel::backward(int slot, double loss_scale) {
  SDMOE_ASSERT(slot >= 0 && slot < int(slots_.size()), "micro-batch slot {} of {}", slot, slots_.size());
  MicroBatch& mb = slots_[size_t(slot)];
  SDMOE_ASSERT(mb.awaiting_backward, "backward of micro-batch slot {} without its training forward", slot);
  mb.awaiting_backward = false;
  const int64_t d = spec_.dim;
  const TensorParallel tp{tp_group_.get(), sequence_parallel_};
  if (tp.split_sequence()) tp.reduce_scatter_rows(mb.d_final, mb.d_final_local);
  be_.rmsnorm_backward(mb.stream[2 * spec_.layers], final_norm_.operand, mb.final_rstd, mb.d_final_local, d_stream_,
                       final_norm_.grad);
  auto stage_done = [&](int stage) {
    if (backward_hook_) backward_hook_(stage);
  };
  stage_done(0);
  for (int l = spec_.layers - 1; l >= 0; --l) {
    Block& b = *blocks_[l];
    BlockActivations& ba = mb.blocks[size_t(l)];
    const Tensor& mid = mb.stream[2 * l + 1];
    if (execution_.recompute == Recompute::FULL) {
      // The shared region still holds the last block of the latest forward: this slot's
      // when no other forward ran since, and then that block need not be recomputed.
      if (l < spec_.layers - 1 || region_slot_ != slot) forward_block(mb, l, nullptr);
      region_slot_ = -1;
    }
    if (execution_.recompute == Recompute::SELECTIVE) {
      if (b.is_moe) b.moe.recompute(be_, ba.moe, ba.ffn_normed);
      else b.mlp.recompute(be_, ba.mlp, ba.ffn_normed);
    }
    const Tensor d_normed = scratch_.d_normed.prefix({mid.rows(), d}), d_x = scratch_.d_x.prefix({mid.rows(), d});
    if (b.is_moe) b.moe.backward(be_, ba.moe, ba.ffn_normed, d_stream_, d_normed, loss_scale, scratch_);
    else b.mlp.backward(be_, ba.mlp, ba.ffn_normed, d_stream_, d_normed, 0.0, scratch_);
    be_.rmsnorm_backward(mid, b.ffn_norm.operand, ba.ffn_rstd, d_normed, d_x, b.ffn_norm.grad);
    be_.axpy(1.0, d_x, d_stream_);
    if (execution_.recompute == Recompute::SELECTIVE) b.attention.recompute(be_, ba.attention, scratch_);
    b.attention.backward(be_, ba.attention, mb.stream[2 * l], d_stream_, scratch_);
    stage_done(spec_.layers - l);
  }
  if (tp.split_sequence()) {
    tp.gather_rows(d_stream_, tp_scratch_.gathered, be_);
    be_.embedding_backward(mb.ids, tp_scratch_.gathered, embedding_.grad);
  } else {
    be_.embedding_backward(mb.ids, d_stream_, embedding_.grad);
  }
  stage_done(spec_.layers + 1);
}

}  // namespace sdmoe
