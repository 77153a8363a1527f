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
  std::vector<int64_t> shape;  // this rank's part (the whole tensor unless sharded)
  ParamRole role;
  double init_std;             // 0: initialised to one (norm gains)
  int64_t offset = 0;          // elements from the start of the category buffer
  int64_t numel = 0;
  // The whole (logical) tensor and this rank's block of it: along each axis a, indices
  // [part_first[a], part_first[a] + shape[a]).
  std::vector<int64_t> logical_shape;
  std::vector<int64_t> part_first;
  // Split over the tensor-parallel group (each tp rank holds a different block); such
  // tensors are not replicated over tp, so the gradient norm sums them over it.
  bool tp_sharded = false;

  // Row-major index in the logical tensor of this part's element `local`.
  int64_t logical_index(int64_t local) const;
  // Where the part starts in the logical tensor when it is one contiguous range of it
  // (a block along the leading axis, or the whole tensor); -1 otherwise.
  int64_t contiguous_logical_offset() const;

  bool weight_decay() const { return role == ParamRole::DENSE || role == ParamRole::ROUTER || role == ParamRole::EXPERT || role == ParamRole::OUTPUT; }
};

// Tensors are declared first and laid out by finalize(): every non-expert tensor, then
// every expert tensor, so that the two regions, which are reduced over different groups
// (data-parallel and expert-data-parallel), are each one contiguous range.
class ParamRegistry {
 public:
  int add(std::string name, std::vector<int64_t> shape, ParamRole role, double init_std);
  // Part `index` of `parts` equal blocks of the logical tensor along `axis` (experts
  // [first, first + E/ep) of a stack along axis 0, a tensor-parallel column block along
  // axis 1, ...). tp_sharded: the parts are spread over the tensor-parallel group.
  int add_part(std::string name, std::vector<int64_t> logical_shape, int axis, int parts, int index, ParamRole role,
               double init_std, bool tp_sharded);
  // A block split along two axes (an expert stack over ep along axis 0 and each expert's
  // hidden units over etp along another).
  struct Split {
    int axis = 0, parts = 1, index = 0;
  };
  int add_block(std::string name, std::vector<int64_t> logical_shape, std::vector<Split> splits, ParamRole role,
                double init_std, bool tp_sharded);
  // Lays the tensors out. The dense region's length is padded to a multiple of
  // dense_multiple elements and the expert region's to a multiple of expert_multiple (so
  // that each divides evenly over the ranks that shard it); padding is never read as a
  // parameter.
  void finalize(int64_t dense_multiple = 64, int64_t expert_multiple = 64);
  // Layout: [tensors replicated over tp | tensors sharded over tp | experts]; the first two
  // together are the dense region [0, expert_begin()).
  int64_t tp_sharded_begin() const { return tp_sharded_begin_; }
  int64_t expert_begin() const { return expert_begin_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  const ParamSpec& spec(int id) const { return specs_.at(id); }
  int64_t total_elements() const {
    check_finalized();
    return total_;
  }
  // The tensor `id` inside a flat buffer laid out by this registry.
  Tensor view(const Buffer& buffer, int id, DType dtype, Device device) const;
  // The whole buffer as one flat tensor.
  Tensor flat(const Buffer& buffer, DType dtype, Device device) const;

 private:
  void check_finalized() const;
  std::vector<ParamSpec> specs_;
  int64_t total_ = 0, tp_sharded_begin_ = 0, expert_begin_ = 0;
  bool finalized_ = false;
};

}  // namespace sdmoe
