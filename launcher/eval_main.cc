// sdmoe_eval --config FILE.textproto --checkpoint PATH [--split validation|train] [--dump-tokens FILE]
//            [--set field.path=value ...]
#include <cstdio>
#include <string>
#include <vector>

#include "launcher/config.h"
#include "launcher/trainer.h"

namespace {
constexpr const char* kUsage =
    "usage: sdmoe_eval --config FILE.textproto --checkpoint PATH [--split validation|train] [--dump-tokens FILE]\n"
    "                  [--set field.path=value ...]\n"
    "       mpirun -np N sdmoe_eval --config FILE.textproto --checkpoint PATH\n"
    "\n"
    "Loads the parameters of a checkpoint (a step_NNNNNNNN directory or its checkpoint.h5)\n"
    "under the config's parallel layout, which need not be the one that wrote it, and\n"
    "prints the mean cross-entropy and perplexity of training.eval_batches micro-batches of\n"
    "the split: the sequences training validates on (validation) or starts with (train).\n"
    "Without --checkpoint, checkpoint.dir's latest is used. The config's model must match\n"
    "the checkpoint's. --dump-tokens FILE (one data-parallel rank) also writes the evaluated\n"
    "windows as raw little-endian int32 [sequences, seq_len + 1], each row the inputs and the\n"
    "next token, so that another implementation can check the loss on the same tokens.\n";
}

int main(int argc, char** argv) {
  std::string config_path, split = "validation", dump_tokens;
  std::vector<std::string> overrides;
  std::string usage_error;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("%s", kUsage);
      return 0;
    }
    const bool has_value = i + 1 < argc;
    if (arg == "--config" && has_value) config_path = argv[++i];
    else if (arg == "--set" && has_value) overrides.emplace_back(argv[++i]);
    else if (arg == "--checkpoint" && has_value) overrides.push_back(std::string("checkpoint.load=") + argv[++i]);
    else if (arg == "--split" && has_value) split = argv[++i];
    else if (arg == "--dump-tokens" && has_value) dump_tokens = argv[++i];
    else usage_error = "unknown or incomplete argument '" + arg + "' (see --help)";
  }
  if (usage_error.empty() && config_path.empty()) usage_error = "--config FILE is required (see --help)";

  sdmoe::MpiRuntime mpi(&argc, &argv);
  // As in sdmoe_pretrain: errors reported where they happen, then agreed on by all ranks.
  std::string error = usage_error;
  sdmoe::config::Run run;
  if (error.empty()) {
    try {
      run = sdmoe::load_config(config_path, overrides);
      // Evaluation never starts fresh: without a checkpoint it is an error. An explicit
      // --checkpoint wins over the config's checkpoint.dir.
      run.mutable_checkpoint()->set_resume(sdmoe::config::Checkpoint::REQUIRED);
      if (!run.checkpoint().load().empty()) run.mutable_checkpoint()->clear_dir();
    } catch (const sdmoe::Error& e) {
      error = e.what();
    }
  }
  if (!sdmoe::agree_on_config(mpi, "sdmoe_eval", error, run)) return 2;
  try {
    return sdmoe::run_eval(run, mpi, split, dump_tokens);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sdmoe_eval: error on %s: %s\n", sdmoe::where_am_i().c_str(), e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return 2;
}
