// sdmoe_import HFDIR OUTDIR --config RUN.textproto: a Hugging Face model directory (as
// sdmoe_export writes it) back into an sdmoe checkpoint a run continues from.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/check.h"
#include "launcher/checkpoint.h"
#include "launcher/checkpoint_writer.h"
#include "launcher/config.h"
#include "launcher/hf_format.h"
#include "parallel/communicator.h"

namespace {
namespace fs = std::filesystem;

constexpr const char* kUsage =
    "usage: sdmoe_import HFDIR OUTDIR --config RUN.textproto [--set field.path=value ...]\n"
    "\n"
    "Reads a Hugging Face model directory (config.json and model.safetensors or its shards;\n"
    "llama, mixtral or qwen2_moe, as sdmoe_export writes them) and writes an sdmoe\n"
    "checkpoint OUTDIR/step_00000000 with OUTDIR/latest: the parameters, zero AdamW moments,\n"
    "step 0. Continue training with checkpoint.dir=OUTDIR (or checkpoint.load). The run\n"
    "config's model must be the one config.json describes; SD-MoE state is not imported\n"
    "(run with sdmoe.enabled false, or start SD-MoE from a fresh refresh).\n";

// Every field config.json states must equal the run config's; the first that differs is
// named.
void check_same_model(const sdmoe::ModelSpec& want, const sdmoe::HfModelConfig& got, const std::string& dir) {
  const sdmoe::ModelSpec& g = got.spec;
  auto differ = [&](const char* field, auto run_value, auto file_value) {
    if (run_value != file_value)
      sdmoe::fail("{}/config.json describes another model: {} is {} there and {} in the run config", dir, field,
                  file_value, run_value);
  };
  differ("vocab_size (model.vocab_size)", want.vocab_size, g.vocab_size);
  differ("hidden_size (model.dim)", want.dim, g.dim);
  differ("num_hidden_layers (model.layers)", want.layers, g.layers);
  differ("num_attention_heads (model.heads)", want.heads, g.heads);
  differ("rms_norm_eps (model.norm_eps)", want.norm_eps, g.norm_eps);
  differ("rope_theta (model.rope_theta)", want.rope_theta, g.rope_theta);
  differ("tie_word_embeddings (model.tie_embeddings)", want.tie_embeddings, g.tie_embeddings);
  differ("the number of experts (model.moe.num_experts)", want.moe.num_experts, g.moe.num_experts);
  const sdmoe::HfArchitecture arch = sdmoe::choose_hf_architecture(want);
  if (arch != got.arch)
    sdmoe::fail("{}/config.json is a {} model; the run config's model exports as {}", dir,
                sdmoe::hf_model_type(got.arch), sdmoe::hf_model_type(arch));
  if (want.moe.num_experts == 0 || arch == sdmoe::HfArchitecture::QWEN2_MOE)
    differ("intermediate_size (model.ffn_dim)", want.ffn_dim, g.ffn_dim);
  if (want.moe.num_experts > 0) {
    differ("num_experts_per_tok (model.moe.top_k)", want.moe.top_k, g.moe.top_k);
    differ("the expert width (model.moe.expert_ffn_dim)", want.moe.expert_ffn_dim, g.moe.expert_ffn_dim);
    differ("norm_topk_prob (model.moe.normalize_topk)", want.moe.normalize_topk, g.moe.normalize_topk);
    if (arch == sdmoe::HfArchitecture::QWEN2_MOE)  // no shared expert exports as one of width 1, all zeros
      differ("shared_expert_intermediate_size (model.moe.shared_expert_ffn_dim)",
             std::max(1, want.moe.shared_expert_ffn_dim), g.moe.shared_expert_ffn_dim);
  }
}

void write_checkpoint(const sdmoe::config::Run& run, const sdmoe::TensorMap& params, const fs::path& out) {
  const sdmoe::ModelSpec spec = sdmoe::model_spec_from(run.model());
  const fs::path partial = out / "step_00000000.partial", final_dir = out / "step_00000000";
  fs::remove_all(partial);
  fs::create_directories(partial);
  auto writer = sdmoe::make_checkpoint_writer(sdmoe::CheckpointWriterKind::GATHER,
                                              (partial / sdmoe::kCheckpointFileName).string(), int64_t(1) << 26);
  writer->attribute("format", std::string(sdmoe::kCheckpointFormat));
  writer->attribute("format_version", sdmoe::kCheckpointFormatVersion);
  writer->attribute("step", int64_t(0));
  writer->attribute("data_position", int64_t(0));
  writer->attribute("training_seed", int64_t(run.training().seed()));
  writer->attribute("data_seed", int64_t(run.data().seed()));
  writer->attribute("architecture", sdmoe::checkpoint_architecture(spec));
  writer->attribute("sdmoe", int64_t(0));
  writer->string_dataset("config", sdmoe::resolved_config_text(run));
  writer->attribute("layout", std::string("imported from the Hugging Face format"));
  for (const auto& [name, t] : params) {
    const std::vector<sdmoe::Piece> whole{{0, int64_t(t.values.size()), 0}};
    writer->tensor("params/" + name, t.shape, whole, t.values.data());
    const std::vector<float> zeros(t.values.size(), 0.0f);
    writer->tensor("optimizer/exp_avg/" + name, t.shape, whole, zeros.data());
    writer->tensor("optimizer/exp_avg_sq/" + name, t.shape, whole, zeros.data());
  }
  const std::string error = writer->finish();
  if (!error.empty()) sdmoe::fail("{}", error);
  std::ofstream(partial / "config.textproto") << sdmoe::resolved_config_text(run);
  fs::remove_all(final_dir);
  fs::rename(partial, final_dir);
  std::ofstream(out / "latest") << "step_00000000\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional, overrides;
  std::string config_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("%s", kUsage);
      return 0;
    }
    if ((arg == "--config" || arg == "--set") && i + 1 < argc) {
      (arg == "--config" ? config_path : overrides.emplace_back()) = argv[++i];
    } else if (arg.rfind("--", 0) == 0) {
      std::fprintf(stderr, "sdmoe_import: error: unknown or incomplete argument '%s' (see --help)\n", arg.c_str());
      return 2;
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2 || config_path.empty()) {
    std::fprintf(stderr, "sdmoe_import: error: HFDIR, OUTDIR and --config RUN.textproto are required (see --help)\n");
    return 2;
  }
  sdmoe::MpiRuntime mpi(&argc, &argv);  // the checkpoint writer's collectives, on one rank
  if (mpi.world_size() != 1) {
    std::fprintf(stderr, "sdmoe_import: error: run it as one process, not under mpirun -np %d\n", mpi.world_size());
    return 2;
  }
  try {
    const sdmoe::config::Run run = sdmoe::load_config(config_path, overrides);
    const sdmoe::ModelSpec spec = sdmoe::model_spec_from(run.model());
    spec.validate();
    const std::string& dir = positional[0];
    const sdmoe::HfModelConfig hf = sdmoe::read_hf_config(dir);
    check_same_model(spec, hf, dir);
    const sdmoe::TensorMap params = sdmoe::from_hf_tensors(spec, hf.arch, sdmoe::read_safetensors(dir));
    write_checkpoint(run, params, positional[1]);
    std::printf("sdmoe_import: %s (%s) -> %s/step_00000000, %zu parameter tensors\n", dir.c_str(),
                sdmoe::hf_model_type(hf.arch), positional[1].c_str(), params.size());
  } catch (const std::exception& e) {  // sdmoe::Error, std::filesystem::filesystem_error
    std::fprintf(stderr, "sdmoe_import: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
