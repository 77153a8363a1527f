// GPT-2 tokenizer tests. Expected ids were produced by the reference implementations,
// never by this code: node with the npm package gpt-3-encoder (`encode(s)`), and each was
// also confirmed with OpenAI's encoder.py algorithm under Python's `regex` module (the
// two agree on every string used here). Expected pieces come from Python's `regex`
// module applied to GPT-2's pattern.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>

#include "core/check.h"
#include "data/gpt2_pretokenizer.h"
#include "test_support.h"

namespace sdmoe::data {
namespace {

using testing::gpt2_tokenizer;
using testing::read_file;
using testing::ScratchDir;
using testing::write_file;

struct KnownEncoding {
  const char* text;
  std::vector<int32_t> ids;
};

const std::vector<KnownEncoding>& known_encodings() {
  static const std::vector<KnownEncoding> cases = {
      {"Hello world", {15496, 995}},
      {"I'm don't you'll we've they're she'd it's",
       {40, 1101, 836, 470, 345, 1183, 356, 1053, 484, 821, 673, 1549, 340, 338}},
      {"In 1611, 3.14159 and 42nd 1000000 numbers",
       {818, 1467, 1157, 11, 513, 13, 1415, 19707, 290, 5433, 358, 1802, 2388, 3146}},
      {"a  b\n\n c", {64, 220, 275, 628, 269}},
      {"naïve café 日本語 🙂", {2616, 38776, 40304, 10545, 245, 98, 17312, 105, 45739, 252, 32485}},
      {"  leading spaces\ttab\r\nCRLF   \n", {220, 3756, 9029, 197, 8658, 201, 198, 34, 7836, 37, 220, 220, 220, 198}},
      // Special-token text is ordinary text: only eod_token() separates documents.
      {"<|endoftext|>", {27, 91, 437, 1659, 5239, 91, 29}},
      {"Ωmega ß straße Ünïcödé ١٢٣ ⅣⅫ",
       {138, 102, 13731, 6184, 253, 3534, 39683, 68, 49363, 77, 26884, 66, 9101, 67, 2634, 18923, 94, 149, 95, 149,
        96, 2343, 227, 96, 158, 227, 104}},
      {"!!!'s ''quote'' ...--- x'S", {10185, 6, 82, 10148, 22708, 7061, 2644, 6329, 2124, 6, 50}},
      {"Genesis 1\n\n  1 In the beginning God created the heaven and the earth.\n  2 And the earth was without "
       "form, and void; and darkness was upon the face of\nthe deep.\n",
       {13746, 9339, 352, 628, 220, 352, 554, 262, 3726, 1793, 2727, 262, 9538, 290, 262, 4534, 13, 198, 220, 362,
        843, 262, 4534, 373, 1231, 1296, 11, 290, 7951, 26, 290, 11854, 373, 2402, 262, 1986, 286, 198, 1169, 2769,
        13, 198}},
      {"The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced \" "
       "no evidence \" that any irregularities took place .",
       {464, 44373, 3418, 5675, 48705, 531, 3217, 281, 3645, 286, 9371, 338, 2274, 4165, 3071, 4635, 366, 645, 2370,
        366, 326, 597, 48302, 1718, 1295, 764}},
  };
  return cases;
}

TEST(BpeTokenizer, VocabularyShape) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 50257);
  EXPECT_EQ(tok->eod_token(), 50256);
  const int32_t eod = tok->eod_token();
  EXPECT_EQ(tok->decode(std::span<const int32_t>(&eod, 1)), "<|endoftext|>");
}

TEST(BpeTokenizer, MatchesReferenceEncodings) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  for (const KnownEncoding& c : known_encodings()) {
    EXPECT_EQ(tok->encode(c.text), c.ids) << "text: " << c.text;
    EXPECT_EQ(tok->decode(c.ids), c.text);
  }
}

TEST(BpeTokenizer, EmptyInput) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  EXPECT_TRUE(tok->encode("").empty());
  EXPECT_EQ(tok->decode({}), "");
}

TEST(BpeTokenizer, DecodeRejectsOutOfRangeIds) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> bad = {15496, 50257};
  EXPECT_THROW(tok->decode(bad), sdmoe::Error);
  const std::vector<int32_t> negative = {-1};
  EXPECT_THROW(tok->decode(negative), sdmoe::Error);
}

TEST(Gpt2Pretokenizer, MatchesPythonRegexPieces) {
  struct Case {
    std::string text;
    std::vector<std::string> pieces;
  };
  const std::vector<Case> cases = {
      {"a  b\n\n c", {"a", " ", " b", "\n\n", " c"}},
      {"x's 'S ''re'' it'll  \t\nend  ", {"x", "'s", " '", "S", " ''", "re", "''", " it", "'ll", "  \t", "\n", "end", "  "}},
      {"  \u00a0 x\u3000y 12ab3 !?'ve", {"  \u00a0", " x", "\u3000", "y", " 12", "ab", "3", " !?'", "ve"}},
      {"\n\n", {"\n\n"}},
      {" ", {" "}},
      {"a \tb", {"a", " ", "\t", "b"}},
      {"\u216b\u00bd \u0663x", {"\u216b\u00bd", " \u0663", "x"}},
      {"hello\u2028world \u0085 z", {"hello", "\u2028", "world", " \u0085", " z"}},
  };
  for (const Case& c : cases) {
    const std::vector<std::string_view> got = split_gpt2_pieces(c.text);
    EXPECT_EQ(std::vector<std::string>(got.begin(), got.end()), c.pieces) << "text: " << c.text;
  }
}

TEST(Gpt2Pretokenizer, InvalidUtf8BytesAreOtherClass) {
  // A stray byte is punctuation-like: it joins a run of other symbols after an optional
  // space, and never joins letters.
  const std::string text = "ab\xff\xfe cd \x80!x\xe6\x97";  // \xe6\x97 is a truncated 3-byte sequence
  const std::vector<std::string_view> got = split_gpt2_pieces(text);
  const std::vector<std::string> expected = {"ab", "\xff\xfe", " cd", " \x80!", "x", "\xe6\x97"};
  EXPECT_EQ(std::vector<std::string>(got.begin(), got.end()), expected);
  // Overlong and surrogate encodings are not letters even though they "decode" to some.
  const std::string overlong = "a\xc1\x81";  // overlong 'A'
  const auto pieces = split_gpt2_pieces(overlong);
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[1], "\xc1\x81");
}

TEST(BpeTokenizer, RoundTripsRandomBytes) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  std::mt19937_64 rng(1234);
  // Alphabet of fragments that hit every class and every UTF-8 length, plus raw bytes.
  const std::vector<std::string> fragments = {"a", "Z", " ", "  ", "\n", "\t", "'", "'s", "'ll", "7", "3.5", "!",
                                              "é", "日", "🙂", "\u00a0", "\u3000", "\u0663", "Ⅻ", "\xff",
                                              "\xc3", "\xe6\x97", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\0"};
  for (int trial = 0; trial < 3000; ++trial) {
    std::string text;
    const int length = static_cast<int>(rng() % 60);
    for (int i = 0; i < length; ++i) {
      if (rng() % 4 == 0) text.push_back(static_cast<char>(rng() % 256));
      else text += fragments[rng() % fragments.size()];
    }
    const std::vector<int32_t> ids = tok->encode(text);
    ASSERT_EQ(tok->decode(ids), text) << "trial " << trial;
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->eod_token());
  }
}

TEST(BpeTokenizer, LongPieceRoundTripsQuickly) {
  // One 200 KB piece of punctuation: quadratic merging would take minutes here.
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  std::string text;
  for (int i = 0; i < 50000; ++i) text += "=-*.";
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok->encode(text);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(tok->decode(ids), text);
  EXPECT_LT(seconds, 20.0);
}

// Round trip and speed on a whole corpus file when the setup has fetched it.
void check_corpus_round_trip(const BpeTokenizer& tok, const std::string& text, const std::string& name) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok.encode(text);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("[ info ] %s: %zu bytes -> %zu tokens in %.2f s (%.1f MB/s)\n", name.c_str(), text.size(), ids.size(),
              seconds, static_cast<double>(text.size()) / 1e6 / seconds);
  EXPECT_EQ(tok.decode(ids), text) << name;
  // English averages 3-5 bytes per GPT-2 token; far outside that means the split is broken.
  EXPECT_GT(static_cast<double>(ids.size()), static_cast<double>(text.size()) / 8.0) << name;
  EXPECT_LT(static_cast<double>(ids.size()), static_cast<double>(text.size()) / 2.0) << name;
}

TEST(BpeTokenizer, RoundTripsKingJamesBible) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  if (!std::filesystem::exists(SDMOE_KJV_TEXT)) GTEST_SKIP() << SDMOE_KJV_TEXT << " not present";
  check_corpus_round_trip(*tok, read_file(SDMOE_KJV_TEXT), "kjv");
}

TEST(BpeTokenizer, RoundTripsBrownCorpus) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  if (!std::filesystem::is_directory(SDMOE_BROWN_DIR)) GTEST_SKIP() << SDMOE_BROWN_DIR << " not present";
  std::string all;
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(SDMOE_BROWN_DIR)) {
    const std::string name = entry.path().filename().string();
    if (name.size() == 4 && name[0] == 'c') {
      all += read_file(entry.path().string());
      ++files;
    }
  }
  ASSERT_GT(files, 400) << "expected the 500 Brown files ca01..cr09 in " << SDMOE_BROWN_DIR;
  check_corpus_round_trip(*tok, all, "brown");
}

// --- loading -------------------------------------------------------------------------

// Copies the real tokenizer files into a scratch dir so a test can damage them.
struct TokenizerCopy {
  ScratchDir dir;
  std::string encoder = read_file(std::string(SDMOE_TOKENIZER_DIR) + "/encoder.json");
  std::string merges = read_file(std::string(SDMOE_TOKENIZER_DIR) + "/vocab.bpe");
  void save() const {
    write_file(dir.file("encoder.json"), encoder);
    write_file(dir.file("vocab.bpe"), merges);
  }
};

std::string load_error(const std::string& dir) {
  try {
    BpeTokenizer::load(dir);
  } catch (const sdmoe::Error& e) {
    return e.what();
  }
  return "";
}

TEST(BpeTokenizerLoad, MissingDirectoryOrFile) {
  ScratchDir dir;
  EXPECT_NE(load_error(dir.file("nope")).find("does not exist"), std::string::npos);
  write_file(dir.file("encoder.json"), "{}");
  const std::string message = load_error(dir.path().string());
  EXPECT_NE(message.find("vocab.bpe"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "one line: " << message;
}

TEST(BpeTokenizerLoad, MalformedFiles) {
  ASSERT_NE(gpt2_tokenizer(), nullptr);
  TokenizerCopy copy;
  ASSERT_GT(copy.encoder.size(), 100000u);

  copy.encoder.resize(copy.encoder.size() / 2);  // truncated JSON
  copy.save();
  std::string message = load_error(copy.dir.path().string());
  EXPECT_NE(message.find("encoder.json: malformed JSON at byte"), std::string::npos) << message;

  TokenizerCopy bad_merge;
  bad_merge.merges += "zzzq\xc3\xbf qqq\n";  // tokens that are not in the vocabulary
  bad_merge.save();
  message = load_error(bad_merge.dir.path().string());
  EXPECT_NE(message.find("vocab.bpe:50002"), std::string::npos) << message;

  TokenizerCopy bad_line;
  bad_line.merges += "single\n";
  bad_line.save();
  message = load_error(bad_line.dir.path().string());
  EXPECT_NE(message.find("expected two tokens"), std::string::npos) << message;
}

uint64_t fnv1a_reference(const std::string& a, const std::string& b) {
  uint64_t h = 14695981039346656037ULL;
  const std::string all = a + std::string(1, '\0') + b;
  for (unsigned char c : all) h = (h ^ c) * 1099511628211ULL;
  return h;
}

TEST(BpeTokenizerLoad, FingerprintIsFnv1aOfBothFiles) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  TokenizerCopy copy;
  EXPECT_EQ(tok->fingerprint(), fnv1a_reference(copy.encoder, copy.merges));
  // Dropping the last merge still loads, but must change the fingerprint.
  copy.merges.resize(copy.merges.rfind('\n', copy.merges.size() - 2) + 1);
  copy.save();
  const BpeTokenizer smaller = BpeTokenizer::load(copy.dir.path().string());
  EXPECT_NE(smaller.fingerprint(), tok->fingerprint());
  EXPECT_EQ(smaller.fingerprint(), fnv1a_reference(copy.encoder, copy.merges));
}

}  // namespace
}  // namespace sdmoe::data
