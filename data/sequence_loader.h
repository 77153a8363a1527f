// Deterministic fixed-length sampling of training windows, resumable and sharded over
// data-parallel ranks.
//
// The split's token stream is cut into num_samples = (num_tokens - 1) / seq_len windows:
// sample k is tokens[k*seq_len, k*seq_len + seq_len] inclusive (seq_len + 1 tokens, so
// inputs and next-token targets come from one row; neighbors share one token). Windows
// cross document boundaries; the EOD token marks them.
//
// Global sample g (counted over all ranks since the start of training) is window
// perm_e[g % num_samples] with epoch e = g / num_samples, where perm_e is a Fisher-Yates
// shuffle driven by splitmix64 seeded from (seed, e). Everything is integer arithmetic
// of our own, so the stream is identical across compilers, standard libraries and
// machines, and a checkpoint only needs position().
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "data/token_dataset.h"

namespace sdmoe::data {

class SequenceLoader {
 public:
  // Throws sdmoe::Error if the dataset has fewer than seq_len + 1 tokens or the arguments
  // are out of range.
  SequenceLoader(std::shared_ptr<const TokenDataset> ds, int seq_len, uint64_t seed, int dp_rank, int dp_size);

  // One micro-batch for this rank: consumes micro_batch * dp_size global samples, of which
  // this rank gets [position + dp_rank*micro_batch, position + (dp_rank+1)*micro_batch).
  // Fills tokens_out with micro_batch * (seq_len + 1) int32 tokens, row-major.
  void next(int micro_batch, std::vector<int32_t>& tokens_out);

  uint64_t position() const { return position_; }  // global samples consumed, all ranks
  void set_position(uint64_t global_samples_consumed) { position_ = global_samples_consumed; }
  uint64_t num_samples() const { return num_samples_; }  // windows per epoch
  int seq_len() const { return seq_len_; }

  // The window index (0 <= k < num_samples) that global sample g reads. Exposed for tests
  // and for logging which data a step saw.
  uint64_t window_of_global_sample(uint64_t g);

 private:
  const std::vector<uint64_t>& permutation_for_epoch(uint64_t epoch);

  std::shared_ptr<const TokenDataset> ds_;
  int seq_len_;           // tokens of context per sample (rows are seq_len + 1 long)
  uint64_t seed_;
  int dp_rank_, dp_size_;
  uint64_t num_samples_;  // windows per epoch
  uint64_t position_ = 0; // global samples consumed

  uint64_t cached_epoch_ = UINT64_MAX;     // epoch whose permutation is in cached_permutation_
  std::vector<uint64_t> cached_permutation_;  // [num_samples] window index for each slot
};

// Fisher-Yates permutation of 0..n-1 from splitmix64 seeded by (seed, epoch); a pure
// function, identical on every platform.
std::vector<uint64_t> epoch_permutation(uint64_t n, uint64_t seed, uint64_t epoch);

}  // namespace sdmoe::data
