// sdmoe_export CHECKPOINT OUTDIR [--shard-mb N] [--tokenizer-dir DIR]: an sdmoe checkpoint
// as a Hugging Face model directory (launcher/hf_format.h, docs/checkpoint.md).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/check.h"
#include "launcher/hf_format.h"

namespace {
namespace fs = std::filesystem;

constexpr const char* kUsage =
    "usage: sdmoe_export CHECKPOINT OUTDIR [--shard-mb N] [--tokenizer-dir DIR]\n"
    "\n"
    "Writes the model of CHECKPOINT (a step_NNNNNNNN directory or its checkpoint.h5) to\n"
    "OUTDIR in the Hugging Face layout: config.json, model.safetensors (shards of at most N\n"
    "MB with model.safetensors.index.json past --shard-mb, default 5000), and the GPT-2\n"
    "tokenizer files (vocab.json, merges.txt, tokenizer_config.json,\n"
    "special_tokens_map.json) from the run's data.tokenizer_dir or --tokenizer-dir.\n"
    "The architecture is the transformers class whose forward equals the model's:\n"
    "LlamaForCausalLM without experts, MixtralForCausalLM for softmax-routed experts in every\n"
    "layer with renormalised top-k weights and no shared expert, Qwen2MoeForCausalLM for the\n"
    "other softmax-routed models. SD-MoE experts are written as their effective weights. A\n"
    "model none of them computes (a sigmoid router) is refused.\n";

void copy_tokenizer(const std::string& dir, const fs::path& out, int seq_len) {
  const fs::path encoder = fs::path(dir) / "encoder.json", merges = fs::path(dir) / "vocab.bpe";
  for (const fs::path& p : {encoder, merges})
    if (!fs::exists(p))
      sdmoe::fail("tokenizer file {} does not exist (the run's data.tokenizer_dir, relative to the directory it ran "
                  "in; give --tokenizer-dir)",
                  p.string());
  fs::copy_file(encoder, out / "vocab.json", fs::copy_options::overwrite_existing);
  fs::copy_file(merges, out / "merges.txt", fs::copy_options::overwrite_existing);
  const char* special = "<|endoftext|>";
  std::ofstream(out / "tokenizer_config.json")
      << "{\n  \"tokenizer_class\": \"GPT2Tokenizer\",\n  \"model_max_length\": " << seq_len
      << ",\n  \"bos_token\": \"" << special << "\",\n  \"eos_token\": \"" << special << "\",\n  \"unk_token\": \""
      << special << "\",\n  \"add_prefix_space\": false\n}\n";
  std::ofstream(out / "special_tokens_map.json") << "{\n  \"bos_token\": \"" << special << "\",\n  \"eos_token\": \""
                                                 << special << "\",\n  \"unk_token\": \"" << special << "\"\n}\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  double shard_mb = 5000;
  std::string tokenizer_dir;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("%s", kUsage);
      return 0;
    }
    if ((arg == "--shard-mb" || arg == "--tokenizer-dir") && i + 1 < argc) {
      const std::string value = argv[++i];
      if (arg == "--tokenizer-dir") {
        tokenizer_dir = value;
        continue;
      }
      char* end = nullptr;
      shard_mb = std::strtod(value.c_str(), &end);
      if (*end != '\0' || !(shard_mb > 0)) {
        std::fprintf(stderr, "sdmoe_export: error: --shard-mb needs a positive number, got '%s'\n", value.c_str());
        return 2;
      }
    } else if (arg.rfind("--", 0) == 0) {
      std::fprintf(stderr, "sdmoe_export: error: unknown or incomplete argument '%s' (see --help)\n", arg.c_str());
      return 2;
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) {
    std::fprintf(stderr, "sdmoe_export: error: CHECKPOINT and OUTDIR are required (see --help)\n");
    return 2;
  }
  try {
    const sdmoe::CheckpointParameters checkpoint = sdmoe::read_checkpoint_parameters(positional[0]);
    const sdmoe::ModelSpec spec = sdmoe::model_spec_from(checkpoint.run.model());
    const sdmoe::HfArchitecture arch = sdmoe::choose_hf_architecture(spec);
    const sdmoe::TensorMap tensors = sdmoe::to_hf_tensors(spec, arch, checkpoint.params);
    const fs::path out = positional[1];
    fs::create_directories(out);
    sdmoe::write_safetensors(out.string(), tensors, int64_t(shard_mb * 1e6));
    std::ofstream(out / "config.json") << sdmoe::hf_config_json(spec, arch);
    copy_tokenizer(tokenizer_dir.empty() ? checkpoint.run.data().tokenizer_dir() : tokenizer_dir, out, spec.seq_len);
    int64_t elements = 0;
    for (const auto& [name, t] : tensors) elements += int64_t(t.values.size());
    std::printf("sdmoe_export: %s -> %s: %s (%s), %zu tensors, %.2fM parameters\n", positional[0].c_str(),
                out.string().c_str(), sdmoe::hf_model_type(arch), spec.summary().c_str(), tensors.size(),
                double(elements) / 1e6);
  } catch (const std::exception& e) {  // sdmoe::Error, std::filesystem::filesystem_error
    std::fprintf(stderr, "sdmoe_export: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
