// A private scratch directory per fuzzer process: TMPDIR/sdmoe_fuzz_<name>_<pid>, removed
// at exit. A crash ends the process without exit handlers, so each start first removes
// the directories of processes that no longer run.
#pragma once
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace sdmoe_fuzz {

inline std::string make_temp_dir(const std::string& name) {
  namespace fs = std::filesystem;
  const fs::path tmp = fs::temp_directory_path();
  const std::string prefix = "sdmoe_fuzz_" + name + "_";
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(tmp, ec)) {
    const std::string base = entry.path().filename().string();
    if (base.rfind(prefix, 0) != 0) continue;
    const std::string digits = base.substr(prefix.size());
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    const long pid = std::strtol(digits.c_str(), nullptr, 10);
    if (pid > 0 && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH) fs::remove_all(entry.path(), ec);
  }
  static std::string dir;
  dir = (tmp / (prefix + std::to_string(::getpid()))).string();
  fs::remove_all(dir, ec);
  fs::create_directories(dir);
  std::atexit([] {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  });
  return dir;
}

}  // namespace sdmoe_fuzz
