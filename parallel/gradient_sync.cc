#include "parallel/gradient_sync.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "core/buffer.h"
#include "core/check.h"

namespace sdmoe {

GradientRegions split_gradient_regions(const Tensor& flat, int64_t tp_sharded_begin, int64_t expert_begin) {
  const int64_t total = flat.numel();
  SDMOE_ASSERT(0 <= tp_sharded_begin && tp_sharded_begin <= expert_begin && expert_begin <= total,
               "parameter regions at {}, {} of {}", tp_sharded_begin, expert_begin, total);
  char* base = static_cast<char*>(flat.data);
  const size_t width = dtype_size(flat.dtype);
  auto part = [&](int64_t begin, int64_t end) {
    return Tensor(base + begin * width, flat.dtype, flat.device, {end - begin});
  };
  return GradientRegions{part(0, expert_begin), part(expert_begin, total), part(0, tp_sharded_begin),
                         part(tp_sharded_begin, expert_begin)};
}

namespace {

int64_t offset_in(const Tensor& region, const Tensor& flat) {
  return (static_cast<char*>(region.data) - static_cast<char*>(flat.data)) / int64_t(dtype_size(flat.dtype));
}

}  // namespace

std::vector<GradientBucket> plan_gradient_buckets(int64_t region_begin, int64_t region_end,
                                                  const std::vector<GradientReadyRange>& ready,
                                                  int64_t bucket_elements, int64_t granularity) {
  SDMOE_ASSERT(granularity >= 1 && region_begin <= region_end && (region_end - region_begin) % granularity == 0,
               "region [{}, {}) does not split into blocks of {}", region_begin, region_end, granularity);
  std::vector<GradientBucket> out;
  if (region_begin == region_end) return out;
  auto stage_of = [&](int64_t begin, int64_t end) {
    if (ready.empty()) return kAfterBackward;
    int stage = 0;
    for (const GradientReadyRange& r : ready)
      if (r.begin < end && r.end > begin) stage = std::max(stage, r.stage);
    return stage;
  };
  std::vector<int64_t> starts;
  for (const GradientReadyRange& r : ready)
    if (r.begin > region_begin && r.begin < region_end) starts.push_back(r.begin);
  std::sort(starts.begin(), starts.end(), std::greater<>());
  int64_t end = region_end;
  if (bucket_elements > 0)
    for (int64_t start : starts) {
      if (end - start < bucket_elements) continue;
      const int64_t cut =
          region_begin + (start - region_begin + granularity - 1) / granularity * granularity;
      if (cut >= end) continue;
      out.push_back({cut, end, stage_of(cut, end)});
      end = cut;
    }
  out.push_back({region_begin, end, stage_of(region_begin, end)});
  return out;
}

GradientSync::GradientSync(const Tensor& params, const Tensor& grads, int64_t tp_sharded_begin, int64_t expert_begin,
                           const ProcessGroups& groups, Backend& backend, GradientSyncOptions options)
    : params_(params),
      grads_(grads),
      regions_(split_gradient_regions(grads, tp_sharded_begin, expert_begin)),
      groups_(groups),
      backend_(backend),
      options_(std::move(options)) {
  options_.sequence_parallel = options_.sequence_parallel && groups.tp->size() > 1;
  if (options_.zero1) SDMOE_ASSERT(groups.dims.tp == 1, "ZeRO-1 with tensor parallelism is not supported");
  auto add = [&](const Tensor& region, bool expert, bool tp_first) {
    const int64_t begin = offset_in(region, grads), end = begin + region.numel();
    const bool sharded = options_.zero1 && (!expert || options_.shard_experts);
    const int64_t granularity = sharded ? (expert ? groups.edp->size() : groups.dp->size()) : 1;
    for (GradientBucket b : plan_gradient_buckets(begin, end, options_.ready, options_.bucket_elements, granularity)) {
      b.expert = expert;
      b.tp_first = tp_first;
      b.sharded = sharded;
      buckets_.push_back(b);
    }
  };
  if (options_.zero1) {
    add(regions_.dense, false, false);
  } else {
    add(regions_.tp_replicated, false, options_.sequence_parallel);
    add(regions_.tp_sharded, false, false);
  }
  add(regions_.expert, true, false);
  pending_.resize(buckets_.size());
  launched_.assign(buckets_.size(), 0);

  if (!options_.zero1) {
    owned_ = {{0, grads.numel()}};
    return;
  }
  // ZeRO-1: block r of each bucket belongs to the rank at position r of its group, and
  // is reduce-scattered into its own slot of a scratch buffer (reduce-scatter may not
  // write over its input) before being copied into place.
  int64_t scratch_elements = 0;
  for (const GradientBucket& b : buckets_) {
    shard_scratch_offset_.push_back(scratch_elements);
    if (!b.sharded) {
      if (b.end > b.begin) owned_.push_back({b.begin, b.end});
      continue;
    }
    Communicator& group = group_of(b);
    const int64_t count = (b.end - b.begin) / group.size();
    scratch_elements += count;
    const int64_t first = b.begin + int64_t(group.rank()) * count;
    if (count > 0) owned_.push_back({first, first + count});
  }
  if (scratch_elements > 0) scratch_ = Buffer(backend, size_t(scratch_elements) * dtype_size(grads.dtype));
}

GradientSync::~GradientSync() = default;

Tensor GradientSync::range(const Tensor& flat, int64_t begin, int64_t end) const {
  return Tensor(static_cast<char*>(flat.data) + begin * int64_t(dtype_size(flat.dtype)), flat.dtype, flat.device,
                {end - begin});
}

void GradientSync::launch(size_t index) {
  const GradientBucket& b = buckets_[index];
  launched_[index] = 1;
  Communicator& group = group_of(b);
  const Tensor grads = range(grads_, b.begin, b.end);
  if (b.tp_first) groups_.tp->all_reduce(grads, ReduceOp::SUM);
  if (group.size() == 1 || b.end == b.begin) return;
  if (b.sharded) {
    const int64_t count = (b.end - b.begin) / group.size();
    const Tensor out(static_cast<char*>(scratch_.data()) + shard_scratch_offset_[index] * int64_t(dtype_size(grads.dtype)),
                     grads.dtype, grads.device, {count});
    pending_[index] = group.reduce_scatter_async(grads, out, ReduceOp::SUM);
  } else {
    pending_[index] = group.all_reduce_async(grads, ReduceOp::SUM);
  }
}

void GradientSync::backward_stage_done(int stage) {
  if (!armed_) return;
  for (size_t i = 0; i < buckets_.size(); ++i)
    if (!launched_[i] && buckets_[i].ready_stage <= stage) {
      launch(i);
      ++launched_during_backward_;
    }
}

double GradientSync::reduce() {
  for (size_t i = 0; i < buckets_.size(); ++i)
    if (!launched_[i]) launch(i);
  for (size_t i = 0; i < buckets_.size(); ++i) {
    if (!pending_[i]) continue;
    pending_[i]->wait();
    pending_[i].reset();
    if (buckets_[i].sharded) {
      const GradientBucket& b = buckets_[i];
      Communicator& group = group_of(b);
      const int64_t count = (b.end - b.begin) / group.size();
      const Tensor shard = range(grads_, b.begin + int64_t(group.rank()) * count, b.begin + int64_t(group.rank() + 1) * count);
      const Tensor reduced(static_cast<char*>(scratch_.data()) + shard_scratch_offset_[i] * int64_t(dtype_size(shard.dtype)),
                           shard.dtype, shard.device, {count});
      backend_.copy(reduced, shard);
    }
  }
  std::fill(launched_.begin(), launched_.end(), 0);
  armed_ = false;
  launched_during_backward_ = 0;
  return gradient_norm();
}

double GradientSync::gradient_norm() {
  auto sq = [&](const Tensor& t) { return t.numel() > 0 ? backend_.sum_squares(t) : 0.0; };
  if (options_.zero1) {
    // Every element of a sharded bucket lies in exactly one rank's block (tp is 1 with
    // ZeRO-1); whole (unsharded) expert buckets are replicated over edp and summed over the
    // ranks holding other experts (ep) or other parts of them (etp).
    std::vector<double> total{0.0}, whole{0.0};
    for (const GradientBucket& b : buckets_) {
      if (!b.sharded) {
        whole[0] += sq(range(grads_, b.begin, b.end));
        continue;
      }
      Communicator& group = group_of(b);
      const int64_t count = (b.end - b.begin) / group.size();
      total[0] += sq(range(grads_, b.begin + int64_t(group.rank()) * count, b.begin + int64_t(group.rank() + 1) * count));
    }
    groups_.world->all_reduce_host(total, ReduceOp::SUM);
    groups_.ep->all_reduce_host(whole, ReduceOp::SUM);
    groups_.etp->all_reduce_host(whole, ReduceOp::SUM);
    return std::sqrt(total[0] + whole[0]);
  }
  // Every rank holds the tp-replicated gradients, its tp group's share of the tp-split
  // ones and its ep group's share of the experts, so
  // |g|^2 = |replicated|^2 + sum over tp of |tp-split|^2 + sum over ep x etp of |experts|^2.
  std::vector<double> tp_sq{sq(regions_.tp_sharded)}, expert_sq{sq(regions_.expert)};
  groups_.tp->all_reduce_host(tp_sq, ReduceOp::SUM);
  groups_.ep->all_reduce_host(expert_sq, ReduceOp::SUM);   // other experts
  groups_.etp->all_reduce_host(expert_sq, ReduceOp::SUM);  // other parts of the same experts
  return std::sqrt(sq(regions_.tp_replicated) + tp_sq[0] + expert_sq[0]);
}

void GradientSync::after_update() {
  if (!options_.zero1) return;
  if (options_.operands.numel() > 0 && options_.operands.dtype != params_.dtype) {
    gather_sharded(options_.operands);
    master_stale_ = true;
  } else {
    gather_sharded(params_);
  }
}

void GradientSync::gather_master() {
  if (!master_stale_) return;
  gather_sharded(params_);
  master_stale_ = false;
}

void GradientSync::gather_sharded(const Tensor& flat) {
  SDMOE_ASSERT(flat.numel() == params_.numel(), "gradient sync: a gathered buffer of {} elements for {} parameters",
               flat.numel(), params_.numel());
  for (const GradientBucket& b : buckets_) {
    if (!b.sharded) continue;
    Communicator& group = group_of(b);
    const int64_t count = (b.end - b.begin) / group.size();
    if (group.size() == 1 || count == 0) continue;
    group.all_gather(range(flat, b.begin + int64_t(group.rank()) * count, b.begin + int64_t(group.rank() + 1) * count),
                     range(flat, b.begin, b.end));
  }
}

}  // namespace sdmoe
