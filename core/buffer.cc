#include "core/buffer.h"

#include <atomic>

namespace sdmoe {
namespace {

// Indexed by Device (CPU, CUDA).
std::atomic<int64_t> in_use[2], peak[2];

void count(const Backend* backend, int64_t bytes) {
  if (!backend || bytes == 0) return;
  const int d = backend->device() == Device::CUDA ? 1 : 0;
  const int64_t now = in_use[d].fetch_add(bytes) + bytes;
  int64_t seen = peak[d].load();
  while (now > seen && !peak[d].compare_exchange_weak(seen, now)) {
  }
}

}  // namespace

int64_t buffer_bytes_in_use(Device device) { return in_use[device == Device::CUDA ? 1 : 0].load(); }
int64_t buffer_bytes_peak(Device device) { return peak[device == Device::CUDA ? 1 : 0].load(); }

Buffer::Buffer(Backend& backend, size_t bytes) : backend_(&backend), bytes_(bytes) {
  data_ = bytes ? backend.allocate(bytes) : nullptr;
  if (data_) count(backend_, int64_t(bytes_));
}

Buffer::~Buffer() {
  if (data_) {
    backend_->deallocate(data_);
    count(backend_, -int64_t(bytes_));
  }
}

Buffer::Buffer(Buffer&& other) noexcept
    : backend_(other.backend_), data_(other.data_), bytes_(other.bytes_) {
  other.data_ = nullptr;
  other.bytes_ = 0;
}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    if (data_) {
      backend_->deallocate(data_);
      count(backend_, -int64_t(bytes_));
    }
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
