#include <algorithm>
// Elementwise ops, deterministic reductions, casts, init, embedding, RMSNorm, SwiGLU and
// AdamW. Kernels first, host launchers last.
//
// Determinism: no floating-point atomics anywhere. Reductions use a grid whose size is a
// function of the problem size only, per-block fixed trees, and a second pass that adds
// the per-block partials in index order; sums are carried in double.
#include <cub/device/device_radix_sort.cuh>

#include "core/cuda/cuda_kernels.cuh"
#include "core/rng.h"

namespace sdmoe::cuda {
namespace {

constexpr int kThreads = 256;

#define SDMOE_GRID_STRIDE(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// ---- elementwise --------------------------------------------------------------------------
template <typename T>
__global__ void fill_kernel(T* x, int64_t n, T value) {
  SDMOE_GRID_STRIDE(i, n) x[i] = value;
}

__global__ void scale_kernel(float* x, int64_t n, float alpha) {
  SDMOE_GRID_STRIDE(i, n) x[i] *= alpha;
}

__global__ void axpy_kernel(float alpha, const float* x, float* y, int64_t n) {
  SDMOE_GRID_STRIDE(i, n) y[i] += alpha * x[i];
}

template <typename Src, typename Dst>
__global__ void cast_kernel(const Src* src, Dst* dst, int64_t n) {
  SDMOE_GRID_STRIDE(i, n) store_float(dst, i, load_as_float(src, i));
}

// From double: rounded to float first and then, for bf16, to bf16, as the CPU backend does
// (host-drawn initial values of tensor-split parameters arrive this way).
template <typename Dst>
__global__ void cast_from_f64_kernel(const double* src, Dst* dst, int64_t n) {
  SDMOE_GRID_STRIDE(i, n) store_float(dst, i, static_cast<float>(src[i]));
}

template <typename Src>
__global__ void cast_to_f64_kernel(const Src* src, double* dst, int64_t n) {
  SDMOE_GRID_STRIDE(i, n) dst[i] = static_cast<double>(load_as_float(src, i));
}

// Same expression as the CPU backend: the normal deviate in double, scaled, then rounded.
template <typename T>
__global__ void init_normal_kernel(T* x, int64_t n, uint64_t seed, uint64_t stream, double std, int64_t offset) {
  SDMOE_GRID_STRIDE(i, n) {
    const double v = std * random_normal(seed, stream, static_cast<uint64_t>(offset + i));
    store_float(x, i, static_cast<float>(v));
  }
}

// ---- sum of squares ---------------------------------------------------------------------
template <typename T>
__global__ void sum_squares_partial_kernel(const T* x, int64_t n, double* partials) {
  __shared__ double shared[32];
  double acc = 0.0;
  SDMOE_GRID_STRIDE(i, n) {
    const double v = load_as_float(x, i);
    acc += v * v;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void sum_partials_kernel(const double* partials, int64_t count, double* result) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *result = acc;
}

// ---- column reductions ------------------------------------------------------------------
// Rows are split into fixed chunks; block (column tile, chunk) sums its chunk with 8 row
// lanes and a fixed-order combine; the final pass adds the chunks in order.
constexpr int kColTile = 32, kRowLanes = 8;

inline int64_t rows_per_chunk(int64_t rows) {
  int64_t r = ceil_div(rows, 1024);
  return r < 64 ? 64 : r;
}
inline int64_t chunk_count(int64_t rows) { return rows == 0 ? 1 : ceil_div(rows, rows_per_chunk(rows)); }

struct PlainValue {
  const float* x;
  int64_t cols;
  __device__ double operator()(int64_t r, int64_t c) const { return double(x[r * cols + c]); }
};

struct RmsnormWeightGrad {
  const float *dy, *x, *rstd;
  int64_t cols;
  __device__ double operator()(int64_t r, int64_t c) const {
    return double(dy[r * cols + c]) * double(x[r * cols + c]) * double(rstd[r]);
  }
};

template <typename F>
__global__ void column_partial_kernel(F f, int64_t rows, int64_t cols, int64_t rpc, double* partials) {
  __shared__ double shared[kRowLanes][kColTile + 1];
  const int64_t c = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rpc;
  const int64_t r1 = min(rows, r0 + rpc);
  double acc = 0.0;
  if (c < cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) acc += f(r, c);
  shared[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    double s = 0.0;
#pragma unroll
    for (int i = 0; i < kRowLanes; ++i) s += shared[i][threadIdx.x];
    partials[int64_t(blockIdx.y) * cols + c] = s;
  }
}

// out_double[c] = sum, or out_float[c] += float(sum).
__global__ void column_final_kernel(const double* partials, int64_t chunks, int64_t cols, double* out_double,
                                    float* out_float) {
  SDMOE_GRID_STRIDE(c, cols) {
    double s = 0.0;
    for (int64_t ch = 0; ch < chunks; ++ch) s += partials[ch * cols + c];
    if (out_double) out_double[c] = s;
    if (out_float) out_float[c] += static_cast<float>(s);
  }
}

template <typename F>
void column_reduce(F f, int64_t rows, int64_t cols, double* partials, double* out_double, float* out_float,
                   cudaStream_t s) {
  if (cols == 0) return;
  const int64_t chunks = chunk_count(rows);
  dim3 grid(static_cast<unsigned>(ceil_div(cols, kColTile)), static_cast<unsigned>(chunks));
  column_partial_kernel<<<grid, dim3(kColTile, kRowLanes), 0, s>>>(f, rows, cols, rows_per_chunk(rows), partials);
  SDMOE_CHECK_LAUNCH();
  column_final_kernel<<<elementwise_blocks(cols), kThreads, 0, s>>>(partials, chunks, cols, out_double, out_float);
  SDMOE_CHECK_LAUNCH();
}

// ---- transpose ----------------------------------------------------------------------------
__global__ void transpose_kernel(const float* in, float* out, int64_t rows, int64_t cols) {
  __shared__ float tile[32][33];
  const int64_t c0 = int64_t(blockIdx.x) * 32, r0 = int64_t(blockIdx.y) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = in[r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) out[c * rows + r] = tile[threadIdx.x][i];
  }
}

// ---- embedding ----------------------------------------------------------------------------
// Negative ids are rows on another rank (vocabulary-parallel): zero. Ids beyond the
// table cannot abort from a kernel; their rows become NaN so the loss shows it.
// The table may be BF16's working copy of the weights (widened exactly).
template <typename W>
__global__ void embedding_forward_kernel(const int32_t* ids, const W* table, float* out, int64_t vocab,
                                         int64_t dim) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
    out[t * dim + d] = id < 0       ? 0.0f
                       : id < vocab ? load_as_float(table, int64_t(id) * dim + d)
                                    : __int_as_float(0x7fc00000);
}

__global__ void iota_kernel(int32_t* x, int64_t n) {
  SDMOE_GRID_STRIDE(i, n) x[i] = static_cast<int32_t>(i);
}

// After a stable sort of (id, token) pairs by id, the first position of each id's run adds
// that run's rows in token order: the same additions, in the same order, as the CPU loop.
__global__ void embedding_accumulate_kernel(const int32_t* sorted_ids, const int32_t* sorted_tokens,
                                            const float* dout, float* dtable, int64_t tokens, int64_t vocab,
                                            int64_t dim) {
  const int64_t p = blockIdx.x;
  const int32_t id = sorted_ids[p];
  if (p > 0 && sorted_ids[p - 1] == id) return;
  if (id < 0 || id >= vocab) return;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = dtable[int64_t(id) * dim + d];
    for (int64_t q = p; q < tokens && sorted_ids[q] == id; ++q) acc += dout[int64_t(sorted_tokens[q]) * dim + d];
    dtable[int64_t(id) * dim + d] = acc;
  }
}

// ---- RMSNorm ------------------------------------------------------------------------------
// The weight may be BF16's working copy (W = uint16_t), the output a bf16 GEMM operand.
template <typename W, typename Y>
__global__ void rmsnorm_forward_kernel(const float* x, const W* w, double eps, Y* y, float* rstd, int64_t dim) {
  __shared__ double shared[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * dim;
  double ss = 0.0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) ss += double(xr[d]) * double(xr[d]);
  ss = block_sum(ss, shared);
  const double inv = 1.0 / sqrt(ss / double(dim) + eps);
  if (threadIdx.x == 0) rstd[r] = static_cast<float>(inv);
  Y* yr = y + r * dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
    store_float(yr, d, static_cast<float>(double(xr[d]) * inv * double(load_as_float(w, d))));
}

template <typename W>
__global__ void rmsnorm_backward_dx_kernel(const float* x, const W* w, const float* rstd, const float* dy,
                                           float* dx, int64_t dim) {
  __shared__ double shared[32];
  const int64_t r = blockIdx.x;
  const float *xr = x + r * dim, *gr = dy + r * dim;
  const double inv = double(rstd[r]);
  double dot = 0.0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
    dot += double(gr[d]) * double(load_as_float(w, d)) * double(xr[d]);
  dot = block_sum(dot, shared);
  const double coef = dot * inv * inv * inv / double(dim);
  float* dxr = dx + r * dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
    dxr[d] = static_cast<float>(double(gr[d]) * double(load_as_float(w, d)) * inv - double(xr[d]) * coef);
}

// ---- SwiGLU -------------------------------------------------------------------------------
template <typename O>
__global__ void swiglu_forward_kernel(const float* gate_up, O* out, int64_t rows, int64_t f) {
  SDMOE_GRID_STRIDE(i, rows * f) {
    const int64_t r = i / f, c = i - r * f;
    const float a = gate_up[r * 2 * f + c], u = gate_up[r * 2 * f + f + c];
    store_float(out, i, a / (1.0f + expf(-a)) * u);
  }
}

template <typename G>
__global__ void swiglu_backward_kernel(const float* gate_up, const float* dout, G* dgate_up, int64_t rows,
                                       int64_t f) {
  SDMOE_GRID_STRIDE(i, rows * f) {
    const int64_t r = i / f, c = i - r * f;
    const float a = gate_up[r * 2 * f + c], u = gate_up[r * 2 * f + f + c], d = dout[i];
    const float sg = 1.0f / (1.0f + expf(-a));
    store_float(dgate_up, r * 2 * f + c, d * u * sg * (1.0f + a * (1.0f - sg)));
    store_float(dgate_up, r * 2 * f + f + c, d * a * sg);
  }
}

// ---- AdamW (double arithmetic, as the CPU backend) ------------------------------------------
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, AdamWArgs a) {
  SDMOE_GRID_STRIDE(i, n) {
    const double gi = double(g[i]) * a.grad_scale;
    const double mi = a.beta1 * double(m[i]) + (1.0 - a.beta1) * gi;
    const double vi = a.beta2 * double(v[i]) + (1.0 - a.beta2) * gi * gi;
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    const double update = (mi / a.bias_correction1) / (sqrt(vi / a.bias_correction2) + a.eps);
    const double pi = double(p[i]);
    p[i] = static_cast<float>(pi - a.lr * (update + a.weight_decay * pi));
  }
}

// SD-MoE's two-part step (double arithmetic, as the CPU backend).
__device__ double sdmoe_direction(double gi, float& m, float& v, double lr, const SdmoePartArgs& a) {
  if (a.sgd) return -lr * gi;
  const double mi = a.adam.beta1 * double(m) + (1.0 - a.adam.beta1) * gi;
  const double vi = a.adam.beta2 * double(v) + (1.0 - a.adam.beta2) * gi * gi;
  m = static_cast<float>(mi);
  v = static_cast<float>(vi);
  return -lr * (mi / a.adam.bias_correction1) / (sqrt(vi / a.adam.bias_correction2) + a.adam.eps);
}

__global__ void sdmoe_part_step_kernel(float* w, const float* g, float* m_c, float* v_c, const float* g_common,
                                       float* m_u, float* v_u, float* diff, int64_t n, int64_t elements,
                                       int64_t stride, SdmoePartArgs a) {
  SDMOE_GRID_STRIDE(i, n) {
    const int64_t at = (i / elements) * stride + i % elements;
    const double gc = double(g_common[i]) * a.adam.grad_scale;
    const double gu = (double(g[at]) - double(g_common[i])) * a.adam.grad_scale;
    const double ac = sdmoe_direction(gc, m_c[at], v_c[at], a.lr_common, a);
    const double au = sdmoe_direction(gu, m_u[i], v_u[i], a.lr_unique, a);
    const double wi = double(w[at]);
    const double d = double(static_cast<float>(au - ac + a.decay_shift * wi));
    diff[i] = static_cast<float>(d);
    w[at] = static_cast<float>((1.0 - a.decay_common) * wi + ac + d);
  }
}

}  // namespace

// ============================== host launchers ==============================================

Workspace::~Workspace() {
  if (data_) cudaFree(data_);  // teardown: errors ignored, see cuda_check.h
}

void* Workspace::get(size_t bytes) {
  if (bytes <= capacity_) return data_;
  size_t want = capacity_ * 2 > bytes ? capacity_ * 2 : bytes;
  want = (want + (1 << 20) - 1) / (1 << 20) * (1 << 20);
  if (data_) SDMOE_CHECK_CUDA(cudaFreeAsync(data_, stream_));
  data_ = nullptr;
  capacity_ = 0;
  SDMOE_CHECK_CUDA(cudaMallocAsync(&data_, want, stream_));
  capacity_ = want;
  return data_;
}

namespace {

// Well under the 4 KiB kernel-parameter limit.
constexpr int kPointersPerLaunch = 256;
struct PointerBlock {
  const void* p[kPointersPerLaunch];
  int count;
};

__global__ void write_pointers_kernel(PointerBlock block, const void** out) {
  const int i = threadIdx.x;
  if (i < block.count) out[i] = block.p[i];
}

}  // namespace

void launch_write_pointers(const void* const* host, int64_t count, const void** device, cudaStream_t s) {
  for (int64_t first = 0; first < count; first += kPointersPerLaunch) {
    PointerBlock block{};
    block.count = int(std::min<int64_t>(kPointersPerLaunch, count - first));
    for (int i = 0; i < block.count; ++i) block.p[i] = host[first + i];
    write_pointers_kernel<<<1, kPointersPerLaunch, 0, s>>>(block, device + first);
    SDMOE_CHECK_CUDA(cudaGetLastError());
  }
}

void launch_fill(void* x, DType dtype, int64_t n, double value, cudaStream_t s) {
  if (n == 0) return;
  switch (dtype) {
    case DType::F32:
      fill_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(static_cast<float*>(x), n, static_cast<float>(value));
      break;
    case DType::BF16:
      fill_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(static_cast<uint16_t*>(x), n,
                                                             float_to_bf16(static_cast<float>(value)).bits);
      break;
    case DType::I32:
      fill_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(static_cast<int32_t*>(x), n, static_cast<int32_t>(value));
      break;
    default: SDMOE_FATAL("cuda", fmt::format("fill: dtype {} is not supported on CUDA", dtype_name(dtype)));
  }
  SDMOE_CHECK_LAUNCH();
}

void launch_scale(float* x, int64_t n, float alpha, cudaStream_t s) {
  if (n == 0) return;
  scale_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(x, n, alpha);
  SDMOE_CHECK_LAUNCH();
}

void launch_axpy(float alpha, const float* x, float* y, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  axpy_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(alpha, x, y, n);
  SDMOE_CHECK_LAUNCH();
}

int64_t sum_squares_partials(int64_t n) {
  int64_t p = ceil_div(n, int64_t(kThreads) * 8);
  return p < 1 ? 1 : (p > 1024 ? 1024 : p);
}

void launch_sum_squares(const void* x, DType dtype, int64_t n, double* partials, double* result, cudaStream_t s) {
  const int64_t blocks = sum_squares_partials(n);
  if (dtype == DType::F32)
    sum_squares_partial_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const float*>(x), n, partials);
  else if (dtype == DType::BF16)
    sum_squares_partial_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const uint16_t*>(x), n, partials);
  else
    SDMOE_FATAL("cuda", fmt::format("sum_squares: dtype {} is not supported on CUDA", dtype_name(dtype)));
  SDMOE_CHECK_LAUNCH();
  sum_partials_kernel<<<1, 1024, 0, s>>>(partials, blocks, result);
  SDMOE_CHECK_LAUNCH();
}

int64_t column_partials(int64_t rows, int64_t cols) { return chunk_count(rows) * cols; }

void launch_column_sums(const float* x, int64_t rows, int64_t cols, double* partials, double* out, cudaStream_t s) {
  column_reduce(PlainValue{x, cols}, rows, cols, partials, out, nullptr, s);
}

void launch_cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  if (src_dtype == dst_dtype) {
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(dst, src, n * dtype_size(src_dtype), cudaMemcpyDeviceToDevice, s));
    return;
  }
  const unsigned blocks = elementwise_blocks(n);
  if (src_dtype == DType::F32 && dst_dtype == DType::BF16)
    cast_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const float*>(src), static_cast<uint16_t*>(dst), n);
  else if (src_dtype == DType::BF16 && dst_dtype == DType::F32)
    cast_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const uint16_t*>(src), static_cast<float*>(dst), n);
  else if (src_dtype == DType::F64 && dst_dtype == DType::F32)
    cast_from_f64_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const double*>(src), static_cast<float*>(dst), n);
  else if (src_dtype == DType::F64 && dst_dtype == DType::BF16)
    cast_from_f64_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const double*>(src), static_cast<uint16_t*>(dst), n);
  else if (src_dtype == DType::F32 && dst_dtype == DType::F64)
    cast_to_f64_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const float*>(src), static_cast<double*>(dst), n);
  else if (src_dtype == DType::BF16 && dst_dtype == DType::F64)
    cast_to_f64_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const uint16_t*>(src), static_cast<double*>(dst), n);
  else
    SDMOE_FATAL("cuda", fmt::format("cast {} -> {} is not supported on CUDA (f64, f32 and bf16 only)",
                                    dtype_name(src_dtype), dtype_name(dst_dtype)));
  SDMOE_CHECK_LAUNCH();
}

void launch_init_normal(void* x, DType dtype, int64_t n, uint64_t seed, uint64_t stream, double std,
                        int64_t index_offset, cudaStream_t s) {
  if (n == 0) return;
  if (dtype == DType::F32)
    init_normal_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(static_cast<float*>(x), n, seed, stream, std,
                                                                  index_offset);
  else if (dtype == DType::BF16)
    init_normal_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(static_cast<uint16_t*>(x), n, seed, stream, std,
                                                                  index_offset);
  else
    SDMOE_FATAL("cuda", fmt::format("init_normal: dtype {} is not supported on CUDA", dtype_name(dtype)));
  SDMOE_CHECK_LAUNCH();
}

void launch_transpose(const float* in, float* out, int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  dim3 grid(static_cast<unsigned>(ceil_div(cols, 32)), static_cast<unsigned>(ceil_div(rows, 32)));
  SDMOE_ASSERT(grid.y <= 65535, "transpose: too many rows ({})", rows);
  transpose_kernel<<<grid, dim3(32, 8), 0, s>>>(in, out, rows, cols);
  SDMOE_CHECK_LAUNCH();
}

void launch_embedding_forward(const int32_t* ids, const void* table, DType table_dtype, float* out, int64_t tokens,
                              int64_t vocab, int64_t dim, cudaStream_t s) {
  if (tokens == 0 || dim == 0) return;
  dispatch_storage(table_dtype, "embedding_forward", [&](auto zt) {
    using W = decltype(zt);
    embedding_forward_kernel<W><<<static_cast<unsigned>(tokens), kThreads, 0, s>>>(ids, static_cast<const W*>(table),
                                                                                   out, vocab, dim);
  });
  SDMOE_CHECK_LAUNCH();
}

namespace {
size_t radix_sort_temp_bytes(int64_t tokens) {
  size_t bytes = 0;
  SDMOE_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr),
                                                   static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), static_cast<int>(tokens)));
  return bytes;
}
}  // namespace

size_t embedding_backward_workspace(int64_t tokens) {
  Carver c;
  c.take<int32_t>(tokens);  // sorted ids
  c.take<int32_t>(tokens);  // token order
  c.take<int32_t>(tokens);  // sorted token order
  c.take<char>(radix_sort_temp_bytes(tokens));
  return c.used();
}

void launch_embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t tokens, int64_t vocab,
                               int64_t dim, void* workspace, size_t workspace_bytes, cudaStream_t s) {
  if (tokens == 0 || dim == 0) return;
  SDMOE_ASSERT(tokens < (int64_t(1) << 31), "embedding_backward: {} tokens exceed int32", tokens);
  const size_t temp_bytes = radix_sort_temp_bytes(tokens);
  Carver c(workspace);
  int32_t* sorted_ids = c.take<int32_t>(tokens);
  int32_t* order = c.take<int32_t>(tokens);
  int32_t* sorted_order = c.take<int32_t>(tokens);
  void* temp = c.take<char>(temp_bytes);
  SDMOE_ASSERT(c.used() <= workspace_bytes, "embedding_backward workspace too small");
  iota_kernel<<<elementwise_blocks(tokens), kThreads, 0, s>>>(order, tokens);
  SDMOE_CHECK_LAUNCH();
  size_t bytes = temp_bytes;
  // All 32 key bits: equal ids end up adjacent even if some are out of range.
  SDMOE_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(temp, bytes, ids, sorted_ids, order, sorted_order,
                                                   static_cast<int>(tokens), 0, 32, s));
  embedding_accumulate_kernel<<<static_cast<unsigned>(tokens), kThreads, 0, s>>>(sorted_ids, sorted_order, dout,
                                                                                  dtable, tokens, vocab, dim);
  SDMOE_CHECK_LAUNCH();
}

void launch_rmsnorm_forward(const float* x, const void* w, DType w_dtype, float eps, void* y, DType y_dtype,
                            float* rstd, int64_t rows, int64_t dim, cudaStream_t s) {
  if (rows == 0) return;
  dispatch_storage(w_dtype, "rmsnorm_forward", [&](auto zw) {
    using W = decltype(zw);
    dispatch_storage(y_dtype, "rmsnorm_forward", [&](auto zy) {
      using Y = decltype(zy);
      rmsnorm_forward_kernel<W, Y><<<static_cast<unsigned>(rows), kThreads, 0, s>>>(
          x, static_cast<const W*>(w), double(eps), static_cast<Y*>(y), rstd, dim);
    });
  });
  SDMOE_CHECK_LAUNCH();
}

void launch_rmsnorm_backward(const float* x, const void* w, DType w_dtype, const float* rstd, const float* dy,
                             float* dx, float* dw, int64_t rows, int64_t dim, double* partials, cudaStream_t s) {
  if (rows == 0 || dim == 0) return;
  dispatch_storage(w_dtype, "rmsnorm_backward", [&](auto zw) {
    using W = decltype(zw);
    rmsnorm_backward_dx_kernel<W><<<static_cast<unsigned>(rows), kThreads, 0, s>>>(x, static_cast<const W*>(w), rstd,
                                                                                   dy, dx, dim);
  });
  SDMOE_CHECK_LAUNCH();
  column_reduce(RmsnormWeightGrad{dy, x, rstd, dim}, rows, dim, partials, nullptr, dw, s);
}

void launch_swiglu_forward(const float* gate_up, void* out, DType out_dtype, int64_t rows, int64_t f,
                           cudaStream_t s) {
  if (rows * f == 0) return;
  dispatch_storage(out_dtype, "swiglu_forward", [&](auto zo) {
    using O = decltype(zo);
    swiglu_forward_kernel<O><<<elementwise_blocks(rows * f), kThreads, 0, s>>>(gate_up, static_cast<O*>(out), rows, f);
  });
  SDMOE_CHECK_LAUNCH();
}

void launch_swiglu_backward(const float* gate_up, const float* dout, void* dgate_up, DType dgate_up_dtype,
                            int64_t rows, int64_t f, cudaStream_t s) {
  if (rows * f == 0) return;
  dispatch_storage(dgate_up_dtype, "swiglu_backward", [&](auto zg) {
    using G = decltype(zg);
    swiglu_backward_kernel<G><<<elementwise_blocks(rows * f), kThreads, 0, s>>>(gate_up, dout,
                                                                                static_cast<G*>(dgate_up), rows, f);
  });
  SDMOE_CHECK_LAUNCH();
}

void launch_sdmoe_part_step(float* w, const float* g, float* m_c, float* v_c, const float* g_common, float* m_u,
                            float* v_u, float* diff, int64_t count, int64_t elements, int64_t stride,
                            const SdmoePartArgs& a, cudaStream_t s) {
  const int64_t n = count * elements;
  if (n == 0) return;
  sdmoe_part_step_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(w, g, m_c, v_c, g_common, m_u, v_u, diff, n,
                                                                    elements, stride, a);
  SDMOE_CHECK_CUDA(cudaGetLastError());
}

void launch_adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWArgs& a, cudaStream_t s) {
  if (n == 0) return;
  adamw_kernel<<<elementwise_blocks(n), kThreads, 0, s>>>(p, g, m, v, n, a);
  SDMOE_CHECK_LAUNCH();
}

}  // namespace sdmoe::cuda
