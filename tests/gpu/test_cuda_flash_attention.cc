// The CUDA backend's fused attention (core/cuda/flash_attention.cuh) against the CPU
// backend's (core/cpu/flash_attention.h), the oracle, on random inputs. Sequence lengths
// straddle the 64-wide tiles (1, 7, 63, 64, 65, 130, 257, and 1024) so that partial
// tiles and the diagonal tile's edges run; the BF16 head dims 32, 64 and 128 take the
// tensor-core kernels, every other case (F32 at any head dim, BF16 at 48 or 200, or
// misaligned views) the SIMT ones. The backward of both backends starts from the same
// inputs: the CPU forward's out and lse.
//
// Tolerances. Each element is compared within rtol x its magnitude sum, the sum of the
// absolute values of the terms that make it (for out[i,d]: sum_j P_ij |v_jd|; for lse:
// 1 + |lse|; for dq, dk, dv as in tests/core/test_flash_attention.cc), computed here in
// double from the same rounded inputs.
//   fp32 part: rtol32 = 8u(2 + sigma), u = 2^-24, sigma the largest scale sum_d |q_id k_jd|
//   of the problem (10 to 40 here). The CPU is within 4u(2 + sigma) of the exact result
//   (its own test; worst seen 2.2), and the GPU's fp32 work (scores, online softmax, the
//   same sums in another order) is bounded the same way, so the two differ by at most
//   twice that. This is all of it for F32 and for BF16 on the SIMT path, which computes in
//   fp32 from the same bf16-rounded inputs as the CPU.
//   Tensor cores: 8 x rtol32 for the fp32 part, + 2^-8 on out, dq, dk and dv. Their fp32
//   accumulation is not a chain of rounded fused multiply-adds (the products of a block
//   are aligned to the largest and the bits shifted out dropped; Fasi et al., "Numerical
//   behavior of NVIDIA tensor cores", 2021): a few units of the block's largest term per
//   mma rather than half a unit, in the scores and so in every P. And like FlashAttention
//   they round P (and dS) to bf16 before P v, P^T dout, dS k and dS^T q: one rounding to
//   nearest of 8 significant bits is at most 2^-8 relative per term, so at most 2^-8 x the
//   magnitude sum per element, reached when one term dominates (the last key's dv has a
//   single term). lse and D stay fp32: lse takes no bf16 term.
//   BF16 out: + 2^-7 max(|out_cpu|, |out_gpu|): each side rounds to bf16 (2^-8 of itself),
//   and two values that straddle a rounding midpoint land one bf16 spacing apart, at most
//   2^-7 of the larger (equality at a power of two, which random data hits).
// A real bug (a key across the mask edge, a missed rescale, a transposed fragment) moves
// an element by a whole term, O(1e-2) of its magnitude sum or more, far above 2^-8.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "tests/gpu/cuda_test_support.h"

namespace sdmoe {
namespace {

using namespace cuda_test;

constexpr double kFp32Unit = 0x1p-24;
constexpr double kBf16Unit = 0x1p-8;

struct Shape {
  DType dtype;
  int64_t n, s, dh;
  std::string name() const {
    return fmt::format("{} N={} S={} Dh={}", dtype_name(dtype), n, s, dh);
  }
  int64_t count() const { return n * s * dh; }
  double scale() const { return 1.0 / std::sqrt(double(dh)); }
};

// The CUDA backend's rule: BF16 at these head dims (with 16-byte aligned pointers) runs on
// tensor cores, and rounds P and dS to bf16.
bool on_tensor_cores(const Shape& c) { return c.dtype == DType::BF16 && (c.dh == 32 || c.dh == 64 || c.dh == 128); }

double stored(DType dtype, double x) {
  return dtype == DType::BF16 ? double(bf16_to_float(float_to_bf16(float(x)))) : double(float(x));
}

std::vector<double> normal_values(int64_t count, uint32_t seed, DType dtype, double std_dev, double mean) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(mean, std_dev);
  std::vector<double> v(count);
  for (double& x : v) x = stored(dtype, normal(gen));
  return v;
}

// q, k, v, dout as stored, with some reach: scores up to about +-20, and later keys larger
// so the running max moves in most key tiles (as in the CPU test).
struct Inputs {
  Shape shape;
  std::vector<double> q, k, v, dout;
};

Inputs make_inputs(const Shape& c, uint32_t seed) {
  Inputs in{c, normal_values(c.count(), seed, c.dtype, 1.5, 0.0), normal_values(c.count(), seed + 1, c.dtype, 1.5, 0.3),
            normal_values(c.count(), seed + 2, c.dtype, 1.0, 0.0), normal_values(c.count(), seed + 3, c.dtype, 1.0, 0.0)};
  for (int64_t h = 0; h < c.n; ++h)
    for (int64_t j = 0; j < c.s; ++j)
      for (int64_t d = 0; d < c.dh; ++d) {
        double& x = in.k[(h * c.s + j) * c.dh + d];
        x = stored(c.dtype, x * (1.0 + 0.5 * double(j) / double(c.s)));
      }
  return in;
}

// One tensor on both backends, `offset` elements into its buffers (0: as allocated), with
// the given values; c and g are its [n, s, dh] or [n, s] views.
struct Operand {
  Twin twin;
  Tensor c, g;
};

Operand place(DType dtype, const std::vector<double>& values, std::initializer_list<int64_t> dims, int64_t offset) {
  const int64_t count = offset + int64_t(values.size());
  const size_t element = dtype_size(dtype);
  std::vector<unsigned char> host(count * element, 0);
  for (size_t i = 0; i < values.size(); ++i) {
    unsigned char* dst = host.data() + (offset + i) * element;
    if (dtype == DType::BF16) {
      const bf16 x = float_to_bf16(float(values[i]));
      std::memcpy(dst, &x.bits, 2);
    } else {
      const float x = float(values[i]);
      std::memcpy(dst, &x, 4);
    }
  }
  Operand o{twin(dtype, {count}, host.data()), Tensor(), Tensor()};
  o.c = Tensor(static_cast<char*>(o.twin.c.data) + offset * element, dtype, Device::CPU, dims);
  o.g = Tensor(static_cast<char*>(o.twin.g.data) + offset * element, dtype, Device::CUDA, dims);
  return o;
}

// Values of a F32 or BF16 tensor on backend b, as floats.
std::vector<float> values_of(Backend& b, const Tensor& t) {
  if (t.dtype == DType::F32) return read<float>(b, t);
  const auto bits = read<uint16_t>(b, t);
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = bf16_to_float(bf16{bits[i]});
  return f;
}

// Magnitude sums in double from the inputs and the out the backward is given.
struct Magnitudes {
  double sigma = 0.0;
  std::vector<double> out, lse, dq, dk, dv;
};

Magnitudes magnitudes(const Inputs& in, const std::vector<float>& given_out) {
  const Shape& c = in.shape;
  const int64_t s = c.s, dh = c.dh;
  const double sc = c.scale();
  Magnitudes m;
  m.out.assign(c.count(), 0.0);
  m.dq = m.dk = m.dv = m.out;
  m.lse.assign(c.n * s, 0.0);
  const auto at = [&](int64_t h, int64_t i, int64_t d) { return (h * s + i) * dh + d; };
  std::vector<double> p(s), dp(s), dp_mag(s);
  for (int64_t h = 0; h < c.n; ++h)
    for (int64_t i = 0; i < s; ++i) {
      double top = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0.0, reach = 0.0, dpj = 0.0, dpm = 0.0;
        for (int64_t d = 0; d < dh; ++d) {
          dot += in.q[at(h, i, d)] * in.k[at(h, j, d)];
          reach += std::fabs(in.q[at(h, i, d)] * in.k[at(h, j, d)]);
          dpj += in.dout[at(h, i, d)] * in.v[at(h, j, d)];
          dpm += std::fabs(in.dout[at(h, i, d)] * in.v[at(h, j, d)]);
        }
        p[j] = sc * dot;
        dp[j] = dpj;
        dp_mag[j] = dpm;
        top = std::max(top, p[j]);
        m.sigma = std::max(m.sigma, sc * reach);
      }
      double sum = 0.0;
      for (int64_t j = 0; j <= i; ++j) sum += std::exp(p[j] - top);
      m.lse[h * s + i] = 1.0 + std::fabs(top + std::log(sum));
      double delta = 0.0, delta_mag = 0.0;
      for (int64_t d = 0; d < dh; ++d) {
        delta += in.dout[at(h, i, d)] * given_out[at(h, i, d)];
        delta_mag += std::fabs(in.dout[at(h, i, d)] * given_out[at(h, i, d)]);
      }
      for (int64_t j = 0; j <= i; ++j) {
        const double pij = std::exp(p[j] - top) / sum;
        const double ds_mag = pij * (dp_mag[j] + delta_mag + std::fabs(dp[j] - delta));
        for (int64_t d = 0; d < dh; ++d) {
          m.out[at(h, i, d)] += pij * std::fabs(in.v[at(h, j, d)]);
          m.dv[at(h, j, d)] += pij * std::fabs(in.dout[at(h, i, d)]);
          m.dq[at(h, i, d)] += sc * ds_mag * std::fabs(in.k[at(h, j, d)]);
          m.dk[at(h, j, d)] += sc * ds_mag * std::fabs(in.q[at(h, i, d)]);
        }
      }
    }
  return m;
}

// rtol x mag + rel x max(|want|, |got|) per element.
std::vector<double> tolerance(const std::vector<double>& mag, double rtol, const std::vector<float>& want,
                              const std::vector<float>& got, double rel) {
  std::vector<double> tol(mag.size());
  for (size_t i = 0; i < mag.size(); ++i)
    tol[i] = rtol * mag[i] + rel * std::max(std::fabs(double(want[i])), std::fabs(double(got[i]))) + 1e-30;
  return tol;
}

// Forward and backward of one problem on both backends; every tensor `offset` elements
// into its buffers.
void expect_matches_cpu(const Shape& c, uint32_t seed, int64_t offset = 0) {
  SCOPED_TRACE(c.name());
  const Inputs in = make_inputs(c, seed);
  const DType dt = c.dtype;
  const std::vector<double> zeros(c.count(), 0.0);
  const auto rows = [&](DType dtype, const std::vector<double>& values) {
    return place(dtype, values, {c.n, c.s, c.dh}, offset);
  };
  const Operand q = rows(dt, in.q), k = rows(dt, in.k), v = rows(dt, in.v), dout = rows(dt, in.dout);
  const Operand out = rows(dt, zeros), dq = rows(DType::F32, zeros), dk = rows(DType::F32, zeros),
                dv = rows(DType::F32, zeros);
  const Operand lse = place(DType::F32, std::vector<double>(c.n * c.s, 0.0), {c.n, c.s}, offset);
  const double scale = c.scale();
  cpu().attention_forward(q.c, k.c, v.c, scale, out.c, lse.c);
  gpu().attention_forward(q.g, k.g, v.g, scale, out.g, lse.g);
  const std::vector<float> cpu_out = values_of(cpu(), out.c), gpu_out = values_of(gpu(), out.g);
  const std::vector<float> cpu_lse = read<float>(cpu(), lse.c), gpu_lse = read<float>(gpu(), lse.g);

  // Both backwards from the CPU's out and lse.
  gpu().copy_from_host(out.c.data, out.g);
  gpu().copy_from_host(lse.c.data, lse.g);
  cpu().attention_backward(q.c, k.c, v.c, out.c, dout.c, lse.c, scale, dq.c, dk.c, dv.c);
  gpu().attention_backward(q.g, k.g, v.g, out.g, dout.g, lse.g, scale, dq.g, dk.g, dv.g);

  const Magnitudes m = magnitudes(in, cpu_out);
  const bool mma = offset == 0 && on_tensor_cores(c);
  const double rtol32 = 8 * kFp32Unit * (2 + m.sigma);
  const double rtol_lse = mma ? 8 * rtol32 : rtol32, rtol = rtol_lse + (mma ? kBf16Unit : 0.0);
  const double out_rounding = dt == DType::BF16 ? 2 * kBf16Unit : 0.0;
  expect_within(cpu_out, gpu_out, tolerance(m.out, rtol, cpu_out, gpu_out, out_rounding), "out " + c.name());
  expect_within(cpu_lse, gpu_lse, tolerance(m.lse, rtol_lse, cpu_lse, gpu_lse, 0.0), "lse " + c.name());
  const auto expect_grad = [&](const Operand& g, const std::vector<double>& mag, const char* what) {
    const std::vector<float> want = read<float>(cpu(), g.c), got = read<float>(gpu(), g.g);
    expect_within(want, got, tolerance(mag, rtol, want, got, 0.0), what + (" " + c.name()));
  };
  expect_grad(dq, m.dq, "dq");
  expect_grad(dk, m.dk, "dk");
  expect_grad(dv, m.dv, "dv");
}

const int64_t kSequences[] = {1, 7, 63, 64, 65, 130, 257};

TEST(CudaFlashAttention, Fp32MatchesCpu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  EXPECT_TRUE(gpu().has_fused_attention());
  uint32_t seed = 100;
  for (const int64_t s : kSequences)
    for (const int64_t dh : {8, 96})
      expect_matches_cpu({DType::F32, s % 2 ? 3 : 6, s, dh}, seed += 10);
  // 16-row tiles of the widest heads, and a head dim that is no multiple of anything.
  for (const int64_t s : {1, 65, 130}) expect_matches_cpu({DType::F32, 2, s, 256}, seed += 10);
  expect_matches_cpu({DType::F32, 3, 70, 7}, seed += 10);
}

TEST(CudaFlashAttention, Bf16TensorCoresMatchCpu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 2000;
  for (const int64_t s : kSequences)
    for (const int64_t dh : {32, 64, 128})
      expect_matches_cpu({DType::BF16, s % 2 ? 3 : 6, s, dh}, seed += 10);
}

TEST(CudaFlashAttention, Bf16OtherHeadDimsMatchCpu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 3000;
  for (const int64_t s : kSequences) expect_matches_cpu({DType::BF16, s % 2 ? 3 : 6, s, 48}, seed += 10);
  expect_matches_cpu({DType::BF16, 2, 130, 200}, seed += 10);
}

TEST(CudaFlashAttention, LongSequenceMatchesCpu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  expect_matches_cpu({DType::BF16, 1, 1024, 64}, 4000);
  expect_matches_cpu({DType::F32, 1, 1024, 64}, 4010);
}

// More heads than gridDim.y could hold (65535): the grid is flattened into x.
TEST(CudaFlashAttention, ManyHeadsMatchCpu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  expect_matches_cpu({DType::BF16, 70000, 3, 32}, 5000);
  expect_matches_cpu({DType::F32, 70000, 2, 8}, 5010);
}

// Views that are not 16-byte aligned (one element in) cannot use cp.async: the tensor-core
// head dims fall back to the SIMT kernels, which must give the fp32 result.
TEST(CudaFlashAttention, MisalignedViewsMatchCpu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  expect_matches_cpu({DType::BF16, 3, 130, 64}, 6000, 1);
  expect_matches_cpu({DType::F32, 2, 65, 32}, 6010, 1);
}

// No atomics, no order that depends on scheduling: the same bits from two runs.
TEST(CudaFlashAttention, DeterministicBits) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const Shape& c : {Shape{DType::BF16, 3, 257, 64}, Shape{DType::BF16, 2, 130, 128}, Shape{DType::F32, 2, 130, 48}}) {
    SCOPED_TRACE(c.name());
    const Inputs in = make_inputs(c, 7000);
    const DType dt = c.dtype;
    const std::vector<double> zeros(c.count(), 0.0);
    const auto rows = [&](DType dtype, const std::vector<double>& values) {
      return place(dtype, values, {c.n, c.s, c.dh}, 0);
    };
    const Operand q = rows(dt, in.q), k = rows(dt, in.k), v = rows(dt, in.v), dout = rows(dt, in.dout);
    std::vector<std::vector<float>> runs[2];
    for (auto& results : runs) {
      const Operand out = rows(dt, zeros), dq = rows(DType::F32, zeros), dk = rows(DType::F32, zeros),
                    dv = rows(DType::F32, zeros);
      const Operand lse = place(DType::F32, std::vector<double>(c.n * c.s, 0.0), {c.n, c.s}, 0);
      gpu().attention_forward(q.g, k.g, v.g, c.scale(), out.g, lse.g);
      gpu().attention_backward(q.g, k.g, v.g, out.g, dout.g, lse.g, c.scale(), dq.g, dk.g, dv.g);
      for (const Operand* o : {&out, &lse, &dq, &dk, &dv}) results.push_back(values_of(gpu(), o->g));
    }
    const char* names[] = {"out", "lse", "dq", "dk", "dv"};
    for (size_t i = 0; i < runs[0].size(); ++i) expect_equal(runs[0][i], runs[1][i], names[i]);
  }
}

}  // namespace
}  // namespace sdmoe
