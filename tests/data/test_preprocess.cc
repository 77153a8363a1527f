// End-to-end tests of the sdmoe_preprocess binary, plus unit tests of the document readers.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>

#include "core/check.h"
#include "data/document_sources.h"
#include "data/token_dataset.h"
#include "test_support.h"

namespace sdmoe::data {
namespace {

using testing::gpt2_tokenizer;
using testing::read_file;
using testing::ScratchDir;
using testing::write_file;

const std::string kChapterRegex = "^[0-9A-Z][A-Za-z ]* [0-9]+$";

// A miniature of the KJV dump: a blank line before the first header, chapter headers
// followed by indented verses; "  12 ..." must not start a document.
const std::vector<std::string> kBibleDocuments = {
    "Genesis 1\n\n  1 In the beginning God created the heaven and the earth.\n  2 And the earth was without form.\n\n",
    "Genesis 2\n\n  1 Thus the heavens and the earth were finished.\n\n",
    "Exodus 1\n\n  1 Now these are the names.\n  12 But the more they afflicted them.\n\n",
    "1 Samuel 1\n\n  1 Now there was a certain man.\n",
};
std::string bible_text() {
  std::string text = "\n";  // blank preamble: dropped, not a document
  for (const auto& d : kBibleDocuments) text += d;
  return text;
}

const std::string kJsonl =
    "{\"id\": 1, \"text\": \"caf\\u00e9 \\ud83d\\ude42 first\", \"meta\": {\"x\": [1, 2.5, null]}}\n"
    "\n"
    "{\"text\": \"second\\nline \\\"quoted\\\"\\ttab\"}\n";
const std::vector<std::string> kJsonlDocuments = {"café 🙂 first", "second\nline \"quoted\"\ttab"};

const std::string kBrownTagged =
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\n"
    "\tIt/pps cost/vbd 1/2/cd and/cc //in mg/l/nn ./.\n";
const std::string kBrownPlain = "The jury said \" no evidence \" .\n\nIt cost 1/2 and / mg/l .";

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

struct RunResult {
  int exit_code;
  std::string out, err;
};

RunResult run_preprocess(const ScratchDir& dir, const std::vector<std::string>& args) {
  std::string command = shell_quote(SDMOE_PREPROCESS_BIN);
  for (const auto& a : args) command.append(" ").append(shell_quote(a));
  const std::string out = dir.file("stdout.txt"), err = dir.file("stderr.txt");
  command.append(" >").append(shell_quote(out)).append(" 2>").append(shell_quote(err));
  const int status = std::system(command.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, read_file(out), read_file(err)};
}

// Documents of one split as decoded text; checks each ends with EOD and has no other EOD.
std::vector<std::string> decoded_documents(const TokenDataset& ds, const BpeTokenizer& tok) {
  std::vector<std::string> docs;
  const auto tokens = ds.tokens();
  const auto offsets = ds.doc_offsets();
  for (int64_t d = 0; d < ds.num_documents(); ++d) {
    const auto doc = tokens.subspan(static_cast<size_t>(offsets[d]), static_cast<size_t>(offsets[d + 1] - offsets[d]));
    EXPECT_EQ(doc.back(), tok.eod_token());
    const auto body = doc.first(doc.size() - 1);
    EXPECT_EQ(std::count(body.begin(), body.end(), tok.eod_token()), 0);
    docs.push_back(tok.decode(body));
  }
  return docs;
}

TEST(Preprocess, TextWithSplitRegexAndJsonl) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  ScratchDir dir;
  write_file(dir.file("bible.txt"), bible_text());
  write_file(dir.file("records.jsonl"), kJsonl);
  const std::string output = dir.file("out.h5");
  const RunResult r = run_preprocess(dir, {"--tokenizer", SDMOE_TOKENIZER_DIR, "--output", output,
                                           "--validation-fraction", "0.5", "--seed", "3", "--split-regex",
                                           kChapterRegex, dir.file("bible.txt"), dir.file("records.jsonl")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("6 documents"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tokens/s"), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(output + ".partial"));

  std::vector<std::string> expected = kBibleDocuments;
  expected.insert(expected.end(), kJsonlDocuments.begin(), kJsonlDocuments.end());
  const TokenDataset train = TokenDataset::open(output, "train");
  const TokenDataset validation = TokenDataset::open(output, "validation");
  EXPECT_EQ(train.tokenizer_fingerprint(), tok->fingerprint());
  EXPECT_EQ(train.vocab_size(), 50257);
  EXPECT_EQ(train.eod_token(), 50256);
  EXPECT_EQ(train.num_documents() + validation.num_documents(), 6);
  EXPECT_GE(train.num_documents(), 1);
  EXPECT_GE(validation.num_documents(), 1);

  // Each document lands in the split its (seed, index) hash says, in input order.
  std::vector<std::string> want_train, want_validation;
  for (size_t i = 0; i < expected.size(); ++i)
    (document_hash_unit(3, i) < 0.5 ? want_validation : want_train).push_back(expected[i]);
  ASSERT_FALSE(want_train.empty() || want_validation.empty()) << "pick another seed for this test";
  EXPECT_EQ(decoded_documents(train, *tok), want_train);
  EXPECT_EQ(decoded_documents(validation, *tok), want_validation);
  // Token counts per split agree with encoding the documents directly (+1 EOD each).
  int64_t train_tokens = 0;
  for (const auto& d : want_train) train_tokens += static_cast<int64_t>(tok->encode(d).size()) + 1;
  EXPECT_EQ(train.num_tokens(), train_tokens);

  // Same inputs and seed: byte-identical token streams.
  const std::string again = dir.file("again.h5");
  ASSERT_EQ(run_preprocess(dir, {"--tokenizer", SDMOE_TOKENIZER_DIR, "--output", again, "--validation-fraction=0.5",
                                 "--seed=3", "--split-regex", kChapterRegex, dir.file("bible.txt"),
                                 dir.file("records.jsonl")})
                .exit_code,
            0);
  const TokenDataset train_again = TokenDataset::open(again, "train");
  EXPECT_TRUE(std::ranges::equal(train_again.tokens(), train.tokens()));
}

TEST(Preprocess, BrownTaggedSingleDocumentAndMaxDocuments) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  ScratchDir dir;
  write_file(dir.file("cb01"), kBrownTagged);
  const std::string output = dir.file("brown.h5");
  RunResult r = run_preprocess(dir, {"--tokenizer", SDMOE_TOKENIZER_DIR, "--output", output, "--strip-pos-tags",
                                     dir.file("cb01")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const TokenDataset train = TokenDataset::open(output, "train");
  EXPECT_EQ(decoded_documents(train, *tok), std::vector<std::string>{kBrownPlain});
  // One document cannot be split: validation exists but is empty.
  EXPECT_EQ(TokenDataset::open(output, "validation").num_documents(), 0);

  write_file(dir.file("bible.txt"), bible_text());
  r = run_preprocess(dir, {"--tokenizer", SDMOE_TOKENIZER_DIR, "--output", output, "--split-regex", kChapterRegex,
                           "--max-documents", "2", dir.file("bible.txt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> docs = decoded_documents(TokenDataset::open(output, "train"), *tok);
  const auto validation_docs = decoded_documents(TokenDataset::open(output, "validation"), *tok);
  docs.insert(docs.end(), validation_docs.begin(), validation_docs.end());
  std::sort(docs.begin(), docs.end());
  EXPECT_EQ(docs, (std::vector<std::string>{kBibleDocuments[0], kBibleDocuments[1]}));
}

// The default corpus needs different options per source (KJV split by chapter, Brown with
// tags stripped), so each is tokenized alone and the token files are merged.
TEST(Preprocess, MergeConcatenatesSplits) {
  const BpeTokenizer* tok = gpt2_tokenizer();
  ASSERT_NE(tok, nullptr);
  ScratchDir dir;
  write_file(dir.file("bible.txt"), bible_text());
  write_file(dir.file("cb01"), kBrownTagged);
  write_file(dir.file("cb02"), "\tA/at second/od file/nn ./.\n");
  ASSERT_EQ(run_preprocess(dir, {"--tokenizer", SDMOE_TOKENIZER_DIR, "--output", dir.file("a.h5"), "--split-regex",
                                 kChapterRegex, "--validation-fraction", "0.5", dir.file("bible.txt")})
                .exit_code,
            0);
  ASSERT_EQ(run_preprocess(dir, {"--tokenizer", SDMOE_TOKENIZER_DIR, "--output", dir.file("b.h5"),
                                 "--strip-pos-tags", dir.file("cb01"), dir.file("cb02")})
                .exit_code,
            0);
  const RunResult r = run_preprocess(dir, {"--merge", "--output", dir.file("all.h5"), dir.file("a.h5"), dir.file("b.h5")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* split : {"train", "validation"}) {
    std::vector<std::string> want = decoded_documents(TokenDataset::open(dir.file("a.h5"), split), *tok);
    const auto b_docs = decoded_documents(TokenDataset::open(dir.file("b.h5"), split), *tok);
    want.insert(want.end(), b_docs.begin(), b_docs.end());
    const TokenDataset merged = TokenDataset::open(dir.file("all.h5"), split);
    EXPECT_EQ(decoded_documents(merged, *tok), want) << split;
    EXPECT_EQ(merged.tokenizer_fingerprint(), tok->fingerprint());
  }
  // Token files from different tokenizers must not mix.
  TokenDatasetWriter other(dir.file("other.h5"), TokenFileInfo{50257, 50256, tok->fingerprint() ^ 1});
  other.write_split("train", std::vector<int32_t>{5, 50256}, std::vector<int64_t>{0, 2});
  other.write_split("validation", {}, std::vector<int64_t>{0});
  other.close();
  const RunResult bad = run_preprocess(dir, {"--merge", "--output", dir.file("bad.h5"), dir.file("a.h5"), dir.file("other.h5")});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("different tokenizer"), std::string::npos) << bad.err;
  const RunResult mixed = run_preprocess(dir, {"--merge", "--seed", "1", "--output", dir.file("bad.h5"), dir.file("a.h5")});
  EXPECT_EQ(mixed.exit_code, 2);
}

TEST(Preprocess, BadInputIsOneLineErrorWithExitCode2) {
  ScratchDir dir;
  write_file(dir.file("in.txt"), "hello\n");
  const std::string output = dir.file("never.h5");
  const std::string tok_dir = SDMOE_TOKENIZER_DIR;
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--tokenizer", tok_dir, "--output", output, dir.file("missing.txt")}, "missing.txt: no such input file"},
      {{"--tokenizer", tok_dir, "--output", output, "--bogus", dir.file("in.txt")}, "unknown option '--bogus'"},
      {{"--tokenizer", dir.file("no_tokenizer"), "--output", output, dir.file("in.txt")}, "tokenizer directory"},
      {{"--tokenizer", tok_dir, "--output", output, "--split-regex", "([a-", dir.file("in.txt")}, "ECMAScript"},
      {{"--tokenizer", tok_dir, "--output", output, "--validation-fraction", "1.5", dir.file("in.txt")},
       "--validation-fraction"},
      {{"--tokenizer", tok_dir, "--output", output, "--seed", "x1", dir.file("in.txt")}, "--seed"},
      {{"--tokenizer", tok_dir, "--output", output}, "no INPUT"},
      {{"--output", output, dir.file("in.txt")}, "--tokenizer DIR is required"},
      {{"--tokenizer", tok_dir, "--output", dir.file("no_dir/out.h5"), dir.file("in.txt")}, "cannot create"},
      {{"--tokenizer", tok_dir, "--output", output, dir.path().string()}, "not a regular file"},
      {{"--tokenizer", tok_dir, "--output", dir.file("in.txt"), dir.file("in.txt")}, "it would be overwritten"},
  };
  for (const auto& [args, needle] : cases) {
    const RunResult r = run_preprocess(dir, args);
    EXPECT_EQ(r.exit_code, 2) << needle;
    EXPECT_EQ(r.err.rfind("sdmoe_preprocess: error: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "want '" << needle << "' in: " << r.err;
    EXPECT_FALSE(std::filesystem::exists(output));
  }
  EXPECT_EQ(read_file(dir.file("in.txt")), "hello\n") << "an input named as the output must stay as it was";
  // The extension is matched in any case: an upper-case .JSONL is read as JSON records.
  write_file(dir.file("bad.JSONL"), "{\"text\": \"ok\"}\n{\"title\": \"no text\"}\n");
  const RunResult r = run_preprocess(dir, {"--tokenizer", tok_dir, "--output", output, dir.file("bad.JSONL")});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("bad.JSONL:2: JSON object has no \"text\""), std::string::npos) << r.err;
}

TEST(Preprocess, Help) {
  ScratchDir dir;
  const RunResult r = run_preprocess(dir, {"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out.rfind("usage: sdmoe_preprocess", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("--split-regex"), std::string::npos);
}

// --- document readers ------------------------------------------------------------------

TEST(DocumentSources, SplitRegexKeepsBytesAndHeaderLines) {
  ScratchDir dir;
  write_file(dir.file("b.txt"), bible_text());
  std::vector<std::string> docs;
  read_text_documents(dir.file("b.txt"), std::regex(kChapterRegex), [&](std::string d) { docs.push_back(d); });
  ASSERT_EQ(docs.size(), 5u);
  EXPECT_EQ(docs[0], "\n");  // the preamble is returned; the preprocessor drops blank ones
  EXPECT_EQ(std::vector<std::string>(docs.begin() + 1, docs.end()), kBibleDocuments);
  // CRLF lines still match a "$"-anchored pattern.
  write_file(dir.file("crlf.txt"), "Genesis 1\r\ntext\r\nGenesis 2\r\nmore\r\n");
  docs.clear();
  read_text_documents(dir.file("crlf.txt"), std::regex(kChapterRegex), [&](std::string d) { docs.push_back(d); });
  EXPECT_EQ(docs, (std::vector<std::string>{"Genesis 1\r\ntext\r\n", "Genesis 2\r\nmore\r\n"}));
  // Without a pattern the file is one document.
  docs.clear();
  read_text_documents(dir.file("crlf.txt"), std::nullopt, [&](std::string d) { docs.push_back(d); });
  EXPECT_EQ(docs, std::vector<std::string>{read_file(dir.file("crlf.txt"))});
}

TEST(DocumentSources, StripBrownPosTags) {
  EXPECT_EQ(strip_brown_pos_tags(kBrownTagged), kBrownPlain);
  EXPECT_EQ(strip_brown_pos_tags("\tA/at b/nn\n\tc/nn ./.\n\n\n\n\tD/at e/nn\n"), "A b c .\n\nD e");
  EXPECT_EQ(strip_brown_pos_tags("Atlanta's/np$ AAb//nn plain"), "Atlanta's AAb/ plain");
  EXPECT_EQ(strip_brown_pos_tags("\n\n"), "");
}

TEST(DocumentSources, ValidationHashIsUniformish) {
  int below_tenth = 0;
  for (uint64_t i = 0; i < 10000; ++i) {
    const double u = document_hash_unit(11, i);
    ASSERT_TRUE(u >= 0.0 && u < 1.0);
    below_tenth += u < 0.1 ? 1 : 0;
  }
  EXPECT_NEAR(below_tenth, 1000, 150);
  EXPECT_NE(document_hash_unit(1, 5), document_hash_unit(2, 5));
}

}  // namespace
}  // namespace sdmoe::data
