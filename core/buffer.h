// Owned device memory and the arena that carves tensor views out of it.
#pragma once
#include <algorithm>
#include <cstddef>
#include <memory>

#include "core/backend.h"

namespace sdmoe {

// One allocation on one backend, freed when the Buffer dies.
// A range [begin, end) of elements of a flat buffer (a region, a shard).
struct ElementRange {
  int64_t begin = 0, end = 0;
};

// Bytes held by live Buffers on each device kind, and the most held at once: the model's
// parameters, gradients, optimizer state, activations and scratch all live in Buffers.
int64_t buffer_bytes_in_use(Device device);
int64_t buffer_bytes_peak(Device device);

class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& backend, size_t bytes);
  ~Buffer();
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  Backend* backend_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Bump allocator over one Buffer. Used in two passes: a planning pass with no buffer
// measures the bytes the same sequence of take() calls needs, then a real pass hands out
// views. The layout code is written once and cannot drift from the size computation.
class Arena {
 public:
  static constexpr size_t kAlignment = 256;
  explicit Arena(Device device) : device_(device) {}  // planning mode
  Arena(Device device, Buffer& buffer) : device_(device), base_(static_cast<char*>(buffer.data())), capacity_(buffer.bytes()) {}

  Tensor take(DType dtype, std::initializer_list<int64_t> dims);
  // Bytes the buffer needs: the furthest any take() reached, rewinds included.
  size_t used() const { return std::max(used_, high_water_); }
  bool planning() const { return base_ == nullptr; }
  // Where the next take() starts, and a return there: the views taken since then are
  // handed out again (the layers' activations under recomputation share one region).
  size_t position() const { return used_; }
  void rewind(size_t position) {
    high_water_ = std::max(high_water_, used_);
    used_ = position;
  }

 private:
  Device device_;
  char* base_ = nullptr;
  size_t capacity_ = 0;
  size_t used_ = 0, high_water_ = 0;
};

}  // namespace sdmoe
