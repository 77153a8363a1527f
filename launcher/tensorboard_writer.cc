#include "launcher/tensorboard_writer.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "core/check.h"
#include "launcher/tensorboard_event.pb.h"

namespace sdmoe {
namespace {

std::array<uint32_t, 256> crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int bit = 0; bit < 8; ++bit) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli
    table[i] = c;
  }
  return table;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void add_scalar(tensorboard::Summary& summary, const std::string& tag, double value) {
  if (!std::isfinite(value)) return;  // a NaN metric (no gradient yet) is left out
  tensorboard::SummaryValue* v = summary.add_value();
  v->set_tag(tag);
  v->set_simple_value(float(value));
}

}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  static const std::array<uint32_t, 256> table = crc32c_table();
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

TensorboardWriter::TensorboardWriter(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  char host[256] = "host";
  gethostname(host, sizeof(host) - 1);
  path_ = (std::filesystem::path(dir) /
           fmt::format("events.out.tfevents.{}.{}.{}", int64_t(now_seconds()), host, int(getpid())))
              .string();
  file_ = std::fopen(path_.c_str(), "wb");
  if (!file_) fail("metrics.tensorboard_dir: cannot create {}", path_);
  tensorboard::Event version;
  version.set_wall_time(now_seconds());
  version.set_file_version("brain.Event:2");
  write_record(version.SerializeAsString());
}

TensorboardWriter::~TensorboardWriter() {
  if (file_) std::fclose(file_);
}

void TensorboardWriter::write_record(const std::string& payload) {
  // Little-endian on every machine we build for (x86-64, aarch64), as TFRecord requires.
  const uint64_t length = payload.size();
  const uint32_t length_crc = masked_crc32c(&length, sizeof(length)), payload_crc = masked_crc32c(payload.data(), payload.size());
  bool ok = std::fwrite(&length, sizeof(length), 1, file_) == 1 && std::fwrite(&length_crc, 4, 1, file_) == 1 &&
            std::fwrite(payload.data(), 1, payload.size(), file_) == payload.size() &&
            std::fwrite(&payload_crc, 4, 1, file_) == 1;
  if (!ok || std::fflush(file_) != 0) fail("metrics.tensorboard_dir: cannot write {}", path_);
}

void TensorboardWriter::append(const StepRecord& r) {
  tensorboard::Event event;
  event.set_wall_time(now_seconds());
  event.set_step(r.step);
  tensorboard::Summary& s = *event.mutable_summary();
  add_scalar(s, "train/loss", r.loss);
  add_scalar(s, "train/lr", r.lr);
  add_scalar(s, "train/grad_norm", r.grad_norm);
  add_scalar(s, "train/aux_loss", r.aux_loss);
  add_scalar(s, "train/z_loss", r.z_loss);
  add_scalar(s, "perf/tokens_per_second", r.tokens_per_second);
  add_scalar(s, "perf/model_tflops", r.model_flops / 1e12);
  add_scalar(s, "perf/peak_percent", 100.0 * r.peak_fraction);
  add_scalar(s, "perf/step_seconds", r.step_seconds);
  add_scalar(s, "perf/forward_backward_seconds", r.forward_backward_seconds);
  add_scalar(s, "perf/optimizer_seconds", r.optimizer_seconds);
  add_scalar(s, "perf/refresh_seconds", r.refresh_seconds);
  if (r.val_loss >= 0) add_scalar(s, "val/loss", r.val_loss);
  add_scalar(s, "memory/buffers_gb", double(r.buffer_bytes) / 1e9);
  add_scalar(s, "memory/buffers_peak_gb", double(r.buffer_peak_bytes) / 1e9);
  for (size_t l = 0; l < r.min_load.size(); ++l) {
    add_scalar(s, fmt::format("moe/layer{}/min_load", l), r.min_load[l]);
    add_scalar(s, fmt::format("moe/layer{}/max_load", l), r.max_load[l]);
  }
  for (const auto& [group, bytes] : r.bytes_sent) add_scalar(s, "comm/" + group + "_mb", double(bytes) / 1e6);
  for (const SpectralMetrics& m : r.spectral) {
    const std::string p = fmt::format("sdmoe/layer{}/{}/", m.layer, sdmoe_matrix_name(m.matrix));
    add_scalar(s, p + "overlap_left", m.overlap_left);
    add_scalar(s, p + "overlap_right", m.overlap_right);
    add_scalar(s, p + "tail_overlap_left", m.tail_overlap_left);
    add_scalar(s, p + "tail_overlap_right", m.tail_overlap_right);
    add_scalar(s, p + "grad_overlap_left", m.grad_overlap_left);
    add_scalar(s, p + "grad_overlap_right", m.grad_overlap_right);
    add_scalar(s, p + "router_alignment", m.router_alignment);
  }
  write_record(event.SerializeAsString());
}

}  // namespace sdmoe
