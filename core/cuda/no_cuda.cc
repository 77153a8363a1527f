// Stand-ins for builds without nvcc: the binary still links, reports no CUDA support and
// refuses to create a CUDA backend with a one-line error.
#include "core/backend.h"
#include "core/check.h"

namespace sdmoe {

bool cuda_backend_compiled() { return false; }

int cuda_device_count() { return 0; }

std::unique_ptr<Backend> make_cuda_backend(int /*device_ordinal*/) {
  throw Error("this binary was built without CUDA");
}

}  // namespace sdmoe
