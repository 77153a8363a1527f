#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "core/check.h"
#include "data/sequence_loader.h"

namespace sdmoe::data {
namespace {

// tokens[i] == i, so a row's first token tells which window it is. The last token doubles
// as the EOD id so that the single document ends with EOD.
std::shared_ptr<const TokenDataset> counting_dataset(int32_t num_tokens) {
  std::vector<int32_t> tokens(static_cast<size_t>(num_tokens));
  for (int32_t i = 0; i < num_tokens; ++i) tokens[static_cast<size_t>(i)] = i;
  const TokenFileInfo info{num_tokens, num_tokens - 1, 0};
  return std::make_shared<const TokenDataset>(
      TokenDataset::from_memory(info, std::move(tokens), std::vector<int64_t>{0, num_tokens}));
}

std::vector<int32_t> take(SequenceLoader& loader, int micro_batch, int steps) {
  std::vector<int32_t> all, batch;
  for (int s = 0; s < steps; ++s) {
    loader.next(micro_batch, batch);
    all.insert(all.end(), batch.begin(), batch.end());
  }
  return all;
}

TEST(SequenceLoader, NumSamplesAndRowShape) {
  const auto ds = counting_dataset(1001);
  SequenceLoader loader(ds, 10, 1, 0, 1);
  EXPECT_EQ(loader.num_samples(), 100u);  // (1001 - 1) / 10
  EXPECT_EQ(SequenceLoader(counting_dataset(1000), 10, 1, 0, 1).num_samples(), 99u);
  std::vector<int32_t> batch;
  loader.next(3, batch);
  ASSERT_EQ(batch.size(), 3u * 11u);
  for (int b = 0; b < 3; ++b) {
    const int32_t first = batch[static_cast<size_t>(b) * 11];
    EXPECT_EQ(first % 10, 0) << "windows start at multiples of seq_len";
    for (int j = 0; j < 11; ++j) EXPECT_EQ(batch[static_cast<size_t>(b * 11 + j)], first + j);
  }
  EXPECT_EQ(loader.position(), 3u);
}

TEST(SequenceLoader, SameSeedSameStreamDifferentSeedDifferentStream) {
  const auto ds = counting_dataset(5000);
  SequenceLoader a(ds, 16, 42, 0, 1), b(ds, 16, 42, 0, 1), c(ds, 16, 43, 0, 1);
  const auto stream_a = take(a, 4, 200);  // 800 samples: crosses several epochs of 312
  EXPECT_EQ(stream_a, take(b, 4, 200));
  EXPECT_NE(stream_a, take(c, 4, 200));
}

TEST(SequenceLoader, EveryWindowOncePerEpochAndEpochsDiffer) {
  const auto ds = counting_dataset(2001);
  SequenceLoader loader(ds, 8, 7, 0, 1);
  const uint64_t n = loader.num_samples();
  ASSERT_EQ(n, 250u);
  std::vector<int32_t> batch;
  std::vector<std::vector<int32_t>> epochs(3);
  for (auto& starts : epochs) {
    for (uint64_t s = 0; s < n; s += 5) {  // 5 divides 250: batches do not straddle epochs
      loader.next(5, batch);
      for (int b = 0; b < 5; ++b) starts.push_back(batch[static_cast<size_t>(b) * 9]);
    }
  }
  for (const auto& starts : epochs) {
    std::vector<int32_t> sorted = starts;
    std::sort(sorted.begin(), sorted.end());
    for (uint64_t k = 0; k < n; ++k) ASSERT_EQ(sorted[k], static_cast<int32_t>(k * 8)) << "window " << k;
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
  // Not the identity order either: the shuffle happened.
  std::vector<int32_t> identity = epochs[0];
  std::sort(identity.begin(), identity.end());
  EXPECT_NE(epochs[0], identity);
}

TEST(SequenceLoader, SetPositionResumesIdenticalStream) {
  const auto ds = counting_dataset(3000);
  SequenceLoader first(ds, 32, 99, 0, 1);
  take(first, 3, 37);  // ends mid-epoch (num_samples 93)
  const uint64_t checkpoint = first.position();
  EXPECT_EQ(checkpoint, 111u);
  const auto continued = take(first, 3, 50);

  SequenceLoader resumed(ds, 32, 99, 0, 1);
  resumed.set_position(checkpoint);
  EXPECT_EQ(take(resumed, 3, 50), continued);
  EXPECT_EQ(resumed.position(), first.position());
}

TEST(SequenceLoader, DataParallelRanksPartitionTheSingleRankStream) {
  const auto ds = counting_dataset(4000);
  const int micro_batch = 3;
  SequenceLoader single(ds, 20, 5, 0, 1);
  SequenceLoader rank0(ds, 20, 5, 0, 2), rank1(ds, 20, 5, 1, 2);
  std::vector<int32_t> expected_pair, got0, got1;
  for (int step = 0; step < 80; ++step) {  // 480 samples, crossing the 199-sample epochs
    const auto two = take(single, micro_batch, 2);
    rank0.next(micro_batch, got0);
    rank1.next(micro_batch, got1);
    std::vector<int32_t> together = got0;
    together.insert(together.end(), got1.begin(), got1.end());
    ASSERT_EQ(together, two) << "step " << step;
    ASSERT_EQ(rank0.position(), single.position());
    ASSERT_EQ(rank1.position(), single.position());
  }
}

// The order must be the same on every platform; these values come from an independent
// Python implementation of the documented generator (splitmix64 seeded with
// seed ^ splitmix64_first_output(epoch ^ 0x5851f42d4c957f2d), Fisher-Yates from the top,
// unbiased bounded draws by rejecting outputs below 2^64 mod bound).
TEST(SequenceLoader, PermutationIsPlatformIndependent) {
  EXPECT_EQ(epoch_permutation(10, 42, 0), (std::vector<uint64_t>{3, 2, 5, 4, 8, 9, 0, 1, 7, 6}));
  EXPECT_EQ(epoch_permutation(10, 42, 1), (std::vector<uint64_t>{8, 1, 0, 6, 3, 5, 9, 2, 7, 4}));
  EXPECT_EQ(epoch_permutation(12, 7, 3), (std::vector<uint64_t>{2, 0, 10, 9, 4, 3, 1, 7, 11, 6, 8, 5}));
  EXPECT_EQ(epoch_permutation(1, 3, 0), (std::vector<uint64_t>{0}));
}

TEST(SequenceLoader, RejectsTooSmallDatasetAndBadArguments) {
  const auto ds = counting_dataset(10);
  EXPECT_THROW(SequenceLoader(ds, 10, 1, 0, 1), sdmoe::Error);  // needs 11 tokens
  EXPECT_NO_THROW(SequenceLoader(ds, 9, 1, 0, 1));
  EXPECT_EQ(SequenceLoader(ds, 9, 1, 0, 1).num_samples(), 1u);
  EXPECT_THROW(SequenceLoader(ds, 0, 1, 0, 1), sdmoe::Error);
  EXPECT_THROW(SequenceLoader(ds, 4, 1, 2, 2), sdmoe::Error);
  EXPECT_THROW(SequenceLoader(nullptr, 4, 1, 0, 1), sdmoe::Error);
  SequenceLoader loader(ds, 4, 1, 0, 1);
  std::vector<int32_t> batch;
  EXPECT_THROW(loader.next(0, batch), sdmoe::Error);
}

// A dataset whose tokens are offset + i, so a row's first token tells the dataset and
// the window.
std::shared_ptr<const TokenDataset> offset_dataset(int32_t num_tokens, int32_t offset) {
  std::vector<int32_t> tokens(static_cast<size_t>(num_tokens));
  for (int32_t i = 0; i < num_tokens; ++i) tokens[static_cast<size_t>(i)] = offset + i;
  const TokenFileInfo info{offset + num_tokens, offset + num_tokens - 1, 0};
  return std::make_shared<const TokenDataset>(
      TokenDataset::from_memory(info, std::move(tokens), std::vector<int64_t>{0, num_tokens}));
}

// Blend of three datasets, weights 5 : 3 : 2. Over every prefix of the stream each dataset
// has given its share of the samples to within one (the greedy schedule's guarantee);
// each dataset's samples, in order, are that dataset's own shuffled stream (dataset 0's
// with the plain loader's seed); rows hold the right dataset's tokens.
TEST(SequenceLoader, BlendFollowsWeightsAndEachDatasetsOwnStream) {
  const int seq = 4;
  const std::vector<std::shared_ptr<const TokenDataset>> ds{offset_dataset(401, 0), offset_dataset(201, 10000),
                                                            offset_dataset(101, 20000)};
  const std::vector<double> weight{5, 3, 2};
  SequenceLoader blend({{ds[0], weight[0]}, {ds[1], weight[1]}, {ds[2], weight[2]}}, seq, 9, 0, 1);
  std::vector<uint64_t> count(3, 0);
  std::vector<std::vector<uint64_t>> windows(3);
  std::vector<int32_t> row;
  for (uint64_t g = 0; g < 1000; ++g) {
    blend.next(1, row);
    const int source = row[0] / 10000;
    ASSERT_LT(source, 3);
    const auto [picked, window] = blend.sample(g);
    ASSERT_EQ(int(picked), source) << "sample " << g;
    ASSERT_EQ(row[0], source * 10000 + int32_t(window) * seq) << "sample " << g;
    windows[source].push_back(window);
    ++count[source];
    for (int i = 0; i < 3; ++i)
      ASSERT_LE(std::abs(double(count[i]) - weight[i] / 10.0 * double(g + 1)), 1.0) << "dataset " << i << " at " << g;
  }
  // Dataset 0 alone, with the same seed: the same windows in the same order.
  SequenceLoader alone(ds[0], seq, 9, 0, 1);
  for (size_t c = 0; c < windows[0].size(); ++c) ASSERT_EQ(windows[0][c], alone.window_of_global_sample(c));
  // Datasets 1 and 2 wrap into further epochs, each window once per epoch.
  for (int i = 1; i < 3; ++i) {
    const uint64_t n = (ds[i]->num_tokens() - 1) / seq;
    std::set<uint64_t> first_epoch(windows[i].begin(), windows[i].begin() + int64_t(n));
    EXPECT_EQ(first_epoch.size(), n) << "dataset " << i;
  }
}

// Resuming a blend at any position, forwards or backwards, gives the same stream; two
// data-parallel ranks share it out as with one dataset.
TEST(SequenceLoader, BlendResumesAndShardsLikeOneDataset) {
  const std::vector<BlendSource> sources{{offset_dataset(301, 0), 1.0}, {offset_dataset(151, 10000), 2.0}};
  SequenceLoader reference(sources, 6, 4, 0, 1);
  const std::vector<int32_t> all = take(reference, 3, 20);
  for (uint64_t position : {uint64_t(30), uint64_t(9), uint64_t(57)}) {
    SequenceLoader resumed(sources, 6, 4, 0, 1);
    take(resumed, 3, 5);  // moves past, then jumps
    resumed.set_position(position);
    const std::vector<int32_t> rest = take(resumed, 3, 1);
    ASSERT_EQ(rest, std::vector<int32_t>(all.begin() + int64_t(position) * 7, all.begin() + int64_t(position + 3) * 7))
        << "position " << position;
  }
  SequenceLoader rank0(sources, 6, 4, 0, 2), rank1(sources, 6, 4, 1, 2);
  std::vector<int32_t> a, b;
  for (int step = 0; step < 10; ++step) {
    rank0.next(2, a);
    rank1.next(2, b);
    const auto at = all.begin() + int64_t(step) * 4 * 7;
    ASSERT_EQ(a, std::vector<int32_t>(at, at + 14));
    ASSERT_EQ(b, std::vector<int32_t>(at + 14, at + 28));
  }
  EXPECT_THROW(SequenceLoader({{sources[0].dataset, 0.0}}, 6, 4, 0, 1), sdmoe::Error);
}

}  // namespace
}  // namespace sdmoe::data
