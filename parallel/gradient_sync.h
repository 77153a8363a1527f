// Data-parallel gradient reduction. The gradient buffer has two regions (see
// ParamRegistry::finalize): dense tensors, replicated on every rank of a data-parallel
// group, and this rank's experts, replicated on every rank of an expert-data-parallel
// group. Each region is summed over its own group.
#pragma once
#include "parallel/communicator.h"

namespace sdmoe {

struct GradientRegions {
  Tensor dense, expert;
};

// Splits a flat gradient tensor at `expert_begin` elements.
GradientRegions split_gradient_regions(const Tensor& flat, int64_t expert_begin);

// Sums dense gradients over groups.dp and expert gradients over groups.edp.
void reduce_gradients(const GradientRegions& grads, const ProcessGroups& groups);

// The norm of the whole model's gradient after reduce_gradients: every rank holds all
// dense gradients and its ep group's share of the experts, so
// |g|^2 = |dense|^2 + sum over the ep group of |experts|^2.
double global_gradient_norm(Backend& backend, const GradientRegions& grads, const ProcessGroups& groups);

}  // namespace sdmoe
