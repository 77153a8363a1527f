#include "core/check.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace sdmoe {

std::string where_am_i() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return fmt::format("rank {} on host {} (pid {})", rank, host, getpid());
  }
  return fmt::format("host {} (pid {})", host, getpid());
}

void fatal(const char* library, const std::string& what, const char* file, int line) {
  std::fprintf(stderr, "sdmoe: fatal %s error on %s at %s:%d: %s\n", library, where_am_i().c_str(),
               file, line, what.c_str());
  std::fflush(stderr);
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, 3);
  std::abort();
}

}  // namespace sdmoe
