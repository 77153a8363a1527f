// Fused causal attention (core/cpu/flash_attention.h) against a plain double-precision
// unfused reference written here: the full [S, S] scores with the causal mask, softmax,
// and the backward's closed form. Sizes straddle the 64-wide tile (1, 7, 63, 64, 65,
// 130, 257) so that partial tiles and the diagonal tile's edges are exercised.
//
// Tolerances. Every element is compared within rtol x its magnitude sum, the sum of the
// absolute values of the terms that make it (for out[i,d]: sum_j P_ij |v_jd|), which is
// what a rounding error in a sum scales with.
//   F64: rtol 1e-12 (the worst seen is 2.5e-15).
//   F32: rtol 4u(2 + sigma), u = 2^-24, sigma = the largest scale sum_d |q_id k_jd| of
//   the problem (~7 to 33 here: scores reach +-20). A score held in fp32 is off by about
//   u sigma (the rounding of the dot product's partial sums and of the score itself), and
//   so is the stored lse, so each probability exp(s - m) or exp(s - lse) carries a
//   relative error of a few u sigma; the vectorised exp adds 3u and the sums of 64 terms
//   per tile and S/64 tiles a few u more. The worst seen over all cases is 2.2 u(2 +
//   sigma) (out; dv 1.7, lse 0.43, dk 0.43, dq 0.31), so the bound has a margin of about
//   2 while a real bug (a missed rescale, a wrong mask edge) is off by O(1).
//   BF16 inputs compute in fp32 from the same rounded values as the reference, so the
//   fp32 tolerance holds, plus half a bf16 unit (at most 2^-8 relative: 8 significant
//   bits) where out is stored in bf16.
#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "core/cpu/flash_attention.h"

// Allocation accounting for the memory test: the largest single request and the total
// requested while `tracking` is set. The kernels allocate through operator new
// (std::vector), so an [S, S] buffer anywhere in them shows up here. This replaces the
// global operator new of the test binary; it only counts while the memory test's two
// calls run. (Over-aligned new, which nothing here uses, is not counted.)
namespace {
std::atomic<bool> tracking{false};
std::atomic<size_t> largest_request{0}, total_requested{0};
}  // namespace

void* operator new(size_t bytes) {
  if (tracking.load(std::memory_order_relaxed)) {
    total_requested += bytes;
    size_t seen = largest_request.load();
    while (bytes > seen && !largest_request.compare_exchange_weak(seen, bytes)) {
    }
  }
  if (void* p = std::malloc(bytes ? bytes : 1)) return p;
  throw std::bad_alloc();
}
// Not inlined: GCC's -Wmismatched-new-delete would see free() meet new's pointer.
__attribute__((noinline)) void operator delete(void* p) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace sdmoe::test {
namespace {

using cpu::flash_attention_backward;
using cpu::flash_attention_forward;

// A tensor owning host memory.
struct Owned {
  std::vector<unsigned char> memory;
  Tensor t;
  Owned(DType dtype, std::initializer_list<int64_t> dims) : t(nullptr, dtype, Device::CPU, dims) {
    memory.resize(t.bytes());
    t.data = memory.data();
  }
};

double stored(DType dtype, double x) {
  if (dtype == DType::F32) return float(x);
  if (dtype == DType::BF16) return bf16_to_float(float_to_bf16(float(x)));
  return x;
}

void put(const Tensor& t, const std::vector<double>& v) {
  ASSERT_EQ(int64_t(v.size()), t.numel());
  for (size_t i = 0; i < v.size(); ++i) {
    if (t.dtype == DType::F64) t.ptr<double>()[i] = v[i];
    else if (t.dtype == DType::F32) t.ptr<float>()[i] = float(v[i]);
    else t.ptr<bf16>()[i] = float_to_bf16(float(v[i]));
  }
}

std::vector<double> get(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = t.dtype == DType::F64 ? t.ptr<double>()[i]
           : t.dtype == DType::F32 ? double(t.ptr<float>()[i])
                                   : double(bf16_to_float(t.ptr<bf16>()[i]));
  return v;
}

// Normal values rounded to the dtype, so that the reference starts from what the kernel sees.
std::vector<double> randn(int64_t count, uint64_t seed, DType dtype, double std_dev = 1.0, double mean = 0.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(mean, std_dev);
  std::vector<double> v(count);
  for (double& x : v) x = stored(dtype, normal(gen));
  return v;
}

// ---------------------------------------------------------------------------------------
// The unfused reference in double: q, k, v [N, S, Dh], P [N, S, S] with the causal mask.

struct Problem {
  int64_t n, s, dh;
  std::vector<double> q, k, v;
  double scale() const { return 1.0 / std::sqrt(double(dh)); }
  int64_t at(int64_t head, int64_t row, int64_t d) const { return (head * s + row) * dh + d; }
};

// Inputs with some reach: scores up to about +-20, rows whose maximum keeps growing across key
// tiles (the later keys are larger, so the running max moves in most tiles).
Problem make_problem(int64_t n, int64_t s, int64_t dh, DType dtype, uint64_t seed) {
  Problem p{n, s, dh, randn(n * s * dh, seed, dtype, 1.5), randn(n * s * dh, seed + 1, dtype, 1.5, 0.3),
            randn(n * s * dh, seed + 2, dtype)};
  for (int64_t h = 0; h < n; ++h)
    for (int64_t j = 0; j < s; ++j)
      for (int64_t d = 0; d < dh; ++d)
        p.k[p.at(h, j, d)] = stored(dtype, p.k[p.at(h, j, d)] * (1.0 + 0.5 * double(j) / double(s)));
  return p;
}

struct Forward {
  std::vector<double> probs;            // [N, S, S], zero above the diagonal
  std::vector<double> out, out_mag;     // [N, S, Dh]; out_mag = sum_j P_ij |v_jd|
  std::vector<double> lse, lse_mag;     // [N, S]; lse_mag = 1 + |lse|
  double sigma = 0.0;                   // max_ij scale sum_d |q_id k_jd|: the scores' reach
};

Forward reference_forward(const Problem& p) {
  const int64_t n = p.n, s = p.s, dh = p.dh;
  Forward f{std::vector<double>(n * s * s, 0.0), std::vector<double>(n * s * dh, 0.0),
            std::vector<double>(n * s * dh, 0.0), std::vector<double>(n * s), std::vector<double>(n * s)};
  std::vector<double> row(s);
  for (int64_t h = 0; h < n; ++h)
    for (int64_t i = 0; i < s; ++i) {
      double mx = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0.0, reach = 0.0;
        for (int64_t d = 0; d < dh; ++d) {
          dot += p.q[p.at(h, i, d)] * p.k[p.at(h, j, d)];
          reach += std::fabs(p.q[p.at(h, i, d)] * p.k[p.at(h, j, d)]);
        }
        row[j] = p.scale() * dot;
        mx = std::max(mx, row[j]);
        f.sigma = std::max(f.sigma, p.scale() * reach);
      }
      double sum = 0.0;
      for (int64_t j = 0; j <= i; ++j) sum += std::exp(row[j] - mx);
      f.lse[h * s + i] = mx + std::log(sum);
      f.lse_mag[h * s + i] = 1.0 + std::fabs(f.lse[h * s + i]);
      for (int64_t j = 0; j <= i; ++j) {
        const double pij = std::exp(row[j] - mx) / sum;
        f.probs[(h * s + i) * s + j] = pij;
        for (int64_t d = 0; d < dh; ++d) {
          f.out[p.at(h, i, d)] += pij * p.v[p.at(h, j, d)];
          f.out_mag[p.at(h, i, d)] += pij * std::fabs(p.v[p.at(h, j, d)]);
        }
      }
    }
  return f;
}

struct Backward {
  std::vector<double> dq, dk, dv;             // [N, S, Dh]
  std::vector<double> dq_mag, dk_mag, dv_mag;  // sums of |terms|
};

// From the probabilities and the out the kernel is given (D_i = sum_d dout out uses it).
Backward reference_backward(const Problem& p, const Forward& f, const std::vector<double>& out,
                            const std::vector<double>& dout) {
  const int64_t n = p.n, s = p.s, dh = p.dh, size = n * s * dh;
  const double sc = p.scale();
  Backward b{std::vector<double>(size, 0.0), std::vector<double>(size, 0.0), std::vector<double>(size, 0.0),
             std::vector<double>(size, 0.0), std::vector<double>(size, 0.0), std::vector<double>(size, 0.0)};
  for (int64_t h = 0; h < n; ++h)
    for (int64_t i = 0; i < s; ++i) {
      double delta = 0.0, delta_mag = 0.0;
      for (int64_t d = 0; d < dh; ++d) {
        delta += dout[p.at(h, i, d)] * out[p.at(h, i, d)];
        delta_mag += std::fabs(dout[p.at(h, i, d)] * out[p.at(h, i, d)]);
      }
      for (int64_t j = 0; j <= i; ++j) {
        const double pij = f.probs[(h * s + i) * s + j];
        double dp = 0.0, dp_mag = 0.0;
        for (int64_t d = 0; d < dh; ++d) {
          dp += dout[p.at(h, i, d)] * p.v[p.at(h, j, d)];
          dp_mag += std::fabs(dout[p.at(h, i, d)] * p.v[p.at(h, j, d)]);
        }
        const double ds = pij * (dp - delta), ds_mag = pij * (dp_mag + delta_mag + std::fabs(dp - delta));
        for (int64_t d = 0; d < dh; ++d) {
          b.dv[p.at(h, j, d)] += pij * dout[p.at(h, i, d)];
          b.dv_mag[p.at(h, j, d)] += pij * std::fabs(dout[p.at(h, i, d)]);
          b.dq[p.at(h, i, d)] += sc * ds * p.k[p.at(h, j, d)];
          b.dq_mag[p.at(h, i, d)] += sc * ds_mag * std::fabs(p.k[p.at(h, j, d)]);
          b.dk[p.at(h, j, d)] += sc * ds * p.q[p.at(h, i, d)];
          b.dk_mag[p.at(h, j, d)] += sc * ds_mag * std::fabs(p.q[p.at(h, i, d)]);
        }
      }
    }
  return b;
}

constexpr double kFp32Unit = 0x1p-24;

double rtol_for(DType compute, double sigma) { return compute == DType::F64 ? 1e-12 : 4 * kFp32Unit * (2 + sigma); }

// |got - want| <= rtol * mag + extra_rel * |want| elementwise; reports the worst ratio.
void expect_within(const std::vector<double>& want, const std::vector<double>& got, const std::vector<double>& mag,
                   double rtol, double extra_rel, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t bad = 0;
  double worst = 0.0;
  std::string first;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]), tol = rtol * mag[i] + extra_rel * std::fabs(want[i]) + 1e-300;
    if (!(err <= tol)) {
      if (bad < 4) first += " [" + std::to_string(i) + "] want " + std::to_string(want[i]) + " got " + std::to_string(got[i]) + ";";
      ++bad;
    }
    if (mag[i] > 0) worst = std::max(worst, err / mag[i]);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " out of tolerance (worst err/mag "
                    << worst << ", rtol " << rtol << "):" << first;
}

struct Case {
  int64_t n, s, dh;
  std::string name() const { return "N=" + std::to_string(n) + " S=" + std::to_string(s) + " Dh=" + std::to_string(dh); }
};

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (int64_t s : {1, 7, 63, 64, 65, 130, 257})
    for (int64_t dh : {32, 64, 128})
      for (int64_t n : {1, 3}) cases.push_back({n, s, dh});
  return cases;
}

DType compute_of(DType storage) { return storage == DType::F64 ? DType::F64 : DType::F32; }

class FlashAttention : public ::testing::TestWithParam<DType> {};

std::string dtype_param_name(const ::testing::TestParamInfo<DType>& info) { return std::string(dtype_name(info.param)); }

TEST_P(FlashAttention, ForwardMatchesReference) {
  const DType dt = GetParam(), cd = compute_of(dt);
  uint64_t seed = 100;
  for (const Case& c : all_cases()) {
    const Problem p = make_problem(c.n, c.s, c.dh, dt, seed += 10);
    const Forward f = reference_forward(p);
    Owned q(dt, {c.n, c.s, c.dh}), k(dt, {c.n, c.s, c.dh}), v(dt, {c.n, c.s, c.dh}), out(dt, {c.n, c.s, c.dh}),
        lse(cd, {c.n, c.s});
    put(q.t, p.q);
    put(k.t, p.k);
    put(v.t, p.v);
    flash_attention_forward(q.t, k.t, v.t, p.scale(), out.t, lse.t);
    const double rtol = rtol_for(cd, f.sigma), rounding = dt == DType::BF16 ? std::ldexp(1.0, -8) : 0.0;
    expect_within(f.out, get(out.t), f.out_mag, rtol, rounding, "out " + c.name());
    expect_within(f.lse, get(lse.t), f.lse_mag, rtol, 0.0, "lse " + c.name());
  }
}

// The backward from the kernel's own forward (its lse, and its out for D), against the
// reference's closed form evaluated on the same out. BF16 q, k, v and dout pass out in
// F32, the reference's rounded to float: the mixed case of a bf16 activation gradient.
TEST_P(FlashAttention, BackwardMatchesReference) {
  const DType dt = GetParam(), cd = compute_of(dt);
  uint64_t seed = 5000;
  for (const Case& c : all_cases()) {
    const Problem p = make_problem(c.n, c.s, c.dh, dt, seed += 10);
    const Forward f = reference_forward(p);
    const DType out_dtype = dt == DType::BF16 ? DType::F32 : dt;
    Owned q(dt, {c.n, c.s, c.dh}), k(dt, {c.n, c.s, c.dh}), v(dt, {c.n, c.s, c.dh}),
        out(out_dtype, {c.n, c.s, c.dh}), fwd_out(dt, {c.n, c.s, c.dh}), lse(cd, {c.n, c.s}),
        dout(dt, {c.n, c.s, c.dh}), dq(cd, {c.n, c.s, c.dh}), dk(cd, {c.n, c.s, c.dh}), dv(cd, {c.n, c.s, c.dh});
    put(q.t, p.q);
    put(k.t, p.k);
    put(v.t, p.v);
    const std::vector<double> w = randn(c.n * c.s * c.dh, seed + 7, dt);
    put(dout.t, w);
    flash_attention_forward(q.t, k.t, v.t, p.scale(), fwd_out.t, lse.t);
    std::vector<double> given_out = get(fwd_out.t);
    if (dt == DType::BF16) {
      given_out = f.out;
      for (double& x : given_out) x = float(x);
    }
    put(out.t, given_out);
    flash_attention_backward(q.t, k.t, v.t, out.t, dout.t, lse.t, p.scale(), dq.t, dk.t, dv.t);
    const Backward b = reference_backward(p, f, given_out, w);
    const double rtol = rtol_for(cd, f.sigma);
    expect_within(b.dq, get(dq.t), b.dq_mag, rtol, 0.0, "dq " + c.name());
    expect_within(b.dk, get(dk.t), b.dk_mag, rtol, 0.0, "dk " + c.name());
    expect_within(b.dv, get(dv.t), b.dv_mag, rtol, 0.0, "dv " + c.name());
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FlashAttention, ::testing::Values(DType::F64, DType::F32, DType::BF16),
                         dtype_param_name);

// fp32 q, k, v with out kept in bf16 and dout in fp32: D comes from the bf16 out, which
// the reference uses too, so the fp32 tolerance holds.
TEST(FlashAttentionMixed, Bf16OutFp32Dout) {
  const Case c{2, 130, 64};
  const Problem p = make_problem(c.n, c.s, c.dh, DType::F32, 77);
  const Forward f = reference_forward(p);
  Owned q(DType::F32, {c.n, c.s, c.dh}), k(DType::F32, {c.n, c.s, c.dh}), v(DType::F32, {c.n, c.s, c.dh}),
      fwd_out(DType::F32, {c.n, c.s, c.dh}), out(DType::BF16, {c.n, c.s, c.dh}), lse(DType::F32, {c.n, c.s}),
      dout(DType::F32, {c.n, c.s, c.dh}), dq(DType::F32, {c.n, c.s, c.dh}), dk(DType::F32, {c.n, c.s, c.dh}),
      dv(DType::F32, {c.n, c.s, c.dh});
  put(q.t, p.q);
  put(k.t, p.k);
  put(v.t, p.v);
  const std::vector<double> w = randn(c.n * c.s * c.dh, 78, DType::F32);
  put(dout.t, w);
  flash_attention_forward(q.t, k.t, v.t, p.scale(), fwd_out.t, lse.t);
  put(out.t, get(fwd_out.t));  // rounded to bf16
  flash_attention_backward(q.t, k.t, v.t, out.t, dout.t, lse.t, p.scale(), dq.t, dk.t, dv.t);
  const Backward b = reference_backward(p, f, get(out.t), w);
  const double rtol = rtol_for(DType::F32, f.sigma);
  expect_within(b.dq, get(dq.t), b.dq_mag, rtol, 0.0, "dq");
  expect_within(b.dk, get(dk.t), b.dk_mag, rtol, 0.0, "dk");
  expect_within(b.dv, get(dv.t), b.dv_mag, rtol, 0.0, "dv");
}

// F64: the backward with dout = W against central differences of L = sum(out * W), on a
// sample of q, k and v elements. With h = 1e-5 the difference's truncation error is
// O(h^2 |L'''|) ~ 1e-10 and its rounding ~ 1e-16 |L| / h ~ 1e-11.
TEST(FlashAttentionGradient, MatchesFiniteDifferences) {
  const int64_t n = 2, s = 130, dh = 32;
  Problem p = make_problem(n, s, dh, DType::F64, 900);
  const std::vector<double> w = randn(n * s * dh, 901, DType::F64);
  Owned q(DType::F64, {n, s, dh}), k(DType::F64, {n, s, dh}), v(DType::F64, {n, s, dh}), out(DType::F64, {n, s, dh}),
      lse(DType::F64, {n, s}), dout(DType::F64, {n, s, dh}), dq(DType::F64, {n, s, dh}), dk(DType::F64, {n, s, dh}),
      dv(DType::F64, {n, s, dh});
  const auto loss = [&]() {
    put(q.t, p.q);
    put(k.t, p.k);
    put(v.t, p.v);
    flash_attention_forward(q.t, k.t, v.t, p.scale(), out.t, lse.t);
    double l = 0.0;
    for (int64_t i = 0; i < n * s * dh; ++i) l += out.t.ptr<double>()[i] * w[i];
    return l;
  };
  loss();
  put(dout.t, w);
  flash_attention_backward(q.t, k.t, v.t, out.t, dout.t, lse.t, p.scale(), dq.t, dk.t, dv.t);
  const std::vector<double> grads[3] = {get(dq.t), get(dk.t), get(dv.t)};
  std::vector<double>* inputs[3] = {&p.q, &p.k, &p.v};
  const char* names[3] = {"q", "k", "v"};
  std::mt19937_64 gen(902);
  // Elements at tile edges (rows 0, 63, 64, 127, 128, 129) and random ones.
  std::vector<int64_t> rows = {0, 63, 64, 127, 128, 129};
  for (int extra = 0; extra < 6; ++extra) rows.push_back(int64_t(gen() % s));
  const double h = 1e-5;
  for (int which = 0; which < 3; ++which)
    for (int64_t row : rows) {
      const int64_t head = int64_t(gen() % n), d = int64_t(gen() % dh), idx = (head * s + row) * dh + d;
      double& x = (*inputs[which])[idx];
      const double x0 = x;
      x = x0 + h;
      const double up = loss();
      x = x0 - h;
      const double down = loss();
      x = x0;
      const double numeric = (up - down) / (2 * h), analytic = grads[which][idx];
      EXPECT_NEAR(analytic, numeric, 1e-8 + 1e-7 * std::fabs(numeric))
          << "d" << names[which] << " at head " << head << " row " << row << " d " << d;
    }
}

// The same bits with one, two and three threads: every output element is written by one
// work item, or (dq) summed over items in item order, whoever runs them. N = 1 with 16
// key tiles makes the items finish out of order (key tile 1 before key tile 0), which is
// when an order that followed completion would show.
TEST(FlashAttentionDeterminism, SameBitsWithOneTwoAndThreeThreads) {
  struct Shape {
    int64_t n, s, dh;
    DType dtype;
  };
  for (const Shape& c : {Shape{3, 257, 64, DType::F32}, Shape{1, 1000, 32, DType::F32}, Shape{2, 130, 64, DType::BF16}}) {
    const Problem p = make_problem(c.n, c.s, c.dh, c.dtype, 1234);
    const std::vector<double> w = randn(c.n * c.s * c.dh, 1235, c.dtype);
    std::vector<std::vector<unsigned char>> results[3];
    for (int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      const DType dt = c.dtype;
      Owned q(dt, {c.n, c.s, c.dh}), k(dt, {c.n, c.s, c.dh}), v(dt, {c.n, c.s, c.dh}), out(dt, {c.n, c.s, c.dh}),
          lse(DType::F32, {c.n, c.s}), dout(dt, {c.n, c.s, c.dh}), dq(DType::F32, {c.n, c.s, c.dh}),
          dk(DType::F32, {c.n, c.s, c.dh}), dv(DType::F32, {c.n, c.s, c.dh});
      put(q.t, p.q);
      put(k.t, p.k);
      put(v.t, p.v);
      put(dout.t, w);
      flash_attention_forward(q.t, k.t, v.t, p.scale(), out.t, lse.t);
      flash_attention_backward(q.t, k.t, v.t, out.t, dout.t, lse.t, p.scale(), dq.t, dk.t, dv.t);
      for (const Owned* o : {&out, &lse, &dq, &dk, &dv}) results[threads - 1].push_back(o->memory);
    }
    omp_set_num_threads(2);
    const char* names[] = {"out", "lse", "dq", "dk", "dv"};
    for (int threads : {2, 3})
      for (size_t i = 0; i < results[0].size(); ++i)
        EXPECT_TRUE(results[0][i] == results[threads - 1][i])
            << names[i] << " (N=" << c.n << " S=" << c.s << " " << dtype_name(c.dtype) << ") differs between 1 and "
            << threads << " threads";
  }
}

// Memory: the per-thread scratch is a fixed number of tiles plus one [S, Dh] buffer,
// linear in S, and at S = 4096 no allocation during either call comes near the [S, S]
// scores (64 MiB in fp32): the total stays within the threads' scratch and D ([N, S]).
// Sampled rows are checked against the reference at that length.
TEST(FlashAttentionMemory, ScratchLinearInSequence) {
  const int64_t t = cpu::kFlashTile;
  for (const int64_t dh : {32, 64, 128})
    for (const int64_t seq : {1, 64, 1000, 4096, 65536}) {
      const size_t tiles = 2 * t * t + 7 * t * dh + 3 * t;
      EXPECT_EQ(cpu::flash_attention_scratch_bytes(DType::F32, seq, dh), 4 * (tiles + seq * dh) + 64);
      EXPECT_EQ(cpu::flash_attention_scratch_bytes(DType::BF16, seq, dh),
                cpu::flash_attention_scratch_bytes(DType::F32, seq, dh));
      EXPECT_EQ(cpu::flash_attention_scratch_bytes(DType::F64, seq, dh), 8 * (tiles + seq * dh) + 64);
    }
  const int64_t n = 1, s = 4096, dh = 64;
  const int threads = 2;
  omp_set_num_threads(threads);
  const Problem p = make_problem(n, s, dh, DType::F32, 4096);
  const std::vector<double> w = randn(n * s * dh, 4097, DType::F32);
  Owned q(DType::F32, {n, s, dh}), k(DType::F32, {n, s, dh}), v(DType::F32, {n, s, dh}), out(DType::F32, {n, s, dh}),
      lse(DType::F32, {n, s}), dout(DType::F32, {n, s, dh}), dq(DType::F32, {n, s, dh}), dk(DType::F32, {n, s, dh}),
      dv(DType::F32, {n, s, dh});
  put(q.t, p.q);
  put(k.t, p.k);
  put(v.t, p.v);
  put(dout.t, w);
  largest_request = 0;
  total_requested = 0;
  tracking = true;
  flash_attention_forward(q.t, k.t, v.t, p.scale(), out.t, lse.t);
  flash_attention_backward(q.t, k.t, v.t, out.t, dout.t, lse.t, p.scale(), dq.t, dk.t, dv.t);
  tracking = false;
  const size_t scratch = cpu::flash_attention_scratch_bytes(DType::F32, s, dh), delta = n * s * sizeof(float);
  EXPECT_LE(largest_request.load(), std::max(scratch, delta));
  EXPECT_LE(total_requested.load(), 2 * threads * scratch + delta) << "an [S, S] fp32 buffer would be " << s * s * 4;

  // Rows near the tile edges and the end: out, lse and dq need only their own row of P;
  // dk and dv of the last keys need the rows after them.
  const double sc = p.scale();
  const std::vector<double> got_out = get(out.t), got_lse = get(lse.t), got_dq = get(dq.t), got_dk = get(dk.t),
                            got_dv = get(dv.t), given = get(out.t);
  std::vector<double> probs(s);
  double sigma = 0.0;  // over the sampled rows, which are the only ones compared
  const auto row_probs = [&](int64_t i) {
    double mx = -INFINITY;
    for (int64_t j = 0; j <= i; ++j) {
      double dot = 0.0, reach = 0.0;
      for (int64_t d = 0; d < dh; ++d) {
        dot += p.q[p.at(0, i, d)] * p.k[p.at(0, j, d)];
        reach += std::fabs(p.q[p.at(0, i, d)] * p.k[p.at(0, j, d)]);
      }
      probs[j] = sc * dot;
      mx = std::max(mx, probs[j]);
      sigma = std::max(sigma, sc * reach);
    }
    double sum = 0.0;
    for (int64_t j = 0; j <= i; ++j) sum += std::exp(probs[j] - mx);
    for (int64_t j = 0; j <= i; ++j) probs[j] = std::exp(probs[j] - mx) / sum;
    return mx + std::log(sum);
  };
  std::vector<double> dp(s), dk_ref(s * dh, 0.0), dv_ref(s * dh, 0.0), dk_mag(s * dh, 0.0), dv_mag(s * dh, 0.0);
  const int64_t tail = 70;  // the last 70 keys: their dk, dv come from the last 70 query rows, all sampled
  const auto sampled = [&](int64_t i) { return i == 0 || i == 63 || i == 64 || i == 2047 || i == 2048 || i >= s - tail; };
  for (int64_t i = 0; i < s; ++i)
    if (sampled(i)) row_probs(i);
  const double rtol = rtol_for(DType::F32, sigma);
  for (int64_t i = 0; i < s; ++i) {
    if (!sampled(i)) continue;
    const double l = row_probs(i);
    EXPECT_NEAR(got_lse[i], l, rtol * (1.0 + std::fabs(l))) << "lse row " << i;
    double delta = 0.0, delta_mag = 0.0;
    for (int64_t d = 0; d < dh; ++d) {
      delta += w[p.at(0, i, d)] * given[p.at(0, i, d)];
      delta_mag += std::fabs(w[p.at(0, i, d)] * given[p.at(0, i, d)]);
    }
    for (int64_t j = 0; j <= i; ++j) {
      dp[j] = 0.0;
      for (int64_t e = 0; e < dh; ++e) dp[j] += w[p.at(0, i, e)] * p.v[p.at(0, j, e)];
    }
    for (int64_t d = 0; d < dh; ++d) {
      double o = 0.0, o_mag = 0.0, g = 0.0, g_mag = 0.0;
      for (int64_t j = 0; j <= i; ++j) {
        o += probs[j] * p.v[p.at(0, j, d)];
        o_mag += probs[j] * std::fabs(p.v[p.at(0, j, d)]);
        g += sc * probs[j] * (dp[j] - delta) * p.k[p.at(0, j, d)];
        g_mag += sc * probs[j] * (std::fabs(dp[j]) + delta_mag) * std::fabs(p.k[p.at(0, j, d)]);
      }
      EXPECT_NEAR(got_out[p.at(0, i, d)], o, rtol * o_mag) << "out row " << i << " d " << d;
      EXPECT_NEAR(got_dq[p.at(0, i, d)], g, rtol * g_mag) << "dq row " << i << " d " << d;
    }
    for (int64_t j = s - tail; j <= i; ++j)
      for (int64_t e = 0; e < dh; ++e) {
        dv_ref[j * dh + e] += probs[j] * w[p.at(0, i, e)];
        dv_mag[j * dh + e] += probs[j] * std::fabs(w[p.at(0, i, e)]);
        dk_ref[j * dh + e] += sc * probs[j] * (dp[j] - delta) * p.q[p.at(0, i, e)];
        dk_mag[j * dh + e] += sc * probs[j] * (std::fabs(dp[j]) + delta_mag) * std::fabs(p.q[p.at(0, i, e)]);
      }
  }
  for (int64_t j = s - tail; j < s; ++j)
    for (int64_t e = 0; e < dh; ++e) {
      EXPECT_NEAR(got_dv[j * dh + e], dv_ref[j * dh + e], rtol * dv_mag[j * dh + e]) << "dv row " << j;
      EXPECT_NEAR(got_dk[j * dh + e], dk_ref[j * dh + e], rtol * dk_mag[j * dh + e]) << "dk row " << j;
    }
}

}  // namespace
}  // namespace sdmoe::test
