// CPU backend: OpenBLAS GEMM, OpenMP kernels, LAPACK (gesdd/syevd). F32 and F64.
#pragma once
#include "core/backend.h"

namespace sdmoe {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads);
  Device device() const override { return Device::CPU; }
  std::string name() const override;
  double peak_flops() override;
  double peak_bf16_flops() override;
  int threads() const { return threads_; }
  void bind_to_current_thread() override;

  void* allocate(size_t bytes) override;
  void deallocate(void* ptr) override;
  void copy_to_host(const Tensor& src, void* dst) override;
  void copy_from_host(const void* src, const Tensor& dst) override;
  void copy(const Tensor& src, const Tensor& dst) override;
  void copy_rows(const Tensor& src, int64_t src_stride, const Tensor& dst, int64_t dst_stride, int64_t rows,
                 int64_t row_elements) override;
  void synchronize() override {}

  void fill(const Tensor& x, double value) override;
  void scale(const Tensor& x, double alpha) override;
  void axpy(double alpha, const Tensor& x, const Tensor& y) override;
  double sum_squares(const Tensor& x) override;
  std::vector<double> column_sums(const Tensor& x) override;
  void cast(const Tensor& src, const Tensor& dst) override;
  void init_normal(const Tensor& x, uint64_t seed, uint64_t stream, double std, int64_t index_offset) override;

  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const Tensor& a,
            const Tensor& b, double beta, const Tensor& c, const GemmBatch& batch) override;
  void grouped_gemm(bool trans_a, bool trans_b, DType dtype, double alpha, std::span<const GemmGroup> groups,
                    double beta) override;

  void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) override;
  void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) override;
  void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd) override;
  void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy,
                        const Tensor& dx, const Tensor& dweight) override;
  void swiglu_forward(const Tensor& gate_up, const Tensor& out) override;
  void swiglu_backward(const Tensor& gate_up, const Tensor& dout, const Tensor& dgate_up) override;

  void split_qkv(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v) override;
  void join_qkv(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dqkv) override;
  void merge_heads(const Tensor& x_bhsd, const Tensor& y_bshd) override;
  void split_heads(const Tensor& y_bshd, const Tensor& x_bhsd) override;
  void rope(const Tensor& x, double theta, int direction) override;
  void causal_softmax_forward(const Tensor& scores, double scale) override;
  void causal_softmax_backward(const Tensor& probs, const Tensor& grad, double scale) override;

  bool has_fused_attention() const override { return true; }
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& out,
                         const Tensor& lse) override;
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
                          const Tensor& lse, double scale, const Tensor& dq, const Tensor& dk,
                          const Tensor& dv) override;

  void cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& losses,
                             const Tensor& lse) override;
  void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, double scale) override;

  void router_forward(const Tensor& logits, RouterScore score, bool normalize_topk, const Tensor& topk_index,
                      const Tensor& topk_weight, const Tensor& aux_probs, const Tensor& lse) override;
  void router_backward(const Tensor& logits, RouterScore score, bool normalize_topk, const Tensor& topk_index,
                       const Tensor& topk_weight, const Tensor& dtopk_weight, const Tensor& aux_grad_per_expert,
                       const Tensor& lse, double z_grad_scale, const Tensor& dlogits) override;
  void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) override;
  void combine_rows(const Tensor& rows, const Tensor& slot_row, const Tensor* slot_weight, double beta,
                    const Tensor& out) override;
  void combine_rows_backward(const Tensor& dout, const Tensor& rows, const Tensor& slot_row,
                             const Tensor& slot_weight, const Tensor& drows, const Tensor& dweight) override;

  void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                    const AdamWStep& step) override;
  void sdmoe_part_step(const Tensor& w, const Tensor& g, const Tensor& m_c, const Tensor& v_c, const Tensor& g_common,
                       const Tensor& m_u, const Tensor& v_u, const Tensor& diff, const MatrixStack& stack,
                       const SdmoePartStep& step) override;

  void svd(const Tensor& a, const Tensor& u, const Tensor& s, const Tensor& vt) override;
  void symmetric_eigen(const Tensor& a, const Tensor& w, const Tensor& vecs) override;
  void cholesky_inverse(const Tensor& gram, const Tensor& inv, double relative_ridge) override;

 private:
  int threads_;
  double peak_flops_ = 0.0, peak_bf16_flops_ = 0.0;
};

// Measured fp32 FMA peak of this process's cores (FLOP/s), with the widest vector unit
// the CPU supports. threads <= 0: one per available core.
double measure_cpu_fma_peak(int threads);
// The method of every measured peak: `threads` threads (<= 0: OpenMP's default) each run
// loop(iters), independent instruction chains whose result stays observable; the best of
// three repetitions, as FLOP/s given the loop's FLOP per iteration.
double measure_loop_peak(int threads, int64_t iters, double flops_per_iteration, float (*loop)(int64_t));
// How GEMMs on bf16 operands run in this process (core/cpu/bf16_gemm_path.cc), chosen once:
// AMX tiles where the CPU and OS offer them; else AVX512_BF16 vdpbf16ps where it beats the
// fp32 FMA rate; else the operands widened to fp32 for the fp32 kernel. The environment
// variable SDMOE_CPU_BF16_GEMM=amx|avx512_bf16|widen forces one (a diagnostic switch, like
// oneDNN's ONEDNN_MAX_CPU_ISA); a bad value or an unavailable path throws sdmoe::Error.
enum class Bf16GemmPath { AMX, AVX512_BF16, WIDEN };
Bf16GemmPath cpu_bf16_gemm_path();
// Why that path, in words for the start-up line.
std::string cpu_bf16_gemm_reason();
const char* bf16_gemm_path_name(Bf16GemmPath path);
// Measured peak FLOP/s of a path's instruction on `threads` threads (the fp32 FMA peak for
// WIDEN): the denominator of BF16 utilisation figures.
double measure_cpu_bf16_gemm_peak(Bf16GemmPath path, int threads);
// Cores this process may run on (its affinity mask).
int cpu_cores_available();
// OpenBLAS kernel family in use ("Cooperlake", "Haswell", ...).
std::string openblas_core_name();

}  // namespace sdmoe
