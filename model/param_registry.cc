#include "model/param_registry.h"

#include <algorithm>

namespace sdmoe {

int ParamRegistry::add(std::string name, std::vector<int64_t> shape, ParamRole role, double init_std) {
  return add_part(std::move(name), std::move(shape), 0, 1, 0, role, init_std, false);
}

int ParamRegistry::add_part(std::string name, std::vector<int64_t> logical_shape, int axis, int parts, int index,
                            ParamRole role, double init_std, bool tp_sharded) {
  return add_block(std::move(name), std::move(logical_shape), {Split{axis, parts, index}}, role, init_std, tp_sharded);
}

int ParamRegistry::add_block(std::string name, std::vector<int64_t> logical_shape, std::vector<Split> splits,
                             ParamRole role, double init_std, bool tp_sharded) {
  SDMOE_ASSERT(!finalized_, "parameter {} declared after the layout was fixed", name);
  SDMOE_ASSERT(!logical_shape.empty() && logical_shape.size() <= 4, "parameter {} rank", name);
  std::vector<int64_t> shape = logical_shape, first(logical_shape.size(), 0);
  bool split_at_all = false;
  for (const Split& sp : splits) {
    SDMOE_ASSERT(sp.axis >= 0 && sp.axis < int(logical_shape.size()) && sp.parts >= 1 && sp.index >= 0 &&
                     sp.index < sp.parts && shape[sp.axis] == logical_shape[sp.axis],
                 "parameter {}: part {} of {} along axis {}", name, sp.index, sp.parts, sp.axis);
    SDMOE_ASSERT(logical_shape[sp.axis] % sp.parts == 0, "parameter {}: {} does not split into {} parts", name,
                 logical_shape[sp.axis], sp.parts);
    shape[sp.axis] /= sp.parts;
    first[sp.axis] = int64_t(sp.index) * shape[sp.axis];
    split_at_all = split_at_all || sp.parts > 1;
  }
  ParamSpec s{std::move(name), shape, role, init_std};
  s.numel = 1;
  for (int64_t d : s.shape) s.numel *= d;
  s.logical_shape = std::move(logical_shape);
  s.part_first = std::move(first);
  s.tp_sharded = tp_sharded && split_at_all;
  specs_.push_back(std::move(s));
  return static_cast<int>(specs_.size()) - 1;
}

int64_t ParamSpec::logical_index(int64_t local) const {
  int64_t index = 0, rest = local, stride = 1;
  // Digits of `local` in the part's shape, last axis fastest, shifted to the part's place.
  std::vector<int64_t> digit(shape.size());
  for (int a = int(shape.size()) - 1; a >= 0; --a) {
    digit[a] = rest % shape[a];
    rest /= shape[a];
  }
  for (int a = int(shape.size()) - 1; a >= 0; --a) {
    index += (digit[a] + part_first[a]) * stride;
    stride *= logical_shape[a];
  }
  return index;
}

int64_t ParamSpec::contiguous_logical_offset() const {
  // Contiguous when, past the first axis that is cut short, every axis is whole, and
  // before it every axis has extent 1.
  const int n = int(shape.size());
  int cut = n;
  for (int a = 0; a < n; ++a)
    if (shape[a] != logical_shape[a]) {
      cut = a;
      break;
    }
  if (cut == n) return 0;  // the whole tensor
  for (int a = cut + 1; a < n; ++a)
    if (shape[a] != logical_shape[a]) return -1;
  for (int a = 0; a < cut; ++a)
    if (shape[a] != 1) return -1;
  return numel == 0 ? 0 : logical_index(0);
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
    if (s.role != ParamRole::EXPERT && !s.tp_sharded) place(s);
  tp_sharded_begin_ = round_up(total_, 64);
  total_ = tp_sharded_begin_;
  for (ParamSpec& s : specs_)
    if (s.role != ParamRole::EXPERT && s.tp_sharded) place(s);
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
