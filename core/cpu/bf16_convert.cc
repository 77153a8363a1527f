// fp32 <-> bf16 arrays: AVX-512 integer rounding where the CPU has AVX-512 (the same
// arithmetic as float_to_bf16, so every bit agrees, NaN included), else the scalar loop.
// AVX512_BF16's vcvtneps2bf16 would do it in one instruction, but it flushes denormals to
// zero, which the scalar definition does not.
#include "core/cpu/bf16_convert.h"

#include <immintrin.h>

namespace sdmoe::cpu {
namespace {

bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return has;
}

__attribute__((target("avx512f,avx512bw"))) void narrow_avx512(const float* src, bf16* dst, int64_t n) {
  const __m512i round_base = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(src + i);
    // Nearest even: add 0x7fff plus the lowest kept bit, keep the upper half.
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(round_base, lsb)), 16);
    // NaN: the upper half with the quiet bit set, as float_to_bf16 does.
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

__attribute__((target("avx512f,avx512bw"))) void widen_avx512(const bf16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(h, 16));
  }
  for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

}  // namespace

void float_to_bf16_array(const float* src, bf16* dst, int64_t n) {
  if (has_avx512()) return narrow_avx512(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

void bf16_to_float_array(const bf16* src, float* dst, int64_t n) {
  if (has_avx512()) return widen_avx512(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

}  // namespace sdmoe::cpu
