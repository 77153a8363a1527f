// A parameter set for testing one sublayer on its own (outside GptModel): a registry, the
// parameter and gradient buffers it lays out, and host copies of the values that the
// finite-difference probes edit.
#pragma once
#include <random>
#include "model/layers.h"
#include "tests/model/grad_support.h"

namespace sdmoe::gradtest {

// The shared tiny shape: dense and MoE layers, 4 experts top-2 with a shared expert.
inline ModelSpec tiny_spec(RouterScore score = RouterScore::SOFTMAX, bool normalize = true, bool tied = true) {
  ModelSpec s;
  s.vocab_size = 61;
  s.seq_len = 8;
  s.dim = 16;
  s.layers = 2;
  s.heads = 4;
  s.ffn_dim = 24;
  s.tie_embeddings = tied;
  s.rope_theta = 10000.0;
  s.norm_eps = 1e-5;
  s.init_std = 0.3;  // larger than in training, so that every nonlinearity matters
  s.moe.num_experts = 4;
  s.moe.top_k = 2;
  s.moe.expert_ffn_dim = 8;
  s.moe.router_score = score;
  s.moe.normalize_topk = normalize;
  s.moe.aux_loss_coef = 0.01;
  s.moe.z_loss_coef = 0.001;
  s.moe.shared_expert_ffn_dim = 8;
  s.moe.first_dense_layers = 1;
  s.moe.layer_freq = 1;
  return s;
}

// tiny_spec with three layers: the dense layer 0, then MoE layers 1 and 2 (the SD-MoE tests'
// model with more than one MoE layer after a dense one).
inline ModelSpec tiny_dense_first_spec() {
  ModelSpec s = tiny_spec();
  s.layers = 3;
  s.moe.first_dense_layers = 1;
  s.moe.layer_freq = 1;
  return s;
}

// A small model at the usual initialisation scale with every layer kind (a dense layer, an
// MoE layer with a shared expert, an untied output head): the mixed-precision and
// execution-mode tests' model.
inline ModelSpec small_model_spec(int64_t seq_len) {
  ModelSpec s = tiny_spec(RouterScore::SOFTMAX, true, false);
  s.dim = 64;
  s.heads = 4;
  s.ffn_dim = 96;
  s.seq_len = seq_len;
  s.vocab_size = 257;
  s.moe.expert_ffn_dim = 48;
  s.moe.shared_expert_ffn_dim = 32;
  s.init_std = 0.05;
  return s;
}

// [batch, seq_len + 1] uniformly random tokens.
inline std::vector<int32_t> random_tokens(const ModelSpec& spec, int batch, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, spec.vocab_size - 1);
  std::vector<int32_t> tokens(batch * (spec.seq_len + 1));
  for (int32_t& x : tokens) x = dist(gen);
  return tokens;
}

// ||got - want|| / ||want|| (the absolute norm when want is zero).
inline double relative_l2(const std::vector<double>& want, const std::vector<double>& got) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Any float tensor (F64, F32, BF16) to host doubles.
inline std::vector<double> host(const Tensor& t) { return test_support::download(be(), t); }

struct LayerParams {
  ParamRegistry reg;
  Buffer params, grads;
  std::vector<std::vector<double>> host;  // by parameter id

  void allocate() {
    reg.finalize();
    params = Buffer(be(), reg.total_elements() * sizeof(double));
    grads = Buffer(be(), reg.total_elements() * sizeof(double));
    host.assign(reg.specs().size(), {});
  }
  // Every tensor in F64: the layers' finite-difference precision.
  ParamBuffers buffers() const {
    return ParamBuffers{reg, params, grads, params, PrecisionPolicy::uniform(DType::F64), Device::CPU};
  }
  Tensor value(int id) const { return reg.view(params, id, DType::F64, Device::CPU); }
  Tensor grad(int id) const { return reg.view(grads, id, DType::F64, Device::CPU); }
  // Random values: norm gains around 1, matrices N(0, std^2).
  void randomize(uint64_t seed, double std) {
    for (size_t id = 0; id < host.size(); ++id) {
      const ParamSpec& s = reg.spec(static_cast<int>(id));
      host[id] = s.role == ParamRole::NORM ? randn(s.numel, seed + id, 0.2, 1.0) : randn(s.numel, seed + id, std);
    }
    upload();
  }
  void upload() {
    for (size_t id = 0; id < host.size(); ++id) put(value(static_cast<int>(id)), host[id]);
  }
  void zero_grads() { be().fill(reg.flat(grads, DType::F64, Device::CPU), 0.0); }
  int id_of(const std::string& name) const {
    for (size_t id = 0; id < reg.specs().size(); ++id)
      if (reg.spec(static_cast<int>(id)).name == name) return static_cast<int>(id);
    ADD_FAILURE() << "no parameter named " << name;
    return 0;
  }
};

inline double silu(double a) { return a / (1.0 + std::exp(-a)); }

}  // namespace sdmoe::gradtest
