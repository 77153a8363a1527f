// CPU kernels for MoE routing, token permutation and weighted combine.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/cpu_dispatch.h"

namespace sdmoe {
using cpu::dispatch_float;

namespace {
// Per-token scores: softmax probabilities or sigmoid gates.
template <typename T>
void token_scores(const T* z, int64_t experts, RouterScore score, double lse, double* out) {
  for (int64_t e = 0; e < experts; ++e)
    out[e] = score == RouterScore::SOFTMAX ? std::exp(double(z[e]) - lse) : 1.0 / (1.0 + std::exp(-double(z[e])));
}

template <typename T>
double logsumexp(const T* z, int64_t n) {
  double mx = double(z[0]);
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, double(z[i]));
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(double(z[i]) - mx);
  return mx + std::log(s);
}
}  // namespace

void CpuBackend::router_forward(const Tensor& logits, RouterScore score, bool normalize_topk,
                                const Tensor& topk_index, const Tensor& topk_weight, const Tensor& aux_probs,
                                const Tensor& lse) {
  const int64_t tokens = logits.rows(), experts = logits.cols(), k = topk_index.cols();
  SDMOE_ASSERT(k >= 1 && k <= experts, "top-k {} with {} experts", k, experts);
  dispatch_float(logits.dtype, [&](auto z) {
    using T = decltype(z);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const T* zt = logits.ptr<T>() + t * experts;
      std::vector<double> s(experts);
      const double l = logsumexp(zt, experts);
      lse.ptr<T>()[t] = T(l);
      token_scores(zt, experts, score, l, s.data());
      std::vector<bool> taken(experts, false);
      int32_t* idx = topk_index.ptr<int32_t>() + t * k;
      double chosen_sum = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < experts; ++e)
          if (!taken[e] && (best < 0 || s[e] > s[best])) best = e;  // strict: ties keep the lower index
        taken[best] = true;
        idx[j] = static_cast<int32_t>(best);
        chosen_sum += s[best];
      }
      for (int64_t j = 0; j < k; ++j)
        topk_weight.ptr<T>()[t * k + j] = T(s[idx[j]] / (normalize_topk ? chosen_sum : 1.0));
      double row_sum = 0.0;
      for (int64_t e = 0; e < experts; ++e) row_sum += s[e];
      for (int64_t e = 0; e < experts; ++e)
        aux_probs.ptr<T>()[t * experts + e] = T(score == RouterScore::SOFTMAX ? s[e] : s[e] / row_sum);
    }
  });
}

void CpuBackend::router_backward(const Tensor& logits, RouterScore score, bool normalize_topk,
                                 const Tensor& topk_index, const Tensor& topk_weight, const Tensor& dtopk_weight,
                                 const Tensor& aux_grad_per_expert, const Tensor& lse, double z_grad_scale,
                                 const Tensor& dlogits) {
  const int64_t tokens = logits.rows(), experts = logits.cols(), k = topk_index.cols();
  dispatch_float(logits.dtype, [&](auto z) {
    using T = decltype(z);
    const T* aux = aux_grad_per_expert.ptr<T>();
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const T* zt = logits.ptr<T>() + t * experts;
      const double l = double(lse.ptr<T>()[t]);
      std::vector<double> s(experts), g(experts, 0.0);
      token_scores(zt, experts, score, l, s.data());
      const int32_t* idx = topk_index.ptr<int32_t>() + t * k;
      const T* w = topk_weight.ptr<T>() + t * k;
      const T* dw = dtopk_weight.ptr<T>() + t * k;
      // Top-k path: w_j = s_j / S (S = sum of chosen scores when normalising).
      if (normalize_topk) {
        double chosen_sum = 0.0, dot = 0.0;
        for (int64_t j = 0; j < k; ++j) {
          chosen_sum += s[idx[j]];
          dot += double(dw[j]) * double(w[j]);
        }
        for (int64_t j = 0; j < k; ++j) g[idx[j]] += (double(dw[j]) - dot) / chosen_sum;
      } else {
        for (int64_t j = 0; j < k; ++j) g[idx[j]] += double(dw[j]);
      }
      // Load-balancing path through aux_probs.
      if (score == RouterScore::SOFTMAX) {
        for (int64_t e = 0; e < experts; ++e) g[e] += double(aux[e]);
      } else {
        double row_sum = 0.0, cq = 0.0;
        for (int64_t e = 0; e < experts; ++e) row_sum += s[e];
        for (int64_t e = 0; e < experts; ++e) cq += double(aux[e]) * s[e] / row_sum;
        for (int64_t e = 0; e < experts; ++e) g[e] += (double(aux[e]) - cq) / row_sum;
      }
      T* dz = dlogits.ptr<T>() + t * experts;
      if (score == RouterScore::SOFTMAX) {
        double dot = 0.0;
        for (int64_t e = 0; e < experts; ++e) dot += g[e] * s[e];
        for (int64_t e = 0; e < experts; ++e) dz[e] = T(s[e] * (g[e] - dot));
      } else {
        for (int64_t e = 0; e < experts; ++e) dz[e] = T(g[e] * s[e] * (1.0 - s[e]));
      }
      // z-loss: d lse / d z = softmax(z).
      for (int64_t e = 0; e < experts; ++e) dz[e] += T(z_grad_scale * l * std::exp(double(zt[e]) - l));
    }
  });
}

void CpuBackend::gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) {
  const int64_t n = index.numel(), dim = src.cols();
  const int32_t* idx = index.ptr<int32_t>();
  cpu::expect_same(src, dst, "gather_rows");
  // A copy: any storage dtype (the routed rows are bf16 GEMM operands under BF16).
  cpu::dispatch_storage(src.dtype, [&](auto z) {
    using T = decltype(z);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) std::copy_n(src.ptr<T>() + int64_t(idx[i]) * dim, dim, dst.ptr<T>() + i * dim);
  });
}

void CpuBackend::combine_rows(const Tensor& rows, const Tensor& slot_row, const Tensor* slot_weight, double beta,
                              const Tensor& out) {
  const int64_t tokens = out.rows(), dim = out.cols(), k = slot_row.cols();
  const int32_t* sr = slot_row.ptr<int32_t>();
  dispatch_float(out.dtype, [&](auto z) {
    using T = decltype(z);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      T* o = out.ptr<T>() + t * dim;
      for (int64_t d = 0; d < dim; ++d) {
        double acc = beta == 0.0 ? 0.0 : beta * double(o[d]);
        for (int64_t j = 0; j < k; ++j) {
          const double w = slot_weight ? double(slot_weight->ptr<T>()[t * k + j]) : 1.0;
          acc += w * double(rows.ptr<T>()[int64_t(sr[t * k + j]) * dim + d]);
        }
        o[d] = T(acc);
      }
    }
  });
}

void CpuBackend::combine_rows_backward(const Tensor& dout, const Tensor& rows, const Tensor& slot_row,
                                       const Tensor& slot_weight, const Tensor& drows, const Tensor& dweight) {
  const int64_t tokens = dout.rows(), dim = dout.cols(), k = slot_row.cols();
  const int32_t* sr = slot_row.ptr<int32_t>();
  dispatch_float(dout.dtype, [&](auto z) {
    using T = decltype(z);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const T* g = dout.ptr<T>() + t * dim;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = sr[t * k + j];
        const double w = double(slot_weight.ptr<T>()[t * k + j]);
        const T* row = rows.ptr<T>() + r * dim;
        T* dr = drows.ptr<T>() + r * dim;
        double dot = 0.0;
        for (int64_t d = 0; d < dim; ++d) {
          dot += double(g[d]) * double(row[d]);
          dr[d] = T(w * double(g[d]));
        }
        dweight.ptr<T>()[t * k + j] = T(dot);
      }
    }
  });
}

}  // namespace sdmoe
