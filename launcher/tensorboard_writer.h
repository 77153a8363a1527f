// TensorBoard event files written natively: TensorBoard's Event protobuf in TFRecord
// framing (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload),
// so `tensorboard --logdir DIR` reads the run without any TensorFlow code here.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

#include "launcher/trainer.h"

namespace sdmoe {

// CRC-32C (Castagnoli), and the masking TFRecord applies to stored checksums.
uint32_t crc32c(const void* data, size_t size);
uint32_t masked_crc32c(const void* data, size_t size);

class TensorboardWriter {
 public:
  // Creates DIR (if needed) and DIR/events.out.tfevents.<unix time>.<host>.<pid> with the
  // file-version event. Throws sdmoe::Error when it cannot.
  explicit TensorboardWriter(const std::string& dir);
  ~TensorboardWriter();
  TensorboardWriter(const TensorboardWriter&) = delete;
  TensorboardWriter& operator=(const TensorboardWriter&) = delete;
  // The step's metrics as scalars (tags in docs/usage.md), flushed.
  void append(const StepRecord& r);
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& payload);
  std::FILE* file_ = nullptr;
  std::string path_;
};

}  // namespace sdmoe
