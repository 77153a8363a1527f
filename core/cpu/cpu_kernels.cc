// CPU layer kernels: plain loops parallelised with OpenMP over independent rows. They are
// the oracle that the CUDA kernels are tested against, so clarity comes before speed;
// the GEMMs, where the time goes, are OpenBLAS or our AVX-512 kernel. The exception is the
// cross-entropy's passes over the vocabulary, as costly as the output head's GEMM in the
// portable form: on AVX-512 CPUs their float rows run in softmax_rows_avx512.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/cpu_dispatch.h"
#include "core/cpu/fast_math.h"
#include "core/cpu/flash_attention.h"
#include "core/cpu/softmax_rows_avx512.h"

namespace sdmoe {
using cpu::dispatch_float;
using cpu::dispatch_storage;
using cpu::exp_of;
using cpu::expect_same;
using cpu::narrow;
using cpu::widen;

void CpuBackend::embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) {
  const int64_t tokens = ids.numel(), dim = table.cols(), vocab = table.rows();
  const int32_t* id = ids.ptr<int32_t>();
  // The table may be in a storage dtype (BF16's working copy of the weights); the rows
  // are widened exactly into the output's dtype.
  dispatch_float(out.dtype, [&](auto z) {
    using T = decltype(z);
    dispatch_storage(table.dtype, [&](auto zt) {
      using W = decltype(zt);
#pragma omp parallel for schedule(static)
      for (int64_t t = 0; t < tokens; ++t) {
        SDMOE_ASSERT(id[t] < vocab, "token id {} outside vocabulary {}", id[t], vocab);
        T* o = out.ptr<T>() + t * dim;
        if (id[t] < 0) {
          std::fill_n(o, dim, T(0));  // row on another rank
          continue;
        }
        const W* row = table.ptr<W>() + int64_t(id[t]) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = T(widen(row[d]));
      }
    });
  });
}

void CpuBackend::embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) {
  const int64_t tokens = ids.numel(), dim = dtable.cols();
  const int32_t* id = ids.ptr<int32_t>();
  dispatch_float(dtable.dtype, [&](auto z) {
    using T = decltype(z);
    // Sequential over tokens: repeated ids must accumulate in a fixed order.
    for (int64_t t = 0; t < tokens; ++t) {
      if (id[t] < 0) continue;  // row on another rank
      T* row = dtable.ptr<T>() + int64_t(id[t]) * dim;
      const T* g = dout.ptr<T>() + t * dim;
      for (int64_t d = 0; d < dim; ++d) row[d] += g[d];
    }
  });
}

void CpuBackend::rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& y,
                                 const Tensor& rstd) {
  const int64_t rows = x.rows(), dim = x.cols();
  // y may be in a storage dtype (a bf16 GEMM operand), and so may the weight (BF16's
  // working copy); statistics stay in x's dtype.
  dispatch_float(x.dtype, [&](auto z) {
    using T = decltype(z);
    dispatch_storage(y.dtype, [&](auto zy) {
      using Y = decltype(zy);
      std::vector<double> w(static_cast<size_t>(dim));
      dispatch_storage(weight.dtype, [&](auto zw) {
        for (int64_t d = 0; d < dim; ++d) w[size_t(d)] = widen(weight.ptr<decltype(zw)>()[d]);
      });
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x.ptr<T>() + r * dim;
        double ss = 0.0;
        for (int64_t d = 0; d < dim; ++d) ss += double(xr[d]) * double(xr[d]);
        const double inv = 1.0 / std::sqrt(ss / double(dim) + eps);
        rstd.ptr<T>()[r] = T(inv);
        Y* yr = y.ptr<Y>() + r * dim;
        for (int64_t d = 0; d < dim; ++d) yr[d] = narrow<Y>(double(xr[d]) * inv * w[size_t(d)]);
      }
    });
  });
}

void CpuBackend::rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy,
                                  const Tensor& dx, const Tensor& dweight) {
  const int64_t rows = x.rows(), dim = x.cols();
  // The weight may be in a storage dtype (BF16's working copy).
  std::vector<double> w(static_cast<size_t>(dim));
  dispatch_storage(weight.dtype, [&](auto zw) {
    for (int64_t d = 0; d < dim; ++d) w[size_t(d)] = widen(weight.ptr<decltype(zw)>()[d]);
  });
  dispatch_float(x.dtype, [&](auto z) {
    using T = decltype(z);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T *xr = x.ptr<T>() + r * dim, *gr = dy.ptr<T>() + r * dim;
      const double inv = double(rstd.ptr<T>()[r]);
      // y = x * inv * w  =>  dx = inv * (g*w) - x * inv^3 * mean(g*w*x)
      double dot = 0.0;
      for (int64_t d = 0; d < dim; ++d) dot += double(gr[d]) * w[size_t(d)] * double(xr[d]);
      const double coef = dot * inv * inv * inv / double(dim);
      T* dxr = dx.ptr<T>() + r * dim;
      for (int64_t d = 0; d < dim; ++d) dxr[d] = T(double(gr[d]) * w[size_t(d)] * inv - double(xr[d]) * coef);
    }
    // Weight gradient reduced over rows in row order (deterministic).
    T* dw = dweight.ptr<T>();
#pragma omp parallel for schedule(static)
    for (int64_t d = 0; d < dim; ++d) {
      double acc = 0.0;
      for (int64_t r = 0; r < rows; ++r)
        acc += double(dy.ptr<T>()[r * dim + d]) * double(x.ptr<T>()[r * dim + d]) * double(rstd.ptr<T>()[r]);
      dw[d] += T(acc);
    }
  });
}

void CpuBackend::swiglu_forward(const Tensor& gate_up, const Tensor& out) {
  const int64_t rows = out.rows(), f = out.cols();
  SDMOE_ASSERT(gate_up.cols() == 2 * f, "swiglu: gate_up must be [T,2F]");
  // out may be in a storage dtype (a bf16 GEMM operand).
  dispatch_float(gate_up.dtype, [&](auto z) {
    using T = decltype(z);
    dispatch_storage(out.dtype, [&](auto zo) {
      using O = decltype(zo);
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate_up.ptr<T>() + r * 2 * f;
        O* o = out.ptr<O>() + r * f;
        for (int64_t i = 0; i < f; ++i) {
          const double a = double(g[i]);
          o[i] = narrow<O>(a / (1.0 + std::exp(-a)) * double(g[f + i]));
        }
      }
    });
  });
}

void CpuBackend::swiglu_backward(const Tensor& gate_up, const Tensor& dout, const Tensor& dgate_up) {
  const int64_t rows = dout.rows(), f = dout.cols();
  // dgate_up may be in a storage dtype (a bf16 GEMM operand).
  dispatch_float(dout.dtype, [&](auto z) {
    using T = decltype(z);
    dispatch_storage(dgate_up.dtype, [&](auto zg) {
      using G = decltype(zg);
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate_up.ptr<T>() + r * 2 * f;
        const T* d = dout.ptr<T>() + r * f;
        G* dg = dgate_up.ptr<G>() + r * 2 * f;
        for (int64_t i = 0; i < f; ++i) {
          const double a = double(g[i]), u = double(g[f + i]), s = 1.0 / (1.0 + std::exp(-a));
          dg[i] = narrow<G>(double(d[i]) * u * s * (1.0 + a * (1.0 - s)));
          dg[f + i] = narrow<G>(double(d[i]) * a * s);
        }
      }
    });
  });
}

namespace {
// Copies between [B,S,P,H,Dh] (P packed projections, p-th selected) and [B,H,S,Dh]; the two
// sides may differ in storage dtype (a master-dtype result rounded into a bf16 operand).
template <typename P, typename H>
void heads_copy(const Tensor& packed_t, const Tensor& heads_t, int64_t b, int64_t s, int64_t parts, int64_t part,
                int64_t h, int64_t dh, bool to_heads) {
  P* packed = packed_t.ptr<P>();
  H* heads = heads_t.ptr<H>();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t si = 0; si < s; ++si)
      for (int64_t hi = 0; hi < h; ++hi) {
        H* hp = heads + ((bi * h + hi) * s + si) * dh;
        P* pp = packed + (((bi * s + si) * parts + part) * h + hi) * dh;
        if constexpr (std::is_same_v<P, H>) {
          if (to_heads) std::copy_n(pp, dh, hp);
          else std::copy_n(hp, dh, pp);
        } else if (to_heads) {
          for (int64_t i = 0; i < dh; ++i) hp[i] = narrow<H>(widen(pp[i]));
        } else {
          for (int64_t i = 0; i < dh; ++i) pp[i] = narrow<P>(widen(hp[i]));
        }
      }
}

template <typename Fn>
void dispatch_pair(DType packed, DType heads, Fn&& fn) {
  dispatch_storage(packed, [&](auto zp) { dispatch_storage(heads, [&](auto zh) { fn(zp, zh); }); });
}
}  // namespace

void CpuBackend::split_qkv(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t b = q.dim(0), h = q.dim(1), s = q.dim(2), dh = q.dim(3);
  expect_same(q, k, "split_qkv");
  expect_same(q, v, "split_qkv");
  dispatch_pair(qkv.dtype, q.dtype, [&](auto zp, auto zh) {
    using P = decltype(zp);
    using H = decltype(zh);
    heads_copy<P, H>(qkv, q, b, s, 3, 0, h, dh, true);
    heads_copy<P, H>(qkv, k, b, s, 3, 1, h, dh, true);
    heads_copy<P, H>(qkv, v, b, s, 3, 2, h, dh, true);
  });
}

void CpuBackend::join_qkv(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dqkv) {
  const int64_t b = dq.dim(0), h = dq.dim(1), s = dq.dim(2), dh = dq.dim(3);
  expect_same(dq, dk, "join_qkv");
  expect_same(dq, dv, "join_qkv");
  dispatch_pair(dqkv.dtype, dq.dtype, [&](auto zp, auto zh) {
    using P = decltype(zp);
    using H = decltype(zh);
    heads_copy<P, H>(dqkv, dq, b, s, 3, 0, h, dh, false);
    heads_copy<P, H>(dqkv, dk, b, s, 3, 1, h, dh, false);
    heads_copy<P, H>(dqkv, dv, b, s, 3, 2, h, dh, false);
  });
}

void CpuBackend::merge_heads(const Tensor& x_bhsd, const Tensor& y_bshd) {
  const int64_t b = x_bhsd.dim(0), h = x_bhsd.dim(1), s = x_bhsd.dim(2), dh = x_bhsd.dim(3);
  dispatch_pair(y_bshd.dtype, x_bhsd.dtype, [&](auto zp, auto zh) {
    heads_copy<decltype(zp), decltype(zh)>(y_bshd, x_bhsd, b, s, 1, 0, h, dh, false);
  });
}

void CpuBackend::split_heads(const Tensor& y_bshd, const Tensor& x_bhsd) {
  const int64_t b = x_bhsd.dim(0), h = x_bhsd.dim(1), s = x_bhsd.dim(2), dh = x_bhsd.dim(3);
  dispatch_pair(y_bshd.dtype, x_bhsd.dtype, [&](auto zp, auto zh) {
    heads_copy<decltype(zp), decltype(zh)>(y_bshd, x_bhsd, b, s, 1, 0, h, dh, true);
  });
}

void CpuBackend::rope(const Tensor& x, double theta, int direction) {
  const int64_t bh = x.dim(0) * x.dim(1), s = x.dim(2), dh = x.dim(3), half = dh / 2;
  // cos/sin tables [S, Dh/2], computed once per call in double.
  std::vector<double> cos_table(s * half), sin_table(s * half);
  for (int64_t pos = 0; pos < s; ++pos)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = double(pos) * std::pow(theta, -2.0 * double(i) / double(dh));
      cos_table[pos * half + i] = std::cos(angle);
      sin_table[pos * half + i] = direction * std::sin(angle);
    }
  // Also on bf16 operands (q and k kept for the backward), computed in double.
  dispatch_storage(x.dtype, [&](auto z) {
    using T = decltype(z);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < bh; ++n)
      for (int64_t pos = 0; pos < s; ++pos) {
        T* row = x.ptr<T>() + (n * s + pos) * dh;
        for (int64_t i = 0; i < half; ++i) {
          const double c = cos_table[pos * half + i], sn = sin_table[pos * half + i];
          const double a = widen(row[i]), b = widen(row[i + half]);
          row[i] = narrow<T>(a * c - b * sn);
          row[i + half] = narrow<T>(a * sn + b * c);
        }
      }
  });
}

void CpuBackend::causal_softmax_forward(const Tensor& scores, double scale) {
  const int64_t n = scores.dim(0), s = scores.dim(1);
  dispatch_float(scores.dtype, [&](auto z) {
    using T = decltype(z);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < n; ++b)
      for (int64_t i = 0; i < s; ++i) {
        T* row = scores.ptr<T>() + (b * s + i) * s;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, scale * double(row[j]));
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(scale * double(row[j]) - mx);
        for (int64_t j = 0; j <= i; ++j) row[j] = T(std::exp(scale * double(row[j]) - mx) / sum);
        for (int64_t j = i + 1; j < s; ++j) row[j] = T(0);
      }
  });
}

void CpuBackend::causal_softmax_backward(const Tensor& probs, const Tensor& grad, double scale) {
  const int64_t n = probs.dim(0), s = probs.dim(1);
  // probs may be the bf16 operand the forward kept; the gradient stays in its own dtype.
  dispatch_float(grad.dtype, [&](auto z) {
    using T = decltype(z);
    dispatch_storage(probs.dtype, [&](auto zp) {
      using P = decltype(zp);
#pragma omp parallel for collapse(2) schedule(static)
      for (int64_t b = 0; b < n; ++b)
        for (int64_t i = 0; i < s; ++i) {
          const P* p = probs.ptr<P>() + (b * s + i) * s;
          T* g = grad.ptr<T>() + (b * s + i) * s;
          double dot = 0.0;
          for (int64_t j = 0; j <= i; ++j) dot += widen(p[j]) * double(g[j]);
          for (int64_t j = 0; j <= i; ++j) g[j] = T(scale * widen(p[j]) * (double(g[j]) - dot));
          for (int64_t j = i + 1; j < s; ++j) g[j] = T(0);
        }
    });
  });
}

void CpuBackend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& out,
                                   const Tensor& lse) {
  cpu::flash_attention_forward(q, k, v, scale, out, lse);
}

void CpuBackend::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                    const Tensor& dout, const Tensor& lse, double scale, const Tensor& dq,
                                    const Tensor& dk, const Tensor& dv) {
  cpu::flash_attention_backward(q, k, v, out, dout, lse, scale, dq, dk, dv);
}

void CpuBackend::cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& losses,
                                       const Tensor& lse) {
  const int64_t rows = logits.rows(), vocab = logits.cols();
  const int32_t* tgt = targets.ptr<int32_t>();
  dispatch_float(logits.dtype, [&](auto z) {
    using T = decltype(z);
    const bool avx512 = std::is_same_v<T, float> && cpu::cpu_supports_softmax_rows_avx512();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = logits.ptr<T>() + r * vocab;
      double l = 0.0;
      if constexpr (std::is_same_v<T, float>) {
        if (avx512) l = cpu::logsumexp_row_avx512(row, vocab);
      }
      if (!avx512) {
        T mx = row[0];
        for (int64_t v = 1; v < vocab; ++v) mx = std::max(mx, row[v]);
        // Partial sums in the working type (vectorised), added up in double.
        constexpr int kLanes = 16;
        T part[kLanes] = {};
        int64_t v = 0;
        for (; v + kLanes <= vocab; v += kLanes)
#pragma omp simd
          for (int i = 0; i < kLanes; ++i) part[i] += exp_of<T>(row[v + i] - mx);
        double sum = 0.0;
        for (; v < vocab; ++v) sum += double(exp_of<T>(row[v] - mx));
        for (int i = 0; i < kLanes; ++i) sum += double(part[i]);
        l = double(mx) + std::log(sum);
      }
      lse.ptr<T>()[r] = T(l);
      losses.ptr<T>()[r] = tgt[r] == kTargetOnOtherShard ? T(l) : tgt[r] < 0 ? T(0) : T(l - double(row[tgt[r]]));
    }
  });
}

void CpuBackend::cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                        double scale) {
  const int64_t rows = logits.rows(), vocab = logits.cols();
  const int32_t* tgt = targets.ptr<int32_t>();
  dispatch_float(logits.dtype, [&](auto z) {
    using T = decltype(z);
    const bool avx512 = std::is_same_v<T, float> && cpu::cpu_supports_softmax_rows_avx512();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      T* row = logits.ptr<T>() + r * vocab;
      if (tgt[r] < 0 && tgt[r] != kTargetOnOtherShard) {
        std::fill_n(row, vocab, T(0));
        continue;
      }
      const T l = lse.ptr<T>()[r], sc = T(scale);
      if constexpr (std::is_same_v<T, float>) {
        if (avx512) cpu::scaled_exp_row_avx512(row, vocab, l, sc);
      }
      if (!avx512) {
#pragma omp simd
        for (int64_t v = 0; v < vocab; ++v) row[v] = sc * exp_of<T>(row[v] - l);
      }
      if (tgt[r] >= 0) row[tgt[r]] -= T(scale);
    }
  });
}

}  // namespace sdmoe
