// CPU backend: memory, elementwise ops, GEMM, optimizer and LAPACK. Layer kernels are in
// cpu_kernels.cc.
#include "core/cpu/cpu_backend.h"
#include "core/cholesky_inverse.h"

#include <cblas.h>
#include <lapacke.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/cpu/bf16_convert.h"
#include "core/cpu/cpu_dispatch.h"
#include "core/cpu/gemm_avx512.h"
#include "core/cpu/gemm_bf16_amx.h"
#include "core/cpu/gemm_bf16_avx512.h"
#include "core/rng.h"

extern "C" {
void openblas_set_num_threads(int);
char* openblas_get_corename(void);
int openblas_get_parallel(void);  // 0 sequential, 1 pthreads, 2 OpenMP
}

namespace sdmoe {
using cpu::dispatch_float;
using cpu::dispatch_storage;
using cpu::expect_same;

namespace {

bool openblas_runs_on_openmp() {
  static const bool openmp = openblas_get_parallel() == 2;
  return openmp;
}

// The accumulation and output type of a GEMM on operands of type T: bf16 operands
// accumulate and write fp32.
template <typename T>
using GemmOut = std::conditional_t<std::is_same_v<T, bf16>, float, T>;

template <typename T>
void gemm_typed(bool ta, bool tb, int64_t m, int64_t n, int64_t k, GemmOut<T> alpha, const T* a, int64_t lda,
                const T* b, int64_t ldb, GemmOut<T> beta, GemmOut<T>* c, int64_t ldc);

// bf16 operands widened into per-thread fp32 copies (packed: leading dimension = width),
// then the fp32 path. The copies cost O(mk + kn) against the GEMM's O(mnk).
void gemm_widened(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a, int64_t lda,
                  const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local std::vector<float> wide_a, wide_b;
  auto widen_block = [](const bf16* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& dst) {
    dst.resize(size_t(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dst[r * cols + j] = bf16_to_float(src[r * ld + j]);
  };
  // A is stored [m,k] (or [k,m] when transposed), B [k,n] (or [n,k]).
  widen_block(a, ta ? k : m, ta ? m : k, lda, wide_a);
  widen_block(b, tb ? n : k, tb ? k : n, ldb, wide_b);
  gemm_typed<float>(ta, tb, m, n, k, alpha, wide_a.data(), ta ? m : k, wide_b.data(), tb ? k : n, beta, c, ldc);
}

template <typename T>
void gemm_typed(bool ta, bool tb, int64_t m, int64_t n, int64_t k, GemmOut<T> alpha, const T* a, int64_t lda,
                const T* b, int64_t ldb, GemmOut<T> beta, GemmOut<T>* c, int64_t ldc) {
  using Out = GemmOut<T>;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == Out(0) ? Out(0) : beta * c[i * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<T, bf16>) {
    // bf16_gemm_path.cc says which path is fastest on this CPU.
    switch (ta && tb ? Bf16GemmPath::WIDEN : cpu_bf16_gemm_path()) {
      case Bf16GemmPath::AMX: return cpu::gemm_bf16_amx(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      case Bf16GemmPath::AVX512_BF16:
        return cpu::gemm_bf16_avx512(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      case Bf16GemmPath::WIDEN: return gemm_widened(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
  } else {
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::gemm_avx512_applies(ta, tb, m, n, k))
      return cpu::gemm_avx512(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  auto opa = ta ? CblasTrans : CblasNoTrans, opb = tb ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, opa, opb, (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
  } else {
    cblas_dgemm(CblasRowMajor, opa, opb, (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
  }
  }
}

// Below this many multiply-adds a GEMM runs on one thread: a fork/join costs more.
constexpr double kMinParallelGemmFmas = 1 << 18;
// Smallest slice of C's rows (or columns) given to one thread: narrower slices fall
// below the BLAS micro-kernel's tile and waste its lanes.
constexpr int64_t kMinGemmSlice = 32;
// Row slices at least this tall are preferred to column slices.
constexpr int64_t kRowSliceForSplit = 128;

// Row-major C[m,n] = alpha op(A) op(B) + beta C with the backend's threads. We split C
// ourselves, by rows or (when C is wider than tall) by columns, and give each thread one
// single-threaded call: our AVX-512 kernel where it applies (core/cpu/gemm_avx512.h), else
// OpenBLAS, whose OpenMP build runs on the calling thread inside an OpenMP region. On the
// model's skinny shapes (k ~ 200) this beats OpenBLAS's own 2-D split; see
// docs/performance.md. Without the OpenMP build (OpenBLAS with its own pthreads would nest
// a pool inside ours) a GEMM our kernel does not take goes to OpenBLAS whole.
template <typename T>
void gemm_threaded(int threads, bool ta, bool tb, int64_t m, int64_t n, int64_t k, GemmOut<T> alpha, const T* a,
                   const T* b, GemmOut<T> beta, GemmOut<T>* c) {
  const int64_t lda = ta ? m : k, ldb = tb ? k : n, ldc = n;
  // Rows keep each thread's B panel whole and its C rows contiguous; columns only win
  // when the row slices would be thin (at m = 333 x n = 50304, 174 against 165 GFLOP/s).
  const bool split_rows = m >= n || m >= kRowSliceForSplit * threads;
  const int64_t extent = split_rows ? m : n;
  const int parts = int(std::min<int64_t>(threads, extent / kMinGemmSlice));
  // Our own kernel runs on the calling thread whatever OpenBLAS's threading.
  bool own_kernel = false;
  if constexpr (std::is_same_v<T, float>)
    own_kernel =
        parts > 0 && cpu::gemm_avx512_applies(ta, tb, split_rows ? m / parts : m, split_rows ? n : n / parts, k);
  // bf16 operands never reach OpenBLAS: our kernels run on any thread.
  if constexpr (std::is_same_v<T, bf16>) own_kernel = true;
  if ((!openblas_runs_on_openmp() && !own_kernel) || omp_in_parallel() || parts < 2 ||
      double(m) * n * k < kMinParallelGemmFmas) {
    gemm_typed<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
#pragma omp parallel num_threads(parts)
  {
    const int part = omp_get_thread_num();
    // Slice edges on our kernel's tile grid (6 rows, 64 columns; 64 rows of C^T for A^T B),
    // so that only the last slice has a partial tile: 576 rows split 288 + 288 left half a
    // panel idle in each.
    const int64_t grid = !own_kernel || std::is_same_v<T, bf16> ? 1 : split_rows && !ta ? 6 : 64;
    const auto edge = [&](int p) { return p == parts ? extent : (extent * p / parts + grid / 2) / grid * grid; };
    const int64_t lo = edge(part), hi = edge(part + 1);
    if (split_rows) {
      const T* a_rows = ta ? a + lo : a + lo * lda;  // op(A) rows lo..hi
      gemm_typed<T>(ta, tb, hi - lo, n, k, alpha, a_rows, lda, b, ldb, beta, c + lo * ldc, ldc);
    } else {
      const T* b_cols = tb ? b + lo * ldb : b + lo;  // op(B) columns lo..hi
      gemm_typed<T>(ta, tb, m, hi - lo, k, alpha, a, lda, b_cols, ldb, beta, c + lo, ldc);
    }
  }
}

// A batch of equally shaped GEMMs: whole GEMMs per thread when there are enough of them
// (the attention heads), otherwise each one split across the threads.
template <typename T>
void gemm_batch_threaded(int threads, bool ta, bool tb, int64_t m, int64_t n, int64_t k, GemmOut<T> alpha,
                         const T* a, const T* b, GemmOut<T> beta, GemmOut<T>* c, const GemmBatch& batch) {
  const bool threads_safe = openblas_runs_on_openmp() || std::is_same_v<T, bf16>;
  if (batch.count >= threads && threads > 1 && threads_safe && !omp_in_parallel()) {
    const int64_t lda = ta ? m : k, ldb = tb ? k : n;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < batch.count; ++i)
      gemm_typed<T>(ta, tb, m, n, k, alpha, a + i * batch.stride_a, lda, b + i * batch.stride_b, ldb, beta,
                    c + i * batch.stride_c, n);
    return;
  }
  for (int64_t i = 0; i < batch.count; ++i)
    gemm_threaded<T>(threads, ta, tb, m, n, k, alpha, a + i * batch.stride_a, b + i * batch.stride_b, beta,
                     c + i * batch.stride_c);
}

}  // namespace

int cpu_cores_available() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return 1;
}

CpuBackend::CpuBackend(int threads) : threads_(threads > 0 ? threads : cpu_cores_available()) {
  omp_set_num_threads(threads_);
  openblas_set_num_threads(threads_);
}

std::string CpuBackend::name() const {
  return fmt::format("cpu ({} threads, OpenBLAS {})", threads_, openblas_core_name());
}

double CpuBackend::peak_flops() {
  if (peak_flops_ == 0.0) peak_flops_ = measure_cpu_fma_peak(threads_);
  return peak_flops_;
}

double CpuBackend::peak_bf16_flops() {
  if (peak_bf16_flops_ == 0.0)
    peak_bf16_flops_ = cpu_bf16_gemm_path() == Bf16GemmPath::WIDEN
                           ? peak_flops()
                           : measure_cpu_bf16_gemm_peak(cpu_bf16_gemm_path(), threads_);
  return peak_bf16_flops_;
}

std::string openblas_core_name() { return openblas_get_corename(); }

void* CpuBackend::allocate(size_t bytes) {
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!p) SDMOE_FATAL("cpu", fmt::format("out of host memory allocating {} bytes", bytes));
  return p;
}
void CpuBackend::deallocate(void* ptr) { std::free(ptr); }
void CpuBackend::copy_to_host(const Tensor& src, void* dst) { std::memcpy(dst, src.data, src.bytes()); }
void CpuBackend::copy_from_host(const void* src, const Tensor& dst) { std::memcpy(dst.data, src, dst.bytes()); }
void CpuBackend::copy(const Tensor& src, const Tensor& dst) {
  SDMOE_ASSERT(src.bytes() == dst.bytes(), "copy size mismatch");
  std::memcpy(dst.data, src.data, src.bytes());
}

void CpuBackend::copy_rows(const Tensor& src, int64_t src_stride, const Tensor& dst, int64_t dst_stride, int64_t rows,
                           int64_t row_elements) {
  if (rows <= 0 || row_elements <= 0) return;
  check_copy_rows(src, src_stride, dst, dst_stride, rows, row_elements);
  const size_t width = dtype_size(src.dtype);
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(static_cast<char*>(dst.data) + i * dst_stride * width,
                static_cast<const char*>(src.data) + i * src_stride * width, size_t(row_elements) * width);
}

void CpuBackend::fill(const Tensor& x, double value) {
  if (x.dtype == DType::I32) {
    std::fill_n(x.ptr<int32_t>(), x.numel(), static_cast<int32_t>(value));
    return;
  }
  dispatch_float(x.dtype, [&](auto z) {
    using T = decltype(z);
    std::fill_n(x.ptr<T>(), x.numel(), static_cast<T>(value));
  });
}

void CpuBackend::scale(const Tensor& x, double alpha) {
  dispatch_float(x.dtype, [&](auto z) {
    using T = decltype(z);
    T* p = x.ptr<T>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) p[i] *= static_cast<T>(alpha);
  });
}

void CpuBackend::axpy(double alpha, const Tensor& x, const Tensor& y) {
  expect_same(x, y, "axpy");
  SDMOE_ASSERT(x.numel() == y.numel(), "axpy size mismatch");
  dispatch_float(x.dtype, [&](auto z) {
    using T = decltype(z);
    const T* px = x.ptr<T>();
    T* py = y.ptr<T>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) py[i] += static_cast<T>(alpha) * px[i];
  });
}

double CpuBackend::sum_squares(const Tensor& x) {
  double total = 0.0;
  dispatch_float(x.dtype, [&](auto z) {
    using T = decltype(z);
    const T* p = x.ptr<T>();
    const int64_t n = x.numel();
    // Fixed chunking so that the result does not depend on the thread count.
    constexpr int64_t kChunk = 4096;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      double s = 0.0;
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) s += double(p[i]) * double(p[i]);
      partial[c] = s;
    }
    for (double s : partial) total += s;
  });
  return total;
}

std::vector<double> CpuBackend::column_sums(const Tensor& x) {
  const int64_t rows = x.rows(), cols = x.cols();
  std::vector<double> out(cols, 0.0);
  dispatch_float(x.dtype, [&](auto z) {
    using T = decltype(z);
    const T* p = x.ptr<T>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out[c] += double(p[r * cols + c]);
  });
  return out;
}

void CpuBackend::cast(const Tensor& src, const Tensor& dst) {
  SDMOE_ASSERT(src.numel() == dst.numel(), "cast size mismatch");
  const int64_t n = src.numel();
  // Under BF16 this runs on every weight after each step and on the staged operands: the
  // float <-> bf16 pairs go 16 lanes wide in blocks over the threads.
  if ((src.dtype == DType::F32 && dst.dtype == DType::BF16) || (src.dtype == DType::BF16 && dst.dtype == DType::F32)) {
    constexpr int64_t kBlock = 1 << 14;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const bool narrowing = src.dtype == DType::F32;
#pragma omp parallel for schedule(static) if (blocks > 4)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kBlock, count = std::min(kBlock, n - begin);
      if (narrowing) cpu::float_to_bf16_array(src.ptr<float>() + begin, dst.ptr<bf16>() + begin, count);
      else cpu::bf16_to_float_array(src.ptr<bf16>() + begin, dst.ptr<float>() + begin, count);
    }
    return;
  }
  cpu::dispatch_storage(src.dtype, [&](auto zs) {
    using S = decltype(zs);
    cpu::dispatch_storage(dst.dtype, [&](auto zd) {
      using D = decltype(zd);
      const S* in = src.ptr<S>();
      D* out = dst.ptr<D>();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) {
        if constexpr (std::is_same_v<S, D>) out[i] = in[i];
        else if constexpr (std::is_same_v<S, float> && std::is_same_v<D, bf16>) out[i] = float_to_bf16(in[i]);
        else if constexpr (std::is_same_v<S, bf16> && std::is_same_v<D, float>) out[i] = bf16_to_float(in[i]);
        else out[i] = cpu::narrow<D>(cpu::widen(in[i]));
      }
    });
  });
}

void CpuBackend::init_normal(const Tensor& x, uint64_t seed, uint64_t stream, double std, int64_t index_offset) {
  dispatch_float(x.dtype, [&](auto z) {
    using T = decltype(z);
    T* p = x.ptr<T>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(std * random_normal(seed, stream, index_offset + i));
  });
}

void CpuBackend::gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const Tensor& a,
                      const Tensor& b, double beta, const Tensor& c, const GemmBatch& batch) {
  if (a.dtype == DType::BF16 || b.dtype == DType::BF16) {
    // bf16 operands, fp32 accumulation and output.
    SDMOE_ASSERT(a.dtype == DType::BF16 && b.dtype == DType::BF16 && c.dtype == DType::F32,
                 "bf16 gemm needs two bf16 operands and an f32 output (got {}, {}, {})", dtype_name(a.dtype),
                 dtype_name(b.dtype), dtype_name(c.dtype));
    gemm_batch_threaded<bf16>(threads_, ta, tb, m, n, k, float(alpha), a.ptr<bf16>(), b.ptr<bf16>(), float(beta),
                              c.ptr<float>(), batch);
    return;
  }
  expect_same(a, b, "gemm");
  expect_same(a, c, "gemm");
  dispatch_float(c.dtype, [&](auto z) {
    using T = decltype(z);
    gemm_batch_threaded<T>(threads_, ta, tb, m, n, k, T(alpha), a.ptr<T>(), b.ptr<T>(), T(beta), c.ptr<T>(), batch);
  });
}

void CpuBackend::grouped_gemm(bool ta, bool tb, DType dtype, double alpha, std::span<const GemmGroup> groups,
                              double beta) {
  // dtype is the operands'; bf16 operands write fp32 outputs, as in gemm.
  dispatch_storage(dtype, [&](auto z) {
    using T = decltype(z);
    using Out = GemmOut<T>;
    for (const GemmGroup& g : groups)
      gemm_threaded<T>(threads_, ta, tb, g.m, g.n, g.k, Out(alpha), static_cast<const T*>(g.a),
                       static_cast<const T*>(g.b), Out(beta), static_cast<Out*>(g.c));
  });
}

namespace {

// The optimizer's elementwise loops, in double whatever the storage type. The library is
// built for baseline x86-64, where these run 2 doubles wide; the float versions are also
// compiled for AVX-512 (8 wide) and chosen at run time, the same loop body inlined into
// both.
template <typename T>
__attribute__((always_inline)) inline void adamw_range(T* p, T* pm, T* pv, const T* g, int64_t begin, int64_t end,
                                                       const AdamWStep& s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const double gi = double(g[i]) * s.grad_scale;
    const double mi = s.beta1 * double(pm[i]) + (1.0 - s.beta1) * gi;
    const double vi = s.beta2 * double(pv[i]) + (1.0 - s.beta2) * gi * gi;
    pm[i] = T(mi);
    pv[i] = T(vi);
    const double update = (mi / s.bias_correction1) / (std::sqrt(vi / s.bias_correction2) + s.eps);
    p[i] = T(double(p[i]) - s.lr * (update + s.weight_decay * double(p[i])));
  }
}

__attribute__((target("avx512f"))) void adamw_range_avx512(float* p, float* pm, float* pv, const float* g,
                                                            int64_t begin, int64_t end, const AdamWStep& s) {
  adamw_range<float>(p, pm, pv, g, begin, end, s);
}

// One expert's contiguous run [begin, end) of the SD-MoE part step (CpuBackend::
// sdmoe_part_step): the strided operands at `at`, the packed ones at `packed`.
template <typename T>
__attribute__((always_inline)) inline void sdmoe_part_range(T* pw, T* mc, T* vc, const T* pg, const T* pc, T* mu, T* vu,
                                                            T* od, int64_t count, const SdmoePartStep& st) {
  const AdamWStep& a = st.adam;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const double gc = double(pc[i]) * a.grad_scale, gu = (double(pg[i]) - double(pc[i])) * a.grad_scale;
    double ac, au;
    if (st.sgd) {
      ac = -st.lr_common * gc;
      au = -st.lr_unique * gu;
    } else {
      const double mci = a.beta1 * double(mc[i]) + (1.0 - a.beta1) * gc;
      const double vci = a.beta2 * double(vc[i]) + (1.0 - a.beta2) * gc * gc;
      const double mui = a.beta1 * double(mu[i]) + (1.0 - a.beta1) * gu;
      const double vui = a.beta2 * double(vu[i]) + (1.0 - a.beta2) * gu * gu;
      mc[i] = T(mci);
      vc[i] = T(vci);
      mu[i] = T(mui);
      vu[i] = T(vui);
      ac = -st.lr_common * (mci / a.bias_correction1) / (std::sqrt(vci / a.bias_correction2) + a.eps);
      au = -st.lr_unique * (mui / a.bias_correction1) / (std::sqrt(vui / a.bias_correction2) + a.eps);
    }
    const double wi = double(pw[i]);
    const double d = double(T(au - ac + st.decay_shift * wi));
    od[i] = T(d);
    pw[i] = T((1.0 - st.decay_common) * wi + ac + d);
  }
}

__attribute__((target("avx512f"))) void sdmoe_part_range_avx512(float* pw, float* mc, float* vc, const float* pg,
                                                                 const float* pc, float* mu, float* vu, float* od,
                                                                 int64_t count, const SdmoePartStep& st) {
  sdmoe_part_range<float>(pw, mc, vc, pg, pc, mu, vu, od, count, st);
}

bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// This thread's share [begin, end) of n elements, in whole cache lines of floats.
std::pair<int64_t, int64_t> thread_share(int64_t n) {
  const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
  const int64_t per = ((n + threads - 1) / threads + 15) / 16 * 16;
  return {std::min(n, t * per), std::min(n, (t + 1) * per)};
}

}  // namespace

void CpuBackend::adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                              const AdamWStep& s) {
  expect_same(param, grad, "adamw");
  dispatch_float(param.dtype, [&](auto z) {
    using T = decltype(z);
    T *p = param.ptr<T>(), *pm = m.ptr<T>(), *pv = v.ptr<T>();
    const T* g = grad.ptr<T>();
    const int64_t n = param.numel();
#pragma omp parallel
    {
      const auto [begin, end] = thread_share(n);
      if constexpr (std::is_same_v<T, float>) {
        if (cpu_has_avx512f()) adamw_range_avx512(p, pm, pv, g, begin, end, s);
        else adamw_range<T>(p, pm, pv, g, begin, end, s);
      } else {
        adamw_range<T>(p, pm, pv, g, begin, end, s);
      }
    }
  });
}

void CpuBackend::bind_to_current_thread() { omp_set_num_threads(threads_); }

void CpuBackend::sdmoe_part_step(const Tensor& w, const Tensor& g, const Tensor& m_c, const Tensor& v_c,
                                 const Tensor& g_common, const Tensor& m_u, const Tensor& v_u, const Tensor& diff,
                                 const MatrixStack& stack, const SdmoePartStep& st) {
  const int64_t strided = stack.count == 0 ? 0 : (stack.count - 1) * stack.stride + stack.elements,
                packed = stack.count * stack.elements;
  for (const Tensor* t : {&g, &m_c, &v_c, &g_common, &m_u, &v_u, &diff}) expect_same(w, *t, "sdmoe_part_step");
  for (const Tensor* t : {&w, &g, &m_c, &v_c})
    SDMOE_ASSERT(t->numel() >= strided, "sdmoe_part_step: strided operand of {} elements, stack needs {}", t->numel(),
                 strided);
  for (const Tensor* t : {&g_common, &m_u, &v_u, &diff})
    SDMOE_ASSERT(t->numel() == packed, "sdmoe_part_step: packed operand of {} elements, stack has {}", t->numel(),
                 packed);
  dispatch_float(w.dtype, [&](auto z) {
    using T = decltype(z);
    T *pw = w.ptr<T>(), *mc = m_c.ptr<T>(), *vc = v_c.ptr<T>(), *mu = m_u.ptr<T>(), *vu = v_u.ptr<T>();
    const T *pg = g.ptr<T>(), *pc = g_common.ptr<T>();
    T* od = diff.ptr<T>();
    // Each thread takes a share of the packed elements and walks it one expert's
    // contiguous run at a time (the strided operands restart at each expert's offset).
#pragma omp parallel
    {
      const auto [begin, end] = thread_share(packed);
      for (int64_t i = begin; i < end;) {
        const int64_t expert = i / stack.elements, within = i % stack.elements;
        const int64_t count = std::min(end - i, stack.elements - within), at = expert * stack.stride + within;
        if constexpr (std::is_same_v<T, float>) {
          if (cpu_has_avx512f())
            sdmoe_part_range_avx512(pw + at, mc + at, vc + at, pg + at, pc + i, mu + i, vu + i, od + i, count, st);
          else
            sdmoe_part_range<T>(pw + at, mc + at, vc + at, pg + at, pc + i, mu + i, vu + i, od + i, count, st);
        } else {
          sdmoe_part_range<T>(pw + at, mc + at, vc + at, pg + at, pc + i, mu + i, vu + i, od + i, count, st);
        }
        i += count;
      }
    }
  });
}

void CpuBackend::svd(const Tensor& a, const Tensor& u, const Tensor& s, const Tensor& vt) {
  const int64_t m = a.dim(0), n = a.dim(1), r = std::min(m, n);
  SDMOE_ASSERT(u.numel() == m * r && s.numel() == r && vt.numel() == r * n, "svd output shapes");
  dispatch_float(a.dtype, [&](auto z) {
    using T = decltype(z);
    std::vector<T> work(a.ptr<T>(), a.ptr<T>() + m * n);  // gesdd destroys its input
    if constexpr (std::is_same_v<T, float>) {
      SDMOE_CHECK_LAPACK(LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', (int)m, (int)n, work.data(), (int)n, s.ptr<T>(),
                                        u.ptr<T>(), (int)r, vt.ptr<T>(), (int)n));
    } else {
      SDMOE_CHECK_LAPACK(LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', (int)m, (int)n, work.data(), (int)n, s.ptr<T>(),
                                        u.ptr<T>(), (int)r, vt.ptr<T>(), (int)n));
    }
  });
}

void CpuBackend::symmetric_eigen(const Tensor& a, const Tensor& w, const Tensor& vecs) {
  SDMOE_ASSERT((a.ndim == 2 || a.ndim == 3) && a.dim(a.ndim - 1) == a.dim(a.ndim - 2),
               "symmetric_eigen: a must be [N,N] or [B,N,N], got {}", a.shape_string());
  const int64_t n = a.dim(a.ndim - 1), batch = a.ndim == 3 ? a.dim(0) : 1;
  SDMOE_ASSERT(w.numel() == batch * n && vecs.numel() == batch * n * n, "symmetric_eigen output shapes");
  dispatch_float(a.dtype, [&](auto z) {
    using T = decltype(z);
    // Row-major symmetric input read as column-major is the same matrix; the eigenvectors
    // come back as columns in column-major, i.e. as rows in row-major.
    std::copy(a.ptr<T>(), a.ptr<T>() + batch * n * n, vecs.ptr<T>());
    // A batch is solved one matrix per thread: LAPACK's threading of one small
    // eigenproblem (the experts' Grams are a few hundred wide) gains little, and inside
    // the parallel region the OpenMP OpenBLAS runs each call on its own thread (a
    // pthreads OpenBLAS would start its own pool inside ours, so it keeps the loop).
    // Errors are reported after the region, which an exception must not leave.
    std::vector<lapack_int> info(size_t(batch), 0);
    const int team = int(std::max<int64_t>(1, std::min<int64_t>(threads_, batch)));
    const bool per_matrix = team > 1 && openblas_runs_on_openmp() && !omp_in_parallel();
#pragma omp parallel for schedule(dynamic) num_threads(team) if (per_matrix)
    for (int64_t b = 0; b < batch; ++b) {
      T* v = vecs.ptr<T>() + b * n * n;
      T* values = w.ptr<T>() + b * n;
      if constexpr (std::is_same_v<T, float>) {
        info[b] = LAPACKE_ssyevd(LAPACK_COL_MAJOR, 'V', 'U', (int)n, v, (int)n, values);
      } else {
        info[b] = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', (int)n, v, (int)n, values);
      }
    }
    for (int64_t b = 0; b < batch; ++b)
      if (info[b] != 0)
        SDMOE_FATAL("LAPACK", fmt::format("syevd of matrix {} of {} ({} x {}) returned info={}", b, batch, n, n,
                                          long(info[b])));
  });
}

void CpuBackend::cholesky_inverse(const Tensor& gram, const Tensor& inv, double relative_ridge) {
  SDMOE_ASSERT(gram.ndim >= 2 && gram.dim(gram.ndim - 1) == gram.dim(gram.ndim - 2) && inv.numel() == gram.numel() &&
                   inv.dtype == gram.dtype,
               "cholesky_inverse: gram must be [..., k, k] and inv alike, got {} and {}", gram.shape_string(),
               inv.shape_string());
  const int k = int(gram.dim(gram.ndim - 1));
  SDMOE_ASSERT(k >= 1 && k <= kMaxCholeskyOrder, "cholesky_inverse: k = {} outside [1, {}]", k, kMaxCholeskyOrder);
  const int64_t batch = gram.numel() / (int64_t(k) * k);
  dispatch_float(gram.dtype, [&](auto z) {
    using T = decltype(z);
    std::vector<double> l(size_t(k) * k), li(size_t(k) * k);
    for (int64_t b = 0; b < batch; ++b)
      cholesky_inverse_lower(gram.ptr<T>() + b * k * k, inv.ptr<T>() + b * k * k, k, relative_ridge, l.data(),
                             li.data());
  });
}

std::unique_ptr<Backend> make_cpu_backend(int threads) { return std::make_unique<CpuBackend>(threads); }

}  // namespace sdmoe
