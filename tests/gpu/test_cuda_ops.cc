// Every CUDA backend op against the CPU oracle on random inputs. Tolerances are fp32
// (bf16 where the inputs are bf16); ops that both backends compute with the same
// additions in the same order (copies, embedding backward, casts) must agree bitwise.
// Each test skips itself when no GPU is visible, so ctest reports it as skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "core/rng.h"
#include "tests/gpu/cuda_test_support.h"

namespace sdmoe {
namespace {

using namespace cuda_test;


// ================================ basics ====================================================

TEST(CudaBackend, DeviceInfo) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  EXPECT_TRUE(cuda_backend_compiled());
  EXPECT_EQ(gpu().device(), Device::CUDA);
  EXPECT_FALSE(gpu().name().empty());
  EXPECT_GT(gpu().peak_flops(), 1e12);
  EXPECT_THROW(make_cuda_backend(cuda_device_count()), Error);
  EXPECT_THROW(make_cuda_backend(-1), Error);
}

TEST(CudaBackend, CopiesRoundTrip) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto v = randn(1000, 1);
  Twin a = twin({10, 100}, v), b = twin(DType::F32, {1000});
  gpu().copy(a.g, b.g);
  expect_equal(v, gpu_f(b), "device-to-device copy");
  // copy() with a host tensor on one side.
  std::vector<float> host(1000, 0.0f);
  Tensor h(host.data(), DType::F32, Device::CPU, {1000});
  gpu().copy(b.g, h);
  expect_equal(v, host, "device-to-host copy()");
  const auto w = randn(1000, 2);
  Tensor hw(const_cast<float*>(w.data()), DType::F32, Device::CPU, {1000});
  gpu().copy(hw, b.g);
  expect_equal(w, gpu_f(b), "host-to-device copy()");
}

// copy_rows (cudaMemcpy2DAsync) against the CPU backend's, on the block of a column slice.
TEST(CudaBackend, CopyRowsMatchesCpu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t rows = 33, src_width = 64, dst_width = 48, block = 32;
  Twin src = twin({rows * src_width}, randn(rows * src_width, 5)), dst = twin({rows * dst_width}, randn(rows * dst_width, 6));
  for (Backend* b : {&cpu(), &gpu()}) {
    const bool g = b == &gpu();
    const Tensor& s = g ? src.g : src.c;
    const Tensor& d = g ? dst.g : dst.c;
    const Tensor from(static_cast<float*>(s.data) + 16, DType::F32, s.device, {rows * src_width - 16});
    const Tensor to(static_cast<float*>(d.data) + 8, DType::F32, d.device, {rows * dst_width - 8});
    b->copy_rows(from, src_width, to, dst_width, rows, block);
  }
  expect_equal(cpu_f(dst), gpu_f(dst), "copy_rows");
}

TEST(CudaBackend, FillScaleAxpy) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 100003;
  Twin x = twin({n}, randn(n, 3)), y = twin({n}, randn(n, 4));
  for (Backend* b : {&cpu(), &gpu()}) {
    const bool g = b == &gpu();
    b->scale(g ? x.g : x.c, -0.37);
    b->axpy(1.25, g ? x.g : x.c, g ? y.g : y.c);
  }
  expect_close(cpu_f(x), gpu_f(x), 0, 1e-7, "scale");
  expect_close(cpu_f(y), gpu_f(y), 1e-6, 1e-6, "axpy");
  cpu().fill(x.c, 2.5);
  gpu().fill(x.g, 2.5);
  expect_equal(cpu_f(x), gpu_f(x), "fill f32");
  Twin i = twin(DType::I32, {77});
  cpu().fill(i.c, -7);
  gpu().fill(i.g, -7);
  expect_equal(read<int32_t>(cpu(), i.c), read<int32_t>(gpu(), i.g), "fill i32");
  Twin h = twin(DType::BF16, {77});
  gpu().fill(h.g, 0.1);
  expect_equal(std::vector<uint16_t>(77, float_to_bf16(0.1f).bits), read<uint16_t>(gpu(), h.g), "fill bf16");
}

TEST(CudaBackend, SumSquares) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(1000), int64_t(1 << 20) + 3}) {
    Twin x = twin(DType::F32, {n});
    if (n) {
      const auto v = randn(n, 5 + uint32_t(n));
      std::memcpy(x.c.data, v.data(), n * 4);
      gpu().copy_from_host(v.data(), x.g);
    }
    const double want = cpu().sum_squares(x.c), got = gpu().sum_squares(x.g);
    EXPECT_NEAR(got, want, 1e-10 * std::max(1.0, want)) << "n=" << n;
    EXPECT_EQ(got, gpu().sum_squares(x.g)) << "sum_squares must be deterministic, n=" << n;
  }
  // bf16 input: the reference from the rounded values.
  const auto v = randn(54321, 6);
  const auto bits = to_bf16_bits(v);
  Twin h = twin(DType::BF16, {54321}, bits.data());
  double want = 0.0;
  for (uint16_t b : bits) want += double(bf16_to_float(bf16{b})) * double(bf16_to_float(bf16{b}));
  EXPECT_NEAR(gpu().sum_squares(h.g), want, 1e-10 * want);
}

TEST(CudaBackend, ColumnSums) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {1000, 37}, {5000, 300}, {70000, 3}, {0, 5}};
  for (auto [r, c] : shapes) {
    Twin x = twin(DType::F32, {r, c});
    if (r * c) {
      const auto v = randn(r * c, 7 + uint32_t(r), 1.0f, 0.5f);
      std::memcpy(x.c.data, v.data(), v.size() * 4);
      gpu().copy_from_host(v.data(), x.g);
    }
    const auto want = cpu().column_sums(x.c), got = gpu().column_sums(x.g);
    ASSERT_EQ(want.size(), got.size());
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 1e-9 * std::max(1.0, double(r))) << r << "x" << c << " column " << i;
    EXPECT_EQ(got, gpu().column_sums(x.g)) << "column_sums must be deterministic";
  }
}

TEST(CudaBackend, CastF32Bf16) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto v = randn(10007, 8, 3.0f);
  const float specials[] = {0.0f, -0.0f, 1.0f, 1.00390625f /* tie to even */, 1.01171875f /* tie to odd */,
                            std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min(),
                            3.3895314e38f /* rounds to inf */, 1e-40f};
  for (size_t i = 0; i < std::size(specials); ++i) v[i] = specials[i];
  const int64_t n = static_cast<int64_t>(v.size());
  Twin f = twin({n}, v), h = twin(DType::BF16, {n}), back = twin(DType::F32, {n});
  for (Backend* b : {&cpu(), &gpu()}) {
    const bool g = b == &gpu();
    b->cast(g ? f.g : f.c, g ? h.g : h.c);
    b->cast(g ? h.g : h.c, g ? back.g : back.c);
  }
  expect_equal(read<uint16_t>(cpu(), h.c), read<uint16_t>(gpu(), h.g), "f32 -> bf16 bits");
  expect_equal(cpu_f(back), gpu_f(back), "bf16 -> f32");
  // f32 -> f32 is a copy.
  Twin same = twin(DType::F32, {n});
  gpu().cast(f.g, same.g);
  expect_equal(v, gpu_f(same), "f32 -> f32");
}

// Double to f32 and bf16 is how host-drawn initial values of tensor-split parameters reach
// the device; both must round as the CPU does (through float), bit for bit.
TEST(CudaBackend, CastF64) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 gen(11);
  std::normal_distribution<double> normal(0.0, 2.0);
  std::vector<double> v(10007);
  for (double& x : v) x = normal(gen);
  v[0] = 1.0 + std::ldexp(1.0, -24);                  // tie between two floats
  v[1] = 1.0 + std::ldexp(1.0, -24) + 1e-12;          // just above the tie
  v[2] = 1.00390625 + 1e-10;                          // float exact tie for bf16 is broken by the double
  v[3] = 1e300;                                       // overflows to inf
  const int64_t n = static_cast<int64_t>(v.size());
  Twin d = twin(DType::F64, {n}, v.data());
  for (DType narrow : {DType::F32, DType::BF16}) {
    Twin out = twin(narrow, {n}), wide = twin(DType::F64, {n});
    for (Backend* b : {&cpu(), &gpu()}) {
      const bool g = b == &gpu();
      b->cast(g ? d.g : d.c, g ? out.g : out.c);
      b->cast(g ? out.g : out.c, g ? wide.g : wide.c);
    }
    if (narrow == DType::F32)
      expect_equal(read<float>(cpu(), out.c), read<float>(gpu(), out.g), "f64 -> f32");
    else
      expect_equal(read<uint16_t>(cpu(), out.c), read<uint16_t>(gpu(), out.g), "f64 -> bf16 bits");
    expect_equal(read<double>(cpu(), wide.c), read<double>(gpu(), wide.g), "back to f64");
  }
}

TEST(CudaBackend, InitNormalMatchesCpu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 100003;
  const uint64_t seed = 1234, stream = stream_of("layers.3.attn.qkv");
  Twin x = twin(DType::F32, {n});
  cpu().init_normal(x.c, seed, stream, 0.02, 777);
  gpu().init_normal(x.g, seed, stream, 0.02, 777);
  const auto want = cpu_f(x), got = gpu_f(x);
  // The same double expression on both; device and host libm may differ in the last
  // double bit, which almost never survives the rounding to float.
  int64_t exact = 0;
  for (int64_t i = 0; i < n; ++i) exact += want[i] == got[i];
  EXPECT_GE(exact, n - n / 1000) << "init_normal should be bitwise equal almost everywhere";
  expect_close(want, got, 0, 1e-6, "init_normal");
  // A shard initialises like the same range of the whole tensor.
  Twin shard = twin(DType::F32, {1000});
  gpu().init_normal(shard.g, seed, stream, 0.02, 777 + 5000);
  expect_equal(std::vector<float>(got.begin() + 5000, got.begin() + 6000), gpu_f(shard), "sharded init");
  // bf16 target: the f32 value, rounded.
  Twin h = twin(DType::BF16, {n});
  gpu().init_normal(h.g, seed, stream, 0.02, 777);
  const auto hb = read<uint16_t>(gpu(), h.g);
  int64_t off = 0;
  for (int64_t i = 0; i < n; ++i) off += hb[i] != float_to_bf16(want[i]).bits;
  EXPECT_LE(off, n / 1000);
}

// ================================ GEMM ======================================================

TEST(CudaBackend, GemmF32AllTransposes) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t m = 37, n = 53, k = 129;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const std::string what = fmt::format("gemm ta={} tb={}", ta, tb);
      const auto av = randn(m * k, 10), bv = randn(k * n, 11), cv = randn(m * n, 12);
      Twin a = twin({m * k}, av), b = twin({k * n}, bv), c = twin({m, n}, cv);
      cpu().gemm(ta, tb, m, n, k, 0.75, a.c, b.c, -0.5, c.c);
      gpu().gemm(ta, tb, m, n, k, 0.75, a.g, b.g, -0.5, c.g);
      expect_within(cpu_f(c), gpu_f(c),
                    scaled(gemm_bound(ta, tb, m, n, k, 0.75, av.data(), bv.data(), -0.5, cv.data()), 2e-5, 1e-6),
                    what);
    }
}

TEST(CudaBackend, GemmBetaZeroIgnoresNanAndKZero) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t m = 16, n = 24, k = 8;
  const auto av = randn(m * k, 13), bv = randn(k * n, 14);
  std::vector<float> nan_c(m * n, std::numeric_limits<float>::quiet_NaN());
  Twin a = twin({m, k}, av), b = twin({k, n}, bv), c = twin({m, n}, nan_c);
  cpu().gemm(false, false, m, n, k, 1.0, a.c, b.c, 0.0, c.c);
  gpu().gemm(false, false, m, n, k, 1.0, a.g, b.g, 0.0, c.g);
  expect_within(cpu_f(c), gpu_f(c),
                scaled(gemm_bound(false, false, m, n, k, 1.0, av.data(), bv.data(), 0.0, nan_c.data()), 2e-5, 1e-6),
                "beta=0 over NaN");
  // k == 0: C = beta C, and beta == 0 writes zeros even over NaN.
  const auto cv = randn(m * n, 15);
  Twin c2 = twin({m, n}, cv);
  cpu().gemm(false, false, m, n, 0, 1.0, a.c, b.c, 0.5, c2.c);
  gpu().gemm(false, false, m, n, 0, 1.0, a.g, b.g, 0.5, c2.g);
  expect_equal(cpu_f(c2), gpu_f(c2), "k=0 beta=0.5");
  Twin c3 = twin({m, n}, nan_c);
  cpu().gemm(false, false, m, n, 0, 1.0, a.c, b.c, 0.0, c3.c);
  gpu().gemm(false, false, m, n, 0, 1.0, a.g, b.g, 0.0, c3.g);
  expect_equal(cpu_f(c3), gpu_f(c3), "k=0 beta=0");
  // m == 0: nothing happens.
  gpu().gemm(false, false, 0, n, k, 1.0, a.g, b.g, 0.0, c2.g);
  expect_equal(cpu_f(c2), gpu_f(c2), "m=0 is a no-op");
}

TEST(CudaBackend, GemmStridedBatched) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t m = 19, n = 23, k = 31, count = 5;
  const GemmBatch batch{count, m * k + 3, k * n + 7, m * n + 1};
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const auto av = randn(count * batch.stride_a, 16), bv = randn(count * batch.stride_b, 17),
                 cv = randn(count * batch.stride_c, 18);
      Twin a = twin({count * batch.stride_a}, av), b = twin({count * batch.stride_b}, bv),
           c = twin({count * batch.stride_c}, cv);
      cpu().gemm(ta, tb, m, n, k, 1.5, a.c, b.c, 1.0, c.c, batch);
      gpu().gemm(ta, tb, m, n, k, 1.5, a.g, b.g, 1.0, c.g, batch);
      const auto want = cpu_f(c), got = gpu_f(c);
      std::vector<double> tol(want.size(), 0.0);  // padding between matrices stays untouched
      for (int64_t i = 0; i < count; ++i) {
        const auto bound = gemm_bound(ta, tb, m, n, k, 1.5, av.data() + i * batch.stride_a,
                                      bv.data() + i * batch.stride_b, 1.0, cv.data() + i * batch.stride_c);
        for (int64_t j = 0; j < m * n; ++j) tol[i * batch.stride_c + j] = 2e-5 * bound[j] + 1e-6;
      }
      expect_within(want, got, tol, fmt::format("batched gemm ta={} tb={}", ta, tb));
    }
}

TEST(CudaBackend, GemmBf16) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t m = 45, n = 67, k = 96;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const auto av = randn(m * k, 19), bv = randn(k * n, 20), cv = randn(m * n, 21);
      const auto ab = to_bf16_bits(av), bb = to_bf16_bits(bv);
      Twin a = twin(DType::BF16, {m * k}, ab.data()), b = twin(DType::BF16, {k * n}, bb.data());
      Twin c = twin({m, n}, cv), c32 = twin({m, n}, cv), a32 = twin({m * k}, av), b32 = twin({k * n}, bv);
      cpu().gemm(ta, tb, m, n, k, 1.0, a.c, b.c, 0.25, c.c);
      gpu().gemm(ta, tb, m, n, k, 1.0, a.g, b.g, 0.25, c.g);
      const auto bound = gemm_bound(ta, tb, m, n, k, 1.0, av.data(), bv.data(), 0.25, cv.data());
      // Same bf16 inputs, fp32 accumulation on both: fp32 agreement.
      expect_within(cpu_f(c), gpu_f(c), scaled(bound, 2e-5, 1e-6), "bf16 gemm vs cpu bf16 gemm");
      // Against the unrounded fp32 product: bf16 input rounding (2^-9 relative per operand).
      cpu().gemm(ta, tb, m, n, k, 1.0, a32.c, b32.c, 0.25, c32.c);
      expect_within(cpu_f(c32), gpu_f(c), scaled(bound, 1e-2, 1e-5), "bf16 gemm vs fp32 gemm");
    }
  // Strided batched bf16.
  const GemmBatch batch{3, m * k, k * n, m * n};
  const auto av = randn(3 * m * k, 22), bv = randn(3 * k * n, 23);
  const auto ab = to_bf16_bits(av), bb = to_bf16_bits(bv);
  Twin a = twin(DType::BF16, {3 * m * k}, ab.data()), b = twin(DType::BF16, {3 * k * n}, bb.data());
  Twin c = twin({3 * m * n}, std::vector<float>(3 * m * n, 0.0f));
  cpu().gemm(false, true, m, n, k, 1.0, a.c, b.c, 0.0, c.c, batch);
  gpu().gemm(false, true, m, n, k, 1.0, a.g, b.g, 0.0, c.g, batch);
  expect_close(cpu_f(c), gpu_f(c), 1e-4, 1e-4, "batched bf16 gemm");
}

TEST(CudaBackend, GroupedGemmWithEmptyGroups) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    int64_t m, n, k;
  };
  const std::vector<Shape> shapes = {{5, 7, 3}, {0, 4, 6}, {3, 0, 2}, {4, 5, 0}, {17, 9, 33}, {1, 1, 1}, {64, 48, 40}};
  for (double beta : {0.5, 0.0})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        int64_t na = 0, nb = 0, nc = 0;
        std::vector<int64_t> oa, ob, oc;
        for (const Shape& s : shapes) {
          oa.push_back(na), ob.push_back(nb), oc.push_back(nc);
          na += s.m * s.k + 1, nb += s.k * s.n + 1, nc += s.m * s.n + 1;
        }
        const auto av = randn(na, 24), bv = randn(nb, 25);
        auto cv = randn(nc, 26);
        if (beta == 0.0) std::fill(cv.begin(), cv.end(), std::numeric_limits<float>::quiet_NaN());
        Twin a = twin({na}, av), b = twin({nb}, bv), c = twin({nc}, cv);
        std::vector<GemmGroup> gc, gg;
        for (size_t i = 0; i < shapes.size(); ++i) {
          const Shape& s = shapes[i];
          gc.push_back({a.c.ptr<float>() + oa[i], b.c.ptr<float>() + ob[i], c.c.ptr<float>() + oc[i], s.m, s.n, s.k});
          gg.push_back({a.g.ptr<float>() + oa[i], b.g.ptr<float>() + ob[i], c.g.ptr<float>() + oc[i], s.m, s.n, s.k});
        }
        cpu().grouped_gemm(ta, tb, DType::F32, 1.5, gc, beta);
        gpu().grouped_gemm(ta, tb, DType::F32, 1.5, gg, beta);
        const auto want = cpu_f(c), got = gpu_f(c);
        std::vector<double> tol(nc, 0.0);
        for (size_t i = 0; i < shapes.size(); ++i) {
          const Shape& s = shapes[i];
          const auto bound = gemm_bound(ta, tb, s.m, s.n, s.k, 1.5, av.data() + oa[i], bv.data() + ob[i], beta,
                                        cv.data() + oc[i]);
          for (int64_t j = 0; j < s.m * s.n; ++j) tol[oc[i] + j] = 2e-5 * bound[j] + 1e-6;
        }
        expect_within(want, got, tol, fmt::format("grouped gemm beta={} ta={} tb={}", beta, ta, tb));
      }
}

TEST(CudaBackend, GroupedGemmBf16) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // The CPU grouped_gemm is f32/f64 only; the reference is its bf16 gemm per group.
  struct Shape {
    int64_t m, n, k;
  };
  const std::vector<Shape> shapes = {{8, 16, 32}, {0, 16, 32}, {5, 16, 0}, {33, 16, 32}};
  for (bool ta : {false, true}) {
    std::vector<GemmGroup> groups;
    std::vector<Twin> as, bs, cs;
    for (size_t i = 0; i < shapes.size(); ++i) {
      const Shape& s = shapes[i];
      const auto ab = to_bf16_bits(randn(s.m * s.k, 27 + uint32_t(i))), bb = to_bf16_bits(randn(s.k * s.n, 31));
      as.push_back(twin(DType::BF16, {s.m * s.k}, ab.data()));
      bs.push_back(twin(DType::BF16, {s.k * s.n}, bb.data()));
      cs.push_back(twin({s.m * s.n}, randn(s.m * s.n, 35)));
      groups.push_back({as.back().g.data, bs.back().g.data, cs.back().g.data, s.m, s.n, s.k});
    }
    gpu().grouped_gemm(ta, false, DType::BF16, 1.0, groups, 1.0);
    for (size_t i = 0; i < shapes.size(); ++i) {
      const Shape& s = shapes[i];
      if (s.m && s.n) cpu().gemm(ta, false, s.m, s.n, s.k, 1.0, as[i].c, bs[i].c, 1.0, cs[i].c);
      expect_close(cpu_f(cs[i]), gpu_f(cs[i]), 1e-4, 1e-4, fmt::format("bf16 group {} ta={}", i, ta));
    }
  }
}

// ================================ embedding, norm, activation ================================

TEST(CudaBackend, Embedding) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t vocab = 50, dim = 300, tokens = 1000;  // many repeated ids
  auto ids = randint(tokens, 0, vocab, 40);
  for (int64_t t = 0; t < tokens; t += 9) ids[t] = -1;  // rows on another rank
  Twin id = twin({tokens}, ids), table = twin({vocab, dim}, randn(vocab * dim, 41)), out = twin(DType::F32, {tokens, dim});
  cpu().embedding_forward(id.c, table.c, out.c);
  gpu().embedding_forward(id.g, table.g, out.g);
  expect_equal(cpu_f(out), gpu_f(out), "embedding_forward");
  // Backward accumulates into an existing gradient, with the CPU's additions in its order.
  const auto dtable0 = randn(vocab * dim, 42);
  Twin dout = twin({tokens, dim}, randn(tokens * dim, 43)), dtable = twin({vocab, dim}, dtable0);
  cpu().embedding_backward(id.c, dout.c, dtable.c);
  gpu().embedding_backward(id.g, dout.g, dtable.g);
  const auto got = gpu_f(dtable);
  expect_equal(cpu_f(dtable), got, "embedding_backward (bitwise: same additions, same order)");
  gpu().copy_from_host(dtable0.data(), dtable.g);
  gpu().embedding_backward(id.g, dout.g, dtable.g);
  expect_equal(got, gpu_f(dtable), "embedding_backward is deterministic");
}

TEST(CudaBackend, RmsNorm) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t dim : {int64_t(16), int64_t(999), int64_t(4096)}) {
    const int64_t rows = 37;
    const std::string what = fmt::format("rmsnorm dim={}", dim);
    Twin x = twin({rows, dim}, randn(rows * dim, 50, 2.0f, 0.3f)), w = twin({dim}, randn(dim, 51, 0.5f, 1.0f));
    Twin y = twin(DType::F32, {rows, dim}), rstd = twin(DType::F32, {rows});
    cpu().rmsnorm_forward(x.c, w.c, 1e-5, y.c, rstd.c);
    gpu().rmsnorm_forward(x.g, w.g, 1e-5, y.g, rstd.g);
    expect_close(cpu_f(y), gpu_f(y), 1e-6, 1e-5, what + " y");
    expect_close(cpu_f(rstd), gpu_f(rstd), 0, 1e-6, what + " rstd");
    Twin dy = twin({rows, dim}, randn(rows * dim, 52)), dx = twin(DType::F32, {rows, dim});
    Twin dw = twin({dim}, randn(dim, 53));  // accumulates
    gpu().copy_from_host(rstd.c.data, rstd.g);  // both backwards see the CPU's rstd
    cpu().rmsnorm_backward(x.c, w.c, rstd.c, dy.c, dx.c, dw.c);
    gpu().rmsnorm_backward(x.g, w.g, rstd.g, dy.g, dx.g, dw.g);
    expect_close(cpu_f(dx), gpu_f(dx), 1e-5, 1e-5, what + " dx");
    expect_close(cpu_f(dw), gpu_f(dw), 1e-5, 1e-5, what + " dweight");
  }
}

TEST(CudaBackend, SwiGlu) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t rows = 29, f = 515;
  Twin gu = twin({rows, 2 * f}, randn(rows * 2 * f, 60, 3.0f)), out = twin(DType::F32, {rows, f});
  cpu().swiglu_forward(gu.c, out.c);
  gpu().swiglu_forward(gu.g, out.g);
  expect_close(cpu_f(out), gpu_f(out), 1e-6, 1e-5, "swiglu_forward");
  Twin dout = twin({rows, f}, randn(rows * f, 61)), dgu = twin(DType::F32, {rows, 2 * f});
  cpu().swiglu_backward(gu.c, dout.c, dgu.c);
  gpu().swiglu_backward(gu.g, dout.g, dgu.g);
  expect_close(cpu_f(dgu), gpu_f(dgu), 1e-6, 1e-5, "swiglu_backward");
}

// ================================ attention =================================================

TEST(CudaBackend, HeadLayouts) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t b = 2, s = 13, h = 3, dh = 20;
  Twin qkv = twin({b, s, 3, h * dh}, randn(b * s * 3 * h * dh, 70));
  Twin q = twin(DType::F32, {b, h, s, dh}), k = twin(DType::F32, {b, h, s, dh}), v = twin(DType::F32, {b, h, s, dh});
  cpu().split_qkv(qkv.c, q.c, k.c, v.c);
  gpu().split_qkv(qkv.g, q.g, k.g, v.g);
  expect_equal(cpu_f(q), gpu_f(q), "split_qkv q");
  expect_equal(cpu_f(k), gpu_f(k), "split_qkv k");
  expect_equal(cpu_f(v), gpu_f(v), "split_qkv v");
  Twin back = twin(DType::F32, {b, s, 3, h * dh});
  gpu().join_qkv(q.g, k.g, v.g, back.g);
  expect_equal(cpu_f(qkv), gpu_f(back), "join_qkv inverts split_qkv");
  Twin dq = twin({b, h, s, dh}, randn(b * h * s * dh, 71)), dk = twin({b, h, s, dh}, randn(b * h * s * dh, 72)),
       dv = twin({b, h, s, dh}, randn(b * h * s * dh, 73));
  cpu().join_qkv(dq.c, dk.c, dv.c, back.c);
  gpu().join_qkv(dq.g, dk.g, dv.g, back.g);
  expect_equal(cpu_f(back), gpu_f(back), "join_qkv");
  Twin y = twin(DType::F32, {b, s, h, dh});
  cpu().merge_heads(dq.c, y.c);
  gpu().merge_heads(dq.g, y.g);
  expect_equal(cpu_f(y), gpu_f(y), "merge_heads");
  Twin x = twin(DType::F32, {b, h, s, dh});
  cpu().split_heads(y.c, x.c);
  gpu().split_heads(y.g, x.g);
  expect_equal(cpu_f(x), gpu_f(x), "split_heads");
  expect_equal(cpu_f(dq), gpu_f(x), "split_heads inverts merge_heads");
}

TEST(CudaBackend, Rope) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t b = 2, h = 3, s = 300, dh = 64;
  const auto v = randn(b * h * s * dh, 80);
  Twin x = twin({b, h, s, dh}, v);
  for (int direction : {1, -1}) {
    cpu().rope(x.c, 10000.0, direction);
    gpu().rope(x.g, 10000.0, direction);
    expect_close(cpu_f(x), gpu_f(x), 1e-6, 1e-5, fmt::format("rope direction {}", direction));
  }
  expect_close(v, gpu_f(x), 1e-5, 1e-5, "rope(-1) inverts rope(+1)");
}

TEST(CudaBackend, CausalSoftmax) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t s : {int64_t(1), int64_t(77), int64_t(300)}) {
    const int64_t n = 5;
    const std::string what = fmt::format("causal softmax S={}", s);
    Twin p = twin({n, s, s}, randn(n * s * s, 90, 4.0f));
    cpu().causal_softmax_forward(p.c, 0.3);
    gpu().causal_softmax_forward(p.g, 0.3);
    const auto got = gpu_f(p);
    expect_close(cpu_f(p), got, 1e-7, 1e-5, what + " forward");
    for (int64_t r = 0; r < n * s; ++r)
      for (int64_t j = r % s + 1; j < s; ++j) ASSERT_EQ(got[r * s + j], 0.0f) << what << " masked entry";
    // Backward from the CPU probabilities on both sides.
    gpu().copy_from_host(cpu_f(p).data(), p.g);
    Twin g = twin({n, s, s}, randn(n * s * s, 91));
    cpu().causal_softmax_backward(p.c, g.c, 0.3);
    gpu().causal_softmax_backward(p.g, g.g, 0.3);
    expect_close(cpu_f(g), gpu_f(g), 1e-6, 1e-5, what + " backward");
  }
}

// ================================ loss ======================================================

TEST(CudaBackend, CrossEntropy) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t rows = 40, vocab = 5003;
  auto logits = randn(rows * vocab, 100, 2.0f);
  for (int64_t v = 0; v < vocab; ++v) logits[3 * vocab + v] += 30.0f;  // a shifted row
  auto targets = randint(rows, 0, int32_t(vocab), 101);
  for (int64_t r = 0; r < rows; r += 7) targets[r] = -1;  // ignored tokens
  for (int64_t r = 5; r < rows; r += 11) targets[r] = sdmoe::Backend::kTargetOnOtherShard;
  Twin z = twin({rows, vocab}, logits), t = twin({rows}, targets);
  Twin loss = twin(DType::F32, {rows}), lse = twin(DType::F32, {rows});
  cpu().cross_entropy_forward(z.c, t.c, loss.c, lse.c);
  gpu().cross_entropy_forward(z.g, t.g, loss.g, lse.g);
  expect_close(cpu_f(lse), gpu_f(lse), 1e-5, 2e-6, "lse");
  expect_close(cpu_f(loss), gpu_f(loss), 2e-5, 1e-5, "per-token loss");
  // Backward from the CPU lse on both sides.
  gpu().copy_from_host(cpu_f(lse).data(), lse.g);
  cpu().cross_entropy_backward(z.c, t.c, lse.c, 0.125);
  gpu().cross_entropy_backward(z.g, t.g, lse.g, 0.125);
  const auto got = gpu_f(z);
  expect_close(cpu_f(z), got, 1e-8, 1e-5, "cross_entropy_backward");
  for (int64_t v = 0; v < vocab; ++v) ASSERT_EQ(got[7 * vocab + v], 0.0f) << "ignored token has zero gradient";
}

// ================================ MoE =======================================================

struct RouterCase {
  int64_t experts, k;
};

std::vector<float> router_logits(int64_t tokens, int64_t experts, uint32_t seed) {
  auto z = randn(tokens * experts, seed, 2.0f);
  for (int64_t e = 0; e < experts; ++e) z[e] = 0.0f;  // token 0: all tied
  for (int64_t e = 0; e < experts; ++e) z[experts + e] = -1.0f;  // token 1: two tied maxima
  z[experts + experts - 1] = 3.0f;
  z[experts + experts / 2] = 3.0f;
  return z;
}

TEST(CudaBackend, RouterForward) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t tokens = 203;
  for (RouterCase rc : {RouterCase{6, 2}, RouterCase{8, 8}, RouterCase{64, 6}, RouterCase{72, 1}, RouterCase{256, 8}})
    for (RouterScore score : {RouterScore::SOFTMAX, RouterScore::SIGMOID})
      for (bool normalize : {false, true}) {
        const int64_t e = rc.experts, k = rc.k;
        const std::string what = fmt::format("router E={} K={} {} normalize={}", e, k,
                                             score == RouterScore::SOFTMAX ? "softmax" : "sigmoid", normalize);
        Twin z = twin({tokens, e}, router_logits(tokens, e, 110 + uint32_t(e)));
        Twin idx = twin(DType::I32, {tokens, k}), w = twin(DType::F32, {tokens, k});
        Twin aux = twin(DType::F32, {tokens, e}), lse = twin(DType::F32, {tokens});
        cpu().router_forward(z.c, score, normalize, idx.c, w.c, aux.c, lse.c);
        gpu().router_forward(z.g, score, normalize, idx.g, w.g, aux.g, lse.g);
        const auto gi = read<int32_t>(gpu(), idx.g);
        expect_equal(read<int32_t>(cpu(), idx.c), gi, what + " top-k index");
        for (int64_t j = 0; j < k; ++j) EXPECT_EQ(gi[j], j) << what << ": all-tied token picks the lowest indices";
        EXPECT_EQ(gi[k], e / 2) << what << ": of two tied maxima the lower index comes first";
        expect_close(cpu_f(w), gpu_f(w), 1e-7, 1e-6, what + " top-k weight");
        expect_close(cpu_f(aux), gpu_f(aux), 1e-8, 1e-6, what + " aux_probs");
        expect_close(cpu_f(lse), gpu_f(lse), 1e-6, 1e-6, what + " lse");
      }
}

TEST(CudaBackend, RouterBackward) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t tokens = 203;
  for (RouterCase rc : {RouterCase{6, 2}, RouterCase{8, 8}, RouterCase{64, 6}, RouterCase{72, 1}, RouterCase{256, 8}})
    for (RouterScore score : {RouterScore::SOFTMAX, RouterScore::SIGMOID})
      for (bool normalize : {false, true}) {
        const int64_t e = rc.experts, k = rc.k;
        const std::string what = fmt::format("router backward E={} K={} {} normalize={}", e, k,
                                             score == RouterScore::SOFTMAX ? "softmax" : "sigmoid", normalize);
        Twin z = twin({tokens, e}, router_logits(tokens, e, 120 + uint32_t(e)));
        Twin idx = twin(DType::I32, {tokens, k}), w = twin(DType::F32, {tokens, k});
        Twin aux = twin(DType::F32, {tokens, e}), lse = twin(DType::F32, {tokens});
        cpu().router_forward(z.c, score, normalize, idx.c, w.c, aux.c, lse.c);
        // The GPU backward sees exactly the CPU forward's outputs.
        gpu().copy_from_host(idx.c.data, idx.g);
        gpu().copy_from_host(w.c.data, w.g);
        gpu().copy_from_host(lse.c.data, lse.g);
        Twin dw = twin({tokens, k}, randn(tokens * k, 121)), ag = twin({e}, randn(e, 122, 0.1f));
        Twin dz = twin(DType::F32, {tokens, e});
        cpu().router_backward(z.c, score, normalize, idx.c, w.c, dw.c, ag.c, lse.c, 1e-3, dz.c);
        gpu().router_backward(z.g, score, normalize, idx.g, w.g, dw.g, ag.g, lse.g, 1e-3, dz.g);
        expect_close(cpu_f(dz), gpu_f(dz), 1e-7, 1e-5, what);
      }
}

TEST(CudaBackend, GatherRows) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t tokens = 100, dim = 257, n = 300;
  Twin src = twin({tokens, dim}, randn(tokens * dim, 130)), index = twin({n}, randint(n, 0, int32_t(tokens), 131));
  Twin dst = twin(DType::F32, {n, dim});
  cpu().gather_rows(src.c, index.c, dst.c);
  gpu().gather_rows(src.g, index.g, dst.g);
  expect_equal(cpu_f(dst), gpu_f(dst), "gather_rows");
}

TEST(CudaBackend, CombineRows) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t tokens = 50, k = 4, dim = 130, nrows = tokens * k + 9;
  std::vector<int32_t> perm(nrows);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(140));
  perm.resize(tokens * k);  // distinct rows, some rows unused
  Twin rows = twin({nrows, dim}, randn(nrows * dim, 141)), slot = twin({tokens, k}, perm);
  Twin weight = twin({tokens, k}, randn(tokens * k, 142, 0.3f, 0.25f));
  for (bool weighted : {false, true})
    for (double beta : {0.0, 0.7}) {
      const std::string what = fmt::format("combine_rows weighted={} beta={}", weighted, beta);
      auto out0 = randn(tokens * dim, 143);
      if (beta == 0.0) std::fill(out0.begin(), out0.end(), std::numeric_limits<float>::quiet_NaN());
      Twin out = twin({tokens, dim}, out0);
      cpu().combine_rows(rows.c, slot.c, weighted ? &weight.c : nullptr, beta, out.c);
      gpu().combine_rows(rows.g, slot.g, weighted ? &weight.g : nullptr, beta, out.g);
      expect_close(cpu_f(out), gpu_f(out), 1e-7, 1e-6, what);
    }
  // Backward: referenced rows assigned, the others untouched.
  Twin dout = twin({tokens, dim}, randn(tokens * dim, 144));
  Twin drows = twin({nrows, dim}, std::vector<float>(nrows * dim, 42.0f)), dweight = twin(DType::F32, {tokens, k});
  cpu().combine_rows_backward(dout.c, rows.c, slot.c, weight.c, drows.c, dweight.c);
  gpu().combine_rows_backward(dout.g, rows.g, slot.g, weight.g, drows.g, dweight.g);
  expect_close(cpu_f(drows), gpu_f(drows), 0, 1e-7, "combine_rows_backward drows");
  expect_close(cpu_f(dweight), gpu_f(dweight), 1e-5, 1e-5, "combine_rows_backward dweight");
}

// ================================ optimizer =================================================

TEST(CudaBackend, AdamW) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 100007;
  auto v0 = randn(n, 153, 1e-3f);
  for (auto& x : v0) x = std::fabs(x);
  Twin p = twin({n}, randn(n, 150)), g = twin({n}, randn(n, 151)), m = twin({n}, randn(n, 152, 0.1f)),
       v = twin({n}, v0);
  for (int t = 1; t <= 3; ++t) {
    const AdamWStep step{1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0 - std::pow(0.9, t), 1.0 - std::pow(0.95, t), 0.5};
    cpu().adamw_update(p.c, g.c, m.c, v.c, step);
    gpu().adamw_update(p.g, g.g, m.g, v.g, step);
  }
  expect_close(cpu_f(p), gpu_f(p), 1e-7, 1e-6, "adamw param");
  // m = 0.9 m + 0.1 s g mixes terms of size ~0.1 that often nearly cancel, so its error is
  // bounded by the terms' rounding (fp32 ulp at 0.1 is 7.5e-9; a few per step, three steps,
  // FMA contraction on one side only), not by the small result.
  expect_close(cpu_f(m), gpu_f(m), 1e-7, 1e-6, "adamw m");
  expect_close(cpu_f(v), gpu_f(v), 1e-12, 1e-6, "adamw v");
}

TEST(CudaBackend, SdmoePartStep) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // Three expert matrices of 10007 elements at a stride of 12000 (the gaps are another
  // matrix type's elements and must stay untouched), the packed operands contiguous.
  const int64_t count = 3, elements = 10007, stride = 12000, span = (count - 1) * stride + elements,
                packed = count * elements;
  auto pos = [&](int64_t n, uint32_t seed) {
    auto v = randn(n, seed, 1e-3f);
    for (auto& x : v) x = std::fabs(x);
    return v;
  };
  for (bool sgd : {false, true}) {
    const auto w0 = randn(span, 170);
    Twin w = twin({span}, w0), g = twin({span}, randn(span, 171)), gc = twin({packed}, randn(packed, 172, 0.5f));
    Twin mc = twin({span}, randn(span, 173, 0.1f)), vc = twin({span}, pos(span, 174)),
         mu = twin({packed}, randn(packed, 175, 0.1f)), vu = twin({packed}, pos(packed, 176)),
         diff = twin(DType::F32, {packed});
    for (int t = 1; t <= 3; ++t) {
      const AdamWStep adam{0.0, 0.9, 0.95, 1e-8, 0.0, 1.0 - std::pow(0.9, t), 1.0 - std::pow(0.95, t), 0.5};
      const SdmoePartStep step{adam, 1e-3, 5e-4, 5e-5, 1e-4, sgd};
      const MatrixStack stack{count, elements, stride};
      cpu().sdmoe_part_step(w.c, g.c, mc.c, vc.c, gc.c, mu.c, vu.c, diff.c, stack, step);
      gpu().sdmoe_part_step(w.g, g.g, mc.g, vc.g, gc.g, mu.g, vu.g, diff.g, stack, step);
    }
    const std::string what = sgd ? "sgd " : "adamw ";
    expect_close(cpu_f(w), gpu_f(w), 1e-7, 1e-6, what + "w");
    expect_close(cpu_f(diff), gpu_f(diff), 1e-9, 1e-5, what + "difference");
    expect_close(cpu_f(mc), gpu_f(mc), 1e-7, 1e-6, what + "m_c");
    expect_close(cpu_f(vu), gpu_f(vu), 1e-12, 1e-6, what + "v_u");
    const auto wg = gpu_f(w);
    for (int64_t e = 0; e + 1 < count; ++e)
      for (int64_t i = e * stride + elements; i < (e + 1) * stride; ++i)
        ASSERT_EQ(wg[i], w0[i]) << what << "gap element " << i << " changed";
  }
}

// ================================ linear algebra ============================================

TEST(CudaBackend, Svd) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{50, 20}, {20, 50}, {33, 33}, {1, 7}, {7, 1}, {128, 96}};
  for (auto [m, n] : shapes) {
    const int64_t r = std::min(m, n);
    const std::string what = fmt::format("svd {}x{}", m, n);
    const auto av = randn(m * n, 160 + uint32_t(m));
    Twin a = twin({m, n}, av), u = twin(DType::F32, {m, r}), s = twin(DType::F32, {r}), vt = twin(DType::F32, {r, n});
    cpu().svd(a.c, u.c, s.c, vt.c);
    gpu().svd(a.g, u.g, s.g, vt.g);
    expect_equal(av, gpu_f(a), what + ": input unchanged");
    const auto sw = cpu_f(s), sg = gpu_f(s), ug = gpu_f(u), vg = gpu_f(vt);
    const double smax = sw[0];
    expect_close(sw, sg, 1e-5 * smax, 0, what + " singular values");
    for (int64_t i = 1; i < r; ++i) EXPECT_GE(sg[i - 1], sg[i]) << what << ": descending";
    // Reconstruction a = u diag(s) vt.
    double worst = 0.0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0.0;
        for (int64_t q = 0; q < r; ++q) acc += double(ug[i * r + q]) * sg[q] * double(vg[q * n + j]);
        worst = std::max(worst, std::fabs(acc - av[i * n + j]));
      }
    EXPECT_LT(worst, 1e-4 * smax) << what << " reconstruction";
    // Orthonormal columns of u and rows of vt.
    double ortho = 0.0;
    for (int64_t p = 0; p < r; ++p)
      for (int64_t q = 0; q < r; ++q) {
        double du = 0.0, dv = 0.0;
        for (int64_t i = 0; i < m; ++i) du += double(ug[i * r + p]) * ug[i * r + q];
        for (int64_t j = 0; j < n; ++j) dv += double(vg[p * n + j]) * vg[q * n + j];
        const double want = p == q ? 1.0 : 0.0;
        ortho = std::max({ortho, std::fabs(du - want), std::fabs(dv - want)});
      }
    EXPECT_LT(ortho, 1e-4) << what << " orthonormality";
  }
}

TEST(CudaBackend, SymmetricEigen) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t n : {int64_t(1), int64_t(40), int64_t(100)}) {
    const std::string what = fmt::format("eigen n={}", n);
    const auto b = randn(n * n, 170 + uint32_t(n));
    std::vector<float> av(n * n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) av[i * n + j] = 0.5f * (b[i * n + j] + b[j * n + i]);
    Twin a = twin({n, n}, av), w = twin(DType::F32, {n}), vecs = twin(DType::F32, {n, n});
    cpu().symmetric_eigen(a.c, w.c, vecs.c);
    gpu().symmetric_eigen(a.g, w.g, vecs.g);
    const auto ww = cpu_f(w), wg = gpu_f(w), vg = gpu_f(vecs);
    double scale = 0.0;
    for (float x : ww) scale = std::max(scale, double(std::fabs(x)));
    expect_close(ww, wg, 1e-5 * scale + 1e-6, 0, what + " eigenvalues");
    for (int64_t i = 1; i < n; ++i) EXPECT_LE(wg[i - 1], wg[i]) << what << ": ascending";
    // Rows are eigenvectors: A v_i = w_i v_i, and orthonormal.
    double resid = 0.0, ortho = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t r = 0; r < n; ++r) {
        double acc = 0.0;
        for (int64_t c = 0; c < n; ++c) acc += double(av[r * n + c]) * vg[i * n + c];
        resid = std::max(resid, std::fabs(acc - double(wg[i]) * vg[i * n + r]));
      }
      for (int64_t j = 0; j < n; ++j) {
        double d = 0.0;
        for (int64_t c = 0; c < n; ++c) d += double(vg[i * n + c]) * vg[j * n + c];
        ortho = std::max(ortho, std::fabs(d - (i == j ? 1.0 : 0.0)));
      }
    }
    EXPECT_LT(resid, 1e-4 * std::max(1.0, scale)) << what << " residual";
    EXPECT_LT(ortho, 1e-4) << what << " orthonormality";
  }
}

// A batch in one call (cusolverDnXsyevBatched) against the CPU one matrix at a time.
TEST(CudaBackend, SymmetricEigenBatched) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 96, batch = 3;
  std::vector<float> av(batch * n * n);
  for (int64_t b = 0; b < batch; ++b) {
    const auto r = randn(n * n, 400 + uint32_t(b));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        av[b * n * n + i * n + j] = float(b + 1) * 0.5f * (r[i * n + j] + r[j * n + i]);
  }
  Twin a = twin({batch, n, n}, av), w = twin(DType::F32, {batch, n}), vecs = twin(DType::F32, {batch, n, n});
  gpu().symmetric_eigen(a.g, w.g, vecs.g);
  const auto wg = gpu_f(w), vg = gpu_f(vecs);
  for (int64_t b = 0; b < batch; ++b) {
    const std::string what = fmt::format("batched eigen matrix {}", b);
    Twin one = twin({n, n}, std::vector<float>(av.begin() + b * n * n, av.begin() + (b + 1) * n * n));
    Twin w1 = twin(DType::F32, {n}), v1 = twin(DType::F32, {n, n});
    cpu().symmetric_eigen(one.c, w1.c, v1.c);
    const auto ww = cpu_f(w1);
    double scale = 0.0;
    for (float x : ww) scale = std::max(scale, double(std::fabs(x)));
    expect_close(ww, std::vector<float>(wg.begin() + b * n, wg.begin() + (b + 1) * n), 1e-5 * scale + 1e-6, 0,
                 what + " eigenvalues");
    double resid = 0.0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < n; ++r) {
        double acc = 0.0;
        for (int64_t c = 0; c < n; ++c) acc += double(av[b * n * n + r * n + c]) * vg[b * n * n + i * n + c];
        resid = std::max(resid, std::fabs(acc - double(wg[b * n + i]) * vg[b * n * n + i * n + r]));
      }
    EXPECT_LT(resid, 1e-4 * std::max(1.0, scale)) << what << " residual";
  }
}

// The CholeskyQR step against the CPU: same double arithmetic on the same f32 input, so
// the results agree to f32 rounding; k above the smallest kernel size too.
TEST(CudaBackend, CholeskyInverse) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t k : {int64_t(8), int64_t(24)}) {
    const int64_t length = 3 * k, batch = 5;
    std::vector<float> gv(batch * k * k, 0.0f);
    for (int64_t b = 0; b + 1 < batch; ++b) {  // the last stays zero
      const auto y = randn(k * length, 500 + uint32_t(b + k));
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) {
          double x = 0;
          for (int64_t l = 0; l < length; ++l) x += double(y[i * length + l]) * y[j * length + l];
          gv[b * k * k + i * k + j] = float(x);
        }
    }
    Twin g = twin({batch, k, k}, gv), inv = twin(DType::F32, {batch, k, k});
    cpu().cholesky_inverse(g.c, inv.c, 1e-12);
    gpu().cholesky_inverse(g.g, inv.g, 1e-12);
    const auto want = cpu_f(inv), got = gpu_f(inv);
    double scale = 0.0;
    for (float x : want) scale = std::max(scale, double(std::fabs(x)));
    expect_close(want, got, 1e-6 * scale, 0, fmt::format("cholesky_inverse k={}", k));
  }
}

// ================================ errors ====================================================

TEST(CudaBackendDeathTest, F64IsFatal) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // re-executes the binary: no fork after CUDA init
  EXPECT_DEATH(
      {
        Buffer buf(gpu(), 64);
        Tensor t(buf.data(), DType::F64, Device::CUDA, {8});
        gpu().scale(t, 2.0);
      },
      "not supported");
}

}  // namespace
}  // namespace sdmoe
