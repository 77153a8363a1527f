// The 16 x 16 transpose of 32-bit words in AVX-512 registers that the CPU kernels share (the
// fp32 and bf16 GEMMs pack B^T panels with it, the fused attention transposes q and k
// tiles): unpack pairs, then quads, then 128-bit lanes twice; on the machines measured this
// beat the two-source permutes.
#pragma once
#include <immintrin.h>

namespace sdmoe::cpu {

// r[i] <- column i of the 16 x 16 matrix whose rows were r[0..15]. Callers are compiled for
// AVX-512 (a superset of this target), so it inlines into them.
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4q + c] now holds, in each 128-bit lane l, column 4l + c of rows 4q..4q+3.
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 a0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), a1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    const __m512 b0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88),
                 b1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(a0, b0, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(a0, b0, 0xDD);
    t[4 + c] = _mm512_shuffle_f32x4(a1, b1, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(a1, b1, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// The same on integer registers (pairs of bf16 words move as one 32-bit word).
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512i v[16]) {
  __m512 r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(v[i]);
  transpose16(r);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) v[i] = _mm512_castps_si512(r[i]);
}

}  // namespace sdmoe::cpu
