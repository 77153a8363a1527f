// CUDA backend: memory, GEMM (cuBLAS), linear algebra (cuSOLVER) and the dtype and shape
// checks in front of the kernels (kernels_*.cu). Everything runs in order on one stream
// owned by the backend; cuBLAS and cuSOLVER are bound to it. Only functions that return
// host values (sum_squares, column_sums, copy_to_host, svd/eigen status) synchronise.
//
// Dtypes: F32 everywhere; BF16 wherever the CPU backend takes a storage dtype, which is
// what the BF16 precision policy (model/precision.h) needs: GEMM inputs (F32 output, F32
// accumulation), the outputs of rmsnorm, SwiGLU and its backward, both sides of the head
// layout copies, RoPE, the kept probabilities of the softmax backward, gathered rows, the
// fused attention's operands, and cast, fill, init_normal and sum_squares; I32 for indices
// and fill. F64 exists only for the CPU oracle and is rejected with a fatal error.
#include <algorithm>
#include <climits>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/cuda/cuda_kernels.cuh"
#include "core/cuda/flash_attention.cuh"
#include "core/cuda/lt_gemm.cuh"

namespace sdmoe {
namespace {

using namespace sdmoe::cuda;

[[noreturn]] void unsupported(const char* op, const Tensor& t) {
  SDMOE_FATAL("cuda", fmt::format("{}: dtype {} is not supported by the CUDA backend (f32 only here; f64 is "
                                  "CPU-only)",
                                  op, dtype_name(t.dtype)));
}

float* f32(const Tensor& t, const char* op) {
  if (t.dtype != DType::F32) unsupported(op, t);
  return t.ptr<float>();
}

// A tensor in a storage dtype (F32 or BF16): an operand-kernel argument.
void* storage(const Tensor& t, const char* op) {
  if (t.dtype != DType::F32 && t.dtype != DType::BF16) unsupported(op, t);
  return t.data;
}

int32_t* i32(const Tensor& t, const char* op) {
  SDMOE_ASSERT(t.dtype == DType::I32, "{}: index tensor must be i32, got {}", op, dtype_name(t.dtype));
  return t.ptr<int32_t>();
}

int as_int(int64_t v, const char* what) {
  SDMOE_ASSERT(v >= 0 && v <= INT_MAX, "{} = {} does not fit the 32-bit cuBLAS/cuSOLVER API", what, v);
  return static_cast<int>(v);
}

cudaDataType cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    default: SDMOE_FATAL("cuda", fmt::format("gemm: dtype {} is not supported on CUDA", dtype_name(t)));
  }
}

// FP32 lanes per SM: 64 on sm_60/sm_70/sm_80 (A100), 128 on sm_86/sm_89/sm_90 and later.
int fp32_lanes_per_sm(int major, int minor) {
  if (major >= 9) return 128;
  if (major == 8) return minor == 0 ? 64 : 128;
  return 64;
}

// Dense bf16 tensor-core FLOPs per SM per clock (data sheets: H100 SXM 989 TFLOP/s = 132
// SMs x 1.83 GHz x 4096; A100 312 = 108 x 1.41 GHz x 2048); 0 where unknown.
int bf16_flops_per_sm_clock(int major, int minor) {
  if (major == 9) return 4096;
  if (major == 8) return minor == 0 ? 2048 : 1024;
  return 0;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    SDMOE_CHECK_CUDA(cudaSetDevice(device_));
    SDMOE_CHECK_CUDA(cudaGetDeviceProperties(&props_, device_));
    int clock_khz = 0;
    SDMOE_CHECK_CUDA(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device_));
    // Data-sheet figure for the log: SMs x boost clock x FP32 lanes x 2 (an FMA is two
    // FLOPs). The "% of peak" figures use the measured one.
    nominal_peak_flops_ = double(props_.multiProcessorCount) * double(clock_khz) * 1e3 *
                          double(fp32_lanes_per_sm(props_.major, props_.minor)) * 2.0;
    nominal_bf16_flops_ = double(props_.multiProcessorCount) * double(clock_khz) * 1e3 *
                          double(bf16_flops_per_sm_clock(props_.major, props_.minor));
    stream_ = make_stream();
    lt_ = std::make_unique<LtGemm>(stream_.get());
    peak_flops_ = measure_fma_peak(device_, stream_.get());
    cublas_ = make_cublas(stream_.get());
    SDMOE_CHECK_CUBLAS(cublasSetMathMode(cublas_.get(), CUBLAS_DEFAULT_MATH));  // exact fp32, no TF32
    cusolver_ = make_cusolver(stream_.get());
    cusolver_params_ = make_cusolver_params();
    workspace_.set_stream(stream_.get());
  }

  ~CudaBackend() override {
    if (stream_) cudaStreamSynchronize(stream_.get());  // teardown: errors ignored
  }

  Device device() const override { return Device::CUDA; }
  std::string name() const override {
    return fmt::format(
        "cuda:{} ({}, sm_{}{}, {:.0f} GiB, fp32 FMA peak {:.1f} TFLOP/s measured, {:.1f} nominal; bf16 tensor-core "
        "{:.0f} TFLOP/s nominal dense)",
        device_, props_.name, props_.major, props_.minor, double(props_.totalGlobalMem) / double(1ull << 30),
        peak_flops_ / 1e12, nominal_peak_flops_ / 1e12, nominal_bf16_flops_ / 1e12);
  }
  double peak_flops() override { return peak_flops_; }
  // The bf16 GEMM path's peak, measured once on first use: the best of a few large square
  // cuBLASLt products (what the tensor cores sustain on this device and clock, below the
  // data-sheet figure that name() prints).
  double peak_bf16_flops() override {
    if (peak_bf16_flops_ == 0.0) peak_bf16_flops_ = measure_bf16_gemm_peak();
    return peak_bf16_flops_;
  }
  void* native_stream() override { return stream_.get(); }
  int device_ordinal() const override { return device_; }
  void bind_to_current_thread() override { SDMOE_CHECK_CUDA(cudaSetDevice(device_)); }

  // ---- memory -------------------------------------------------------------------------
  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    cudaError_t rc = cudaMalloc(&p, bytes);
    if (rc != cudaSuccess) {
      size_t free_b = 0, total_b = 0;
      cudaGetLastError();
      cudaMemGetInfo(&free_b, &total_b);
      SDMOE_FATAL("CUDA", fmt::format("cudaMalloc of {} bytes on device {} failed: {} ({} of {} bytes free)", bytes,
                                      device_, cudaGetErrorString(rc), free_b, total_b));
    }
    return p;
  }
  void deallocate(void* ptr) override {
    if (ptr) SDMOE_CHECK_CUDA(cudaFree(ptr));
  }
  void copy_to_host(const Tensor& src, void* dst) override {
    if (src.bytes() == 0) return;
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(dst, src.data, src.bytes(), cudaMemcpyDeviceToHost, s()));
    synchronize();
  }
  void copy_from_host(const void* src, const Tensor& dst) override {
    if (dst.bytes() == 0) return;
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(dst.data, src, dst.bytes(), cudaMemcpyHostToDevice, s()));
    synchronize();
  }
  void copy(const Tensor& src, const Tensor& dst) override {
    SDMOE_ASSERT(src.bytes() == dst.bytes(), "copy size mismatch {} vs {} bytes", src.bytes(), dst.bytes());
    if (src.bytes() == 0) return;
    const bool host = src.device == Device::CPU || dst.device == Device::CPU;
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(dst.data, src.data, src.bytes(), host ? cudaMemcpyDefault : cudaMemcpyDeviceToDevice, s()));
    if (host) synchronize();
  }
  void copy_rows(const Tensor& src, int64_t src_stride, const Tensor& dst, int64_t dst_stride, int64_t rows,
                 int64_t row_elements) override {
    if (rows <= 0 || row_elements <= 0) return;
    check_copy_rows(src, src_stride, dst, dst_stride, rows, row_elements);
    const size_t width = dtype_size(src.dtype);
    // One 2-D copy instead of a memcpy per row (rows of an expert matrix's column slice).
    SDMOE_CHECK_CUDA(cudaMemcpy2DAsync(dst.data, size_t(dst_stride) * width, src.data, size_t(src_stride) * width,
                                       size_t(row_elements) * width, size_t(rows), cudaMemcpyDeviceToDevice, s()));
  }
  void synchronize() override { SDMOE_CHECK_CUDA(cudaStreamSynchronize(s())); }

  // ---- elementwise and reductions -----------------------------------------------------
  void fill(const Tensor& x, double value) override {
    if (x.dtype == DType::F64) unsupported("fill", x);
    launch_fill(x.data, x.dtype, x.numel(), value, s());
  }
  void scale(const Tensor& x, double alpha) override { launch_scale(f32(x, "scale"), x.numel(), float(alpha), s()); }
  void axpy(double alpha, const Tensor& x, const Tensor& y) override {
    SDMOE_ASSERT(x.numel() == y.numel(), "axpy size mismatch");
    launch_axpy(float(alpha), f32(x, "axpy"), f32(y, "axpy"), x.numel(), s());
  }
  double sum_squares(const Tensor& x) override {
    if (x.dtype != DType::F32 && x.dtype != DType::BF16) unsupported("sum_squares", x);
    const int64_t parts = sum_squares_partials(x.numel());
    Carver plan;
    plan.take<double>(parts);
    plan.take<double>(1);
    Carver c(workspace_.get(plan.used()));
    double* partials = c.take<double>(parts);
    double* result = c.take<double>(1);
    launch_sum_squares(x.data, x.dtype, x.numel(), partials, result, s());
    double host = 0.0;
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(&host, result, sizeof(double), cudaMemcpyDeviceToHost, s()));
    synchronize();
    return host;
  }
  std::vector<double> column_sums(const Tensor& x) override {
    const int64_t rows = x.rows(), cols = x.cols();
    std::vector<double> out(cols, 0.0);
    if (cols == 0) return out;
    Carver plan;
    plan.take<double>(column_partials(rows, cols));
    plan.take<double>(cols);
    Carver c(workspace_.get(plan.used()));
    double* partials = c.take<double>(column_partials(rows, cols));
    double* dev_out = c.take<double>(cols);
    launch_column_sums(f32(x, "column_sums"), rows, cols, partials, dev_out, s());
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(out.data(), dev_out, cols * sizeof(double), cudaMemcpyDeviceToHost, s()));
    synchronize();
    return out;
  }
  void cast(const Tensor& src, const Tensor& dst) override {
    SDMOE_ASSERT(src.numel() == dst.numel(), "cast size mismatch");
    launch_cast(src.data, src.dtype, dst.data, dst.dtype, src.numel(), s());
  }
  void init_normal(const Tensor& x, uint64_t seed, uint64_t stream, double std, int64_t index_offset) override {
    launch_init_normal(x.data, x.dtype, x.numel(), seed, stream, std, index_offset, s());
  }

  // ---- GEMM ---------------------------------------------------------------------------
  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const Tensor& a, const Tensor& b,
            double beta, const Tensor& c, const GemmBatch& batch) override {
    DType in = a.dtype;
    if (a.dtype == DType::BF16 || b.dtype == DType::BF16) {
      SDMOE_ASSERT(a.dtype == DType::BF16 && b.dtype == DType::BF16, "bf16 gemm on CUDA needs both A and B in bf16");
      SDMOE_ASSERT(c.dtype == DType::F32, "bf16 gemm needs an f32 output");
    } else {
      f32(a, "gemm");
      f32(b, "gemm");
      f32(c, "gemm");
    }
    SDMOE_ASSERT(batch.count >= 0, "gemm: negative batch count");
    if (m == 0 || n == 0 || batch.count == 0) return;
    const int64_t last = batch.count - 1;
    SDMOE_ASSERT(a.numel() >= last * batch.stride_a + m * k, "gemm: A has {} elements", a.numel());
    SDMOE_ASSERT(b.numel() >= last * batch.stride_b + k * n, "gemm: B has {} elements", b.numel());
    SDMOE_ASSERT(c.numel() >= last * batch.stride_c + m * n, "gemm: C has {} elements", c.numel());
    if (k == 0) {
      for (int64_t i = 0; i < batch.count; ++i) scale_output(c.ptr<float>() + i * batch.stride_c, m * n, beta);
      return;
    }
    gemm_raw(ta, tb, m, n, k, float(alpha), a.data, b.data, cuda_type(in), float(beta), c.data, batch.count,
             batch.stride_a, batch.stride_b, batch.stride_c);
  }

  void grouped_gemm(bool ta, bool tb, DType dtype, double alpha, std::span<const GemmGroup> groups,
                    double beta) override {
    if (dtype != DType::F32 && dtype != DType::BF16)
      SDMOE_FATAL("cuda", fmt::format("grouped_gemm: dtype {} is not supported on CUDA", dtype_name(dtype)));
    // The experts with rows go to cublasGemmGroupedBatchedEx as one call (one group of
    // one problem per expert, each with its own m); an expert with k == 0 (no rows in a
    // weight gradient) only scales its output. Operands are swapped as in gemm_raw.
    const cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    std::vector<const GemmGroup*> active;
    for (const GemmGroup& g : groups) {
      if (g.m == 0 || g.n == 0) continue;
      if (g.k == 0) scale_output(static_cast<float*>(g.c), g.m * g.n, beta);
      else active.push_back(&g);
    }
    if (active.empty()) return;
    const cudaDataType in_type = cuda_type(dtype);
    bool& grouped_supported = grouped_gemm_supported_[dtype == DType::BF16 ? 1 : 0];
    if (grouped_supported) {
      const size_t count = active.size();
      std::vector<cublasOperation_t> trans_first(count, op_b), trans_second(count, op_a);
      std::vector<int> ms(count), ns(count), ks(count), ld_first(count), ld_second(count), ldc(count), sizes(count, 1);
      std::vector<float> alphas(count, float(alpha)), betas(count, float(beta));
      std::vector<const void*> pointers(3 * count);  // [first operands | second operands | outputs]
      for (size_t i = 0; i < count; ++i) {
        const GemmGroup& g = *active[i];
        ms[i] = as_int(g.n, "grouped gemm n");
        ns[i] = as_int(g.m, "grouped gemm m");
        ks[i] = as_int(g.k, "grouped gemm k");
        ld_first[i] = tb ? ks[i] : ms[i];
        ld_second[i] = ta ? ns[i] : ks[i];
        ldc[i] = ms[i];
        pointers[i] = g.b;
        pointers[count + i] = g.a;
        pointers[2 * count + i] = g.c;
      }
      auto* device_pointers = static_cast<const void**>(workspace_.get(pointers.size() * sizeof(void*)));
      launch_write_pointers(pointers.data(), int64_t(pointers.size()), device_pointers, s());
      const cublasStatus_t status = cublasGemmGroupedBatchedEx(
          cublas_.get(), trans_first.data(), trans_second.data(), ms.data(), ns.data(), ks.data(), alphas.data(),
          device_pointers, in_type, ld_first.data(), device_pointers + count, in_type, ld_second.data(), betas.data(),
          reinterpret_cast<void* const*>(const_cast<void**>(device_pointers + 2 * count)), CUDA_R_32F,
          ldc.data(), as_int(int64_t(count), "grouped gemm groups"), sizes.data(), CUBLAS_COMPUTE_32F);
      if (status != CUBLAS_STATUS_NOT_SUPPORTED) {
        SDMOE_CHECK_CUBLAS(status);
        return;
      }
      // This cuBLAS or GPU lacks the grouped kernel (or this type combination): loop.
      grouped_supported = false;
    }
    for (const GemmGroup* g : active)
      gemm_raw(ta, tb, g->m, g->n, g->k, float(alpha), g->a, g->b, in_type, float(beta), g->c, 1, 0, 0, 0);
  }

  // ---- embedding, norm, activation ----------------------------------------------------
  void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) override {
    const int64_t tokens = ids.numel(), dim = table.cols();
    SDMOE_ASSERT(out.numel() == tokens * dim, "embedding_forward: out {} for {} tokens x {}", out.shape_string(),
                 tokens, dim);
    launch_embedding_forward(i32(ids, "embedding_forward"), storage(table, "embedding_forward"), table.dtype,
                             f32(out, "embedding_forward"), tokens, table.rows(), dim, s());
  }
  void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) override {
    const int64_t tokens = ids.numel(), dim = dtable.cols();
    SDMOE_ASSERT(dout.numel() == tokens * dim, "embedding_backward: dout {} for {} tokens x {}",
                 dout.shape_string(), tokens, dim);
    if (tokens == 0) return;
    const size_t bytes = embedding_backward_workspace(tokens);
    void* ws = workspace_.get(bytes);
    launch_embedding_backward(i32(ids, "embedding_backward"), f32(dout, "embedding_backward"),
                              f32(dtable, "embedding_backward"), tokens, dtable.rows(), dim, ws, bytes, s());
  }
  void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& y,
                       const Tensor& rstd) override {
    const int64_t rows = x.rows(), dim = x.cols();
    SDMOE_ASSERT(weight.numel() == dim && y.numel() == x.numel() && rstd.numel() == rows, "rmsnorm_forward shapes");
    launch_rmsnorm_forward(f32(x, "rmsnorm"), storage(weight, "rmsnorm"), weight.dtype, float(eps),
                           storage(y, "rmsnorm"), y.dtype, f32(rstd, "rmsnorm"), rows, dim, s());
  }
  void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy,
                        const Tensor& dx, const Tensor& dweight) override {
    const int64_t rows = x.rows(), dim = x.cols();
    SDMOE_ASSERT(weight.numel() == dim && dweight.numel() == dim && dy.numel() == x.numel() &&
                     dx.numel() == x.numel() && rstd.numel() == rows,
                 "rmsnorm_backward shapes");
    if (rows == 0 || dim == 0) return;
    double* partials = static_cast<double*>(workspace_.get(column_partials(rows, dim) * sizeof(double)));
    launch_rmsnorm_backward(f32(x, "rmsnorm"), storage(weight, "rmsnorm"), weight.dtype, f32(rstd, "rmsnorm"),
                            f32(dy, "rmsnorm"), f32(dx, "rmsnorm"), f32(dweight, "rmsnorm"), rows, dim, partials, s());
  }
  void swiglu_forward(const Tensor& gate_up, const Tensor& out) override {
    const int64_t rows = out.rows(), f = out.cols();
    SDMOE_ASSERT(gate_up.numel() == rows * 2 * f, "swiglu: gate_up must be [T,2F]");
    launch_swiglu_forward(f32(gate_up, "swiglu"), storage(out, "swiglu"), out.dtype, rows, f, s());
  }
  void swiglu_backward(const Tensor& gate_up, const Tensor& dout, const Tensor& dgate_up) override {
    const int64_t rows = dout.rows(), f = dout.cols();
    SDMOE_ASSERT(gate_up.numel() == rows * 2 * f && dgate_up.numel() == rows * 2 * f, "swiglu_backward shapes");
    launch_swiglu_backward(f32(gate_up, "swiglu"), f32(dout, "swiglu"), storage(dgate_up, "swiglu"), dgate_up.dtype,
                           rows, f, s());
  }

  // ---- attention ----------------------------------------------------------------------
  void split_qkv(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v) override {
    qkv_copy(qkv, q, k, v, true, "split_qkv");
  }
  void join_qkv(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dqkv) override {
    qkv_copy(dqkv, dq, dk, dv, false, "join_qkv");
  }
  void merge_heads(const Tensor& x_bhsd, const Tensor& y_bshd) override {
    SDMOE_ASSERT(x_bhsd.ndim == 4 && y_bshd.numel() == x_bhsd.numel(), "merge_heads shapes");
    void* heads[1] = {storage(x_bhsd, "merge_heads")};
    launch_heads_copy(storage(y_bshd, "merge_heads"), y_bshd.dtype, heads, x_bhsd.dtype, 1, x_bhsd.dim(0),
                      x_bhsd.dim(2), x_bhsd.dim(1), x_bhsd.dim(3), false, s());
  }
  void split_heads(const Tensor& y_bshd, const Tensor& x_bhsd) override {
    SDMOE_ASSERT(x_bhsd.ndim == 4 && y_bshd.numel() == x_bhsd.numel(), "split_heads shapes");
    void* heads[1] = {storage(x_bhsd, "split_heads")};
    launch_heads_copy(storage(y_bshd, "split_heads"), y_bshd.dtype, heads, x_bhsd.dtype, 1, x_bhsd.dim(0),
                      x_bhsd.dim(2), x_bhsd.dim(1), x_bhsd.dim(3), true, s());
  }
  void rope(const Tensor& x, double theta, int direction) override {
    SDMOE_ASSERT(x.ndim == 4, "rope: x must be [B,H,S,Dh], got {}", x.shape_string());
    launch_rope(storage(x, "rope"), x.dtype, x.dim(0) * x.dim(1), x.dim(2), x.dim(3), theta, direction, s());
  }
  void causal_softmax_forward(const Tensor& scores, double scale) override {
    SDMOE_ASSERT(scores.ndim == 3 && scores.dim(1) == scores.dim(2), "causal_softmax: scores must be [N,S,S]");
    launch_causal_softmax_forward(f32(scores, "causal_softmax"), scores.dim(0), scores.dim(1), float(scale), s());
  }
  void causal_softmax_backward(const Tensor& probs, const Tensor& grad, double scale) override {
    SDMOE_ASSERT(probs.ndim == 3 && probs.dim(1) == probs.dim(2) && grad.numel() == probs.numel(),
                 "causal_softmax_backward: tensors must be [N,S,S]");
    launch_causal_softmax_backward(storage(probs, "causal_softmax"), probs.dtype, f32(grad, "causal_softmax"),
                                   probs.dim(0), probs.dim(1), float(scale), s());
  }

  // ---- fused attention ----------------------------------------------------------------
  bool has_fused_attention() const override { return true; }
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& out,
                         const Tensor& lse) override {
    const auto [n, seq, dh] = attention_shape(q, k, v, "attention_forward");
    SDMOE_ASSERT(out.dtype == q.dtype && out.numel() == q.numel(), "attention_forward: out must be like q, got {} {}",
                 dtype_name(out.dtype), out.shape_string());
    SDMOE_ASSERT(lse.numel() == n * seq, "attention_forward: lse must be [N,S], got {}", lse.shape_string());
    launch_flash_attention_forward(q.data, k.data, v.data, out.data, f32(lse, "attention_forward"), q.dtype, n, seq, dh,
                                   float(scale), s());
  }
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
                          const Tensor& lse, double scale, const Tensor& dq, const Tensor& dk,
                          const Tensor& dv) override {
    const auto [n, seq, dh] = attention_shape(q, k, v, "attention_backward");
    for (const Tensor* t : {&out, &dout, &dq, &dk, &dv})
      SDMOE_ASSERT(t->numel() == q.numel(), "attention_backward: {} for q {}", t->shape_string(), q.shape_string());
    SDMOE_ASSERT(lse.numel() == n * seq, "attention_backward: lse must be [N,S], got {}", lse.shape_string());
    // The kernels read out and dout in q's dtype. The model may hand out in fp32 (its
    // context split into master-dtype heads): staged into q's dtype, which under BF16 is
    // exact, since that context was itself a bf16 operand.
    const size_t d_bytes = flash_attention_backward_workspace(n, seq, dh);
    const bool stage_out = out.dtype != q.dtype, stage_dout = dout.dtype != q.dtype;
    const size_t width = dtype_size(q.dtype);
    Carver plan;
    plan.take<char>(d_bytes);
    plan.take<char>(stage_out ? q.numel() * width : 0);
    plan.take<char>(stage_dout ? q.numel() * width : 0);
    Carver carve(workspace_.get(plan.used()));
    void* d_workspace = carve.take<char>(d_bytes);
    const void* out_data = out.data;
    const void* dout_data = dout.data;
    if (stage_out) {
      void* staged = carve.take<char>(q.numel() * width);
      launch_cast(out.data, out.dtype, staged, q.dtype, q.numel(), s());
      out_data = staged;
    }
    if (stage_dout) {
      void* staged = carve.take<char>(q.numel() * width);
      launch_cast(dout.data, dout.dtype, staged, q.dtype, q.numel(), s());
      dout_data = staged;
    }
    launch_flash_attention_backward(q.data, k.data, v.data, out_data, dout_data, f32(lse, "attention_backward"),
                                    q.dtype, n, seq, dh, float(scale), f32(dq, "attention_backward"),
                                    f32(dk, "attention_backward"), f32(dv, "attention_backward"), d_workspace, d_bytes,
                                    s());
  }

  // ---- loss ---------------------------------------------------------------------------
  void cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& losses,
                             const Tensor& lse) override {
    const int64_t rows = logits.rows(), vocab = logits.cols();
    SDMOE_ASSERT(targets.numel() == rows && losses.numel() == rows && lse.numel() == rows, "cross_entropy shapes");
    launch_cross_entropy_forward(f32(logits, "cross_entropy"), i32(targets, "cross_entropy"),
                                 f32(losses, "cross_entropy"), f32(lse, "cross_entropy"), rows, vocab, s());
  }
  void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                              double scale) override {
    const int64_t rows = logits.rows(), vocab = logits.cols();
    SDMOE_ASSERT(targets.numel() == rows && lse.numel() == rows, "cross_entropy_backward shapes");
    launch_cross_entropy_backward(f32(logits, "cross_entropy"), i32(targets, "cross_entropy"),
                                  f32(lse, "cross_entropy"), float(scale), rows, vocab, s());
  }

  // ---- MoE ----------------------------------------------------------------------------
  void router_forward(const Tensor& logits, RouterScore score, bool normalize_topk, const Tensor& topk_index,
                      const Tensor& topk_weight, const Tensor& aux_probs, const Tensor& lse) override {
    const int64_t tokens = logits.rows(), experts = logits.cols(), k = topk_index.cols();
    SDMOE_ASSERT(topk_index.numel() == tokens * k && topk_weight.numel() == tokens * k &&
                     aux_probs.numel() == tokens * experts && lse.numel() == tokens,
                 "router_forward shapes");
    launch_router_forward(f32(logits, "router"), score == RouterScore::SIGMOID, normalize_topk,
                          i32(topk_index, "router"), f32(topk_weight, "router"), f32(aux_probs, "router"),
                          f32(lse, "router"), tokens, experts, k, s());
  }
  void router_backward(const Tensor& logits, RouterScore score, bool normalize_topk, const Tensor& topk_index,
                       const Tensor& topk_weight, const Tensor& dtopk_weight, const Tensor& aux_grad_per_expert,
                       const Tensor& lse, double z_grad_scale, const Tensor& dlogits) override {
    const int64_t tokens = logits.rows(), experts = logits.cols(), k = topk_index.cols();
    SDMOE_ASSERT(topk_index.numel() == tokens * k && topk_weight.numel() == tokens * k &&
                     dtopk_weight.numel() == tokens * k && aux_grad_per_expert.numel() == experts &&
                     lse.numel() == tokens && dlogits.numel() == tokens * experts,
                 "router_backward shapes");
    launch_router_backward(f32(logits, "router"), score == RouterScore::SIGMOID, normalize_topk,
                           i32(topk_index, "router"), f32(topk_weight, "router"), f32(dtopk_weight, "router"),
                           f32(aux_grad_per_expert, "router"), f32(lse, "router"), z_grad_scale,
                           f32(dlogits, "router"), tokens, experts, k, s());
  }
  void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) override {
    const int64_t n = index.numel(), dim = src.cols();
    SDMOE_ASSERT(dst.numel() == n * dim, "gather_rows: dst {} for {} rows of {}", dst.shape_string(), n, dim);
    SDMOE_ASSERT(src.dtype == dst.dtype, "gather_rows: dtype mismatch {} vs {}", dtype_name(src.dtype),
                 dtype_name(dst.dtype));
    launch_gather_rows(storage(src, "gather_rows"), i32(index, "gather_rows"), storage(dst, "gather_rows"), src.dtype,
                       n, src.rows(), dim, s());
  }
  void combine_rows(const Tensor& rows, const Tensor& slot_row, const Tensor* slot_weight, double beta,
                    const Tensor& out) override {
    const int64_t tokens = out.rows(), dim = out.cols(), k = slot_row.cols();
    SDMOE_ASSERT(slot_row.numel() == tokens * k && rows.cols() == dim, "combine_rows shapes");
    SDMOE_ASSERT(!slot_weight || slot_weight->numel() == tokens * k, "combine_rows: slot_weight shape");
    launch_combine_rows(f32(rows, "combine_rows"), i32(slot_row, "combine_rows"),
                        slot_weight ? f32(*slot_weight, "combine_rows") : nullptr, beta, f32(out, "combine_rows"),
                        tokens, k, dim, rows.rows(), s());
  }
  void combine_rows_backward(const Tensor& dout, const Tensor& rows, const Tensor& slot_row,
                             const Tensor& slot_weight, const Tensor& drows, const Tensor& dweight) override {
    const int64_t tokens = dout.rows(), dim = dout.cols(), k = slot_row.cols();
    SDMOE_ASSERT(slot_row.numel() == tokens * k && slot_weight.numel() == tokens * k &&
                     dweight.numel() == tokens * k && rows.cols() == dim && drows.numel() == rows.numel(),
                 "combine_rows_backward shapes");
    launch_combine_rows_backward(f32(dout, "combine_rows"), f32(rows, "combine_rows"), i32(slot_row, "combine_rows"),
                                 f32(slot_weight, "combine_rows"), f32(drows, "combine_rows"),
                                 f32(dweight, "combine_rows"), tokens, k, dim, rows.rows(), s());
  }

  // ---- optimizer ----------------------------------------------------------------------
  void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                    const AdamWStep& st) override {
    const int64_t n = param.numel();
    SDMOE_ASSERT(grad.numel() == n && m.numel() == n && v.numel() == n, "adamw shapes");
    AdamWArgs a{st.lr, st.beta1, st.beta2, st.eps, st.weight_decay, st.bias_correction1, st.bias_correction2,
                st.grad_scale};
    launch_adamw(f32(param, "adamw"), f32(grad, "adamw"), f32(m, "adamw"), f32(v, "adamw"), n, a, s());
  }
  void sdmoe_part_step(const Tensor& w, const Tensor& g, const Tensor& m_c, const Tensor& v_c, const Tensor& g_common,
                       const Tensor& m_u, const Tensor& v_u, const Tensor& diff, const MatrixStack& stack,
                       const SdmoePartStep& st) override {
    const int64_t strided = stack.count == 0 ? 0 : (stack.count - 1) * stack.stride + stack.elements,
                  packed = stack.count * stack.elements;
    for (const Tensor* t : {&w, &g, &m_c, &v_c})
      SDMOE_ASSERT(t->numel() >= strided, "sdmoe_part_step: strided operand of {} elements, stack needs {}",
                   t->numel(), strided);
    for (const Tensor* t : {&g_common, &m_u, &v_u, &diff})
      SDMOE_ASSERT(t->numel() == packed, "sdmoe_part_step: packed operand of {} elements, stack has {}", t->numel(),
                   packed);
    const AdamWStep& d = st.adam;
    const SdmoePartArgs a{{d.lr, d.beta1, d.beta2, d.eps, d.weight_decay, d.bias_correction1, d.bias_correction2,
                           d.grad_scale},
                          st.lr_common, st.lr_unique, st.decay_shift, st.decay_common, st.sgd};
    const char* op = "sdmoe_part_step";
    launch_sdmoe_part_step(f32(w, op), f32(g, op), f32(m_c, op), f32(v_c, op), f32(g_common, op), f32(m_u, op),
                           f32(v_u, op), f32(diff, op), stack.count, stack.elements, stack.stride, a, s());
  }

  // ---- linear algebra -----------------------------------------------------------------
  void svd(const Tensor& a, const Tensor& u, const Tensor& sv, const Tensor& vt) override;
  void symmetric_eigen(const Tensor& a, const Tensor& w, const Tensor& vecs) override;
  void cholesky_inverse(const Tensor& gram, const Tensor& inv, double relative_ridge) override {
    SDMOE_ASSERT(gram.ndim >= 2 && gram.dim(gram.ndim - 1) == gram.dim(gram.ndim - 2) &&
                     inv.numel() == gram.numel() && inv.dtype == gram.dtype,
                 "cholesky_inverse: gram must be [..., k, k] and inv alike, got {} and {}", gram.shape_string(),
                 inv.shape_string());
    const int k = int(gram.dim(gram.ndim - 1));
    SDMOE_ASSERT(k >= 1 && k <= kMaxCholeskyOrder, "cholesky_inverse: k = {} outside [1, {}]", k, kMaxCholeskyOrder);
    launch_cholesky_inverse(gram.data, inv.data, gram.dtype, gram.numel() / (int64_t(k) * k), k, relative_ridge, s());
  }

 private:
  cudaStream_t s() const { return stream_.get(); }

  // C = beta * C (the k == 0 product); beta == 0 writes zeros even over NaN.
  void scale_output(float* c, int64_t count, double beta) {
    if (beta == 0.0) launch_fill(c, DType::F32, count, 0.0, s());
    else if (beta != 1.0) launch_scale(c, count, float(beta), s());
  }

  // Row-major C[m,n] = alpha op(A) op(B) + beta C, computed as the column-major product
  // C^T[n,m] = op(B)^T op(A)^T: row-major storage of X is column-major storage of X^T, so
  // B goes first with its own transpose flag, and each leading dimension is the row
  // length of the operand as stored.
  void gemm_raw(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a, const void* b,
                cudaDataType in_type, float beta, void* c, int64_t count, int64_t stride_a, int64_t stride_b,
                int64_t stride_c) {
    const int im = as_int(m, "gemm m"), in = as_int(n, "gemm n"), ik = as_int(k, "gemm k");
    if (in_type == CUDA_R_16BF &&
        lt_->run(LtProblem{ta, tb, m, n, k, count, stride_a, stride_b, stride_c}, alpha, a, b, beta, c))
      return;
    const int lda = ta ? im : ik, ldb = tb ? ik : in, ldc = in;
    const cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (count == 1) {
      SDMOE_CHECK_CUBLAS(cublasGemmEx(cublas_.get(), op_b, op_a, in, im, ik, &alpha, b, in_type, ldb, a, in_type, lda,
                                      &beta, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
      SDMOE_CHECK_CUBLAS(cublasGemmStridedBatchedEx(cublas_.get(), op_b, op_a, in, im, ik, &alpha, b, in_type, ldb,
                                                    stride_b, a, in_type, lda, stride_a, &beta, c, CUDA_R_32F, ldc,
                                                    stride_c, as_int(count, "gemm batch"), CUBLAS_COMPUTE_32F,
                                                    CUBLAS_GEMM_DEFAULT));
    }
  }

  // [N,S,Dh] of q, k and v alike, in F32 or BF16, with a head dim the kernels take.
  std::tuple<int64_t, int64_t, int64_t> attention_shape(const Tensor& q, const Tensor& k, const Tensor& v,
                                                        const char* op) {
    SDMOE_ASSERT(q.ndim == 3, "{}: q must be [N,S,Dh], got {}", op, q.shape_string());
    storage(q, op);
    for (const Tensor* t : {&k, &v})
      SDMOE_ASSERT(t->dtype == q.dtype && t->numel() == q.numel(), "{}: k and v must be like q", op);
    const int64_t dh = q.dim(2);
    if (dh < 1 || dh > kFlashMaxHeadDim)
      fail("{}: head dim {} is outside the CUDA fused attention's 1..{}; use training.attention UNFUSED", op, dh,
           kFlashMaxHeadDim);
    return {q.dim(0), q.dim(1), dh};
  }

  void qkv_copy(const Tensor& packed, const Tensor& q, const Tensor& k, const Tensor& v, bool to_heads,
                const char* op) {
    SDMOE_ASSERT(q.ndim == 4, "{}: q must be [B,H,S,Dh], got {}", op, q.shape_string());
    SDMOE_ASSERT(k.numel() == q.numel() && v.numel() == q.numel() && packed.numel() == 3 * q.numel(),
                 "{}: shape mismatch", op);
    SDMOE_ASSERT(k.dtype == q.dtype && v.dtype == q.dtype, "{}: q, k and v differ in dtype", op);
    void* heads[3] = {storage(q, op), storage(k, op), storage(v, op)};
    launch_heads_copy(storage(packed, op), packed.dtype, heads, q.dtype, 3, q.dim(0), q.dim(2), q.dim(1), q.dim(3),
                      to_heads, s());
  }

  void check_info(const int* dev_info, const char* routine) {
    int info = 0;
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(&info, dev_info, sizeof(int), cudaMemcpyDeviceToHost, s()));
    synchronize();
    if (info != 0) SDMOE_FATAL("cuSOLVER", fmt::format("{} returned info={}", routine, info));
  }

  double measure_bf16_gemm_peak();

  int device_;
  cudaDeviceProp props_{};
  double peak_flops_ = 0.0, nominal_peak_flops_ = 0.0, nominal_bf16_flops_ = 0.0, peak_bf16_flops_ = 0.0;
  // Declaration order is teardown order in reverse: the stream outlives the handles.
  StreamHandle stream_;
  CublasHandle cublas_;
  CusolverHandle cusolver_;
  CusolverParamsHandle cusolver_params_;
  Workspace workspace_;
  std::unique_ptr<LtGemm> lt_;  // bf16 GEMMs; declared after the stream it enqueues on
  // Per input dtype (F32, BF16): false once cuBLAS answered NOT_SUPPORTED for the grouped
  // GEMM, which then runs as one GEMM per expert.
  bool grouped_gemm_supported_[2] = {true, true};
};

double CudaBackend::measure_bf16_gemm_peak() {
  constexpr int64_t n = 8192;  // 1.1 TFLOP a product: about 1.5 ms at the H100's rate
  DeviceMemory a = make_device_memory(size_t(n) * n * 2), b = make_device_memory(size_t(n) * n * 2),
               c = make_device_memory(size_t(n) * n * 4);
  launch_fill(a.get(), DType::BF16, n * n, 0.01, s());
  launch_fill(b.get(), DType::BF16, n * n, 0.01, s());
  EventHandle start = make_event(true), stop = make_event(true);
  const LtProblem problem{false, true, n, n, n};
  double best = 0.0;
  for (int rep = 0; rep < 4; ++rep) {  // the first warms up clocks and the plan cache
    SDMOE_CHECK_CUDA(cudaEventRecord(start.get(), s()));
    SDMOE_ASSERT(lt_->run(problem, 1.0f, a.get(), b.get(), 0.0f, c.get()), "cuBLASLt has no bf16 {}^3 GEMM", n);
    SDMOE_CHECK_CUDA(cudaEventRecord(stop.get(), s()));
    SDMOE_CHECK_CUDA(cudaEventSynchronize(stop.get()));
    float ms = 0.f;
    SDMOE_CHECK_CUDA(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    if (rep > 0) best = std::max(best, 2.0 * double(n) * n * n / (double(ms) * 1e-3));
  }
  synchronize();
  return best;
}

// Thin SVD of row-major a [M,N]. cusolverDnSgesvd is column-major and needs rows >= cols.
//   M <= N: the row-major bytes of A are the column-major X = A^T [N,M], which has
//     N >= M rows. X = Ux S Vx^T gives A = Vx S Ux^T, and the layouts line up with no copy:
//     Ux [N,M] column-major is row-major Ux^T [M,N] = vt, and Vx^T [M,M] column-major is
//     row-major Vx [M,M] = u. So gesvd writes U into vt and VT into u.
//   M > N: factor Y = A as column-major [M,N] (an explicit transpose), then transpose its
//     U [M,N] and VT [N,N] back to row-major.
void CudaBackend::svd(const Tensor& a, const Tensor& u, const Tensor& sv, const Tensor& vt) {
  SDMOE_ASSERT(a.ndim == 2, "svd: a must be [M,N], got {}", a.shape_string());
  const int64_t m = a.dim(0), n = a.dim(1), r = std::min(m, n);
  SDMOE_ASSERT(u.numel() == m * r && sv.numel() == r && vt.numel() == r * n, "svd output shapes");
  const float* pa = f32(a, "svd");
  float *pu = f32(u, "svd"), *ps = f32(sv, "svd"), *pvt = f32(vt, "svd");
  if (r == 0) return;
  const bool tall = m > n;
  const int rows = as_int(tall ? m : n, "svd rows"), cols = as_int(tall ? n : m, "svd cols");  // rows >= cols
  int lwork = 0;
  SDMOE_CHECK_CUSOLVER(cusolverDnSgesvd_bufferSize(cusolver_.get(), rows, cols, &lwork));
  auto plan = [&](Carver& c) {
    struct {
      float *x, *u, *vt, *work, *rwork;
      int* info;
    } p{};
    p.x = c.take<float>(size_t(m) * n);
    p.u = c.take<float>(tall ? size_t(m) * n : 0);
    p.vt = c.take<float>(tall ? size_t(n) * n : 0);
    p.work = c.take<float>(lwork);
    p.rwork = c.take<float>(r);
    p.info = c.take<int>(1);
    return p;
  };
  Carver sizing;
  plan(sizing);
  Carver carve(workspace_.get(sizing.used()));
  auto p = plan(carve);
  if (tall) {
    launch_transpose(pa, p.x, m, n, s());  // column-major [M,N]
    SDMOE_CHECK_CUSOLVER(cusolverDnSgesvd(cusolver_.get(), 'S', 'S', rows, cols, p.x, rows, ps, p.u, rows, p.vt, cols,
                                          p.work, lwork, p.rwork, p.info));
    check_info(p.info, "cusolverDnSgesvd");
    launch_transpose(p.u, pu, n, m, s());   // column-major [M,N] seen as row-major [N,M] -> row-major [M,N]
    launch_transpose(p.vt, pvt, n, n, s());
  } else {
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(p.x, pa, a.bytes(), cudaMemcpyDeviceToDevice, s()));  // gesvd destroys it
    SDMOE_CHECK_CUSOLVER(cusolverDnSgesvd(cusolver_.get(), 'S', 'S', rows, cols, p.x, rows, ps, pvt, rows, pu, cols,
                                          p.work, lwork, p.rwork, p.info));
    check_info(p.info, "cusolverDnSgesvd");
  }
}

// Row-major symmetric a is the same matrix column-major; syevd leaves the eigenvectors as
// columns (column-major), which are the rows of vecs in row-major.
void CudaBackend::symmetric_eigen(const Tensor& a, const Tensor& w, const Tensor& vecs) {
  SDMOE_ASSERT((a.ndim == 2 || a.ndim == 3) && a.dim(a.ndim - 1) == a.dim(a.ndim - 2),
               "symmetric_eigen: a must be [N,N] or [B,N,N], got {}", a.shape_string());
  const int64_t n = a.dim(a.ndim - 1), batch = a.ndim == 3 ? a.dim(0) : 1;
  SDMOE_ASSERT(w.numel() == batch * n && vecs.numel() == batch * n * n, "symmetric_eigen output shapes");
  const float* pa = f32(a, "symmetric_eigen");
  float *pw = f32(w, "symmetric_eigen"), *pv = f32(vecs, "symmetric_eigen");
  if (n == 0 || batch == 0) return;
  const int in = as_int(n, "symmetric_eigen n");
  if (pv != pa) SDMOE_CHECK_CUDA(cudaMemcpyAsync(pv, pa, a.bytes(), cudaMemcpyDeviceToDevice, s()));
  if (batch > 1) {
    // One call for the batch: on the SD-MoE expert shapes (n = 768, 8 matrices) it was a
    // little faster than eight syevd calls on an H100, and it synchronises once.
    size_t device_bytes = 0, host_bytes = 0;
    SDMOE_CHECK_CUSOLVER(cusolverDnXsyevBatched_bufferSize(
        cusolver_.get(), cusolver_params_.get(), CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n, CUDA_R_32F, pv, n,
        CUDA_R_32F, pw, CUDA_R_32F, &device_bytes, &host_bytes, batch));
    Carver sizing;
    sizing.take<char>(device_bytes);
    sizing.take<int>(batch);
    Carver carve(workspace_.get(sizing.used()));
    void* device_work = carve.take<char>(device_bytes);
    int* info = carve.take<int>(batch);
    std::vector<char> host_work(std::max<size_t>(host_bytes, 1));
    SDMOE_CHECK_CUSOLVER(cusolverDnXsyevBatched(cusolver_.get(), cusolver_params_.get(), CUSOLVER_EIG_MODE_VECTOR,
                                                CUBLAS_FILL_MODE_UPPER, n, CUDA_R_32F, pv, n, CUDA_R_32F, pw,
                                                CUDA_R_32F, device_work, device_bytes, host_work.data(), host_bytes,
                                                info, batch));
    std::vector<int> infos(size_t(batch), 0);
    SDMOE_CHECK_CUDA(cudaMemcpyAsync(infos.data(), info, batch * sizeof(int), cudaMemcpyDeviceToHost, s()));
    synchronize();  // also keeps host_work alive until the solver is done with it
    for (int64_t b = 0; b < batch; ++b)
      if (infos[b] != 0) SDMOE_FATAL("cuSOLVER", fmt::format("cusolverDnXsyevBatched matrix {}: info={}", b, infos[b]));
    return;
  }
  int lwork = 0;
  SDMOE_CHECK_CUSOLVER(cusolverDnSsyevd_bufferSize(cusolver_.get(), CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER,
                                                   in, pv, in, pw, &lwork));
  Carver sizing;
  sizing.take<float>(lwork);
  sizing.take<int>(1);
  Carver carve(workspace_.get(sizing.used()));
  float* work = carve.take<float>(lwork);
  int* info = carve.take<int>(1);
  SDMOE_CHECK_CUSOLVER(cusolverDnSsyevd(cusolver_.get(), CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, in, pv, in,
                                        pw, work, lwork, info));
  check_info(info, "cusolverDnSsyevd");
}

}  // namespace

bool cuda_backend_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the error, report none
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> make_cuda_backend(int device_ordinal) {
  const int count = cuda_device_count();
  if (device_ordinal < 0 || device_ordinal >= count)
    fail("CUDA device {} requested but {} device(s) are visible", device_ordinal, count);
  return std::make_unique<CudaBackend>(device_ordinal);
}

}  // namespace sdmoe
