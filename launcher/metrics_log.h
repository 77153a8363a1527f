// Per-step metrics on disk: one JSON object per line (JSONL), appended by world rank 0.
// The fields are listed in docs/usage.md; scripts/plot_run.py reads them.
#pragma once
#include <cstdio>
#include <string>

#include "launcher/trainer.h"

namespace sdmoe {

class JsonlMetrics {
 public:
  // Opens `path` for appending (a resumed run continues its file; readers keep the last
  // record of a step). Throws sdmoe::Error when it cannot.
  explicit JsonlMetrics(const std::string& path);
  ~JsonlMetrics();
  JsonlMetrics(const JsonlMetrics&) = delete;
  JsonlMetrics& operator=(const JsonlMetrics&) = delete;
  // One line, flushed: a killed run loses no finished step.
  void append(const StepRecord& r, double elapsed_seconds);

 private:
  std::FILE* file_ = nullptr;
  std::string path_;
};

// The record as one JSON object (no newline); NaN and infinities become null.
std::string step_record_json(const StepRecord& r, double elapsed_seconds);

}  // namespace sdmoe
