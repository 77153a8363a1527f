// Element types and devices shared by every tensor and backend.
#pragma once
#include <cstdint>
#include <cstring>
#include <string_view>

namespace sdmoe {

// F64 exists for the CPU oracle (finite-difference gradient checks); training uses F32
// master weights, with BF16 as a storage type for GEMM inputs on GPU.
enum class DType : uint8_t { F32, BF16, F64, I32 };
enum class Device : uint8_t { CPU, CUDA };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F64: return 8;
    case DType::I32: return 4;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::F64: return "f64";
    case DType::I32: return "i32";
  }
  return "?";
}

constexpr std::string_view device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

// bf16 as the upper half of an fp32, rounded to nearest even (NaN kept quiet).
struct bf16 {
  uint16_t bits;
};

inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

inline float bf16_to_float(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace sdmoe
