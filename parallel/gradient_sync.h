// Data-parallel gradient reduction. The gradient buffer has two regions (see
// ParamRegistry::finalize): dense tensors, replicated on every rank of a data-parallel
// group, and this rank's experts, replicated on every rank of an expert-data-parallel
// group. Each region is summed over its own group.
#pragma once
#include "core/buffer.h"
#include "parallel/communicator.h"

namespace sdmoe {

struct GradientRegions {
  Tensor dense, expert;
  // The dense region's two parts: tensors replicated over the tensor-parallel group, then
  // tensors split over it.
  Tensor tp_replicated, tp_sharded;
};

// Splits a flat gradient (or parameter) tensor laid out as
// [tp-replicated | tp-sharded | experts] at the two boundaries (in elements).
GradientRegions split_gradient_regions(const Tensor& flat, int64_t tp_sharded_begin, int64_t expert_begin);

// Sums dense gradients over groups.dp and expert gradients over groups.edp. With sequence
// parallelism the tp-replicated tensors (norm gains, routers) hold partial sums over this
// rank's tokens, which are first summed over groups.tp.
void reduce_gradients(const GradientRegions& grads, const ProcessGroups& groups, bool sequence_parallel = false);

// The norm of the whole model's gradient after reduce_gradients: every rank holds the
// tp-replicated gradients, its tp group's share of the tp-split ones and its ep group's
// share of the experts, so
// |g|^2 = |replicated|^2 + sum over tp of |tp-split|^2 + sum over ep x etp of |experts|^2.
double global_gradient_norm(Backend& backend, const GradientRegions& grads, const ProcessGroups& groups);

// ZeRO-1. Each region is split evenly over the ranks of its group (the model pads the
// regions to make that exact); a rank's shard of a region is the block at its rank.
struct Zero1Shards {
  int64_t dense_begin = 0, dense_count = 0;    // elements, in the flat buffer
  int64_t expert_begin = 0, expert_count = 0;
};

Zero1Shards zero1_shards(const GradientRegions& regions, const Tensor& flat, const ProcessGroups& groups);

// Sums the gradients and leaves this rank's shard of the sum in place in `grads` (the rest
// of the buffer is then stale): reduce-scatter of the dense region over groups.dp and of
// the expert region over groups.edp.
// `scratch` is a buffer the caller keeps between steps (grown on first use), so that no
// step allocates device memory.
void reduce_scatter_gradients(const GradientRegions& grads, const Zero1Shards& shards, Backend& backend,
                              const ProcessGroups& groups, Buffer& scratch);

// |g| from the shards alone: every element of the model lies in exactly one rank's shard
// (tensor parallelism aside, which ZeRO-1 does not support yet).
double zero1_gradient_norm(Backend& backend, const GradientRegions& grads, const Zero1Shards& shards,
                           const ProcessGroups& groups);

// After the optimizer updated this rank's shards of the parameters: all-gather them in
// place so that every rank holds the whole updated model again.
void gather_parameters(const GradientRegions& params, const ProcessGroups& groups);

// The step's gradient synchronisation as the trainer runs it, one object per model:
//   reduce()        after the last micro-batch's backward: the reductions above (or,
//                   with ZeRO-1, the reduce-scatter); returns the global gradient norm;
//   after_update()  after the optimizer: with ZeRO-1, the parameter all-gather.
// owned() is what this rank's optimizer updates: everything, or its ZeRO-1 shards.
class GradientSync {
 public:
  GradientSync(const Tensor& params, const Tensor& grads, int64_t tp_sharded_begin, int64_t expert_begin,
               const ProcessGroups& groups, Backend& backend, bool zero1, bool sequence_parallel);
  double reduce();
  void after_update();
  const std::vector<ElementRange>& owned() const { return owned_; }
  bool zero1() const { return zero1_; }

 private:
  GradientRegions grads_, params_;
  const ProcessGroups& groups_;
  Backend& backend_;
  bool zero1_, sequence_parallel_;
  Zero1Shards shards_;
  std::vector<ElementRange> owned_;
  Buffer scratch_;
};

}  // namespace sdmoe
