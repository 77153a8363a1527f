// Tokenized corpus on disk (HDF5) and in memory.
//
// File layout ("sdmoe-tokens-v1"; readable with h5py, see docs/data.md):
//   attributes on /: format = "sdmoe-tokens-v1" (string), vocab_size (int64),
//                    eod_token (int64), tokenizer_fingerprint (uint64)
//   /train/tokens, /validation/tokens: 1-D, uint16 when vocab_size <= 65535 else int32
//   /train/doc_offsets, /validation/doc_offsets: int64 [n_docs + 1], start of each document
//        in tokens, first 0, last = number of tokens; every document ends with eod_token.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace sdmoe::data {

inline constexpr const char* kTokenFileFormat = "sdmoe-tokens-v1";

struct TokenFileInfo {
  int64_t vocab_size = 0;
  int32_t eod_token = 0;
  uint64_t tokenizer_fingerprint = 0;  // BpeTokenizer::fingerprint() of the tokenizer used
};

// Which documents of a Megatron dataset (which has no splits of its own) to read: all,
// or the first (TRAIN) or last (VALIDATION) documents with validation_fraction of them
// held out (at least one).
struct MegatronSelection {
  enum class Part { ALL, TRAIN, VALIDATION };
  Part part = Part::ALL;
  double validation_fraction = 0.05;
  int32_t eod_token = 50256;  // GPT-2's <|endoftext|>; Megatron files do not record it
};

// A Megatron dataset's prefix: PATH without a trailing .bin or .idx.
std::string megatron_prefix(const std::string& path);
// Whether PATH (a prefix, or the .bin or .idx) names an existing PREFIX.bin + PREFIX.idx pair.
bool is_megatron_dataset(const std::string& path);

// One split of a token file, held in memory as int32.
class TokenDataset {
 public:
  // split is "train" or "validation". Throws sdmoe::Error "<path>: <reason>" for a missing
  // file, a non-HDF5 file, a wrong format, a missing split, or truncated/corrupt data.
  static TokenDataset open(const std::string& path, const std::string& split);
  // A Megatron-LM indexed dataset (PREFIX.bin/.idx, docs/data.md), or part of it. Every
  // document must end with the EOD token (Megatron's preprocess_data.py --append-eod).
  // The vocabulary size is taken as the largest token + 1 and the tokenizer fingerprint
  // is unknown (0). Throws sdmoe::Error naming the file and the problem.
  static TokenDataset open_megatron(const std::string& path, const MegatronSelection& selection);

  // For tests and tools that make data in memory. Validates like open() does.
  static TokenDataset from_memory(const TokenFileInfo& info, std::vector<int32_t> tokens,
                                  std::vector<int64_t> doc_offsets);

  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(doc_offsets_.size()) - 1; }
  int64_t vocab_size() const { return info_.vocab_size; }
  int32_t eod_token() const { return info_.eod_token; }
  uint64_t tokenizer_fingerprint() const { return info_.tokenizer_fingerprint; }
  std::span<const int32_t> tokens() const { return tokens_; }
  std::span<const int64_t> doc_offsets() const { return doc_offsets_; }

 private:
  TokenFileInfo info_;
  std::vector<int32_t> tokens_;       // [num_tokens]
  std::vector<int64_t> doc_offsets_;  // [num_documents + 1]
};

// Creates (or replaces) a token file; used by sdmoe_preprocess.
class TokenDatasetWriter {
 public:
  TokenDatasetWriter(const std::string& path, const TokenFileInfo& info);
  ~TokenDatasetWriter();
  TokenDatasetWriter(const TokenDatasetWriter&) = delete;
  TokenDatasetWriter& operator=(const TokenDatasetWriter&) = delete;

  // Writes group /<split> with tokens and doc_offsets. The same checks as TokenDataset::open
  // run first, so the writer never produces a file the reader rejects.
  void write_split(const std::string& split, std::span<const int32_t> tokens,
                   std::span<const int64_t> doc_offsets);
  // Flushes and closes; called by the destructor too, but call it to see errors.
  void close();

 private:
  std::string path_;
  TokenFileInfo info_;
  int64_t file_id_ = -1;  // hid_t
};

// The checks shared by reader and writer; throws sdmoe::Error "<where>: <reason>".
void validate_split(const std::string& where, const TokenFileInfo& info, std::span<const int32_t> tokens,
                    std::span<const int64_t> doc_offsets);

}  // namespace sdmoe::data
