// The bf16 storage variants of the CUDA ops that the BF16 precision policy uses (GEMM
// operands written or read by rmsnorm, SwiGLU, the head layouts, RoPE, the softmax
// backward and the row gather; the norm gains and the embedding table read from the
// weights' bf16 working copy), and the cuBLASLt bf16 GEMMs, each against the CPU twin.
//
// Tolerances.
//   - Pure copies and roundings of the same fp32 values (the head layouts, gather) use one
//     rounding function on both backends (round to nearest even), so they agree bitwise.
//   - An op computed in fp32 on the GPU and in double on the CPU and then rounded to bf16
//     (rmsnorm's y, SwiGLU, RoPE) agrees to fp32 accuracy before the rounding; the two
//     roundings then differ only where that tiny difference straddles a bf16 rounding
//     boundary: by one bf16 unit, at most 2^-7 of the value, and in few elements. The
//     tests allow one unit and require that at most 1% of the elements differ at all, so a
//     wrong rounding mode (truncation differs in about half of them) or a wrong element
//     fails.
//   - The softmax backward reads the same bf16 probabilities on both and computes in fp32
//     (GPU) or double (CPU): the fp32 tolerance of the fp32 test.
//   - bf16 GEMMs: the same bf16 inputs with fp32 accumulation on both, so fp32 agreement
//     within 2e-5 of the magnitude bound sum_p |a_ip b_pj| (a few units of fp32 over sums
//     of up to a few hundred terms, in a different order).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"
#include "tests/gpu/cuda_test_support.h"

namespace sdmoe {
namespace {

using namespace cuda_test;

std::vector<float> widen_bits(const std::vector<uint16_t>& bits) {
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_to_float(bf16{bits[i]});
  return out;
}
std::vector<float> cpu_bf16(const Twin& t) { return widen_bits(read<uint16_t>(cpu(), t.c)); }
std::vector<float> gpu_bf16(const Twin& t) { return widen_bits(read<uint16_t>(gpu(), t.g)); }

// Within one bf16 unit (2^-7 relative), and differing at all in at most 1% of the elements.
void expect_bf16_rounding_of_same_value(const std::vector<float>& want, const std::vector<float>& got,
                                        const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t differ = 0, beyond_unit = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] == got[i]) continue;
    ++differ;
    if (!(std::fabs(double(got[i]) - double(want[i])) <= std::ldexp(std::fabs(double(want[i])), -7) + 1e-30)) {
      if (beyond_unit < 5) ADD_FAILURE() << what << ": element " << i << " want " << want[i] << " got " << got[i];
      ++beyond_unit;
    }
  }
  EXPECT_EQ(beyond_unit, 0) << what << ": elements off by more than one bf16 unit";
  EXPECT_LE(differ, int64_t(want.size()) / 100) << what << ": " << differ << " of " << want.size()
                                                << " elements rounded differently";
}

Twin bf16_twin(std::initializer_list<int64_t> dims, const std::vector<float>& values) {
  const auto bits = to_bf16_bits(values);
  return twin(DType::BF16, dims, bits.data());
}

TEST(CudaBf16, RmsNormWritesBf16Operand) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t dim : {int64_t(16), int64_t(999), int64_t(4096)}) {
    const int64_t rows = 37;
    const std::string what = fmt::format("rmsnorm bf16 y, dim={}", dim);
    Twin x = twin({rows, dim}, randn(rows * dim, 150, 2.0f, 0.3f)), w = twin({dim}, randn(dim, 151, 0.5f, 1.0f));
    Twin y = twin(DType::BF16, {rows, dim}), rstd = twin(DType::F32, {rows});
    cpu().rmsnorm_forward(x.c, w.c, 1e-5, y.c, rstd.c);
    gpu().rmsnorm_forward(x.g, w.g, 1e-5, y.g, rstd.g);
    expect_bf16_rounding_of_same_value(cpu_bf16(y), gpu_bf16(y), what);
    expect_close(cpu_f(rstd), gpu_f(rstd), 0, 1e-6, what + " rstd (fp32)");
  }
}

// Under BF16 the norm gains are read from the weights' working copy: the same bf16
// weight on both backends, fp32 x, y and gradients, so the fp32 tolerances of the fp32
// test (CudaBackend.RmsNorm) apply.
TEST(CudaBf16, RmsNormReadsBf16Weight) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t dim : {int64_t(16), int64_t(999), int64_t(4096)}) {
    const int64_t rows = 37;
    const std::string what = fmt::format("rmsnorm bf16 weight, dim={}", dim);
    Twin x = twin({rows, dim}, randn(rows * dim, 170, 2.0f, 0.3f)), w = bf16_twin({dim}, randn(dim, 171, 0.5f, 1.0f));
    Twin y = twin(DType::F32, {rows, dim}), rstd = twin(DType::F32, {rows});
    cpu().rmsnorm_forward(x.c, w.c, 1e-5, y.c, rstd.c);
    gpu().rmsnorm_forward(x.g, w.g, 1e-5, y.g, rstd.g);
    expect_close(cpu_f(y), gpu_f(y), 1e-6, 1e-5, what + " y");
    Twin dy = twin({rows, dim}, randn(rows * dim, 172)), dx = twin(DType::F32, {rows, dim});
    Twin dw = twin({dim}, randn(dim, 173));  // accumulates, fp32
    gpu().copy_from_host(rstd.c.data, rstd.g);  // both backwards see the CPU's rstd
    cpu().rmsnorm_backward(x.c, w.c, rstd.c, dy.c, dx.c, dw.c);
    gpu().rmsnorm_backward(x.g, w.g, rstd.g, dy.g, dx.g, dw.g);
    expect_close(cpu_f(dx), gpu_f(dx), 1e-5, 1e-5, what + " dx");
    expect_close(cpu_f(dw), gpu_f(dw), 1e-5, 1e-5, what + " dweight");
  }
}

// The embedding table read from the working copy: rows widened exactly, so bitwise.
TEST(CudaBf16, EmbeddingReadsBf16Table) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t vocab = 50, dim = 300, tokens = 1000;
  auto ids = randint(tokens, 0, vocab, 174);
  for (int64_t t = 0; t < tokens; t += 9) ids[t] = -1;  // rows on another rank
  Twin id = twin({tokens}, ids), table = bf16_twin({vocab, dim}, randn(vocab * dim, 175));
  Twin out = twin(DType::F32, {tokens, dim});
  cpu().embedding_forward(id.c, table.c, out.c);
  gpu().embedding_forward(id.g, table.g, out.g);
  expect_equal(cpu_f(out), gpu_f(out), "embedding_forward from a bf16 table");
}

TEST(CudaBf16, SwiGluWritesBf16Operands) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t rows = 53, f = 200;
  Twin gate_up = twin({rows, 2 * f}, randn(rows * 2 * f, 160, 2.0f));
  Twin out = twin(DType::BF16, {rows, f});
  cpu().swiglu_forward(gate_up.c, out.c);
  gpu().swiglu_forward(gate_up.g, out.g);
  expect_bf16_rounding_of_same_value(cpu_bf16(out), gpu_bf16(out), "swiglu forward bf16 out");
  Twin dout = twin({rows, f}, randn(rows * f, 161)), dgate_up = twin(DType::BF16, {rows, 2 * f});
  cpu().swiglu_backward(gate_up.c, dout.c, dgate_up.c);
  gpu().swiglu_backward(gate_up.g, dout.g, dgate_up.g);
  expect_bf16_rounding_of_same_value(cpu_bf16(dgate_up), gpu_bf16(dgate_up), "swiglu backward bf16 dgate_up");
}

// Every pairing of fp32 and bf16 sides: a bf16 side receives the same rounding of the same
// float on both backends, so the results are bitwise equal.
TEST(CudaBf16, HeadLayoutsAcrossDtypes) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t b = 2, s = 13, h = 3, dh = 20, n = b * s * h * dh;
  for (DType packed_dtype : {DType::F32, DType::BF16})
    for (DType heads_dtype : {DType::F32, DType::BF16}) {
      if (packed_dtype == DType::F32 && heads_dtype == DType::F32) continue;  // test_cuda_ops covers it
      const std::string what = fmt::format("packed {} heads {}", dtype_name(packed_dtype), dtype_name(heads_dtype));
      const auto packed_values = randn(3 * n, 170), head_values = randn(3 * n, 171);
      auto make = [&](DType dtype, std::initializer_list<int64_t> dims, const float* values, int64_t count) {
        std::vector<float> v(values, values + count);
        return dtype == DType::BF16 ? bf16_twin(dims, v) : twin(dims, v);
      };
      Twin qkv = make(packed_dtype, {b, s, 3, h * dh}, packed_values.data(), 3 * n);
      Twin q = twin(heads_dtype, {b, h, s, dh}), k = twin(heads_dtype, {b, h, s, dh}), v = twin(heads_dtype, {b, h, s, dh});
      cpu().split_qkv(qkv.c, q.c, k.c, v.c);
      gpu().split_qkv(qkv.g, q.g, k.g, v.g);
      for (const Twin* t : {&q, &k, &v})
        expect_equal(read<uint8_t>(cpu(), t->c), read<uint8_t>(gpu(), t->g), "split_qkv " + what);
      Twin dq = make(heads_dtype, {b, h, s, dh}, head_values.data(), n),
           dk = make(heads_dtype, {b, h, s, dh}, head_values.data() + n, n),
           dv = make(heads_dtype, {b, h, s, dh}, head_values.data() + 2 * n, n);
      Twin dqkv = twin(packed_dtype, {b, s, 3, h * dh});
      cpu().join_qkv(dq.c, dk.c, dv.c, dqkv.c);
      gpu().join_qkv(dq.g, dk.g, dv.g, dqkv.g);
      expect_equal(read<uint8_t>(cpu(), dqkv.c), read<uint8_t>(gpu(), dqkv.g), "join_qkv " + what);
      Twin y = twin(packed_dtype, {b, s, h, dh});
      cpu().merge_heads(dq.c, y.c);
      gpu().merge_heads(dq.g, y.g);
      expect_equal(read<uint8_t>(cpu(), y.c), read<uint8_t>(gpu(), y.g), "merge_heads " + what);
      Twin x = twin(heads_dtype, {b, h, s, dh});
      cpu().split_heads(y.c, x.c);
      gpu().split_heads(y.g, x.g);
      expect_equal(read<uint8_t>(cpu(), x.c), read<uint8_t>(gpu(), x.g), "split_heads " + what);
    }
}

TEST(CudaBf16, RopeOnBf16) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t b = 2, h = 3, s = 300, dh = 64;  // positions to 299: angles of hundreds of radians
  const auto values = randn(b * h * s * dh, 180, 1.5f);
  for (int direction : {+1, -1}) {
    Twin x = bf16_twin({b, h, s, dh}, values);
    cpu().rope(x.c, 10000.0, direction);
    gpu().rope(x.g, 10000.0, direction);
    expect_bf16_rounding_of_same_value(cpu_bf16(x), gpu_bf16(x), fmt::format("rope bf16 direction {}", direction));
  }
}

TEST(CudaBf16, CausalSoftmaxBackwardReadsBf16Probabilities) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 4, s = 77;
  // Probabilities from the fp32 forward, rounded to bf16 as the BF16 forward keeps them.
  Twin scores = twin({n, s, s}, randn(n * s * s, 190, 3.0f));
  cpu().causal_softmax_forward(scores.c, 0.125);
  Twin probs = bf16_twin({n, s, s}, cpu_f(scores));
  const auto grad_values = randn(n * s * s, 191);
  Twin grad = twin({n, s, s}, grad_values);
  cpu().causal_softmax_backward(probs.c, grad.c, 0.125);
  gpu().causal_softmax_backward(probs.g, grad.g, 0.125);
  expect_close(cpu_f(grad), gpu_f(grad), 1e-6, 1e-4, "causal softmax backward, bf16 probabilities");
}

TEST(CudaBf16, GatherRowsBf16) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t rows = 40, dim = 72, n = 100;
  Twin src = bf16_twin({rows, dim}, randn(rows * dim, 200));
  Twin index = twin({n}, randint(n, 0, int32_t(rows), 201));
  Twin dst = twin(DType::BF16, {n, dim});
  cpu().gather_rows(src.c, index.c, dst.c);
  gpu().gather_rows(src.g, index.g, dst.g);
  expect_equal(read<uint16_t>(cpu(), dst.c), read<uint16_t>(gpu(), dst.g), "gather_rows bf16");
}

// The cuBLASLt path on the shapes and layouts the model gives it: every transpose pair,
// odd sizes, strided batches (attention heads), beta 1 (accumulating weight gradients), and
// operands at 2-byte offsets (slices of an arena), whose alignment changes the plan.
TEST(CudaBf16, LtGemmShapesLayoutsAndAlignment) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Case {
    int64_t m, n, k, count, offset;
    double beta;
  };
  int seed = 210;
  for (const Case& cs : {Case{1, 1, 1, 1, 0, 0.0}, Case{7, 3, 5, 1, 1, 1.0}, Case{64, 48, 32, 1, 0, 0.5},
                         Case{129, 65, 200, 1, 3, 1.0}, Case{37, 16, 64, 6, 0, 0.0}, Case{37, 16, 64, 6, 1, 1.0},
                         Case{512, 384, 256, 1, 0, 0.0}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        const std::string what = fmt::format("lt gemm {}x{}x{} batch {} offset {} beta {} ta {} tb {}", cs.m, cs.n,
                                             cs.k, cs.count, cs.offset, cs.beta, ta, tb);
        const int64_t sa = cs.m * cs.k, sb = cs.k * cs.n, sc = cs.m * cs.n;
        const auto av = randn(cs.offset + cs.count * sa, seed++), bv = randn(cs.offset + cs.count * sb, seed++),
                   cv = randn(cs.offset + cs.count * sc, seed++);
        Twin a = bf16_twin({int64_t(av.size())}, av), b = bf16_twin({int64_t(bv.size())}, bv);
        Twin c = twin({int64_t(cv.size())}, cv);
        auto at = [&](const Tensor& t, int64_t elements) {
          Tensor v = t;
          v.data = static_cast<char*>(t.data) + cs.offset * dtype_size(t.dtype);
          v.shape[0] = elements;
          return v;
        };
        const GemmBatch batch{cs.count, sa, sb, sc};
        cpu().gemm(ta, tb, cs.m, cs.n, cs.k, 1.0, at(a.c, cs.count * sa), at(b.c, cs.count * sb), cs.beta,
                   at(c.c, cs.count * sc), batch);
        gpu().gemm(ta, tb, cs.m, cs.n, cs.k, 1.0, at(a.g, cs.count * sa), at(b.g, cs.count * sb), cs.beta,
                   at(c.g, cs.count * sc), batch);
        // The bound from the bf16-rounded inputs, per batch member; untouched offset elements
        // must stay as they were on both.
        const auto ar = cpu_bf16(a), br = cpu_bf16(b);
        std::vector<double> tol(cv.size(), 0.0);
        for (int64_t i = 0; i < cs.count; ++i) {
          const auto bound = gemm_bound(ta, tb, cs.m, cs.n, cs.k, 1.0, ar.data() + cs.offset + i * sa,
                                        br.data() + cs.offset + i * sb, cs.beta, cv.data() + cs.offset + i * sc);
          for (int64_t j = 0; j < sc; ++j) tol[cs.offset + i * sc + j] = 2e-5 * bound[j] + 1e-6;
        }
        expect_within(cpu_f(c), gpu_f(c), tol, what);
      }
}

TEST(CudaBf16, MeasuredBf16PeakExceedsFp32Peak) {
  if (sdmoe::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // The tensor cores run bf16 at 8 to 16 times the fp32 FMA rate on sm_80 and sm_90; a
  // measurement at or below twice the fp32 rate means the GEMM did not reach them.
  EXPECT_GT(gpu().peak_bf16_flops(), 2.0 * gpu().peak_flops()) << gpu().name();
}

}  // namespace
}  // namespace sdmoe
