#include "parallel/parallel_dims.h"

#include <fmt/format.h>

#include "core/check.h"

namespace sdmoe {

ParallelDims ParallelDims::make(int world, int tp, int ep, int etp, int num_experts) {
  if (world < 1) fail("world size {} must be positive", world);
  if (tp < 1) fail("parallel.tp ({}) must be at least 1", tp);
  if (ep < 1) fail("parallel.ep ({}) must be at least 1", ep);
  if (etp < 1) fail("parallel.etp ({}) must be at least 1", etp);
  if (world % tp != 0) fail("parallel.tp ({}) must divide the number of ranks ({})", tp, world);
  if (world % (etp * ep) != 0)
    fail("parallel.etp x parallel.ep ({} x {} = {}) must divide the number of ranks ({})", etp, ep, etp * ep, world);
  if (num_experts == 0 && (ep > 1 || etp > 1))
    fail("parallel.ep ({}) and parallel.etp ({}) must be 1 for a model without MoE layers", ep, etp);
  if (num_experts > 0 && num_experts % ep != 0)
    fail("parallel.ep ({}) must divide model.moe.num_experts ({})", ep, num_experts);
  ParallelDims d;
  d.world = world;
  d.tp = tp;
  d.dp = world / tp;
  d.etp = etp;
  d.ep = ep;
  d.edp = world / (etp * ep);
  return d;
}

std::string ParallelDims::describe() const {
  return fmt::format("tp {} x dp {} | etp {} x ep {} x edp {}", tp, dp, etp, ep, edp);
}

}  // namespace sdmoe
