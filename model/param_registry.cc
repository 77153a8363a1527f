#include "model/param_registry.h"

#include <algorithm>

namespace sdmoe {

int ParamRegistry::add(std::string name, std::vector<int64_t> shape, ParamRole role, double init_std) {
  std::vector<int64_t> logical = shape;
  return add_part(std::move(name), std::move(shape), std::move(logical), 0, role, init_std);
}

int ParamRegistry::add_part(std::string name, std::vector<int64_t> shape, std::vector<int64_t> logical_shape,
                            int64_t first, ParamRole role, double init_std) {
  SDMOE_ASSERT(!finalized_, "parameter {} declared after the layout was fixed", name);
  SDMOE_ASSERT(!shape.empty() && shape.size() <= 4 && shape.size() == logical_shape.size(), "parameter {} rank", name);
  for (size_t i = 1; i < shape.size(); ++i)
    SDMOE_ASSERT(shape[i] == logical_shape[i], "parameter {}: parts split the leading dimension only", name);
  SDMOE_ASSERT(first >= 0 && first + shape[0] <= logical_shape[0], "parameter {}: part {}+{} of {}", name, first,
               shape[0], logical_shape[0]);
  ParamSpec s{std::move(name), std::move(shape), role, init_std};
  s.numel = 1;
  for (int64_t d : s.shape) s.numel *= d;
  s.logical_shape = std::move(logical_shape);
  s.logical_offset = first * (s.numel / std::max<int64_t>(1, s.shape[0]));
  specs_.push_back(std::move(s));
  return static_cast<int>(specs_.size()) - 1;
}

void ParamRegistry::finalize(int64_t dense_multiple, int64_t expert_multiple) {
  SDMOE_ASSERT(!finalized_, "parameter layout fixed twice");
  SDMOE_ASSERT(dense_multiple > 0 && expert_multiple > 0, "region multiples must be positive");
  // Align each tensor to 64 elements so that views stay vector-aligned.
  auto place = [&](ParamSpec& s) {
    s.offset = (total_ + 63) / 64 * 64;
    total_ = s.offset + s.numel;
  };
  auto round_up = [](int64_t x, int64_t m) { return (x + m - 1) / m * m; };
  for (ParamSpec& s : specs_)
    if (s.role != ParamRole::EXPERT) place(s);
  expert_begin_ = round_up(round_up(total_, 64), dense_multiple);
  total_ = expert_begin_;
  for (ParamSpec& s : specs_)
    if (s.role == ParamRole::EXPERT) place(s);
  total_ = expert_begin_ + round_up(total_ - expert_begin_, expert_multiple);
  finalized_ = true;
}

void ParamRegistry::check_finalized() const {
  SDMOE_ASSERT(finalized_, "parameter layout used before finalize()");
}

Tensor ParamRegistry::view(const Buffer& buffer, int id, DType dtype, Device device) const {
  check_finalized();
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
  check_finalized();
  return Tensor(buffer.data(), dtype, device, {total_});
}

}  // namespace sdmoe
