// The backend interface: every op the model needs, implemented once for CPU (OpenBLAS,
// OpenMP, LAPACK) and once for CUDA (cuBLAS, own kernels, cuSOLVER). The CPU backend is
// the oracle: tests compare every CUDA op against it, and the CPU backend also accepts F64
// so that backward passes can be checked against finite differences in double precision.
//
// Conventions for every op:
//   - Row-major tensors; shapes are given as comments with a legend:
//       T tokens (= B*S), B batch, S sequence, H heads, Dh head dim, D model dim,
//       F ffn dim, V vocabulary, E experts, K top-k, N routed rows (= T*K).
//   - Activation gradients are assigned (=). Parameter gradients accumulate (+=), so
//     micro-batches accumulate into one gradient buffer without extra adds.
//   - Ops run in stream order on their device; only functions returning host values
//     (sum_squares, column_sums, copy_to_host) synchronise.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace sdmoe {

// Strided batch of GEMMs with identical shapes (attention over B*H heads).
struct GemmBatch {
  int64_t count = 1;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;  // in elements
};

// One member of a grouped GEMM: packed row-major operands; op(A) is [m,k], op(B) [k,n].
// Groups may have m, n or k equal to zero (an expert that received no tokens).
struct GemmGroup {
  const void* a;
  const void* b;
  void* c;
  int64_t m, n, k;
};

enum class RouterScore : uint8_t { SOFTMAX, SIGMOID };

struct AdamWStep {
  double lr;
  double beta1, beta2, eps;
  double weight_decay;       // decoupled: p -= lr * wd * p
  double bias_correction1;   // 1 - beta1^t
  double bias_correction2;   // 1 - beta2^t
  double grad_scale;         // applied to the gradient first (clipping, averaging)
};

// SD-MoE's two-part optimizer step on one matrix (docs/sdmoe.md); `adam` gives betas, eps,
// bias corrections and grad_scale (its lr and weight_decay are unused).
struct SdmoePartStep {
  AdamWStep adam;
  double lr_common, lr_unique;
  double decay_shift;   // (lr_common - lr_unique) x weight decay
  double decay_common;  // lr_common x weight decay
  bool sgd;             // plain SGD: no moments
};

// `count` matrices of `elements` elements each, the first at element 0 of a flat tensor
// and the next `stride` elements further (the experts' slices of a stacked parameter).
struct MatrixStack {
  int64_t count = 1, elements = 0, stride = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // Peak dense fp32 FLOP/s of the device, used for the "% of peak" figures, measured once
  // with an FMA loop (CPU cores or GPU SMs).
  virtual double peak_flops() = 0;
  // Peak FLOP/s of the device's bf16 GEMM path, the denominator of BF16 figures: on CPU the
  // measured vdpbf16ps rate (or the fp32 peak where bf16 GEMMs widen to fp32); 0 where no
  // measurement exists yet (CUDA).
  virtual double peak_bf16_flops() { return 0.0; }
  // The stream every op of this backend is ordered on (a cudaStream_t on CUDA), so that a
  // device communicator can enqueue its collectives in the same order; null on CPU.
  virtual void* native_stream() { return nullptr; }
  // Device ordinal of a GPU backend, -1 on CPU.
  virtual int device_ordinal() const { return -1; }
  // Makes the calling thread ready to run this backend's ops (a worker thread: the GPU
  // made current; on CPU the OpenMP team size, which is per thread).
  virtual void bind_to_current_thread() {}

  // ---- memory -------------------------------------------------------------------------
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* ptr) = 0;
  virtual void copy_to_host(const Tensor& src, void* dst) = 0;
  virtual void copy_from_host(const void* src, const Tensor& dst) = 0;
  virtual void copy(const Tensor& src, const Tensor& dst) = 0;
  // `rows` runs of `row_elements` elements: run i from src element i * src_stride to dst
  // element i * dst_stride (a 2-D block between matrices of other widths: slices of
  // expert matrices and bases). Both on this backend's device, of one dtype.
  virtual void copy_rows(const Tensor& src, int64_t src_stride, const Tensor& dst, int64_t dst_stride, int64_t rows,
                         int64_t row_elements) = 0;
  // What both backends' copy_rows check first: one dtype, and every run inside its tensor.
  static void check_copy_rows(const Tensor& src, int64_t src_stride, const Tensor& dst, int64_t dst_stride,
                              int64_t rows, int64_t row_elements);
  virtual void synchronize() = 0;

  // ---- elementwise and reductions -----------------------------------------------------
  virtual void fill(const Tensor& x, double value) = 0;
  virtual void scale(const Tensor& x, double alpha) = 0;
  virtual void axpy(double alpha, const Tensor& x, const Tensor& y) = 0;  // y += alpha x
  virtual double sum_squares(const Tensor& x) = 0;
  virtual std::vector<double> column_sums(const Tensor& x) = 0;        // x [R,C] -> C sums
  virtual void cast(const Tensor& src, const Tensor& dst) = 0;         // any float dtypes
  // x[i] = std * N(0,1)(seed, stream, index_offset + i): the logical element index, so a
  // shard initialises exactly like the same range of the whole tensor.
  virtual void init_normal(const Tensor& x, uint64_t seed, uint64_t stream, double std,
                           int64_t index_offset) = 0;

  // ---- GEMM ---------------------------------------------------------------------------
  // C[m,n] = alpha * op(A) op(B) + beta * C with packed operands. A and B may be BF16
  // with C F32 (fp32 accumulation); otherwise all three share one dtype.
  virtual void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                    const Tensor& a, const Tensor& b, double beta, const Tensor& c,
                    const GemmBatch& batch = {}) = 0;
  // Many GEMMs of different shapes with one call (the experts of an MoE layer).
  virtual void grouped_gemm(bool trans_a, bool trans_b, DType dtype, double alpha,
                            std::span<const GemmGroup> groups, double beta) = 0;

  // ---- embedding, norm, activation ----------------------------------------------------
  // A negative id is a token whose row lives on another rank (a vocabulary-parallel
  // table): its output row is zero and it adds no gradient.
  virtual void embedding_forward(const Tensor& ids /*I32 [T]*/, const Tensor& table /*[V,D]*/,
                                 const Tensor& out /*[T,D]*/) = 0;
  virtual void embedding_backward(const Tensor& ids /*[T]*/, const Tensor& dout /*[T,D]*/,
                                  const Tensor& dtable /*[V,D] +=*/) = 0;
  virtual void rmsnorm_forward(const Tensor& x /*[T,D]*/, const Tensor& weight /*[D]*/, double eps,
                               const Tensor& y /*[T,D]*/, const Tensor& rstd /*[T]*/) = 0;
  virtual void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd,
                                const Tensor& dy, const Tensor& dx /*=*/,
                                const Tensor& dweight /*+=*/) = 0;
  virtual void swiglu_forward(const Tensor& gate_up /*[T,2F]: gate | up*/,
                              const Tensor& out /*[T,F]*/) = 0;
  virtual void swiglu_backward(const Tensor& gate_up, const Tensor& dout,
                               const Tensor& dgate_up /*=*/) = 0;

  // ---- attention ----------------------------------------------------------------------
  // qkv [B,S,3,H,Dh] -> q, k, v [B,H,S,Dh]; join_qkv is its adjoint.
  virtual void split_qkv(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v) = 0;
  virtual void join_qkv(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dqkv) = 0;
  // [B,H,S,Dh] <-> [B,S,H,Dh]
  virtual void merge_heads(const Tensor& x_bhsd, const Tensor& y_bshd) = 0;
  virtual void split_heads(const Tensor& y_bshd, const Tensor& x_bhsd) = 0;
  // Rotary embedding in place on x [B,H,S,Dh], rotating pairs (i, i + Dh/2) by
  // position * theta^(-2i/Dh). direction = -1 applies the inverse rotation (the backward).
  virtual void rope(const Tensor& x, double theta, int direction) = 0;
  // scores [N,S,S] -> probabilities of softmax(scale * scores) over keys j <= i, in place;
  // masked entries become 0.
  virtual void causal_softmax_forward(const Tensor& scores, double scale) = 0;
  // grad [N,S,S]: in dP, out d(scores) = scale * P * (dP - sum_j P dP).
  virtual void causal_softmax_backward(const Tensor& probs, const Tensor& grad, double scale) = 0;

  // ---- fused attention (FlashAttention-2) ------------------------------------------------
  // Causal attention without the [S,S] probabilities: q, k, v, out [N,S,Dh] (N = B*H
  // heads, one storage dtype), lse [N,S] the rows' log-sum-exp of scale * q k^T over keys
  // j <= i (F64 for F64 inputs, else F32). The backward recomputes the probabilities from
  // lse tile by tile; out and dout may be any float dtype, dq, dk, dv (assigned) are F64 for
  // F64 inputs, else F32. A backend without it says so (has_fused_attention) and throws.
  virtual bool has_fused_attention() const { return false; }
  virtual void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& out,
                                 const Tensor& lse);
  virtual void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                  const Tensor& dout, const Tensor& lse, double scale, const Tensor& dq,
                                  const Tensor& dk, const Tensor& dv);

  // ---- loss ---------------------------------------------------------------------------
  // Per-token loss and log-sum-exp. A target of kTargetOnOtherShard is a class outside
  // these logits (a vocabulary-parallel shard): loss = lse, and the gradient is the
  // softmax alone. Other negative targets are ignored (loss 0, gradient 0).
  static constexpr int32_t kTargetOnOtherShard = -2;
  virtual void cross_entropy_forward(const Tensor& logits /*[T,V]*/, const Tensor& targets /*I32 [T]*/,
                                     const Tensor& losses /*[T]*/, const Tensor& lse /*[T]*/) = 0;
  // logits are overwritten with scale * (softmax(logits) - onehot(target)), the softmax
  // normalised by the given lse (for a vocabulary-parallel shard: the whole row's).
  virtual void cross_entropy_backward(const Tensor& logits, const Tensor& targets,
                                      const Tensor& lse, double scale) = 0;

  // ---- MoE ----------------------------------------------------------------------------
  // logits [T,E] -> top-k experts per token (ties to the lower index) and their weights,
  // normalised over the k chosen when normalize_topk. aux_probs [T,E] are the per-token
  // expert probabilities the load-balancing loss uses (softmax, or sigmoid scores divided
  // by their row sum); lse [T] is logsumexp(logits) for the z-loss.
  virtual void router_forward(const Tensor& logits, RouterScore score, bool normalize_topk,
                              const Tensor& topk_index /*I32 [T,K]*/, const Tensor& topk_weight /*[T,K]*/,
                              const Tensor& aux_probs /*[T,E]*/, const Tensor& lse /*[T]*/) = 0;
  // d logits from: d topk_weight [T,K]; the aux loss, through aux_grad_per_expert [E]
  // (= d loss / d aux_probs[t,e], the same for every token); the z-loss with
  // d loss / d lse[t] = z_grad_scale * lse[t].
  virtual void router_backward(const Tensor& logits, RouterScore score, bool normalize_topk,
                               const Tensor& topk_index, const Tensor& topk_weight,
                               const Tensor& dtopk_weight, const Tensor& aux_grad_per_expert /*[E]*/,
                               const Tensor& lse, double z_grad_scale,
                               const Tensor& dlogits /*[T,E] =*/) = 0;
  // dst[i] = src[index[i]]
  virtual void gather_rows(const Tensor& src /*[T,D]*/, const Tensor& index /*I32 [N]*/,
                           const Tensor& dst /*[N,D]*/) = 0;
  // out[t] = beta * out[t] + sum_j rows[slot_row[t,j]] * (weight ? weight[t,j] : 1).
  // Written as a gather over each token's slots, so results are deterministic.
  virtual void combine_rows(const Tensor& rows /*[N,D]*/, const Tensor& slot_row /*I32 [T,K]*/,
                            const Tensor* slot_weight /*[T,K] or null*/, double beta,
                            const Tensor& out /*[T,D]*/) = 0;
  // Adjoint of combine_rows with weights: drows[slot_row[t,j]] = weight[t,j] * dout[t] and
  // dweight[t,j] = <dout[t], rows[slot_row[t,j]]>.
  virtual void combine_rows_backward(const Tensor& dout, const Tensor& rows, const Tensor& slot_row,
                                     const Tensor& slot_weight, const Tensor& drows /*=*/,
                                     const Tensor& dweight /*=*/) = 0;

  // ---- optimizer ----------------------------------------------------------------------
  virtual void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m,
                            const Tensor& v, const AdamWStep& step) = 0;

  // Elementwise over a stack of expert matrices, with g_unique = g - g_common:
  //   a_c = -lr_common x AdamW direction of g_common with moments (m_c, v_c),
  //   a_u = -lr_unique x AdamW direction of g_unique with moments (m_u, v_u)
  //   (sgd: a = -lr x grad_scale x g_part, moments untouched);
  //   diff = a_u - a_c + decay_shift x w, then w <- (1 - decay_common) x w + a_c + diff.
  // w, g, m_c and v_c hold the stack at its stride; g_common, m_u, v_u and diff are
  // contiguous [count, elements]. The caller then subtracts the common projection of diff
  // from w, which leaves each part's update projected into its own subspace.
  virtual void sdmoe_part_step(const Tensor& w, const Tensor& g, const Tensor& m_c, const Tensor& v_c,
                               const Tensor& g_common, const Tensor& m_u, const Tensor& v_u, const Tensor& diff,
                               const MatrixStack& stack, const SdmoePartStep& step) = 0;

  // ---- linear algebra -----------------------------------------------------------------
  // Thin SVD a [M,N] = u [M,R] diag(s [R]) vt [R,N], R = min(M,N), singular values
  // descending. a is not modified.
  virtual void svd(const Tensor& a, const Tensor& u, const Tensor& s, const Tensor& vt) = 0;
  // Symmetric eigendecomposition of a [N,N], or of each of a batch a [B,N,N]: eigenvalues
  // ascending in w [N] ([B,N]), eigenvectors as the rows of vecs [N,N] ([B,N,N]).
  virtual void symmetric_eigen(const Tensor& a, const Tensor& w, const Tensor& vecs) = 0;
  // For each k x k matrix of gram [..., k, k] (symmetric, positive semi-definite):
  // inv = L^{-1}, lower triangular, with L L^T = gram + ridge I and ridge =
  // relative_ridge x trace(gram) (a zero matrix stays finite). Computed in double; the
  // small step of a batched CholeskyQR that keeps the rows of thin bases orthonormal
  // without a trip to the host. k <= kMaxCholeskyOrder.
  static constexpr int kMaxCholeskyOrder = 128;
  virtual void cholesky_inverse(const Tensor& gram, const Tensor& inv, double relative_ridge) = 0;
};

// threads <= 0 picks the cores available to this process.
std::unique_ptr<Backend> make_cpu_backend(int threads = 0);
// Whether this binary was built with the CUDA backend, and whether a GPU is visible.
bool cuda_backend_compiled();
int cuda_device_count();
std::unique_ptr<Backend> make_cuda_backend(int device_ordinal);

}  // namespace sdmoe
