// HDF5 checkpoints of the logical (unsharded) training state: parameters, AdamW moments,
// SD-MoE bases and unique-part moments, step and data position (docs/checkpoint.md).
//
// Writing: each block of a tensor comes from the one replica that holds it (tensor-,
// expert- and ZeRO-1 shards assembled into the logical tensor), written either by every
// rank into the one file through parallel HDF5 or gathered to rank 0, which writes it
// (checkpoint.writer, launcher/checkpoint_writer.h). The file goes into
// DIR/step_NNNNNNNN.partial/, which is renamed to DIR/step_NNNNNNNN/ once complete and
// synced; then DIR/latest is replaced (write and rename) and checkpoints beyond `keep` are
// deleted. A kill at any point leaves the previous checkpoint and `latest` intact; a save
// that fails (a full disk, checked before writing) removes its partial directory.
//
// Reading: every rank opens the file and reads the logical tensors, keeping its own
// blocks, so a checkpoint loads under any parallel layout.
#pragma once
#include <cstdint>
#include <string>

#include "launcher/config.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "model/sdmoe.h"
#include "parallel/communicator.h"

namespace sdmoe {

// What must match for a checkpoint's tensors to mean the same thing in a model: the
// architecture, not the sequence length or the loss coefficients, as space-separated
// "name=value" words (the file's `architecture` attribute, docs/checkpoint.md).
std::string checkpoint_architecture(const ModelSpec& spec);
inline constexpr const char* kCheckpointFileName = "checkpoint.h5";
inline constexpr const char* kCheckpointFormat = "sdmoe-checkpoint";
inline constexpr int64_t kCheckpointFormatVersion = 1;

// Where training resumes.
struct TrainingPosition {
  int64_t step = 0;                // optimizer steps done
  uint64_t data_position = 0;      // training samples consumed, all ranks together
};

// Which replicas of the optimizer moments hold distinct parts (ZeRO-1 shards): those
// are written by every replica; replicated moments by the first one only.
struct MomentSharding {
  bool dense = false;    // dense moments split over the data-parallel group
  bool experts = false;  // expert moments split over the expert-data-parallel group
};

class Checkpointer {
 public:
  // optimizer and sdmoe may be null for a run that only loads parameters (evaluation).
  Checkpointer(const config::Run& run, GptModel& model, AdamW* optimizer, SpectralDecomposition* sdmoe,
               const ProcessGroups& groups, MomentSharding sharding);

  // The checkpoint to start from: checkpoint.load, else DIR/latest when it exists, else ""
  // (fresh start). Throws sdmoe::Error when resume is REQUIRED and there is none, or the
  // pointer names a missing directory. The same answer on every rank (no collective).
  static std::string resume_path(const config::Checkpoint& cfg);

  // Collective over the world. Throws sdmoe::Error on every rank when it fails.
  void save(const TrainingPosition& position);
  // Collective over the world: every rank reads `path` (a step directory or its
  // checkpoint.h5) into its blocks. A missing, truncated or corrupt file, or one from a
  // different model, throws sdmoe::Error on every rank with the reason. parameters_only:
  // the model's parameters alone (W_eff for SD-MoE matrices), for evaluation.
  TrainingPosition load(const std::string& path, bool parameters_only = false);

  // Creates dir when missing and checks that a file can be written in it, so that a
  // checkpoint.dir that cannot hold checkpoints fails the run at start-up, not at its
  // first save. Throws sdmoe::Error with the reason. For the writing rank only.
  static void check_writable(const std::string& dir);

  // The directory of step `step` inside dir.
  static std::string step_directory(const std::string& dir, int64_t step);

 private:
  const config::Run& run_;
  GptModel& model_;
  AdamW* optimizer_;
  SpectralDecomposition* sdmoe_;
  const ProcessGroups& groups_;
  MomentSharding sharding_;
};

}  // namespace sdmoe
