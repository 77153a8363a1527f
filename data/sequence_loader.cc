#include "data/sequence_loader.h"

#include <algorithm>

#include "core/check.h"

namespace sdmoe::data {

namespace {

// splitmix64 (Steele, Lea, Flood 2014): a tiny generator whose output is fixed by
// definition, unlike std::uniform_int_distribution / std::shuffle, which differ between
// libstdc++ and libc++.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, bound) without modulo bias: reject the lowest 2^64 mod bound outputs.
  uint64_t below(uint64_t bound) {
    const uint64_t reject_below = (0 - bound) % bound;  // == 2^64 mod bound
    while (true) {
      const uint64_t r = next();
      if (r >= reject_below) return r % bound;
    }
  }
};

}  // namespace

std::vector<uint64_t> epoch_permutation(uint64_t n, uint64_t seed, uint64_t epoch) {
  // Distinct (seed, epoch) pairs must give unrelated streams; hashing the epoch through
  // one splitmix step before mixing keeps seed s, epoch e+1 apart from seed s+1, epoch e.
  SplitMix64 epoch_hash{epoch ^ 0x5851f42d4c957f2dULL};
  SplitMix64 rng{seed ^ epoch_hash.next()};
  std::vector<uint64_t> perm(n);
  for (uint64_t i = 0; i < n; ++i) perm[i] = i;
  for (uint64_t i = n; i > 1; --i) std::swap(perm[i - 1], perm[rng.below(i)]);
  return perm;
}

SequenceLoader::SequenceLoader(std::shared_ptr<const TokenDataset> ds, int seq_len, uint64_t seed, int dp_rank,
                               int dp_size)
    : ds_(std::move(ds)), seq_len_(seq_len), seed_(seed), dp_rank_(dp_rank), dp_size_(dp_size) {
  if (!ds_) fail("SequenceLoader: no dataset");
  if (seq_len_ < 1) fail("SequenceLoader: seq_len must be >= 1, got {}", seq_len_);
  if (dp_size_ < 1 || dp_rank_ < 0 || dp_rank_ >= dp_size_)
    fail("SequenceLoader: data-parallel rank {} is outside [0, {})", dp_rank_, dp_size_);
  if (ds_->num_tokens() < static_cast<int64_t>(seq_len_) + 1)
    fail("dataset has {} tokens, fewer than seq_len + 1 = {}: use a larger split or a shorter sequence",
         ds_->num_tokens(), seq_len_ + 1);
  num_samples_ = static_cast<uint64_t>(ds_->num_tokens() - 1) / static_cast<uint64_t>(seq_len_);
}

const std::vector<uint64_t>& SequenceLoader::permutation_for_epoch(uint64_t epoch) {
  if (epoch != cached_epoch_) {
    cached_permutation_ = epoch_permutation(num_samples_, seed_, epoch);
    cached_epoch_ = epoch;
  }
  return cached_permutation_;
}

uint64_t SequenceLoader::window_of_global_sample(uint64_t g) {
  return permutation_for_epoch(g / num_samples_)[g % num_samples_];
}

void SequenceLoader::next(int micro_batch, std::vector<int32_t>& tokens_out) {
  if (micro_batch < 1) fail("SequenceLoader: micro_batch must be >= 1, got {}", micro_batch);
  const size_t row = static_cast<size_t>(seq_len_) + 1;
  tokens_out.resize(static_cast<size_t>(micro_batch) * row);
  const std::span<const int32_t> tokens = ds_->tokens();
  const uint64_t first = position_ + static_cast<uint64_t>(dp_rank_) * static_cast<uint64_t>(micro_batch);
  for (int b = 0; b < micro_batch; ++b) {
    const uint64_t window = window_of_global_sample(first + static_cast<uint64_t>(b));
    const size_t start = static_cast<size_t>(window) * static_cast<size_t>(seq_len_);
    std::copy_n(tokens.begin() + static_cast<std::ptrdiff_t>(start), row,
                tokens_out.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(b) * row));
  }
  position_ += static_cast<uint64_t>(micro_batch) * static_cast<uint64_t>(dp_size_);
}

}  // namespace sdmoe::data
