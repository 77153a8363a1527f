// Megatron-LM indexed datasets (.bin/.idx) read by TokenDataset::open_megatron. The files
// are written here byte by byte from the format as Megatron's indexed_dataset.py writes
// it (header, version, dtype code, counts, lengths, pointers, document indices), not by
// any code of ours.
#include <cstring>
#include <vector>

#include "core/check.h"
#include "data/sequence_loader.h"
#include "data/token_dataset.h"
#include "tests/data/test_support.h"

namespace sdmoe::data {
namespace {

using testing::ScratchDir;

constexpr int32_t kEod = 50256;

// Appends the little-endian bytes of `value`.
template <typename T>
void put(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.append(bytes, sizeof(T));
}

// Documents, each a list of sequences (Megatron splits a document into sentences when
// asked), written as PREFIX.bin/.idx with tokens of type T (dtype code `code`).
template <typename T>
void write_megatron(const std::string& prefix, uint8_t code, const std::vector<std::vector<std::vector<int64_t>>>& docs,
                    std::string* idx_out = nullptr) {
  std::string bin, idx;
  std::vector<int32_t> lengths;
  std::vector<int64_t> pointers, doc_index{0};
  int64_t byte = 0;
  for (const auto& doc : docs) {
    for (const auto& seq : doc) {
      lengths.push_back(int32_t(seq.size()));
      pointers.push_back(byte);
      for (int64_t t : seq) put<T>(bin, T(t));
      byte += int64_t(seq.size() * sizeof(T));
    }
    doc_index.push_back(int64_t(lengths.size()));
  }
  idx.append("MMIDIDX\0\0", 9);
  put<uint64_t>(idx, 1);
  put<uint8_t>(idx, code);
  put<uint64_t>(idx, lengths.size());
  put<uint64_t>(idx, doc_index.size());
  for (int32_t l : lengths) put<int32_t>(idx, l);
  for (int64_t p : pointers) put<int64_t>(idx, p);
  for (int64_t d : doc_index) put<int64_t>(idx, d);
  testing::write_file(prefix + ".bin", bin);
  testing::write_file(prefix + ".idx", idx);
  if (idx_out) *idx_out = idx;
}

// Three documents; the second is two sequences (sentences), the third uses token ids
// above 2^15 (a sign error in uint16 handling would show).
std::vector<std::vector<std::vector<int64_t>>> sample_docs() {
  return {{{10, 11, 12, kEod}}, {{20, 21}, {22, 23, 24, kEod}}, {{40000, 50000, 30, kEod}}};
}

std::vector<int32_t> flat_tokens() { return {10, 11, 12, kEod, 20, 21, 22, 23, 24, kEod, 40000, 50000, 30, kEod}; }

TEST(MegatronDataset, ReadsUint16AndInt32WithMultiSequenceDocuments) {
  ScratchDir dir;
  for (const auto& [name, code] : {std::pair<std::string, uint8_t>{"u16", 8}, {"i32", 4}}) {
    const std::string prefix = dir.file(name);
    if (code == 8) write_megatron<uint16_t>(prefix, code, sample_docs());
    else write_megatron<int32_t>(prefix, code, sample_docs());
    for (const std::string& path : {prefix, prefix + ".bin", prefix + ".idx"}) {
      ASSERT_TRUE(is_megatron_dataset(path)) << path;
      const TokenDataset ds = TokenDataset::open_megatron(path, MegatronSelection{});
      EXPECT_EQ(std::vector<int32_t>(ds.tokens().begin(), ds.tokens().end()), flat_tokens()) << name;
      EXPECT_EQ(std::vector<int64_t>(ds.doc_offsets().begin(), ds.doc_offsets().end()),
                (std::vector<int64_t>{0, 4, 10, 14}))
          << name;
      EXPECT_EQ(ds.vocab_size(), kEod + 1) << name;  // the largest token is the EOD
      EXPECT_EQ(ds.eod_token(), kEod);
    }
  }
}

// Megatron writes an empty document (no sequences) for an empty input text: skipped.
TEST(MegatronDataset, EmptyDocumentsAreSkipped) {
  ScratchDir dir;
  write_megatron<uint16_t>(dir.file("e"), 8, {{{1, 2, kEod}}, {}, {{3, kEod}}});
  const TokenDataset ds = TokenDataset::open_megatron(dir.file("e"), MegatronSelection{});
  EXPECT_EQ(std::vector<int64_t>(ds.doc_offsets().begin(), ds.doc_offsets().end()), (std::vector<int64_t>{0, 3, 5}));
  EXPECT_EQ(std::vector<int32_t>(ds.tokens().begin(), ds.tokens().end()), (std::vector<int32_t>{1, 2, kEod, 3, kEod}));
}

TEST(MegatronDataset, TrainAndValidationSelectionsSplitDocuments) {
  ScratchDir dir;
  const std::string prefix = dir.file("d");
  write_megatron<uint16_t>(prefix, 8, sample_docs());
  MegatronSelection train{MegatronSelection::Part::TRAIN, 0.3, kEod}, validation = train;
  validation.part = MegatronSelection::Part::VALIDATION;
  // 3 documents x 0.3 rounds to 1 held out: the last one.
  const TokenDataset t = TokenDataset::open_megatron(prefix, train), v = TokenDataset::open_megatron(prefix, validation);
  EXPECT_EQ(t.num_documents(), 2);
  EXPECT_EQ(v.num_documents(), 1);
  EXPECT_EQ(std::vector<int32_t>(v.tokens().begin(), v.tokens().end()), (std::vector<int32_t>{40000, 50000, 30, kEod}));
  EXPECT_EQ(t.num_tokens(), 10);
}

TEST(MegatronDataset, TrainingWindowsCrossDocuments) {
  ScratchDir dir;
  const std::string prefix = dir.file("w");
  write_megatron<int32_t>(prefix, 4, sample_docs());
  auto ds = std::make_shared<const TokenDataset>(TokenDataset::open_megatron(prefix, MegatronSelection{}));
  // seq_len 6: windows [0..6], [6..12] of the 14 tokens; each spans a document boundary.
  SequenceLoader loader(ds, 6, 7, 0, 1);
  ASSERT_EQ(loader.num_samples(), 2u);
  const std::vector<int32_t> all = flat_tokens();
  std::vector<int32_t> got;
  for (int i = 0; i < 2; ++i) {
    loader.next(1, got);
    const uint64_t w = loader.window_of_global_sample(uint64_t(i));
    ASSERT_EQ(got, std::vector<int32_t>(all.begin() + int64_t(w) * 6, all.begin() + int64_t(w) * 6 + 7));
    EXPECT_NE(std::find(got.begin(), got.end(), kEod), got.end()) << "window " << w << " holds no boundary";
  }
}

// Each damaged dataset fails with a message naming the file and the problem.
void expect_error(const std::string& path, const std::string& fragment, MegatronSelection s = {}) {
  try {
    TokenDataset::open_megatron(path, s);
    ADD_FAILURE() << "no error for " << path << " (expected '" << fragment << "')";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(MegatronDataset, DamagedFilesGiveClearErrors) {
  ScratchDir dir;
  const std::string good = dir.file("g");
  std::string idx;
  write_megatron<uint16_t>(good, 8, sample_docs(), &idx);
  const std::string bin = [&] {
    std::ifstream in(good + ".bin", std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }();
  auto variant = [&](const std::string& name, const std::string& idx_bytes, const std::string& bin_bytes) {
    testing::write_file(dir.file(name) + ".idx", idx_bytes);
    testing::write_file(dir.file(name) + ".bin", bin_bytes);
    return dir.file(name);
  };
  expect_error(dir.file("missing"), "no such file");
  std::string bad_magic = idx;
  bad_magic[0] = 'X';
  expect_error(variant("magic", bad_magic, bin), "not a Megatron index");
  std::string float_dtype = idx;
  float_dtype[17] = 7;  // float32
  expect_error(variant("float", float_dtype, bin), "dtype code 7");
  expect_error(variant("short_idx", idx.substr(0, idx.size() - 5), bin), "truncated");
  expect_error(variant("short_bin", idx, bin.substr(0, bin.size() - 2)), "truncated");
  std::string bad_pointer = idx;
  bad_pointer[9 + 8 + 1 + 8 + 8 + 4 * 4 + 8] ^= 0x10;  // second sequence pointer
  expect_error(variant("pointer", bad_pointer, bin), "corrupt index");
  std::string bad_document = idx;
  // Document index 1 (after the header, 4 lengths and 4 pointers) made larger than the
  // sequence count.
  bad_document[9 + 8 + 1 + 8 + 8 + 4 * 4 + 4 * 8 + 8] = 99;
  expect_error(variant("document", bad_document, bin), "corrupt index");
  // Without --append-eod the documents do not end with the EOD token.
  write_megatron<uint16_t>(dir.file("no_eod"), 8, {{{1, 2, 3}}, {{4, 5}}});
  expect_error(dir.file("no_eod"), "does not end with the EOD token");
  // One document cannot be split into training and validation.
  write_megatron<uint16_t>(dir.file("one"), 8, {{{1, 2, kEod}}});
  expect_error(dir.file("one"), "cannot be split", MegatronSelection{MegatronSelection::Part::TRAIN, 0.05, kEod});
}

}  // namespace
}  // namespace sdmoe::data
