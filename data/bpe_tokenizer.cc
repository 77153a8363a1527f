#include "data/bpe_tokenizer.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <queue>
#include <sstream>

#include "core/check.h"
#include "data/gpt2_pretokenizer.h"
#include "data/json_text.h"

namespace sdmoe::data {

namespace {

std::string read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot read tokenizer file ({})", path, std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

uint64_t fnv1a(uint64_t hash, std::string_view bytes) {
  for (unsigned char c : bytes) {
    hash ^= c;
    hash *= 0x100000001b3ULL;
  }
  return hash;
}
constexpr uint64_t kFnvOffsetBasis = 0xcbf29ce484222325ULL;

// GPT-2 stores token strings with every byte replaced by a printable code point, so that
// vocab.bpe can separate pairs by a plain space: printable Latin-1 bytes stand for
// themselves, the other 68 bytes map to U+0100.. in byte order. This is the inverse map,
// code point -> byte (-1 where the code point stands for no byte).
std::array<int, 324> printable_code_point_to_byte() {
  std::array<int, 324> to_byte;
  to_byte.fill(-1);
  int next_substitute = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    to_byte[printable ? b : next_substitute++] = b;
  }
  return to_byte;
}

// Decodes a token as written in encoder.json / vocab.bpe (UTF-8 of printable code points)
// to the raw bytes it stands for. Returns false if it contains a code point outside the map.
bool printable_to_bytes(std::string_view printable, std::string& bytes) {
  static const std::array<int, 324> to_byte = printable_code_point_to_byte();
  bytes.clear();
  size_t i = 0;
  while (i < printable.size()) {
    const auto b0 = static_cast<uint8_t>(printable[i]);
    uint32_t cp;
    if (b0 < 0x80) {
      cp = b0;
      i += 1;
    } else if ((b0 & 0xE0) == 0xC0 && i + 1 < printable.size()) {
      cp = (uint32_t(b0 & 0x1F) << 6) | (static_cast<uint8_t>(printable[i + 1]) & 0x3F);
      i += 2;
    } else {
      return false;  // all code points in the map are below U+0800
    }
    if (cp >= to_byte.size() || to_byte[cp] < 0) return false;
    bytes.push_back(static_cast<char>(to_byte[cp]));
  }
  return true;
}

}  // namespace

BpeTokenizer BpeTokenizer::load(const std::string& dir) {
  if (!std::filesystem::is_directory(dir))
    fail("{}: tokenizer directory does not exist (expected encoder.json and vocab.bpe there)", dir);
  const std::string encoder_path = (std::filesystem::path(dir) / "encoder.json").string();
  const std::string merges_path = (std::filesystem::path(dir) / "vocab.bpe").string();
  const std::string encoder_text = read_whole_file(encoder_path);
  const std::string merges_text = read_whole_file(merges_path);

  BpeTokenizer tok;
  tok.fingerprint_ = fnv1a(fnv1a(fnv1a(kFnvOffsetBasis, encoder_text), std::string_view("\0", 1)), merges_text);

  // encoder.json: token string -> id; ids must be exactly 0..n-1.
  const auto entries = parse_string_to_int_object(encoder_text, encoder_path);
  if (entries.empty()) fail("{}: empty vocabulary", encoder_path);
  tok.token_bytes_.assign(entries.size(), std::string());
  std::vector<bool> seen(entries.size(), false);
  std::unordered_map<std::string, int32_t> id_by_bytes;
  id_by_bytes.reserve(entries.size());
  std::string bytes;
  for (const auto& [printable, id] : entries) {
    if (id < 0 || id >= static_cast<int64_t>(entries.size()) || seen[static_cast<size_t>(id)])
      fail("{}: token ids must be 0..{} each used once, found {} for \"{}\"", encoder_path,
           entries.size() - 1, id, printable);
    seen[static_cast<size_t>(id)] = true;
    if (!printable_to_bytes(printable, bytes))
      fail("{}: token \"{}\" (id {}) is not in GPT-2's byte-to-printable encoding", encoder_path,
           printable, id);
    tok.token_bytes_[static_cast<size_t>(id)] = bytes;
    if (printable == "<|endoftext|>") {
      tok.eod_token_ = static_cast<int32_t>(id);
    } else if (!id_by_bytes.emplace(bytes, static_cast<int32_t>(id)).second) {
      fail("{}: two tokens stand for the same bytes (\"{}\")", encoder_path, printable);
    }
  }
  if (tok.eod_token_ < 0) fail("{}: no <|endoftext|> token", encoder_path);
  for (int b = 0; b < 256; ++b) {
    const auto it = id_by_bytes.find(std::string(1, static_cast<char>(b)));
    if (it == id_by_bytes.end()) fail("{}: no token for byte 0x{:02x}", encoder_path, b);
    tok.byte_token_[static_cast<size_t>(b)] = it->second;
  }

  // vocab.bpe: "#version" header, then one "left right" merge per line in rank order.
  std::string left_bytes, right_bytes;
  size_t line_start = 0;
  int line_number = 0;
  int32_t rank = 0;
  while (line_start < merges_text.size()) {
    size_t line_end = merges_text.find('\n', line_start);
    if (line_end == std::string::npos) line_end = merges_text.size();
    std::string_view line(merges_text.data() + line_start, line_end - line_start);
    line_start = line_end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_number == 1 && line.starts_with("#version"))) continue;
    const size_t space = line.find(' ');
    if (space == std::string_view::npos || space == 0 || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string_view::npos)
      fail("{}:{}: expected two tokens separated by one space", merges_path, line_number);
    if (!printable_to_bytes(line.substr(0, space), left_bytes) ||
        !printable_to_bytes(line.substr(space + 1), right_bytes))
      fail("{}:{}: token is not in GPT-2's byte-to-printable encoding", merges_path, line_number);
    const auto left = id_by_bytes.find(left_bytes);
    const auto right = id_by_bytes.find(right_bytes);
    const auto merged = id_by_bytes.find(left_bytes + right_bytes);
    if (left == id_by_bytes.end() || right == id_by_bytes.end() || merged == id_by_bytes.end())
      fail("{}:{}: merge \"{}\" uses or makes a token missing from encoder.json", merges_path,
           line_number, line);
    if (!tok.merges_.emplace(pair_key(left->second, right->second), Merge{rank++, merged->second}).second)
      fail("{}:{}: merge \"{}\" is listed twice", merges_path, line_number, line);
  }
  if (tok.merges_.empty()) fail("{}: no merges", merges_path);
  return tok;
}

void BpeTokenizer::merge_by_rank(std::vector<int32_t>& ids) const {
  // Reference semantics (OpenAI's encoder.py): repeatedly take the adjacent pair with the
  // lowest rank and merge all its occurrences left to right, non-overlapping. Done here
  // with a heap over a linked list so a long piece (a run of punctuation, a base64 blob)
  // costs O(n log n) instead of O(n^2). All occurrences of one rank are merged as a batch
  // before pairs created by those merges are considered, exactly as the reference does.
  const int n = static_cast<int>(ids.size());
  std::vector<int> next(static_cast<size_t>(n)), prev(static_cast<size_t>(n));
  std::vector<bool> alive(static_cast<size_t>(n), true);
  for (int i = 0; i < n; ++i) {
    next[static_cast<size_t>(i)] = i + 1 < n ? i + 1 : -1;
    prev[static_cast<size_t>(i)] = i - 1;
  }
  struct Candidate {
    int32_t rank;
    int left;  // list node of the pair's left symbol; its position order is text order
    int32_t left_id, right_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  const auto consider = [&](int left) {
    if (left < 0) return;
    const int right = next[static_cast<size_t>(left)];
    if (right < 0) return;
    const int32_t l = ids[static_cast<size_t>(left)], r = ids[static_cast<size_t>(right)];
    if (const auto it = merges_.find(pair_key(l, r)); it != merges_.end())
      heap.push({it->second.rank, left, l, r});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);

  std::vector<Candidate> batch;
  while (!heap.empty()) {
    const int32_t rank = heap.top().rank;
    batch.clear();
    while (!heap.empty() && heap.top().rank == rank) {
      batch.push_back(heap.top());
      heap.pop();
    }
    for (const Candidate& c : batch) {  // ascending `left`, i.e. left to right
      const auto left = static_cast<size_t>(c.left);
      const int right = next[left];
      // Skip entries made stale by an earlier merge (overlap like "a a a", or a changed neighbor).
      if (!alive[left] || ids[left] != c.left_id || right < 0 || ids[static_cast<size_t>(right)] != c.right_id)
        continue;
      ids[left] = merges_.at(pair_key(c.left_id, c.right_id)).merged_id;
      alive[static_cast<size_t>(right)] = false;
      next[left] = next[static_cast<size_t>(right)];
      if (next[left] >= 0) prev[static_cast<size_t>(next[left])] = c.left;
      consider(prev[left]);
      consider(c.left);
    }
  }
  size_t out = 0;
  for (int i = 0; i >= 0 && n > 0; i = next[static_cast<size_t>(i)]) ids[out++] = ids[static_cast<size_t>(i)];
  ids.resize(out);
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  // Short pieces are cached; long ones are rare, unlikely to repeat, and would bloat the cache.
  constexpr size_t kMaxCachedPieceBytes = 64;
  constexpr size_t kMaxCachedPieces = 1 << 20;  // bound memory on huge corpora
  const bool cacheable = piece.size() <= kMaxCachedPieceBytes;
  if (cacheable) {
    const auto it = cache_->ids_by_piece.find(std::string(piece));
    if (it != cache_->ids_by_piece.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  ids.reserve(piece.size());
  for (unsigned char c : piece) ids.push_back(byte_token_[c]);
  merge_by_rank(ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    if (cache_->ids_by_piece.size() >= kMaxCachedPieces) cache_->ids_by_piece.clear();
    cache_->ids_by_piece.emplace(std::string(piece), std::move(ids));
  }
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view bytes) const {
  std::vector<int32_t> ids;
  ids.reserve(bytes.size() / 3 + 1);
  const std::vector<std::string_view> pieces = split_gpt2_pieces(bytes);
  // One lock per call rather than per piece: callers encode whole documents.
  std::lock_guard<std::mutex> lock(cache_->mutex);
  for (std::string_view piece : pieces) encode_piece(piece, ids);
  return ids;
}

std::string BpeTokenizer::decode(std::span<const int32_t> ids) const {
  std::string text;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) fail("token id {} is outside the vocabulary [0, {})", id, vocab_size());
    text += token_bytes_[static_cast<size_t>(id)];
  }
  return text;
}

}  // namespace sdmoe::data
