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
//
// Blends. With several datasets and weights, global sample g comes from the dataset the
// greedy schedule of Megatron's blending picks (the one whose weight x (g + 1) exceeds the
// samples it has given so far by the most; ties to the first), as that dataset's c-th
// sample, c counting its earlier picks; each dataset has its own windows and shuffle
// (dataset i > 0 shuffled with a seed derived from (seed, i)). One dataset is the plain
// stream above.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "data/token_dataset.h"

namespace sdmoe::data {

struct BlendSource {
  std::shared_ptr<const TokenDataset> dataset;
  double weight = 1.0;  // relative; normalised over the blend
};

class SequenceLoader {
 public:
  // Throws sdmoe::Error if the dataset has fewer than seq_len + 1 tokens or the arguments
  // are out of range.
  SequenceLoader(std::shared_ptr<const TokenDataset> ds, int seq_len, uint64_t seed, int dp_rank, int dp_size);
  // A weighted blend; also throws when a weight is not positive.
  SequenceLoader(std::vector<BlendSource> sources, int seq_len, uint64_t seed, int dp_rank, int dp_size);

  // One micro-batch for this rank: consumes micro_batch * dp_size global samples, of which
  // this rank gets [position + dp_rank*micro_batch, position + (dp_rank+1)*micro_batch).
  // Fills tokens_out with micro_batch * (seq_len + 1) int32 tokens, row-major.
  void next(int micro_batch, std::vector<int32_t>& tokens_out);

  uint64_t position() const { return position_; }  // global samples consumed, all ranks
  void set_position(uint64_t global_samples_consumed) { position_ = global_samples_consumed; }
  uint64_t num_samples() const { return sources_[0].num_samples; }  // windows per epoch (first dataset)
  int seq_len() const { return seq_len_; }

  // The window index (0 <= k < num_samples) that global sample g reads. Exposed for tests
  // and for logging which data a step saw.
  uint64_t window_of_global_sample(uint64_t g);
  // The dataset (index into the blend) and its window that global sample g reads.
  std::pair<size_t, uint64_t> sample(uint64_t g);

 private:
  struct Source {
    std::shared_ptr<const TokenDataset> dataset;
    double weight = 1.0;
    uint64_t seed = 0;
    uint64_t num_samples = 0;                   // windows per epoch
    uint64_t cached_epoch = UINT64_MAX;         // epoch whose permutation is cached
    std::vector<uint64_t> cached_permutation;   // [num_samples] window index for each slot
  };
  uint64_t window_in(Source& source, uint64_t c);
  // (dataset, its sample count) of global sample g, from the greedy schedule.
  std::pair<size_t, uint64_t> pick(uint64_t g);

  std::vector<Source> sources_;
  int seq_len_;           // tokens of context per sample (rows are seq_len + 1 long)
  int dp_rank_, dp_size_;
  uint64_t position_ = 0; // global samples consumed
  // The schedule replayed up to schedule_next_ (samples decided so far) with each
  // dataset's picks; asking for an earlier sample replays it from 0.
  uint64_t schedule_next_ = 0;
  std::vector<uint64_t> schedule_counts_;
};

// Fisher-Yates permutation of 0..n-1 from splitmix64 seeded by (seed, epoch); a pure
// function, identical on every platform.
std::vector<uint64_t> epoch_permutation(uint64_t n, uint64_t seed, uint64_t epoch);

}  // namespace sdmoe::data
