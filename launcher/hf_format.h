// Hugging Face format: our trained model as a transformers checkpoint (config.json,
// safetensors weights, GPT-2 tokenizer files) and back (docs/checkpoint.md, "Export to
// the Hugging Face format" has the mapping).
//
// The architecture is the transformers class whose forward pass equals ours:
//   LLAMA      no experts;
//   MIXTRAL    every layer MoE with a softmax router, top-k weights renormalised, no shared
//              expert;
//   QWEN2_MOE  any other softmax-routed MoE: dense layers in mlp_only_layers, norm_topk_prob
//              as ours, and the shared expert, which Qwen2-MoE scales by
//              sigmoid(shared_expert_gate x), exported with that gate zero (sigmoid 0.5)
//              and its down projection doubled, so that it is added with weight 1 as ours
//              is (doubling and halving are exact in floating point); its q/k/v biases are
//              zero. Without a shared expert, one of width 1 with zero weights.
// A model no architecture reproduces (a sigmoid router) is refused, never exported wrongly.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "launcher/config.h"
#include "model/model_spec.h"

namespace sdmoe {

struct LogicalTensor {
  std::vector<int64_t> shape;
  std::vector<float> values;
};
using TensorMap = std::map<std::string, LogicalTensor>;

enum class HfArchitecture { LLAMA, MIXTRAL, QWEN2_MOE };
const char* hf_model_type(HfArchitecture a);  // "llama", "mixtral", "qwen2_moe"

// The architecture for `spec`; throws sdmoe::Error naming the feature when none fits.
HfArchitecture choose_hf_architecture(const ModelSpec& spec);

// An sdmoe checkpoint's run config and parameters (params/*: for SD-MoE experts the
// effective weights), read in one process. `path`: a step directory or its checkpoint.h5.
struct CheckpointParameters {
  config::Run run;
  TensorMap params;
};
CheckpointParameters read_checkpoint_parameters(const std::string& path);

// config.json of the export (max_position_embeddings = the training sequence length).
std::string hf_config_json(const ModelSpec& spec, HfArchitecture arch);
// Our parameters under the architecture's names and layouts.
TensorMap to_hf_tensors(const ModelSpec& spec, HfArchitecture arch, const TensorMap& params);
// And back: every parameter our model has, from the architecture's tensors. Throws
// sdmoe::Error naming a missing tensor or one of the wrong shape.
TensorMap from_hf_tensors(const ModelSpec& spec, HfArchitecture arch, const TensorMap& hf);

// safetensors (F32 only): one model.safetensors, or shards of at most shard_bytes each
// with model.safetensors.index.json when the tensors are larger.
void write_safetensors(const std::string& dir, const TensorMap& tensors, int64_t shard_bytes);
// Reads model.safetensors or the shards the index names; throws sdmoe::Error on a missing,
// truncated or malformed file.
TensorMap read_safetensors(const std::string& dir);

// Reads config.json: the architecture and the model fields it states, as a ModelSpec
// (fields config.json does not carry, like the loss coefficients, are left at their
// defaults). Throws on a missing file or an unknown model_type.
struct HfModelConfig {
  HfArchitecture arch;
  ModelSpec spec;
};
HfModelConfig read_hf_config(const std::string& dir);

}  // namespace sdmoe
