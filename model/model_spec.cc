#include "model/model_spec.h"

#include <cmath>

namespace sdmoe {

int ModelSpec::moe_layer_count() const {
  int n = 0;
  for (int l = 0; l < layers; ++l) n += moe.is_moe_layer(l);
  return n;
}

void ModelSpec::validate() const {
  auto positive = [](const char* field, int64_t v) {
    if (v <= 0) fail("model.{} must be positive, got {}", field, v);
  };
  positive("vocab_size", vocab_size);
  positive("seq_len", seq_len);
  positive("dim", dim);
  positive("layers", layers);
  positive("heads", heads);
  positive("ffn_dim", ffn_dim);
  // Written so that NaN fails too.
  if (!(rope_theta > 0) || !std::isfinite(rope_theta)) fail("model.rope_theta must be positive, got {}", rope_theta);
  if (!(norm_eps >= 0) || !std::isfinite(norm_eps)) fail("model.norm_eps must be >= 0, got {}", norm_eps);
  if (!(init_std >= 0) || !std::isfinite(init_std)) fail("model.init_std must be >= 0, got {}", init_std);
  if (dim % heads != 0) fail("model.dim ({}) must be divisible by model.heads ({})", dim, heads);
  if (head_dim() % 2 != 0) fail("model.dim / model.heads ({}) must be even for RoPE", head_dim());
  if (moe.num_experts < 0) fail("model.moe.num_experts must be >= 0, got {}", moe.num_experts);
  if (moe.num_experts > 0) {
    if (moe.top_k < 1 || moe.top_k > moe.num_experts)
      fail("model.moe.top_k ({}) must be between 1 and num_experts ({})", moe.top_k, moe.num_experts);
    positive("moe.expert_ffn_dim", moe.expert_ffn_dim);
    positive("moe.layer_freq", moe.layer_freq);
    if (moe.first_dense_layers < 0) fail("model.moe.first_dense_layers must be >= 0");
    if (moe.shared_expert_ffn_dim < 0) fail("model.moe.shared_expert_ffn_dim must be >= 0");
    if (!(moe.aux_loss_coef >= 0) || !(moe.z_loss_coef >= 0) || !std::isfinite(moe.aux_loss_coef) ||
        !std::isfinite(moe.z_loss_coef))
      fail("model.moe loss coefficients must be finite and >= 0");
  }
}

int64_t ModelSpec::active_matmul_params() const {
  const int64_t d = dim;
  int64_t total = int64_t(vocab_size) * d;  // output projection (the embedding lookup is no matmul)
  for (int l = 0; l < layers; ++l) {
    total += 4 * d * d;
    if (moe.is_moe_layer(l)) {
      total += d * moe.num_experts + int64_t(moe.top_k) * 3 * d * moe.expert_ffn_dim + 3 * d * moe.shared_expert_ffn_dim;
    } else {
      total += 3 * d * ffn_dim;
    }
  }
  return total;
}

double ModelSpec::train_flops_per_token() const {
  return 6.0 * double(active_matmul_params()) + 12.0 * layers * double(seq_len) * dim;
}

std::string ModelSpec::summary() const {
  return fmt::format("{} layers ({} MoE), dim {}, {} heads, seq {}, vocab {}, experts {} top-{} ffn {}", layers,
                     moe_layer_count(), dim, heads, seq_len, vocab_size, moe.num_experts, moe.top_k,
                     moe.expert_ffn_dim);
}

}  // namespace sdmoe
