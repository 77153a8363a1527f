// The inverse Cholesky factor of one small symmetric matrix, shared by the CPU backend and
// the CUDA kernel so that both compute the same arithmetic (in double).
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define SDMOE_HOST_DEVICE __host__ __device__
#else
#define SDMOE_HOST_DEVICE
#endif

namespace sdmoe {

// inv = L^{-1} (lower; zeros above the diagonal) with L L^T = gram + ridge I, ridge =
// relative_ridge x trace. l and li are k x k double scratch. A rank-deficient gram (the
// rows of an expert's gradient from fewer than k routed tokens span fewer than k
// dimensions) has pivots that are only the Gram's rounding, of either sign: a pivot below
// a fraction of its row's diagonal (1e-5 in f32, 1e-10 in f64, well above that rounding)
// is raised to it, so 1/L stays within T's range and such a row comes out finite (its
// direction is rounding; a second CholeskyQR pass makes the rows orthonormal). A floor of
// 1e-300 made 1/L about 1e150: inf in f32, and an overflowing Gram at the next pass in
// f64. Pivots above the floor are untouched. An all-zero gram (the rows of an expert's
// zero gradient) gives the identity, so those rows stay zero instead of turning into
// inf x 0.
template <typename T>
SDMOE_HOST_DEVICE inline void cholesky_inverse_lower(const T* gram, T* inv, int k, double relative_ridge, double* l,
                                                     double* li) {
  double trace = 0.0;
  for (int i = 0; i < k; ++i) trace += double(gram[i * k + i]);
  if (trace == 0.0) {
    for (int i = 0; i < k * k; ++i) inv[i] = T(i % (k + 1) == 0 ? 1.0 : 0.0);
    return;
  }
  const double ridge = trace * relative_ridge;
  const double floor_fraction = sizeof(T) == sizeof(float) ? 1e-5 : 1e-10;
  for (int i = 0; i < k; ++i)
    for (int j = 0; j <= i; ++j) {
      // Symmetric input: read the lower triangle.
      double s = double(gram[i * k + j]) + (i == j ? ridge : 0.0);
      for (int p = 0; p < j; ++p) s -= l[i * k + p] * l[j * k + p];
      if (i != j) {
        l[i * k + j] = s / l[j * k + j];
        continue;
      }
      double pivot_floor = floor_fraction * (double(gram[i * k + i]) + ridge);
      if (pivot_floor < 1e-300) pivot_floor = 1e-300;
      l[i * k + i] = sqrt(s > pivot_floor ? s : pivot_floor);
    }
  for (int c = 0; c < k; ++c)
    for (int i = 0; i < k; ++i) {
      if (i < c) {
        li[i * k + c] = 0.0;
        continue;
      }
      double s = i == c ? 1.0 : 0.0;
      for (int p = c; p < i; ++p) s -= l[i * k + p] * li[p * k + c];
      li[i * k + c] = s / l[i * k + i];
    }
  for (int i = 0; i < k * k; ++i) inv[i] = T(li[i]);
}

}  // namespace sdmoe
