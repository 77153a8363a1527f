// sdmoe_pretrain --config FILE.textproto [--set field.path=value ...]
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "launcher/config.h"
#include "launcher/trainer.h"

namespace {
constexpr const char* kUsage =
    "usage: sdmoe_pretrain --config FILE.textproto [--set field.path=value ...] [--resume]\n"
    "       mpirun -np N sdmoe_pretrain --config FILE.textproto\n"
    "\n"
    "Pretrains a GPT-style mixture-of-experts model. N ranks split the model by the parallel\n"
    "degrees (parallel.tp, parallel.ep, parallel.etp) and the batch over the remaining\n"
    "data-parallel ranks, with the results of one rank with the same global batch (up to\n"
    "summation order). The config is protobuf\n"
    "text (schema: launcher/config.proto); --set overrides one field, e.g.\n"
    "--set training.steps=10 --set model.moe.top_k=1.\n"
    "\n"
    "With checkpoint.dir set, checkpoints are written every checkpoint.interval steps, at\n"
    "the end, and on SIGTERM or SIGUSR1 (then the run exits 0); a run whose checkpoint.dir\n"
    "holds one resumes from it. --resume (= --set checkpoint.resume=REQUIRED) fails instead\n"
    "of starting fresh when there is none.\n"
    "\n"
    "training.precision BF16 (or AUTO where the CPU has a fast bf16 path) trains with bf16 GEMM\n"
    "operands and fp32 master state; checkpoints hold the fp32 state either way. On CPUs the\n"
    "bf16 GEMMs run on AMX, on AVX512_BF16, or widened to fp32, whichever is fastest; the\n"
    "environment variable SDMOE_CPU_BF16_GEMM=amx|avx512_bf16|widen forces one.\n\nconfig fields:\n";
}

int main(int argc, char** argv) {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string usage_error;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("%s%s", kUsage, sdmoe::config_reference().c_str());
      return 0;
    }
    if ((arg == "--config" || arg == "--set") && i + 1 < argc) {
      (arg == "--config" ? config_path = argv[++i] : (overrides.emplace_back(argv[++i]), config_path));
    } else if (arg.rfind("--config=", 0) == 0) {
      config_path = arg.substr(9);
    } else if (arg == "--resume") {
      overrides.push_back("checkpoint.resume=REQUIRED");
    } else if (arg.rfind("--set=", 0) == 0) {
      overrides.push_back(arg.substr(6));
    } else if (arg == "--config" || arg == "--set") {
      usage_error = arg + " needs a value (see --help)";
    } else {
      usage_error = "unknown argument '" + arg + "' (see --help)";
    }
  }
  if (usage_error.empty() && config_path.empty()) usage_error = "--config FILE is required (see --help)";

  sdmoe::MpiRuntime mpi(&argc, &argv);
  // Argument and config errors are reported by the ranks that have them; one agreement
  // makes every rank exit, so a rank whose node lacks the config file cannot leave the
  // others waiting.
  std::string error = usage_error;
  sdmoe::config::Run run;
  if (error.empty()) {
    try {
      run = sdmoe::load_config(config_path, overrides);
    } catch (const sdmoe::Error& e) {
      error = e.what();
    }
  }
  if (!sdmoe::agree_on_config(mpi, "sdmoe_pretrain", error, run)) return 2;
  try {
    return sdmoe::run_pretrain(run, mpi);
  } catch (const sdmoe::Error& e) {
    // Found after training started (a bad token id, say): end the whole job, never hang.
    std::fprintf(stderr, "sdmoe_pretrain: error on %s: %s\n", sdmoe::where_am_i().c_str(), e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 2);
  } catch (const std::exception& e) {
    // Out of memory and the like: the same, so that the other ranks do not wait forever.
    std::fprintf(stderr, "sdmoe_pretrain: error on %s: %s\n", sdmoe::where_am_i().c_str(), e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return 2;
}
