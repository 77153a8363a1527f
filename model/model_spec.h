// The full, unsharded model shape, independent of the config format and of parallelism.
#pragma once
#include <cstdint>
#include <string>

#include "core/backend.h"

namespace sdmoe {

struct MoeSpec {
  int num_experts = 0;  // 0: every layer is dense
  int top_k = 2;
  int expert_ffn_dim = 256;
  RouterScore router_score = RouterScore::SOFTMAX;
  bool normalize_topk = true;
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.001;
  int shared_expert_ffn_dim = 0;
  int first_dense_layers = 0;
  int layer_freq = 1;

  bool is_moe_layer(int layer) const {
    // layer_freq <= 0 is rejected by ModelSpec::validate; no layer is MoE until then.
    return num_experts > 0 && layer_freq > 0 && layer >= first_dense_layers &&
           (layer - first_dense_layers) % layer_freq == 0;
  }
};

struct ModelSpec {
  int vocab_size = 50304;
  int seq_len = 256;
  int dim = 256;
  int layers = 4;
  int heads = 4;
  int ffn_dim = 688;
  bool tie_embeddings = true;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  double init_std = 0.02;
  MoeSpec moe;

  int head_dim() const { return dim / heads; }
  int moe_layer_count() const;
  // Throws sdmoe::Error naming the offending field.
  void validate() const;
  // Parameters touched by one token (the k routed experts, not all E), for model FLOPs.
  int64_t active_matmul_params() const;
  // Model FLOPs per trained token: 6 * active matmul params + 12 * layers * seq_len * dim
  // (attention scores and context, forward and backward, counted without the causal half).
  double train_flops_per_token() const;
  std::string summary() const;
};

}  // namespace sdmoe
