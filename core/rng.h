// Counter-based random numbers.
//
// Every value is a pure function of (seed, stream, index): no state is carried, so a
// parameter initialised on CPU or GPU, whole or split across ranks, gets the same values
// for the same logical element. The generator is the splitmix64 finaliser applied to a
// mixed key; it is not cryptographic, only well distributed.
#pragma once
#include <cmath>
#include <cstdint>
#include <string_view>

#if defined(__CUDACC__)
#define SDMOE_HOST_DEVICE __host__ __device__
#else
#define SDMOE_HOST_DEVICE
#endif

namespace sdmoe {

SDMOE_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

SDMOE_HOST_DEVICE inline uint64_t random_bits(uint64_t seed, uint64_t stream, uint64_t index) {
  return mix64(mix64(seed ^ 0x9e3779b97f4a7c15ULL) ^ mix64(stream + 0x632be59bd9b4e019ULL) ^
               (index * 0x9e3779b97f4a7c15ULL));
}

// Uniform in (0, 1), never exactly 0 so that log() is safe.
SDMOE_HOST_DEVICE inline double random_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return (static_cast<double>(random_bits(seed, stream, index) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// Standard normal by Box-Muller over two counters (2*index and 2*index+1).
SDMOE_HOST_DEVICE inline double random_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  double u1 = random_uniform(seed, stream, 2 * index);
  double u2 = random_uniform(seed, stream, 2 * index + 1);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

// Streams are derived from tensor names, so the stream of "layers.3.attn.qkv" does not
// depend on how many tensors precede it.
constexpr uint64_t stream_of(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (char c : name) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace sdmoe
