// Measured fp32 FMA peak: independent FMA chains on the widest vector unit, one chain set
// per thread. The figure is the denominator of every "% of peak" the tools print.
#include <immintrin.h>
#include <omp.h>

#include <chrono>

#include "core/cpu/cpu_backend.h"

namespace sdmoe {
namespace {

constexpr int kChains = 12;  // enough independent chains to cover FMA latency x ports

__attribute__((target("avx512f"))) float fma_loop_avx512(int64_t iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) float fma_loop_avx2(int64_t iters) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  float out[8];
  __m256 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
  _mm256_storeu_ps(out, s);
  return out[0] + out[7];
}

double flops_per_iteration(bool avx512) { return double(kChains) * (avx512 ? 16 : 8) * 2; }

}  // namespace

double measure_loop_peak(int threads, int64_t iters, double flops_per_iteration, float (*loop)(int64_t)) {
  const int used = threads > 0 ? threads : omp_get_max_threads();
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    float sink = 0.0f;
    auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(used)
    {
      float r = loop(iters);
#pragma omp atomic
      sink += r;
    }
    // Keeps the loops' results observable, so the compiler cannot drop them.
    asm volatile("" : : "r"(&sink) : "memory");
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, used * iters * flops_per_iteration / seconds);
  }
  return best;
}

double measure_cpu_fma_peak(int threads) {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!avx512 && !avx2) return 0.0;
  return measure_loop_peak(threads, 20'000'000, flops_per_iteration(avx512), avx512 ? fma_loop_avx512 : fma_loop_avx2);
}

}  // namespace sdmoe
