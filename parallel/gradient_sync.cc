#include "parallel/gradient_sync.h"

#include <algorithm>
#include <cmath>

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

void reduce_gradients(const GradientRegions& grads, const ProcessGroups& groups, bool sequence_parallel) {
  if (sequence_parallel) groups.tp->all_reduce(grads.tp_replicated, ReduceOp::SUM);
  groups.dp->all_reduce(grads.dense, ReduceOp::SUM);
  groups.edp->all_reduce(grads.expert, ReduceOp::SUM);
}

double global_gradient_norm(Backend& backend, const GradientRegions& grads, const ProcessGroups& groups) {
  auto sq = [&](const Tensor& t) { return t.numel() > 0 ? backend.sum_squares(t) : 0.0; };
  std::vector<double> tp_sq{sq(grads.tp_sharded)}, expert_sq{sq(grads.expert)};
  groups.tp->all_reduce_host(tp_sq, ReduceOp::SUM);
  groups.ep->all_reduce_host(expert_sq, ReduceOp::SUM);   // other experts
  groups.etp->all_reduce_host(expert_sq, ReduceOp::SUM);  // other parts of the same experts
  return std::sqrt(sq(grads.tp_replicated) + tp_sq[0] + expert_sq[0]);
}

namespace {

Tensor block(const Tensor& flat, int64_t begin, int64_t count) {
  return Tensor(static_cast<char*>(flat.data) + begin * int64_t(dtype_size(flat.dtype)), flat.dtype, flat.device,
                {count});
}

int64_t offset_in(const Tensor& region, const Tensor& flat) {
  return (static_cast<char*>(region.data) - static_cast<char*>(flat.data)) / int64_t(dtype_size(flat.dtype));
}

}  // namespace

Zero1Shards zero1_shards(const GradientRegions& regions, const Tensor& flat, const ProcessGroups& groups) {
  const int dp = groups.dp->size(), edp = groups.edp->size();
  SDMOE_ASSERT(groups.dims.tp == 1, "ZeRO-1 with tensor parallelism is not supported");
  SDMOE_ASSERT(regions.dense.numel() % dp == 0 && regions.expert.numel() % edp == 0,
               "ZeRO-1: regions of {} and {} elements do not divide over {} and {} ranks", regions.dense.numel(),
               regions.expert.numel(), dp, edp);
  Zero1Shards s;
  s.dense_count = regions.dense.numel() / dp;
  s.dense_begin = offset_in(regions.dense, flat) + groups.dp->rank() * s.dense_count;
  s.expert_count = regions.expert.numel() / edp;
  s.expert_begin = offset_in(regions.expert, flat) + groups.edp->rank() * s.expert_count;
  return s;
}

void reduce_scatter_gradients(const GradientRegions& grads, const Zero1Shards& shards, Backend& backend,
                              const ProcessGroups& groups, Buffer& scratch) {
  // Through a separate shard-sized buffer: reduce-scatter may not write over its input.
  const int64_t most = std::max(shards.dense_count, shards.expert_count);
  if (most == 0) return;
  const size_t bytes = size_t(most) * dtype_size(grads.dense.dtype);
  if (scratch.bytes() < bytes) scratch = Buffer(backend, bytes);
  auto one = [&](const Tensor& region, Communicator& group, int64_t count) {
    if (count == 0) return;
    const Tensor out(scratch.data(), region.dtype, region.device, {count});
    group.reduce_scatter(region, out, ReduceOp::SUM);
    backend.copy(out, block(region, int64_t(group.rank()) * count, count));
  };
  one(grads.dense, *groups.dp, shards.dense_count);
  one(grads.expert, *groups.edp, shards.expert_count);
}

double zero1_gradient_norm(Backend& backend, const GradientRegions& grads, const Zero1Shards& shards,
                           const ProcessGroups& groups) {
  auto sq = [&](const Tensor& region, Communicator& group, int64_t count) {
    return count > 0 ? backend.sum_squares(block(region, int64_t(group.rank()) * count, count)) : 0.0;
  };
  std::vector<double> total{sq(grads.dense, *groups.dp, shards.dense_count) +
                            sq(grads.expert, *groups.edp, shards.expert_count)};
  groups.world->all_reduce_host(total, ReduceOp::SUM);
  return std::sqrt(total[0]);
}

void gather_parameters(const GradientRegions& params, const ProcessGroups& groups) {
  auto one = [&](const Tensor& region, Communicator& group) {
    const int64_t count = region.numel() / group.size();
    if (count == 0) return;
    group.all_gather(block(region, int64_t(group.rank()) * count, count), region);
  };
  one(params.dense, *groups.dp);
  one(params.expert, *groups.edp);
}

GradientSync::GradientSync(const Tensor& params, const Tensor& grads, int64_t tp_sharded_begin, int64_t expert_begin,
                           const ProcessGroups& groups, Backend& backend, bool zero1, bool sequence_parallel)
    : grads_(split_gradient_regions(grads, tp_sharded_begin, expert_begin)),
      params_(split_gradient_regions(params, tp_sharded_begin, expert_begin)),
      groups_(groups),
      backend_(backend),
      zero1_(zero1),
      sequence_parallel_(sequence_parallel && groups.tp->size() > 1) {
  if (!zero1_) {
    owned_ = {{0, grads.numel()}};
    return;
  }
  shards_ = zero1_shards(grads_, grads, groups);
  owned_ = {{shards_.dense_begin, shards_.dense_begin + shards_.dense_count},
            {shards_.expert_begin, shards_.expert_begin + shards_.expert_count}};
}

double GradientSync::reduce() {
  if (zero1_) {
    reduce_scatter_gradients(grads_, shards_, backend_, groups_, scratch_);
    return zero1_gradient_norm(backend_, grads_, shards_, groups_);
  }
  reduce_gradients(grads_, groups_, sequence_parallel_);
  return global_gradient_norm(backend_, grads_, groups_);
}

void GradientSync::after_update() {
  if (zero1_) gather_parameters(params_, groups_);
}

}  // namespace sdmoe
