#include "core/buffer.h"

namespace sdmoe {

Buffer::Buffer(Backend& backend, size_t bytes) : backend_(&backend), bytes_(bytes) {
  data_ = bytes ? backend.allocate(bytes) : nullptr;
}

Buffer::~Buffer() {
  if (data_) backend_->deallocate(data_);
}

Buffer::Buffer(Buffer&& other) noexcept
    : backend_(other.backend_), data_(other.data_), bytes_(other.bytes_) {
  other.data_ = nullptr;
  other.bytes_ = 0;
}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    if (data_) backend_->deallocate(data_);
    backend_ = other.backend_;
    data_ = other.data_;
    bytes_ = other.bytes_;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

Tensor Arena::take(DType dtype, std::initializer_list<int64_t> dims) {
  Tensor t(nullptr, dtype, device_, dims);
  size_t offset = (used_ + kAlignment - 1) / kAlignment * kAlignment;
  used_ = offset + t.bytes();
  if (base_) {
    SDMOE_ASSERT(used_ <= capacity_, "arena overflow: {} > {} bytes", used_, capacity_);
    t.data = base_ + offset;
  }
  return t;
}

}  // namespace sdmoe
