// One error family for the whole code base.
//
// sdmoe::Error carries a one-line message about bad input (config, data, vocabulary):
// the launcher prints it and exits nonzero. fatal() is for broken invariants and failed
// library calls (CUDA, cuBLAS, cuSOLVER, NCCL, MPI, LAPACK): it prints rank, host and
// file:line and aborts the whole MPI job so that no rank hangs in a collective.
#pragma once
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace sdmoe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// "rank 3 on host node017" when MPI is up, "host node017" otherwise.
std::string where_am_i();

[[noreturn]] void fatal(const char* library, const std::string& what, const char* file, int line);

}  // namespace sdmoe

#define SDMOE_FATAL(library, what) ::sdmoe::fatal(library, what, __FILE__, __LINE__)

// Invariant checks, active in release builds too: a silent wrong answer costs more than
// the branch.
#define SDMOE_ASSERT(cond, ...)                                                     \
  do {                                                                              \
    if (!(cond)) SDMOE_FATAL("assert", fmt::format("{}: " #cond, fmt::format(__VA_ARGS__))); \
  } while (0)

#define SDMOE_CHECK_MPI(call)                                                       \
  do {                                                                              \
    int sdmoe_mpi_rc_ = (call);                                                     \
    if (sdmoe_mpi_rc_ != 0) SDMOE_FATAL("MPI", fmt::format("{} returned {}", #call, sdmoe_mpi_rc_)); \
  } while (0)

#define SDMOE_CHECK_LAPACK(call)                                                    \
  do {                                                                              \
    long sdmoe_lapack_rc_ = static_cast<long>(call);                                \
    if (sdmoe_lapack_rc_ != 0)                                                      \
      SDMOE_FATAL("LAPACK", fmt::format("{} returned info={}", #call, sdmoe_lapack_rc_)); \
  } while (0)
