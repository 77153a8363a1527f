// The GPT/MoE model: embedding, pre-norm blocks (attention, then dense MLP or MoE), final
// norm and output projection with cross-entropy. It describes the network as this rank
// holds it: whole dense tensors, and the block of experts its expert-parallel group gives
// it. The only communication inside is the MoE layers' token dispatch over that group.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "model/layers.h"
#include "parallel/gradient_sync.h"

namespace sdmoe {

struct MicroBatchStats {
  double loss_sum = 0.0;       // cross-entropy summed over the micro-batch's tokens
  int64_t tokens = 0;
  double aux_loss = 0.0;       // summed over MoE layers
  double z_loss = 0.0;
  std::vector<MoeStats> moe;   // per MoE layer
};

// Activation recomputation: what the backward recomputes instead of keeping from the
// forward. SELECTIVE keeps each layer's normalised inputs, routing and routed rows and
// recomputes attention's q, k, v, probabilities and context and the MLPs' and experts'
// hidden activations; FULL keeps only each block's input and re-runs the block's forward
// (its MoE exchanges included) before its backward. Either way the recomputed values are
// bitwise those of the forward, so the gradients do not change.
enum class Recompute : uint8_t { NONE, SELECTIVE, FULL };

// How the model runs, apart from its shape, layout and precision.
struct ModelExecution {
  Recompute recompute = Recompute::NONE;
  // Attention as one fused kernel (FlashAttention-2: no [S,S] probabilities kept) instead
  // of the unfused GEMM, softmax, GEMM path, which stays the reference.
  bool fused_attention = false;
  // Micro-batches whose activations the model holds at once: the forward of one may run
  // while others wait for their backward (pipeline schedules, communication of one
  // micro-batch overlapped with another's compute). Each costs its own activations.
  int micro_batches_in_flight = 1;
};

// Where this rank's part of the model sits in the parallel layout.
struct ModelPlacement {
  std::shared_ptr<Communicator> ep_group;  // null: every expert on this rank
  std::shared_ptr<Communicator> tp_group;  // null: dense layers not split
  std::shared_ptr<Communicator> etp_group;  // null: experts not split
  bool sequence_parallel = false;            // with tp > 1: split the residual stream by tokens
  // Multiples the dense and expert parameter regions are padded to (ZeRO-1 shards them
  // evenly over the data-parallel and expert-data-parallel ranks).
  int64_t dense_multiple = 64, expert_multiple = 64;
};

// The placement for this rank's process groups; with zero1 the parameter regions are
// padded to divide evenly over the ranks that shard them.
ModelPlacement placement_for(const ProcessGroups& groups, bool zero1, bool sequence_parallel = false);

class GptModel {
 public:
  // micro_batch sequences of spec.seq_len tokens per forward/backward. A dtype gives every
  // tensor that dtype (FP32 training, F64 gradient checks); a policy mixes precisions.
  GptModel(const ModelSpec& spec, Backend& backend, DType dtype, int micro_batch, const ModelPlacement& placement = {});
  GptModel(const ModelSpec& spec, Backend& backend, const PrecisionPolicy& policy, int micro_batch,
           const ModelPlacement& placement = {}, const ModelExecution& execution = {});
  ~GptModel();

  const ModelSpec& spec() const { return spec_; }
  const ParamRegistry& registry() const { return registry_; }
  Backend& backend() { return be_; }
  // The master dtype: parameters, gradients and optimizer state.
  DType dtype() const { return dtype_; }
  const PrecisionPolicy& precision() const { return policy_; }
  int micro_batch() const { return batch_; }
  Tensor params() const { return registry_.flat(params_, dtype_, be_.device()); }
  Tensor grads() const { return registry_.flat(grads_, dtype_, be_.device()); }
  Tensor param(int id) const { return registry_.view(params_, id, dtype_, be_.device()); }
  Tensor grad(int id) const { return registry_.view(grads_, id, dtype_, be_.device()); }

  void init_parameters(uint64_t seed);
  // To be called whenever the master weights change outside init_parameters (an optimizer
  // step with its ZeRO-1 gather, a checkpoint load): refreshes the GEMM operands' working
  // copy (a no-op unless the policy keeps one).
  void weights_changed();
  // The same for `ranges` of the flat buffer only (an optimizer step that updated only
  // this rank's ZeRO-1 shards: the rest arrives through the working copy's all-gather).
  void weights_changed(const std::vector<ElementRange>& ranges);
  // The weights the step reads, laid out as params(): the working copy under a policy
  // with separate operands (BF16), else the master itself.
  Tensor operand_weights() const {
    return policy_.separate_operands() ? registry_.flat(operand_weights_, policy_.operand, be_.device()) : params();
  }
  // Bytes of the activation buffer: what the forward keeps for the backward, the
  // backward's scratch, and the output head's chunk.
  size_t activation_bytes() const { return activations_.bytes() + block_activations_.bytes(); }
  Recompute recompute() const { return execution_.recompute; }
  void zero_grads();
  // tokens: host, [micro_batch, seq_len + 1]; inputs are the first seq_len, targets the
  // last seq_len. Accumulates loss_scale * d(mean cross-entropy + aux + z)/d(params)
  // into the gradients.
  MicroBatchStats forward_backward(const int32_t* tokens, double loss_scale);
  MicroBatchStats forward_only(const int32_t* tokens);

  // The same in two halves, for several micro-batches in flight: `slot` in
  // [0, micro_batches_in_flight()) holds one micro-batch's activations from its forward to
  // its backward. forward() runs the embedding, the blocks and the output head; in
  // training (train true) the head's backward runs with it, chunk by chunk as its logits
  // are made, and the slot keeps the gradient it leaves. backward() runs the rest, from
  // the final norm down to the embedding. A slot's backward must follow its forward; the
  // slots are otherwise independent, and gradients of all of them accumulate.
  MicroBatchStats forward(int slot, const int32_t* tokens, bool train, double loss_scale);
  void backward(int slot, double loss_scale);
  int micro_batches_in_flight() const { return int(slots_.size()); }

  // The backward runs in stages: 0 is the output head and final norm, layers - l is
  // block l, layers + 1 the embedding. The hook is called as each stage finishes, so
  // that the gradients it completed can be reduced while the rest of the backward runs.
  void set_backward_hook(std::function<void(int stage)> hook) { backward_hook_ = std::move(hook); }
  int backward_stages() const { return spec_.layers + 2; }
  // Every tensor's range in the flat gradient and the stage after which it is final.
  std::vector<GradientReadyRange> gradient_ready_ranges() const;

  // Rows of logits the output head materialises at once for `tokens` tokens per micro-batch,
  // each logit taking `bytes_per_logit` bytes (4 in fp32; 6 under BF16, with its bf16
  // gradient copy).
  static int64_t output_head_chunk(const ModelSpec& spec, int64_t tokens, int64_t bytes_per_logit = 4);

 private:
  struct Block;
  // arena: what lives for the whole step; region: what a block needs only while it runs
  // (rewound for every block under recomputation; `arena` itself without it).
  void plan_activations(Arena& arena, Arena& region);
  // One micro-batch's activations of one block.
  struct BlockActivations {
    Attention::Activations attention;
    Tensor ffn_normed, ffn_rstd;  // [T,D], [T]
    SwigluMlp::Activations mlp;
    MoeFeedForward::Activations moe;
  };
  // Everything one micro-batch in flight keeps between its forward and its backward.
  struct MicroBatch {
    Tensor ids, targets;              // I32 [T], as this rank's vocabulary shard sees them
    std::vector<Tensor> stream;       // residual stream: 2 * layers + 1 tensors [T,D]
    std::vector<BlockActivations> blocks;
    Tensor final_normed, final_rstd;  // [T,D], [T]
    Tensor d_final;                   // [T,D] the output head's input gradient
    Tensor d_final_local;             // this rank's rows of it (sequence parallel), else d_final
    bool awaiting_backward = false;
  };
  // One block's forward on a micro-batch: its attention and feed-forward sublayers with
  // their residuals. stats: where the MoE statistics go (null when recomputing).
  void forward_block(MicroBatch& mb, int layer, MicroBatchStats* stats);
  void init_part_on_host(const ParamSpec& s, const Tensor& p, uint64_t seed);
  void norm_all_rows(const Tensor& x, const Tensor& weight, const Tensor& normed, const Tensor& rstd);
  // Vocabulary-parallel cross-entropy: combines the shards' per-row results over tp,
  // leaves the whole row's lse in `lse` and returns the chunk's summed loss.
  // targets: the chunk's targets as this shard sees them (host).
  double combine_vocab_shards(const Tensor& losses, const Tensor& lse, const int32_t* targets,
                              const TensorParallel& tp);
  void copy_to_host_f64(const Tensor& x, std::vector<double>& out);
  void copy_from_host_f64(const std::vector<double>& in, const Tensor& x);

  ModelSpec spec_;
  Backend& be_;
  std::function<void(int)> backward_hook_;
  std::vector<int> ready_stage_;  // per parameter id
  std::shared_ptr<Communicator> tp_group_;
  bool sequence_parallel_;
  TpScratch tp_scratch_;
  PrecisionPolicy policy_;
  ModelExecution execution_;
  DType dtype_;
  int batch_;
  int64_t tokens_;
  int64_t head_chunk_;  // rows of logits materialised at once
  int64_t vocab_local_ = 0, vocab_begin_ = 0;  // this rank's vocabulary shard
  ParamRegistry registry_;
  std::vector<std::unique_ptr<Block>> blocks_;
  Param embedding_, final_norm_, output_;
  Buffer params_, grads_, activations_;
  Buffer operand_weights_;  // the weights in the policy's operand dtype (separate operands only)
  Buffer block_activations_;  // the region the blocks share under recomputation
  Scratch scratch_;
  std::vector<MicroBatch> slots_;
  // Under FULL recomputation the blocks share one region: the slot whose last block's
  // forward it still holds (its backward need not recompute that block), else -1.
  int region_slot_ = -1;
  Tensor logits_, losses_, lse_;    // [C,V], [C], [C]
  Tensor logits_operand_;           // [C,V] the logits' gradient as a GEMM operand (separate operands only)
  Tensor d_stream_;                 // [T,D] residual gradient
};

}  // namespace sdmoe
