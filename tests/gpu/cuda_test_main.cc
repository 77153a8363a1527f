// The main of every CUDA op test binary: the shared backends are released before static
// destruction (tests/gpu/cuda_test_support.h).
#include <gtest/gtest.h>

#include "tests/gpu/cuda_test_support.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::AddGlobalTestEnvironment(new sdmoe::cuda_test::Backends);
  return RUN_ALL_TESTS();
}
