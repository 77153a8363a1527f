#include "model/param_registry.h"

namespace sdmoe {

int ParamRegistry::add(std::string name, std::vector<int64_t> shape, ParamRole role, double init_std) {
  SDMOE_ASSERT(!shape.empty() && shape.size() <= 4, "parameter {} rank", name);
  ParamSpec s{std::move(name), std::move(shape), role, init_std};
  s.numel = 1;
  for (int64_t d : s.shape) s.numel *= d;
  // Align each tensor to 64 elements so that views stay vector-aligned.
  s.offset = (total_ + 63) / 64 * 64;
  total_ = s.offset + s.numel;
  specs_.push_back(std::move(s));
  return static_cast<int>(specs_.size()) - 1;
}

Tensor ParamRegistry::view(const Buffer& buffer, int id, DType dtype, Device device) const {
  const ParamSpec& s = specs_.at(id);
  Tensor t;
  t.data = static_cast<char*>(buffer.data()) + s.offset * dtype_size(dtype);
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(s.shape.size());
  for (int i = 0; i < t.ndim; ++i) t.shape[i] = s.shape[i];
  return t;
}

Tensor ParamRegistry::flat(const Buffer& buffer, DType dtype, Device device) const {
  return Tensor(buffer.data(), dtype, device, {total_});
}

}  // namespace sdmoe
