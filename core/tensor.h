// Non-owning tensor views over owned buffers.
//
// A Tensor is a pointer, a shape (row-major, up to 4 dims), a dtype and a device. It never
// owns memory: Buffers own one allocation per category (parameters, gradients, optimizer
// state, activations) and hand out views. Sharding, bucketing and checkpoint I/O then
// become offset arithmetic on a flat buffer.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/check.h"
#include "core/dtype.h"

namespace sdmoe {

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device = Device::CPU;
  int ndim = 0;
  std::array<int64_t, 4> shape{1, 1, 1, 1};

  Tensor() = default;
  Tensor(void* ptr, DType t, Device d, std::initializer_list<int64_t> dims) : data(ptr), dtype(t), device(d) {
    SDMOE_ASSERT(dims.size() <= 4, "at most 4 dims");
    for (int64_t v : dims) shape[ndim++] = v;
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape[i < 0 ? ndim + i : i]; }
  // Rows and columns of the tensor seen as a matrix whose columns are the last dim.
  int64_t rows() const { return ndim == 0 ? 1 : numel() / shape[ndim - 1]; }
  int64_t cols() const { return ndim == 0 ? 1 : shape[ndim - 1]; }

  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }

  // Same memory, new shape with the same element count.
  Tensor view(std::initializer_list<int64_t> dims) const {
    Tensor t(data, dtype, device, dims);
    SDMOE_ASSERT(t.numel() == numel(), "view changes element count {} -> {}", numel(), t.numel());
    return t;
  }
  // The leading elements of this tensor, seen with a smaller shape (scratch reuse).
  Tensor prefix(std::initializer_list<int64_t> dims) const {
    Tensor t(data, dtype, device, dims);
    SDMOE_ASSERT(t.numel() <= numel(), "prefix larger than tensor {} > {}", t.numel(), numel());
    return t;
  }
  // Rows [begin, begin + count) of the leading dimension.
  Tensor slice_rows(int64_t begin, int64_t count) const {
    SDMOE_ASSERT(ndim >= 1 && begin >= 0 && begin + count <= shape[0], "slice out of range");
    Tensor t = *this;
    t.shape[0] = count;
    t.data = static_cast<char*>(data) + begin * (numel() / shape[0]) * dtype_size(dtype);
    return t;
  }
  std::string shape_string() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? "," : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

}  // namespace sdmoe
