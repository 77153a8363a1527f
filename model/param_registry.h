// The one list of model tensors. Allocation, initialisation, the optimizer, gradient
// norms, data-parallel reduction and (later) checkpoint names and the spectral service
// all iterate it; nothing else spells the list out.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/buffer.h"

namespace sdmoe {

enum class ParamRole : uint8_t {
  EMBEDDING,  // token embedding (tied: also the output projection)
  OUTPUT,     // untied output projection
  NORM,       // RMSNorm gains
  DENSE,      // attention and dense-MLP matrices
  ROUTER,     // MoE router
  EXPERT,     // stacked routed-expert matrices [E, out, in]
};

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;  // logical, unsharded
  ParamRole role;
  double init_std;             // 0: initialised to one (norm gains)
  int64_t offset = 0;          // elements from the start of the category buffer
  int64_t numel = 0;

  bool weight_decay() const { return role == ParamRole::DENSE || role == ParamRole::ROUTER || role == ParamRole::EXPERT || role == ParamRole::OUTPUT; }
};

class ParamRegistry {
 public:
  int add(std::string name, std::vector<int64_t> shape, ParamRole role, double init_std);
  const std::vector<ParamSpec>& specs() const { return specs_; }
  const ParamSpec& spec(int id) const { return specs_.at(id); }
  int64_t total_elements() const { return total_; }
  // The tensor `id` inside a flat buffer laid out by this registry.
  Tensor view(const Buffer& buffer, int id, DType dtype, Device device) const;
  // The whole buffer as one flat tensor.
  Tensor flat(const Buffer& buffer, DType dtype, Device device) const;

 private:
  std::vector<ParamSpec> specs_;
  int64_t total_ = 0;
};

}  // namespace sdmoe
