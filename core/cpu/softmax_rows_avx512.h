// AVX-512 row kernels for the cross-entropy over the vocabulary. The library is built for
// baseline x86-64, where the portable loops in cpu_kernels.cc run 4 lanes wide without
// FMA (and the row maximum not vectorised at all), which made the two passes over the
// [tokens, vocabulary] logits cost more than the output head's GEMM. These run 16 lanes
// wide with FMA, chosen at run time where the CPU has AVX-512.
#pragma once

#include <cstdint>

namespace sdmoe::cpu {

// True when the CPU has AVX-512, which these kernels need.
bool cpu_supports_softmax_rows_avx512();

// log(sum_v exp(row[v])) for v in [0, n), n >= 1: the row's maximum plus the log of the
// sum of exp(row[v] - maximum), summed in float lanes and the lanes in double. A NaN in
// the row gives NaN.
double logsumexp_row_avx512(const float* row, int64_t n);

// row[v] <- scale * exp(row[v] - shift) for v in [0, n).
void scaled_exp_row_avx512(float* row, int64_t n, float shift, float scale);

}  // namespace sdmoe::cpu
