// The CPU kernels' bf16 variants (the BF16 precision policy) against their fp32 twins.
//
// Every such kernel computes in double and only stores differently: an op that writes a
// bf16 tensor must write exactly the fp32 twin's result rounded to bf16 (nearest even), and
// an op that reads a bf16 tensor must give exactly what its fp32 twin gives on the same
// values widened. So the tolerance here is zero, bit for bit: any difference means the
// variant computes something else (a different rounding point, a lost element, a wrong
// index), not that bf16 is coarse. The GEMMs are the exception: their summation order
// differs from the reference's, so they get a bound (see GemmTolerance).
#include <cmath>

#include "core/cpu/cpu_backend.h"
#include "model/precision.h"
#include "tests/core/cpu_test_support.h"

namespace sdmoe::test {
namespace {

// Values as a bf16 tensor holds them.
std::vector<double> bf16_values(std::vector<double> v) {
  for (double& x : v) x = bf16_to_float(float_to_bf16(static_cast<float>(x)));
  return v;
}

// What an fp32 result becomes when stored as bf16.
std::vector<double> to_bf16(const std::vector<double>& f32) { return bf16_values(f32); }

void expect_identical(const std::vector<double>& want, const std::vector<double>& got, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t bad = 0;
  std::string first;
  for (size_t i = 0; i < want.size(); ++i)
    if (!(want[i] == got[i] || (std::isnan(want[i]) && std::isnan(got[i])))) {
      if (bad++ < 5) first += " [" + std::to_string(i) + "] want " + std::to_string(want[i]) + " got " + std::to_string(got[i]);
    }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " differ:" << first;
}

TEST(CpuBf16Ops, CastRoundsToNearestEven) {
  // Ties, values just either side of a tie, FLT_MAX (beyond bf16 range: infinity), NaN and
  // infinities, a denormal, a negative value.
  const float tie_even = bf16_to_float(bf16{0x3f80}) + std::ldexp(1.0f, -8);  // 1 + half an ulp: stays 1
  const float tie_odd = bf16_to_float(bf16{0x3f81}) + std::ldexp(1.0f, -8);   // rounds up to 0x3f82
  const std::vector<float> in = {0.0f, -0.0f, 1.0f, tie_even, tie_odd, std::nextafter(tie_even, 2.0f), 3.4028235e38f,
                                 INFINITY, -INFINITY, NAN, 1e-40f, -2.5f};
  const std::vector<uint16_t> want = {0x0000, 0x8000, 0x3f80, 0x3f80, 0x3f82, 0x3f81, 0x7f80,
                                      0x7f80, 0xff80, 0x7fc0, 0x0001, 0xc020};
  Owned src = make(DType::F32, {int64_t(in.size())}), dst = make(DType::BF16, {int64_t(in.size())});
  cpu().copy_from_host(in.data(), src.t);
  cpu().cast(src.t, dst.t);
  std::vector<uint16_t> got(in.size());
  cpu().copy_to_host(dst.t, got.data());
  for (size_t i = 0; i < in.size(); ++i)
    if (i == 9) EXPECT_EQ(got[i] & 0x7fc0, 0x7fc0) << "NaN stays a quiet NaN";
    else EXPECT_EQ(got[i], want[i]) << "element " << i << " (" << in[i] << ")";
  // Back to fp32 and to F64: exact.
  Owned back = make(DType::F32, {int64_t(in.size())}), wide = make(DType::F64, {int64_t(in.size())});
  cpu().cast(dst.t, back.t);
  cpu().cast(dst.t, wide.t);
  const std::vector<double> b = get(back.t), w = get(wide.t);
  for (size_t i = 0; i < in.size(); ++i) {
    if (i == 9) continue;
    EXPECT_EQ(b[i], double(bf16_to_float(bf16{want[i]}))) << i;
    EXPECT_EQ(w[i], b[i]) << i;
  }
}

TEST(CpuBf16Ops, VectorCastKeepsEverySpecialValue) {
  // The special values again, now inside 16-lane blocks of a large array, between random
  // values: every element must have float_to_bf16's bits (NaN: a quiet NaN).
  const std::vector<float> special = {0.0f, -0.0f, 1.0f + std::ldexp(1.0f, -8), 1.0078125f + std::ldexp(1.0f, -8),
                                      3.4028235e38f, INFINITY, -INFINITY, NAN, 1e-40f, -1e-41f, -2.5f, 65504.0f};
  const int64_t n = (1 << 17) + 5;
  const std::vector<double> r = randn(n, 23, 100.0);
  std::vector<float> in(r.begin(), r.end());
  for (int64_t i = 0; i < n; i += 7) in[i] = special[(i / 7) % special.size()];
  Owned src = make(DType::F32, {n}), dst = make(DType::BF16, {n}), back = make(DType::F32, {n});
  cpu().copy_from_host(in.data(), src.t);
  cpu().cast(src.t, dst.t);
  std::vector<uint16_t> got(n);
  cpu().copy_to_host(dst.t, got.data());
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t want = float_to_bf16(in[i]).bits;
    if (std::isnan(in[i]) ? (got[i] & 0x7fc0) != 0x7fc0 : got[i] != want) ++bad;
  }
  EXPECT_EQ(bad, 0) << "elements whose bf16 bits differ from float_to_bf16";
  cpu().cast(dst.t, back.t);
  std::vector<float> widened(n);
  cpu().copy_to_host(back.t, widened.data());
  bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float want = bf16_to_float(bf16{got[i]});
    if (!(widened[i] == want || (std::isnan(want) && std::isnan(widened[i])))) ++bad;
  }
  EXPECT_EQ(bad, 0) << "widened elements that differ";
}

TEST(CpuBf16Ops, LargeCastMatchesElementwise) {
  // Above the size where the cast runs on several threads.
  const int64_t n = (1 << 17) + 3;
  const std::vector<double> v = randn(n, 11, 3.0);
  Owned src = make_from(DType::F32, {n}, v), dst = make(DType::BF16, {n});
  cpu().cast(src.t, dst.t);
  expect_identical(to_bf16(rounded(DType::F32, v)), get(dst.t), "cast f32 -> bf16");
}

TEST(CpuBf16Ops, RmsnormForwardWritesRoundedOutput) {
  const int64_t rows = 7, dim = 48;
  const std::vector<double> x = randn(rows * dim, 1), w = randn(dim, 2, 0.2, 1.0);
  Owned xt = make_from(DType::F32, {rows, dim}, x), wt = make_from(DType::F32, {dim}, w);
  Owned y32 = make(DType::F32, {rows, dim}), r32 = make(DType::F32, {rows});
  Owned y16 = make(DType::BF16, {rows, dim}), r16 = make(DType::F32, {rows});
  cpu().rmsnorm_forward(xt.t, wt.t, 1e-5, y32.t, r32.t);
  cpu().rmsnorm_forward(xt.t, wt.t, 1e-5, y16.t, r16.t);
  expect_identical(to_bf16(get(y32.t)), get(y16.t), "normed output");
  expect_identical(get(r32.t), get(r16.t), "rstd stays fp32");
}

// Under BF16 the step reads every weight from the working copy, the norm gains and the
// embedding table included: a bf16 weight must give exactly what an fp32 weight holding
// the same (widened) values gives.
TEST(CpuBf16Ops, RmsnormReadsBf16Weight) {
  const int64_t rows = 6, dim = 40;
  const std::vector<double> x = randn(rows * dim, 11), w = bf16_values(randn(dim, 12, 0.2, 1.0)),
                            dy = randn(rows * dim, 13);
  Owned xt = make_from(DType::F32, {rows, dim}, x), dyt = make_from(DType::F32, {rows, dim}, dy);
  Owned w32 = make_from(DType::F32, {dim}, w), w16 = make_from(DType::BF16, {dim}, w);
  Owned ya = make(DType::F32, {rows, dim}), ra = make(DType::F32, {rows});
  Owned yb = make(DType::F32, {rows, dim}), rb = make(DType::F32, {rows});
  cpu().rmsnorm_forward(xt.t, w32.t, 1e-5, ya.t, ra.t);
  cpu().rmsnorm_forward(xt.t, w16.t, 1e-5, yb.t, rb.t);
  expect_identical(get(ya.t), get(yb.t), "normed output from a bf16 weight");
  Owned dxa = make(DType::F32, {rows, dim}), dxb = make(DType::F32, {rows, dim});
  Owned dwa = make_from(DType::F32, {dim}, randn(dim, 14)), dwb = make_from(DType::F32, {dim}, get(dwa.t));
  cpu().rmsnorm_backward(xt.t, w32.t, ra.t, dyt.t, dxa.t, dwa.t);
  cpu().rmsnorm_backward(xt.t, w16.t, rb.t, dyt.t, dxb.t, dwb.t);
  expect_identical(get(dxa.t), get(dxb.t), "input gradient through a bf16 weight");
  expect_identical(get(dwa.t), get(dwb.t), "fp32 weight gradient accumulated");
  // The bf16 weight is really read: a different weight gives a different output.
  Owned w_other = make_from(DType::BF16, {dim}, bf16_values(randn(dim, 15, 0.2, 1.0)));
  cpu().rmsnorm_forward(xt.t, w_other.t, 1e-5, yb.t, rb.t);
  EXPECT_NE(get(ya.t), get(yb.t));
}

TEST(CpuBf16Ops, EmbeddingReadsBf16Table) {
  const int64_t vocab = 9, dim = 24;
  const std::vector<double> table = bf16_values(randn(vocab * dim, 16));
  const std::vector<int32_t> ids = {3, 0, 8, -1, 3, 5};  // -1: a row held by another rank
  Owned idt = make(DType::I32, {int64_t(ids.size())});
  put_i32(idt.t, ids);
  Owned t32 = make_from(DType::F32, {vocab, dim}, table), t16 = make_from(DType::BF16, {vocab, dim}, table);
  Owned oa = make(DType::F32, {int64_t(ids.size()), dim}), ob = make(DType::F32, {int64_t(ids.size()), dim});
  cpu().embedding_forward(idt.t, t32.t, oa.t);
  cpu().embedding_forward(idt.t, t16.t, ob.t);
  expect_identical(get(oa.t), get(ob.t), "rows widened from a bf16 table");
  std::vector<double> want(ids.size() * size_t(dim), 0.0);
  for (size_t t = 0; t < ids.size(); ++t)
    if (ids[t] >= 0)
      for (int64_t d = 0; d < dim; ++d) want[t * size_t(dim) + size_t(d)] = table[size_t(ids[t] * dim + d)];
  expect_identical(want, get(ob.t), "the looked-up rows");
}

TEST(CpuBf16Ops, SwigluForwardAndBackwardWriteRoundedOutputs) {
  const int64_t rows = 5, f = 40;
  const std::vector<double> gu = randn(rows * 2 * f, 3, 2.0), d = randn(rows * f, 4);
  Owned gut = make_from(DType::F32, {rows, 2 * f}, gu), dt = make_from(DType::F32, {rows, f}, d);
  Owned a32 = make(DType::F32, {rows, f}), a16 = make(DType::BF16, {rows, f});
  cpu().swiglu_forward(gut.t, a32.t);
  cpu().swiglu_forward(gut.t, a16.t);
  expect_identical(to_bf16(get(a32.t)), get(a16.t), "swiglu forward");
  Owned g32 = make(DType::F32, {rows, 2 * f}), g16 = make(DType::BF16, {rows, 2 * f});
  cpu().swiglu_backward(gut.t, dt.t, g32.t);
  cpu().swiglu_backward(gut.t, dt.t, g16.t);
  expect_identical(to_bf16(get(g32.t)), get(g16.t), "swiglu backward");
}

TEST(CpuBf16Ops, HeadPermutationsConvertBothWays) {
  const int64_t b = 2, s = 5, h = 3, dh = 8, t = b * s;
  const std::vector<double> qkv = randn(t * 3 * h * dh, 5), heads = randn(b * h * s * dh, 6);
  Owned qkv32 = make_from(DType::F32, {t, 3 * h * dh}, qkv);
  auto trio = [&](DType dt) {
    return std::array<Owned, 3>{make(dt, {b, h, s, dh}), make(dt, {b, h, s, dh}), make(dt, {b, h, s, dh})};
  };
  // split_qkv: fp32 packed -> bf16 heads.
  auto q32 = trio(DType::F32), q16 = trio(DType::BF16);
  cpu().split_qkv(qkv32.t, q32[0].t, q32[1].t, q32[2].t);
  cpu().split_qkv(qkv32.t, q16[0].t, q16[1].t, q16[2].t);
  for (int i = 0; i < 3; ++i) expect_identical(to_bf16(get(q32[i].t)), get(q16[i].t), "split_qkv part " + std::to_string(i));
  // join_qkv: fp32 heads -> bf16 packed.
  Owned j32 = make(DType::F32, {t, 3 * h * dh}), j16 = make(DType::BF16, {t, 3 * h * dh});
  cpu().join_qkv(q32[0].t, q32[1].t, q32[2].t, j32.t);
  cpu().join_qkv(q32[0].t, q32[1].t, q32[2].t, j16.t);
  expect_identical(to_bf16(get(j32.t)), get(j16.t), "join_qkv");
  // merge_heads: fp32 [B,H,S,Dh] -> bf16 [B,S,H,Dh]; split_heads: fp32 [B,S,H,Dh] -> bf16 [B,H,S,Dh].
  Owned x32 = make_from(DType::F32, {b, h, s, dh}, heads);
  Owned m32 = make(DType::F32, {b, s, h, dh}), m16 = make(DType::BF16, {b, s, h, dh});
  cpu().merge_heads(x32.t, m32.t);
  cpu().merge_heads(x32.t, m16.t);
  expect_identical(to_bf16(get(m32.t)), get(m16.t), "merge_heads");
  Owned s32 = make(DType::F32, {b, h, s, dh}), s16 = make(DType::BF16, {b, h, s, dh});
  cpu().split_heads(m32.t, s32.t);
  cpu().split_heads(m32.t, s16.t);
  expect_identical(to_bf16(get(s32.t)), get(s16.t), "split_heads");
  expect_identical(rounded(DType::F32, heads), get(s32.t), "split_heads inverts merge_heads");
}

TEST(CpuBf16Ops, RopeOnBf16MatchesFp32OnTheSameValues) {
  const int64_t b = 2, h = 2, s = 9, dh = 16;
  const std::vector<double> x = bf16_values(randn(b * h * s * dh, 7));
  for (int direction : {+1, -1}) {
    Owned x32 = make_from(DType::F32, {b, h, s, dh}, x), x16 = make_from(DType::BF16, {b, h, s, dh}, x);
    cpu().rope(x32.t, 10000.0, direction);
    cpu().rope(x16.t, 10000.0, direction);
    expect_identical(to_bf16(get(x32.t)), get(x16.t), "rope direction " + std::to_string(direction));
  }
}

TEST(CpuBf16Ops, CausalSoftmaxBackwardReadsBf16Probabilities) {
  const int64_t n = 3, s = 11;
  Owned scores = make_from(DType::F32, {n, s, s}, randn(n * s * s, 8, 2.0));
  cpu().causal_softmax_forward(scores.t, 0.5);
  const std::vector<double> p16 = to_bf16(get(scores.t)), g = randn(n * s * s, 9);
  Owned probs32 = make_from(DType::F32, {n, s, s}, p16), probs16 = make_from(DType::BF16, {n, s, s}, p16);
  Owned g32 = make_from(DType::F32, {n, s, s}, g), g16 = make_from(DType::F32, {n, s, s}, g);
  cpu().causal_softmax_backward(probs32.t, g32.t, 0.5);
  cpu().causal_softmax_backward(probs16.t, g16.t, 0.5);
  expect_identical(get(g32.t), get(g16.t), "score gradient (fp32) from bf16 probabilities");
}

TEST(CpuBf16Ops, GatherRowsCopiesBf16Rows) {
  const int64_t rows = 6, dim = 33, n = 10;
  const std::vector<double> src = bf16_values(randn(rows * dim, 10));
  const std::vector<int32_t> idx = randint(n, 0, int32_t(rows), 12);
  Owned st = make_from(DType::BF16, {rows, dim}, src), it = make(DType::I32, {n}), dt = make(DType::BF16, {n, dim});
  put_i32(it.t, idx);
  cpu().gather_rows(st.t, it.t, dt.t);
  std::vector<double> want(n * dim);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; ++d) want[i * dim + d] = src[idx[i] * dim + d];
  expect_identical(want, get(dt.t), "gathered rows");
}

// Both sides sum the same exact products (a bf16 x bf16 product is exact in fp32 and in
// double); they differ only in the fp32 rounding of the partial sums, at most about
// k x 2^-24 x sum |a_i b_i| per element (a fourfold margin covers the kernels' blocked
// order).
std::vector<double> gemm_tolerance(const std::vector<double>& abs_products_sum, int64_t k) {
  std::vector<double> tol(abs_products_sum.size());
  for (size_t i = 0; i < tol.size(); ++i) tol[i] = 4.0 * double(k) * std::ldexp(1.0, -24) * abs_products_sum[i] + 1e-30;
  return tol;
}

TEST(CpuBf16Ops, BackendGemmOnBf16OperandsAllTransposes) {
  // Large enough that the backend splits C over its threads, with edges off the tiles.
  const int64_t m = 203, n = 131, k = 77;
  for (auto [ta, tb] : {std::pair{false, true}, std::pair{false, false}, std::pair{true, false}, std::pair{true, true}}) {
    const std::vector<double> a = bf16_values(randn(m * k, 13)), b = bf16_values(randn(k * n, 14)),
                              c0 = randn(m * n, 15);
    Owned at = make_from(DType::BF16, {ta ? k : m, ta ? m : k}, a), bt = make_from(DType::BF16, {tb ? n : k, tb ? k : n}, b);
    Owned ct = make_from(DType::F32, {m, n}, c0);
    cpu().gemm(ta, tb, m, n, k, 0.75, at.t, bt.t, 0.5, ct.t);
    std::vector<double> want(m * n), mag(m * n);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0.0, abs_sum = 0.0;
        for (int64_t p = 0; p < k; ++p) {
          const double x = ta ? a[p * m + i] : a[i * k + p], y = tb ? b[j * k + p] : b[p * n + j];
          acc += x * y;
          abs_sum += std::fabs(x * y);
        }
        const double c = static_cast<float>(c0[i * n + j]);
        want[i * n + j] = 0.75 * acc + 0.5 * c;
        mag[i * n + j] = 0.75 * abs_sum + 0.5 * std::fabs(c);
      }
    expect_within(want, get(ct.t), gemm_tolerance(mag, k), fmt::format("gemm ta={} tb={}", ta, tb));
  }
}

TEST(CpuBf16Ops, BatchedAndGroupedGemmOnBf16Operands) {
  // Attention-shaped batch (4 heads of 70 x 70 x 32) and experts of 0, 5 and 90 rows.
  const int64_t count = 4, s = 70, dh = 32;
  const std::vector<double> q = bf16_values(randn(count * s * dh, 16)), kk = bf16_values(randn(count * s * dh, 17));
  Owned qt = make_from(DType::BF16, {count * s, dh}, q), kt = make_from(DType::BF16, {count * s, dh}, kk);
  Owned st = make(DType::F32, {count * s, s});
  cpu().gemm(false, true, s, s, dh, 1.0, qt.t, kt.t, 0.0, st.t, {count, s * dh, s * dh, s * s});
  std::vector<double> want(count * s * s), mag(count * s * s);
  for (int64_t h = 0; h < count; ++h)
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j) {
        double acc = 0.0, abs_sum = 0.0;
        for (int64_t p = 0; p < dh; ++p) {
          const double x = q[(h * s + i) * dh + p] * kk[(h * s + j) * dh + p];
          acc += x;
          abs_sum += std::fabs(x);
        }
        want[(h * s + i) * s + j] = acc;
        mag[(h * s + i) * s + j] = abs_sum;
      }
  expect_within(want, get(st.t), gemm_tolerance(mag, dh), "batched q k^T");

  const int64_t d = 40, f = 24;
  const std::vector<int64_t> rows = {0, 5, 90};
  const int64_t total = 95;
  const std::vector<double> x = bf16_values(randn(total * d, 18)), w = bf16_values(randn(3 * f * d, 19));
  Owned xt = make_from(DType::BF16, {total, d}, x), wt = make_from(DType::BF16, {3 * f, d}, w);
  Owned yt = make(DType::F32, {total, f});
  std::vector<GemmGroup> groups;
  int64_t offset = 0;
  for (int e = 0; e < 3; ++e) {
    groups.push_back({static_cast<bf16*>(xt.t.data) + offset * d, static_cast<bf16*>(wt.t.data) + e * f * d,
                      static_cast<float*>(yt.t.data) + offset * f, rows[e], f, d});
    offset += rows[e];
  }
  cpu().grouped_gemm(false, true, DType::BF16, 1.0, groups, 0.0);
  std::vector<double> gwant(total * f), gmag(total * f);
  offset = 0;
  for (int e = 0; e < 3; ++e) {
    for (int64_t r = offset; r < offset + rows[e]; ++r)
      for (int64_t j = 0; j < f; ++j) {
        double acc = 0.0, abs_sum = 0.0;
        for (int64_t p = 0; p < d; ++p) {
          const double v = x[r * d + p] * w[(e * f + j) * d + p];
          acc += v;
          abs_sum += std::fabs(v);
        }
        gwant[r * f + j] = acc;
        gmag[r * f + j] = abs_sum;
      }
    offset += rows[e];
  }
  expect_within(gwant, get(yt.t), gemm_tolerance(gmag, d), "grouped expert gemm");
}

TEST(PrecisionPolicy, AsOperandStagesOnlyWhenOperandsAreSeparate) {
  const std::vector<double> v = randn(24, 20);
  Owned x = make_from(DType::F32, {4, 6}, v), staging = make(DType::BF16, {40});
  const PrecisionPolicy fp32 = PrecisionPolicy::of(Precision::FP32), bf16p = PrecisionPolicy::of(Precision::BF16);
  EXPECT_FALSE(fp32.separate_operands());
  EXPECT_EQ(fp32.as_operand(cpu(), x.t, Tensor{}).data, x.t.data) << "FP32 uses the tensor itself";
  ASSERT_TRUE(bf16p.separate_operands());
  EXPECT_EQ(bf16p.master, DType::F32);
  const Tensor op = bf16p.as_operand(cpu(), x.t, staging.t);
  EXPECT_EQ(op.data, staging.t.data);
  EXPECT_EQ(op.dtype, DType::BF16);
  EXPECT_EQ(op.shape_string(), x.t.shape_string());
  expect_identical(to_bf16(rounded(DType::F32, v)), get(op), "staged operand");
}

}  // namespace
}  // namespace sdmoe::test
