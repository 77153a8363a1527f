// Transformer sublayers as explicit forward/backward pairs; no hidden tape.
//
// Shape legend: B micro-batch, S sequence, T = B*S tokens, D model dim, H heads, Dh head
// dim, F ffn dim, E experts, K top-k, N = T*K routed rows, V vocabulary.
//
// Every sublayer is residual: forward computes out = in + f(norm(in)); backward takes
// d(out) in `dres` and turns it into d(in) in place. Parameter gradients accumulate (+=)
// into the gradient buffer; activation gradients are assigned (=) into scratch space
// shared by all layers (they are used one layer at a time).
#pragma once
#include <memory>
#include <vector>

#include "core/buffer.h"
#include "model/model_spec.h"
#include "model/param_registry.h"
#include "model/precision.h"
#include "parallel/token_dispatcher.h"

namespace sdmoe {

struct Param {
  int id = -1;
  Tensor value;    // master weights
  Tensor grad;     // master dtype, accumulated
  Tensor operand;  // the weights as a GEMM operand: `value`, or its working copy (BF16)
};

// The flat buffers a layer binds its parameters in, and the precision they follow.
struct ParamBuffers {
  const ParamRegistry& registry;
  const Buffer& params;
  const Buffer& grads;
  const Buffer& operands;  // the weights' working copy; unused when operands are master dtype
  PrecisionPolicy policy;
  Device device;
  Param bind(int id) const {
    const Tensor value = registry.view(params, id, policy.master, device);
    return Param{id, value, registry.view(grads, id, policy.master, device),
                 policy.separate_operands() ? registry.view(operands, id, policy.operand, device) : value};
  }
};

// Scratch shared by all layers (used one layer at a time): activation gradients, and the
// intermediates of a forward that its backward does not keep. Dtypes follow the precision
// policy: GEMM operands in its operand dtype, the rest in its master dtype.
struct Scratch {
  Tensor qkv;       // [T,3D] forward: the qkv projection before the head split
  Tensor scores;    // [B*H,S,S] forward: attention scores (master dtype; empty unless separate operands)
  Tensor ctx_heads; // [B,H,S,Dh] forward: attention output per head
  Tensor d_normed;  // [T,D]
  Tensor d_x;       // [T,D]
  Tensor d_ctx;     // [T,D]
  Tensor d_ctx_heads;  // [B,H,S,Dh] operand
  Tensor dq, dk, dv;   // [B,H,S,Dh]
  Tensor d_probs;   // [B*H,S,S]
  Tensor d_qkv;     // [T,3D] operand
  Tensor d_hidden;  // [T, 2*max(F, F_shared)] operand, for the dense MLPs
  Tensor d_act;     // [T, max(F, F_shared)]
  // Operand staging for gradients computed in master dtype (empty without separate operands).
  Tensor operand_rows;    // [T,D]
  Tensor operand_scores;  // [B*H,S,S]
  // fused_attention: no [B*H,S,S] tensors (scores, their gradient and its staging).
  void plan(Arena& arena, const ModelSpec& spec, int batch, const PrecisionPolicy& policy,
            bool fused_attention = false);
};

// How a layer is split over the tensor-parallel group (Megatron's column/row-parallel
// pairs): the first matrix of a pair is split by output rows (attention heads, MLP hidden
// units), the second by input columns, and the partial outputs of the second are summed
// over the group. Inputs and outputs of a layer are replicated on every tp rank.
//
// With sequence parallelism the residual stream between the layers is split by tokens too:
// each tp rank holds rows [rank * T/tp, (rank+1) * T/tp) of it, normalises only those, and
// the layer all-gathers the normalised rows before its first matrix and reduce-scatters
// the partial outputs of its second (instead of one all-reduce); the backward mirrors it.
struct TensorParallel {
  Communicator* group = nullptr;  // null: not split
  bool sequence_parallel = false;
  int size() const { return group ? group->size() : 1; }
  int rank() const { return group ? group->rank() : 0; }
  bool active() const { return size() > 1; }
  bool split_sequence() const { return active() && sequence_parallel; }
  // x <- sum over the group of x.
  void sum(const Tensor& x) const {
    if (active()) group->all_reduce(x, ReduceOp::SUM);
  }
  // full [T, D] <- every rank's rows, given this rank's `local` [T/tp, D] (copied into its
  // block of `full` unless it is already there).
  void gather_rows(const Tensor& local, const Tensor& full, Backend& be) const {
    const Tensor mine = full.slice_rows(int64_t(rank()) * local.rows(), local.rows());
    if (mine.data != local.data) be.copy(local, mine);
    group->all_gather(mine, full);
  }
  // local [T/tp, D] <- this rank's rows of the sum over the group of `full` [T, D].
  void reduce_scatter_rows(const Tensor& full, const Tensor& local) const {
    group->reduce_scatter(full, local, ReduceOp::SUM);
  }
};

// Shared [T, D] and [T/tp, D] scratch for the tensor-parallel collectives, used by one
// layer at a time.
struct TpScratch {
  Tensor partial;   // [T,D] partial sums of a row-parallel matrix
  Tensor gathered;  // [T,D] sequence parallel: an all-gathered gradient
  Tensor local;     // [T/tp,D] sequence parallel: a reduce-scattered result
};

// Sizes one layer sees.
struct LayerDims {
  int64_t batch, seq, dim, heads, head_dim;
  int64_t tokens() const { return batch * seq; }
};

class Attention {
 public:
  // One micro-batch's activations. kept: what the backward reads as the forward left it
  // (the normalised input and its statistics); the rest are internal (q, k, v, the
  // probabilities and the context), which the backward may recompute (selective
  // recomputation plans them in a region the layers share). All but rstd and lse are
  // GEMM operands (the policy's operand dtype).
  struct Activations {
    Tensor normed, rstd;  // [T,D], [T] (this rank's rows with sequence parallelism)
    Tensor q, k, v;       // [B,H,S,Dh], q and k after RoPE
    Tensor probs;         // [B*H,S,S] unfused only
    Tensor lse;           // [B*H,S] fused only: the softmax rows' log-sum-exp (master dtype)
    Tensor ctx;           // [T,D]
  };

  // With tensor parallelism this rank holds heads [rank * H/tp, (rank+1) * H/tp).
  // fused: the fused kernel (Backend::attention_forward) instead of the unfused path.
  void declare(ParamRegistry& registry, const std::string& prefix, const ModelSpec& spec, TensorParallel tp = {},
               bool fused = false);
  void bind(const ParamBuffers& buffers);
  // dims: the model's sizes (all heads); tp_scratch: [T,D] scratch shared by the layers,
  // used when tensor parallel. Once, before planning.
  void configure(const LayerDims& dims, const TpScratch& tp_scratch = {});
  Activations plan_activations(Arena& kept, Arena& internal) const;
  void forward(Backend& be, Activations& a, const Tensor& in, const Tensor& out, Scratch& scratch);
  // Recomputes the internal activations from the kept ones, as the forward made them.
  void recompute(Backend& be, Activations& a, Scratch& scratch);
  void backward(Backend& be, Activations& a, const Tensor& in, const Tensor& dres, Scratch& scratch);

  // One micro-batch at a time, in activations the layer holds itself (the layer tests).
  void plan(Arena& kept, Arena& internal, const LayerDims& dims, const TpScratch& tp_scratch = {}) {
    configure(dims, tp_scratch);
    own_ = plan_activations(kept, internal);
  }
  void plan(Arena& arena, const LayerDims& dims, const TpScratch& tp_scratch = {}) {
    plan(arena, arena, dims, tp_scratch);
  }
  void forward(Backend& be, const Tensor& in, const Tensor& out, Scratch& scratch) {
    forward(be, own_, in, out, scratch);
  }
  void backward(Backend& be, const Tensor& in, const Tensor& dres, Scratch& scratch) {
    backward(be, own_, in, dres, scratch);
  }

 private:
  LayerDims dims_{};  // heads: this rank's
  TensorParallel tp_;
  TpScratch tps_;
  PrecisionPolicy policy_;
  bool fused_ = false;
  double rope_theta_ = 10000.0, eps_ = 1e-5;
  Param norm_, qkv_, proj_;  // [D], [3D,D], [D,D]; with tp: [3, D/tp, D] and [D, D/tp]
  Activations own_;
};

// SwiGLU MLP on an already-normalised input, adding its output into `out`.
class SwigluMlp {
 public:
  // One micro-batch's activations, both internal (recomputable from the input h).
  struct Activations {
    Tensor hidden, act;  // [T,2F] master dtype, [T,F] operand dtype
  };

  // With tensor parallelism this rank holds hidden units [rank * F/tp, (rank+1) * F/tp).
  void declare(ParamRegistry& registry, const std::string& prefix, int64_t dim, int64_t ffn, double std, double out_std,
               TensorParallel tp = {});
  void bind(const ParamBuffers& buffers);
  void configure(const TpScratch& tp_scratch = {}) { tps_ = tp_scratch; }
  Activations plan_activations(Arena& internal, int64_t tokens) const;
  // h: [T,D] (all tokens). out and d_out: [T,D], or this rank's [T/tp,D] rows with
  // sequence parallelism; d_h likewise.
  void forward(Backend& be, Activations& a, const Tensor& h, const Tensor& out);
  // Recomputes the activations from h, as the forward made them.
  void recompute(Backend& be, Activations& a, const Tensor& h);
  // d_h = beta * d_h + d(h) of this MLP.
  void backward(Backend& be, Activations& a, const Tensor& h, const Tensor& d_out, const Tensor& d_h, double beta,
                Scratch& scratch);

  // One micro-batch at a time, in activations the layer holds itself (the layer tests).
  void plan(Arena& internal, int64_t tokens, const TpScratch& tp_scratch = {}) {
    configure(tp_scratch);
    own_ = plan_activations(internal, tokens);
  }
  void forward(Backend& be, const Tensor& h, const Tensor& out) { forward(be, own_, h, out); }
  void backward(Backend& be, const Tensor& h, const Tensor& d_out, const Tensor& d_h, double beta, Scratch& scratch) {
    backward(be, own_, h, d_out, d_h, beta, scratch);
  }

 private:
  int64_t dim_ = 0, ffn_ = 0;  // ffn_: this rank's hidden units
  TensorParallel tp_;
  TpScratch tps_;
  PrecisionPolicy policy_;
  Param gate_up_, down_;  // [2F,D], [D,F]; with tp: [2, F/tp, D] and [D, F/tp]
  Activations own_;
};

// Where each routed row goes; computed on the host from the router's choices with a
// stable counting sort, so the order is the same on every backend.
struct RoutingPlan {
  std::vector<int32_t> row_token;      // [N] token of each expert-sorted row
  std::vector<int32_t> slot_row;       // [T*K] row of token t's j-th choice
  std::vector<int64_t> expert_offset;  // [E+1]
  void build(const std::vector<int32_t>& topk_index, int64_t tokens, int top_k, int experts);
};

struct MoeStats {
  double aux_loss = 0.0, z_loss = 0.0;
  double min_load = 0.0, max_load = 0.0;  // smallest and largest share of routed rows
  std::vector<double> load;               // each expert's share of routed rows
};

// The rows the local experts work on, expert-major. Without expert parallelism these are
// the layer's own sorted-row tensors; with it they hold the rows received from the ep group
// and grow with the busiest micro-batch seen (routing is dropless).
struct ExpertRows {
  Tensor x, hidden, act, y;  // [R,D], [R,2Fe], [R,Fe], [R,D]: x and act operands, the rest master
  Tensor dy, d_hidden, d_act, dx;  // dy, d_act and dx master, d_hidden operand
  Tensor dy_operand;               // [R,D] dy staged as an operand (empty without separate operands)
};

class MoeFeedForward {
 public:
  // One micro-batch's state. kept: routing, routed rows and their outputs; internal: the
  // experts' (and the shared expert's) hidden activations and the backward's scratch.
  struct Activations {
    RoutingPlan plan;
    TokenDispatcher::Routing routing;
    std::vector<double> expert_load;  // [E] share of rows per expert
    Tensor logits, topk_index, topk_weight, aux_probs, lse;  // [T,E], [T,K], [T,K], [T,E], [T]
    Tensor row_token, slot_row;                               // I32 [N], [T,K]
    Tensor routed_in, hidden, act, routed_out;                // [N,D], [N,2Fe], [N,Fe], [N,D]
    Tensor d_routed, d_hidden, d_act, d_weight, d_logits, aux_grad;  // backward scratch
    Tensor d_routed_operand, d_logits_operand;  // [N,D], [T,E] operand staging (separate operands only)
    // With expert parallelism: the rows this rank's experts received (grown to the
    // busiest micro-batch seen); without it, views of the rows above.
    Buffer expert_side;
    int64_t expert_side_rows = 0;
    ExpertRows rows;
    SwigluMlp::Activations shared;
  };

  // dispatcher: how rows reach the experts; its ep group decides which experts this rank
  // holds.
  //
  // With tensor parallelism the router runs on all T tokens on every tp rank (so routing,
  // the auxiliary and z losses and the router's gradients are those of the whole
  // micro-batch, identical on the group), but each tp rank sends only its slice of T/tp
  // tokens to the experts; the slices' outputs (and input gradients) are all-gathered over
  // tp. The shared expert is split like a dense MLP.
  void declare(ParamRegistry& registry, const std::string& prefix, const ModelSpec& spec,
               std::shared_ptr<TokenDispatcher> dispatcher, TensorParallel tp = {});
  void bind(const ParamBuffers& buffers);
  // tokens per micro-batch and the layers' shared tensor-parallel scratch. Once.
  void configure(int64_t tokens, const TpScratch& tp_scratch = {});
  Activations plan_activations(Arena& kept, Arena& internal) const;
  MoeStats forward(Backend& be, Activations& a, const Tensor& h, const Tensor& out);
  // Recomputes the experts' and the shared expert's hidden activations from the routed
  // rows and h, as the forward made them.
  void recompute(Backend& be, Activations& a, const Tensor& h);
  // loss_scale multiplies the auxiliary and z losses in the gradient, as the cross
  // entropy's own scale does for the main loss.
  void backward(Backend& be, Activations& a, const Tensor& h, const Tensor& d_out, const Tensor& d_h,
                double loss_scale, Scratch& scratch);

  // One micro-batch at a time, in state the layer holds itself (the layer tests).
  void plan(Arena& kept, Arena& internal, int64_t tokens, const TpScratch& tp_scratch = {}) {
    configure(tokens, tp_scratch);
    own_ = plan_activations(kept, internal);
  }
  void plan(Arena& arena, int64_t tokens, const TpScratch& tp_scratch = {}) { plan(arena, arena, tokens, tp_scratch); }
  MoeStats forward(Backend& be, const Tensor& h, const Tensor& out) { return forward(be, own_, h, out); }
  void backward(Backend& be, const Tensor& h, const Tensor& d_out, const Tensor& d_h, double loss_scale,
                Scratch& scratch) {
    backward(be, own_, h, d_out, d_h, loss_scale, scratch);
  }

 private:
  // One GEMM per local expert over its rows of this micro-batch; `make` fills a group from
  // (expert, row offset, rows).
  template <typename MakeGroup>
  void run_experts(Backend& be, const Activations& a, bool trans_a, bool trans_b, double beta, MakeGroup&& make);
  void expert_hidden(Backend& be, Activations& a);  // rows.x -> rows.hidden, rows.act
  ExpertRows expert_rows(Backend& be, Activations& a, int64_t rows);
  MoeSpec moe_{};
  std::shared_ptr<TokenDispatcher> dispatcher_;
  TensorParallel tp_;
  TpScratch tps_;
  int64_t slice_begin_ = 0, slice_tokens_ = 0;  // this tp rank's tokens
  int64_t dim_ = 0, tokens_ = 0;
  int64_t expert_ffn_local_ = 0;  // this rank's hidden units of each expert (Fe / etp)
  DType dtype_ = DType::F32;  // the policy's master dtype
  PrecisionPolicy policy_;
  Param router_, gate_up_, down_;  // [E,D], [E,2Fe,D], [E,D,Fe]
  bool has_shared_ = false;
  SwigluMlp shared_;
  Activations own_;
};

}  // namespace sdmoe
