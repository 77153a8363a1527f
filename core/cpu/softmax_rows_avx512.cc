// The exponential is fast_expf (core/cpu/fast_math.h) on 16 lanes: the same range
// reduction and polynomial, with fused multiply-adds, so the same accuracy (relative
// error below 2e-7 for arguments in [-87, 88]).
#include "core/cpu/softmax_rows_avx512.h"
#include "core/cpu/avx512_exp.h"

#include <immintrin.h>

#include <cmath>
#include <limits>

namespace sdmoe::cpu {
namespace {

constexpr int kLanes = 16;
constexpr int kAccumulators = 4;  // independent chains, to cover the FMA latency


__attribute__((target("avx512f"))) inline __mmask16 tail_mask(int64_t left) {
  return static_cast<__mmask16>((1u << left) - 1u);
}

}  // namespace

bool cpu_supports_softmax_rows_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

__attribute__((target("avx512f"))) double logsumexp_row_avx512(const float* row, int64_t n) {
  constexpr int64_t kBlock = kLanes * kAccumulators;
  // The maximum. A NaN may be dropped here (max returns its second operand when either is
  // NaN), but not in the sum below: exp16 keeps it, and so does every add after it.
  __m512 top[kAccumulators];
  for (__m512& t : top) t = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t v = 0;
  for (; v + kBlock <= n; v += kBlock)
    for (int a = 0; a < kAccumulators; ++a) top[a] = _mm512_max_ps(top[a], _mm512_loadu_ps(row + v + a * kLanes));
  for (; v + kLanes <= n; v += kLanes) top[0] = _mm512_max_ps(top[0], _mm512_loadu_ps(row + v));
  if (v < n) {
    const __mmask16 mask = tail_mask(n - v);
    top[0] = _mm512_mask_max_ps(top[0], mask, top[0], _mm512_maskz_loadu_ps(mask, row + v));
  }
  for (int a = 1; a < kAccumulators; ++a) top[0] = _mm512_max_ps(top[0], top[a]);
  const float largest = _mm512_reduce_max_ps(top[0]);

  const __m512 shift = _mm512_set1_ps(largest);
  __m512 sum[kAccumulators];
  for (__m512& s : sum) s = _mm512_setzero_ps();
  for (v = 0; v + kBlock <= n; v += kBlock)
    for (int a = 0; a < kAccumulators; ++a)
      sum[a] = _mm512_add_ps(sum[a], exp16(_mm512_sub_ps(_mm512_loadu_ps(row + v + a * kLanes), shift)));
  for (; v + kLanes <= n; v += kLanes) sum[0] = _mm512_add_ps(sum[0], exp16(_mm512_sub_ps(_mm512_loadu_ps(row + v), shift)));
  if (v < n) {
    const __mmask16 mask = tail_mask(n - v);
    sum[0] = _mm512_mask_add_ps(sum[0], mask, sum[0], exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + v), shift)));
  }
  double total = 0.0;
  float lanes[kLanes];
  for (int a = 0; a < kAccumulators; ++a) {
    _mm512_storeu_ps(lanes, sum[a]);
    for (int i = 0; i < kLanes; ++i) total += double(lanes[i]);
  }
  return double(largest) + std::log(total);
}

__attribute__((target("avx512f"))) void scaled_exp_row_avx512(float* row, int64_t n, float shift, float scale) {
  const __m512 s = _mm512_set1_ps(shift), c = _mm512_set1_ps(scale);
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes)
    _mm512_storeu_ps(row + v, _mm512_mul_ps(c, exp16(_mm512_sub_ps(_mm512_loadu_ps(row + v), s))));
  if (v < n) {
    const __mmask16 mask = tail_mask(n - v);
    _mm512_mask_storeu_ps(row + v, mask, _mm512_mul_ps(c, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + v), s))));
  }
}

}  // namespace sdmoe::cpu
