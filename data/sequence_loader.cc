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
    : SequenceLoader(std::vector<BlendSource>{{std::move(ds), 1.0}}, seq_len, seed, dp_rank, dp_size) {}

SequenceLoader::SequenceLoader(std::vector<BlendSource> sources, int seq_len, uint64_t seed, int dp_rank, int dp_size)
    : seq_len_(seq_len), dp_rank_(dp_rank), dp_size_(dp_size) {
  if (sources.empty()) fail("SequenceLoader: no dataset");
  if (seq_len_ < 1) fail("SequenceLoader: seq_len must be >= 1, got {}", seq_len_);
  if (dp_size_ < 1 || dp_rank_ < 0 || dp_rank_ >= dp_size_)
    fail("SequenceLoader: data-parallel rank {} is outside [0, {})", dp_rank_, dp_size_);
  double total = 0.0;
  for (const BlendSource& b : sources) {
    if (!b.dataset) fail("SequenceLoader: no dataset");
    if (!(b.weight > 0.0)) fail("blend weight {} must be positive", b.weight);
    total += b.weight;
  }
  for (size_t i = 0; i < sources.size(); ++i) {
    const TokenDataset& ds = *sources[i].dataset;
    if (ds.num_tokens() < static_cast<int64_t>(seq_len_) + 1)
      fail("dataset{} has {} tokens, fewer than seq_len + 1 = {}: use a larger split or a shorter sequence",
           sources.size() > 1 ? fmt::format(" {} of the blend", i) : std::string(), ds.num_tokens(), seq_len_ + 1);
    Source s;
    s.dataset = sources[i].dataset;
    s.weight = sources[i].weight / total;
    // Dataset 0 keeps the plain stream's seed, so one dataset is exactly the plain loader.
    s.seed = i == 0 ? seed : SplitMix64{seed ^ (0x632be59bd9b4e019ULL * (i + 1))}.next();
    s.num_samples = static_cast<uint64_t>(ds.num_tokens() - 1) / static_cast<uint64_t>(seq_len_);
    sources_.push_back(std::move(s));
  }
  schedule_counts_.assign(sources_.size(), 0);
}

uint64_t SequenceLoader::window_in(Source& source, uint64_t c) {
  const uint64_t epoch = c / source.num_samples;
  if (epoch != source.cached_epoch) {
    source.cached_permutation = epoch_permutation(source.num_samples, source.seed, epoch);
    source.cached_epoch = epoch;
  }
  return source.cached_permutation[c % source.num_samples];
}

std::pair<size_t, uint64_t> SequenceLoader::pick(uint64_t g) {
  if (sources_.size() == 1) return {0, g};
  if (g < schedule_next_) {
    schedule_next_ = 0;
    std::fill(schedule_counts_.begin(), schedule_counts_.end(), 0);
  }
  while (true) {
    // Sample n = schedule_next_ goes to the dataset furthest behind its share.
    const double n = double(schedule_next_ + 1);
    size_t best = 0;
    double best_error = -1e300;
    for (size_t i = 0; i < sources_.size(); ++i) {
      const double error = sources_[i].weight * n - double(schedule_counts_[i]);
      if (error > best_error) {
        best_error = error;
        best = i;
      }
    }
    const uint64_t c = schedule_counts_[best]++;
    if (schedule_next_++ == g) return {best, c};
  }
}

std::pair<size_t, uint64_t> SequenceLoader::sample(uint64_t g) {
  const auto [source, c] = pick(g);
  return {source, window_in(sources_[source], c)};
}

uint64_t SequenceLoader::window_of_global_sample(uint64_t g) { return sample(g).second; }

void SequenceLoader::next(int micro_batch, std::vector<int32_t>& tokens_out) {
  if (micro_batch < 1) fail("SequenceLoader: micro_batch must be >= 1, got {}", micro_batch);
  const size_t row = static_cast<size_t>(seq_len_) + 1;
  tokens_out.resize(static_cast<size_t>(micro_batch) * row);
  const uint64_t first = position_ + static_cast<uint64_t>(dp_rank_) * static_cast<uint64_t>(micro_batch);
  for (int b = 0; b < micro_batch; ++b) {
    const auto [source, window] = sample(first + static_cast<uint64_t>(b));
    const std::span<const int32_t> tokens = sources_[source].dataset->tokens();
    const size_t start = static_cast<size_t>(window) * static_cast<size_t>(seq_len_);
    std::copy_n(tokens.begin() + static_cast<std::ptrdiff_t>(start), row,
                tokens_out.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(b) * row));
  }
  position_ += static_cast<uint64_t>(micro_batch) * static_cast<uint64_t>(dp_size_);
}

}  // namespace sdmoe::data
