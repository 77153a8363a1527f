// Data-parallel gradient reduction. The gradient buffer has two regions (see
// ParamRegistry::finalize): dense tensors, replicated on every rank of a data-parallel
// group, and this rank's experts, replicated on every rank of an expert-data-parallel
// group. Each region is summed over its own group.
//
// The reduction runs in buckets: contiguous ranges of a region, cut at tensor boundaries,
// each launched as soon as the backward has finished every tensor in it, so that on a GPU
// (NCCL on a communication stream) and over nonblocking MPI the communication overlaps
// the rest of the backward. Buckets are cut from the end of each region, because the
// layout follows the model's declaration order and the backward finishes the last layers
// first.
#pragma once
#include <memory>
#include <vector>

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

// Elements [begin, end) of the flat gradient receive their last contribution in the
// backward stage `stage` (stages are numbered in the order the backward finishes them).
struct GradientReadyRange {
  int64_t begin = 0, end = 0;
  int stage = 0;
};

// One bucket: a range of one region, the groups it is summed over, and when it is ready.
struct GradientBucket {
  int64_t begin = 0, end = 0;  // elements of the flat buffer
  int ready_stage = 0;         // launchable once the backward finished this stage
  bool expert = false;         // expert region (summed over edp), else dense (over dp)
  bool tp_first = false;       // sequence parallel: summed over tp before dp
  bool sharded = false;        // ZeRO-1: reduce-scattered, each rank owning one block
};

// Cuts [region_begin, region_end) into buckets of at least `bucket_elements` (the first
// cut may leave less), from the end of the region towards its start, cutting at the
// starts of ready ranges and rounding each cut up to a multiple of `granularity` elements
// from region_begin (ZeRO-1 splits each bucket evenly over its group). A bucket's ready
// stage is the latest stage of the ranges it overlaps; elements no range covers
// (padding) never delay a bucket. bucket_elements <= 0: one bucket. Empty `ready`: every
// bucket waits for the end of the backward (stage kAfterBackward).
constexpr int kAfterBackward = 1 << 30;
std::vector<GradientBucket> plan_gradient_buckets(int64_t region_begin, int64_t region_end,
                                                  const std::vector<GradientReadyRange>& ready,
                                                  int64_t bucket_elements, int64_t granularity);

struct GradientSyncOptions {
  bool zero1 = false;
  // With zero1: shard the expert region too. false keeps experts whole on every rank (all-
  // reduced, updated by every replica), as SD-MoE's projections need whole matrices.
  bool shard_experts = true;
  bool sequence_parallel = false;
  int64_t bucket_elements = 0;             // <= 0: one bucket per region
  std::vector<GradientReadyRange> ready;   // empty: nothing launches before reduce()
  // Mixed precision: the weights' working copy (laid out as the flat parameters, in the
  // operand dtype) from which the step reads every weight. With ZeRO-1 the parameter
  // all-gather then moves this copy, half the bytes of the fp32 master, and the master's
  // blocks owned by other ranks go stale until gather_master(). Empty: no separate copy.
  Tensor operands;
};

// The step's gradient synchronisation as the trainer runs it, one object per model:
//   expect_backward()       before the last micro-batch's backward: arms the buckets;
//   backward_stage_done(s)  called by the model's backward as it finishes stage s:
//                           launches every armed bucket that is now complete;
//   reduce()                after the backward: launches what is left, waits for all,
//                           and returns the global gradient norm;
//   after_update()          after the optimizer and the owner's refresh of the working
//                           copy: with ZeRO-1, the parameter all-gather (of the working
//                           copy when there is one, else of the master);
//   gather_master()         with ZeRO-1 and a working copy: brings the fp32 master of
//                           other ranks' blocks up to date, before anything reads it whole
//                           (a checkpoint save); a no-op when it is current.
// Dense buckets are all-reduced over groups.dp (with sequence parallelism the
// tp-replicated ones, partial sums over this rank's tokens, over groups.tp first), expert
// buckets over groups.edp. With ZeRO-1 each bucket is reduce-scattered instead: the rank
// at position r of the group keeps block r of every bucket, and owned() lists those
// blocks, which are what this rank's optimizer updates (with shard_experts false the
// expert buckets are all-reduced and owned whole).
class GradientSync {
 public:
  GradientSync(const Tensor& params, const Tensor& grads, int64_t tp_sharded_begin, int64_t expert_begin,
               const ProcessGroups& groups, Backend& backend, GradientSyncOptions options);
  ~GradientSync();
  void expect_backward() { armed_ = true; }
  void backward_stage_done(int stage);
  double reduce();
  void after_update();
  void gather_master();
  // Whether the fp32 master of other ranks' blocks is behind (ZeRO-1 with a working copy,
  // between after_update() and gather_master()).
  bool master_stale() const { return master_stale_; }
  const std::vector<ElementRange>& owned() const { return owned_; }
  const std::vector<GradientBucket>& buckets() const { return buckets_; }
  // Buckets launched by backward_stage_done since the last reduce().
  int launched_during_backward() const { return launched_during_backward_; }

 private:
  Communicator& group_of(const GradientBucket& b) const { return b.expert ? *groups_.edp : *groups_.dp; }
  Tensor range(const Tensor& flat, int64_t begin, int64_t end) const;
  void launch(size_t index);
  double gradient_norm();
  // All-gathers every sharded bucket's blocks of `flat` (the master or the working copy).
  void gather_sharded(const Tensor& flat);

  Tensor params_, grads_;
  GradientRegions regions_;
  const ProcessGroups& groups_;
  Backend& backend_;
  GradientSyncOptions options_;
  std::vector<GradientBucket> buckets_;
  std::vector<int64_t> shard_scratch_offset_;   // ZeRO-1: where each bucket's block lands
  std::vector<std::unique_ptr<PendingCollective>> pending_;  // per bucket, null when idle
  std::vector<char> launched_;                              // per bucket, this step
  std::vector<ElementRange> owned_;
  Buffer scratch_;
  bool armed_ = false;
  bool master_stale_ = false;
  int launched_during_backward_ = 0;
};

}  // namespace sdmoe
