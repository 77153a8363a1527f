#include "parallel/gradient_sync.h"

#include <cmath>

#include "core/check.h"

namespace sdmoe {

GradientRegions split_gradient_regions(const Tensor& flat, int64_t expert_begin) {
  const int64_t total = flat.numel();
  SDMOE_ASSERT(expert_begin >= 0 && expert_begin <= total, "expert region starts at {} of {}", expert_begin, total);
  char* base = static_cast<char*>(flat.data);
  const size_t width = dtype_size(flat.dtype);
  return GradientRegions{Tensor(base, flat.dtype, flat.device, {expert_begin}),
                         Tensor(base + expert_begin * width, flat.dtype, flat.device, {total - expert_begin})};
}

void reduce_gradients(const GradientRegions& grads, const ProcessGroups& groups) {
  groups.dp->all_reduce(grads.dense, ReduceOp::SUM);
  groups.edp->all_reduce(grads.expert, ReduceOp::SUM);
}

double global_gradient_norm(Backend& backend, const GradientRegions& grads, const ProcessGroups& groups) {
  std::vector<double> expert_sq{grads.expert.numel() > 0 ? backend.sum_squares(grads.expert) : 0.0};
  groups.ep->all_reduce_host(expert_sq, ReduceOp::SUM);
  const double dense_sq = grads.dense.numel() > 0 ? backend.sum_squares(grads.dense) : 0.0;
  return std::sqrt(dense_sq + expert_sq[0]);
}

}  // namespace sdmoe
