#include "launcher/metrics_log.h"

#include <sys/resource.h>

#include <cmath>
#include <ctime>

#include "core/check.h"

namespace sdmoe {
namespace {

std::string number(double x) { return std::isfinite(x) ? fmt::format("{:.9g}", x) : "null"; }

std::string array(const std::vector<double>& xs) {
  std::string s = "[";
  for (size_t i = 0; i < xs.size(); ++i) s += (i ? "," : "") + number(xs[i]);
  return s + "]";
}

// Names here are ours (axis names, matrix names): plain ASCII without quotes.
std::string quoted(const std::string& s) { return "\"" + s + "\""; }

int64_t max_rss_bytes() {
  struct rusage usage = {};
  getrusage(RUSAGE_SELF, &usage);
  return int64_t(usage.ru_maxrss) * 1024;
}

}  // namespace

std::string step_record_json(const StepRecord& r, double elapsed_seconds) {
  std::string s = fmt::format(
      "{{\"step\":{},\"time\":{},\"elapsed_seconds\":{},\"loss\":{},\"lr\":{},\"grad_norm\":{},\"tokens_per_second\":{},"
      "\"model_flops\":{},\"peak_fraction\":{},\"aux_loss\":{},\"z_loss\":{},\"min_load\":{},\"max_load\":{},"
      "\"max_rss_bytes\":{},\"buffer_bytes\":{},\"buffer_peak_bytes\":{},\"step_seconds\":{},"
      "\"forward_backward_seconds\":{},\"optimizer_seconds\":{},\"refresh_seconds\":{},\"activation_bytes\":{},"
      "\"compute_seconds_min\":{},\"compute_seconds_median\":{},\"compute_seconds_max\":{},\"slowest_rank\":{},"
      "\"forward_backward_comm_seconds\":{},\"optimizer_comm_seconds\":{}",
      r.step, int64_t(std::time(nullptr)), number(elapsed_seconds), number(r.loss), number(r.lr),
      number(r.grad_norm), number(r.tokens_per_second), number(r.model_flops), number(r.peak_fraction),
      number(r.aux_loss), number(r.z_loss), array(r.min_load), array(r.max_load), max_rss_bytes(), r.buffer_bytes,
      r.buffer_peak_bytes, number(r.step_seconds), number(r.forward_backward_seconds), number(r.optimizer_seconds),
      number(r.refresh_seconds), r.activation_bytes, number(r.compute_seconds_min), number(r.compute_seconds_median),
      number(r.compute_seconds_max), r.slowest_rank, number(r.forward_backward_comm_seconds),
      number(r.optimizer_comm_seconds));
  s += ",\"expert_load\":[";
  for (size_t l = 0; l < r.expert_load.size(); ++l) s += (l ? "," : "") + array(r.expert_load[l]);
  s += "]";
  if (r.val_loss >= 0) s += ",\"val_loss\":" + number(r.val_loss);
  s += ",\"bytes_sent\":{";
  for (size_t i = 0; i < r.bytes_sent.size(); ++i)
    s += fmt::format("{}{}:{}", i ? "," : "", quoted(r.bytes_sent[i].first), r.bytes_sent[i].second);
  s += "}";
  if (!r.spectral.empty()) {
    s += fmt::format(",\"spectral_compute_seconds\":{},\"spectral_comm_seconds\":{},\"spectral\":[",
                     number(r.spectral_compute_seconds), number(r.spectral_comm_seconds));
    for (size_t i = 0; i < r.spectral.size(); ++i) {
      const SpectralMetrics& m = r.spectral[i];
      s += fmt::format(
          "{}{{\"layer\":{},\"matrix\":{},\"overlap_left\":{},\"overlap_right\":{},\"tail_overlap_left\":{},"
          "\"tail_overlap_right\":{},\"grad_overlap_left\":{},\"grad_overlap_right\":{},\"router_alignment\":{}}}",
          i ? "," : "", m.layer, quoted(sdmoe_matrix_name(m.matrix)), number(m.overlap_left), number(m.overlap_right),
          number(m.tail_overlap_left), number(m.tail_overlap_right), number(m.grad_overlap_left),
          number(m.grad_overlap_right), number(m.router_alignment));
    }
    s += "]";
  }
  return s + "}";
}

JsonlMetrics::JsonlMetrics(const std::string& path) : path_(path) {
  file_ = std::fopen(path.c_str(), "a");
  if (!file_) fail("metrics.jsonl: cannot open {} for appending", path);
}

JsonlMetrics::~JsonlMetrics() {
  if (file_) std::fclose(file_);
}

void JsonlMetrics::append(const StepRecord& r, double elapsed_seconds) {
  const std::string line = step_record_json(r, elapsed_seconds) + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0)
    fail("metrics.jsonl: cannot write {}", path_);
}

}  // namespace sdmoe
