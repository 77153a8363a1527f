// sdmoe_preprocess: corpus files -> one HDF5 token file with train and validation splits.
// See docs/data.md for the default corpus command lines.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "core/check.h"
#include "data/bpe_tokenizer.h"
#include "data/document_sources.h"
#include "data/token_dataset.h"

namespace {

using namespace sdmoe::data;

constexpr const char* kUsage = R"(usage: sdmoe_preprocess --tokenizer DIR --output FILE.h5 [options] INPUT...
       sdmoe_preprocess --merge --output FILE.h5 TOKENS.h5...

Tokenizes INPUT files with GPT-2 BPE into an HDF5 token file with /train and /validation.
  INPUT ending in .jsonl (any case): one JSON object per line, its "text" member is a document.
  Any other INPUT: plain text, one document per file (see --split-regex).

options:
  --tokenizer DIR             directory with encoder.json and vocab.bpe (required)
  --output FILE.h5            token file to write, replaced if it exists (required)
  --validation-fraction F     share of documents for validation, 0 < F < 1 (default 0.05)
  --seed N                    seed of the document-to-split assignment (default 0)
  --split-regex REGEX         in plain text inputs, each line matching this ECMAScript regex
                              starts a new document (the line is part of it)
  --strip-pos-tags            inputs are Brown-corpus tagged text (word/tag); keep the words
  --max-documents N           stop after N documents (in input order)
  --merge                     INPUTs are token files made by this tool with the same tokenizer:
                              concatenate their train splits and their validation splits
                              (corpora that need different options are tokenized separately)
  --help                      print this help
)";

struct Options {
  std::string tokenizer_dir;
  std::string output;
  double validation_fraction = 0.05;
  uint64_t seed = 0;
  std::optional<std::string> split_regex;
  bool strip_pos_tags = false;
  std::optional<int64_t> max_documents;
  bool merge = false;
  bool document_options_given = false;  // any option that only applies when tokenizing
  std::vector<std::string> inputs;
};

uint64_t parse_unsigned(const std::string& flag, const std::string& value) {
  size_t used = 0;
  uint64_t parsed = 0;
  try {
    if (!value.empty() && value[0] != '-') parsed = std::stoull(value, &used, 10);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != value.size()) sdmoe::fail("{} expects a non-negative integer, got '{}'", flag, value);
  return parsed;
}

// Returns nullopt when --help was given.
std::optional<Options> parse_arguments(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return std::nullopt;
    if (arg == "--") {
      for (++i; i < argc; ++i) options.inputs.emplace_back(argv[i]);
      break;
    }
    if (!arg.starts_with("--")) {
      options.inputs.push_back(arg);
      continue;
    }
    std::optional<std::string> inline_value;  // --flag=value form
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      inline_value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    const auto value = [&]() -> std::string {
      if (inline_value) return *inline_value;
      if (i + 1 >= argc) sdmoe::fail("{} needs a value", arg);
      return argv[++i];
    };
    if (arg != "--tokenizer" && arg != "--output" && arg != "--merge") options.document_options_given = true;
    if (arg == "--tokenizer") {
      options.tokenizer_dir = value();
    } else if (arg == "--output") {
      options.output = value();
    } else if (arg == "--validation-fraction") {
      const std::string text = value();
      size_t used = 0;
      try {
        options.validation_fraction = std::stod(text, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != text.size() || !(options.validation_fraction > 0.0) ||
          !(options.validation_fraction < 1.0))
        sdmoe::fail("--validation-fraction expects a number strictly between 0 and 1, got '{}'", text);
    } else if (arg == "--seed") {
      options.seed = parse_unsigned(arg, value());
    } else if (arg == "--split-regex") {
      options.split_regex = value();
    } else if (arg == "--max-documents") {
      const uint64_t n = parse_unsigned(arg, value());
      if (n == 0 || n > static_cast<uint64_t>(INT64_MAX)) sdmoe::fail("--max-documents must be >= 1");
      options.max_documents = static_cast<int64_t>(n);
    } else if (arg == "--strip-pos-tags" && !inline_value) {
      options.strip_pos_tags = true;
    } else if (arg == "--merge" && !inline_value) {
      options.merge = true;
    } else {
      sdmoe::fail("unknown option '{}' (see --help)", argv[i]);
    }
  }
  if (options.merge && options.document_options_given)
    sdmoe::fail("--merge takes only --output and token files (the inputs are already tokenized)");
  if (options.tokenizer_dir.empty() && !options.merge) sdmoe::fail("--tokenizer DIR is required (see --help)");
  if (options.output.empty()) sdmoe::fail("--output FILE.h5 is required (see --help)");
  if (options.inputs.empty()) sdmoe::fail("no INPUT files given (see --help)");
  // The output replaces whatever has its name: never one of the inputs.
  for (const std::string& input : options.inputs) {
    std::error_code ec;
    if (std::filesystem::equivalent(input, options.output, ec))
      sdmoe::fail("--output {} is the input {}; it would be overwritten", options.output, input);
  }
  return options;
}

struct DocumentSpan {
  int64_t begin, end;  // token range in the all-documents buffer, EOD included
};

struct Split {
  std::vector<int32_t> tokens;
  std::vector<int64_t> doc_offsets{0};
  int64_t documents() const { return static_cast<int64_t>(doc_offsets.size()) - 1; }
};

// Writes `splits` to output via a ".partial" file and a rename, so an interrupted run never
// leaves a file that looks complete.
void write_token_file(const std::string& output, const TokenFileInfo& info, const Split& train,
                      const Split& validation) {
  const std::string partial = output + ".partial";
  std::error_code ec;
  try {
    TokenDatasetWriter writer(partial, info);
    writer.write_split("train", train.tokens, train.doc_offsets);
    writer.write_split("validation", validation.tokens, validation.doc_offsets);
    writer.close();
  } catch (...) {
    std::filesystem::remove(partial, ec);
    throw;
  }
  std::filesystem::rename(partial, output, ec);
  if (ec) sdmoe::fail("{}: cannot move the finished file into place ({})", output, ec.message());
}

void append_split(Split& into, const TokenDataset& from) {
  const auto base = static_cast<int64_t>(into.tokens.size());
  into.tokens.insert(into.tokens.end(), from.tokens().begin(), from.tokens().end());
  for (size_t d = 1; d < from.doc_offsets().size(); ++d) into.doc_offsets.push_back(base + from.doc_offsets()[d]);
}

int run_merge(const Options& options) {
  Split train, validation;
  std::optional<TokenFileInfo> info;
  for (const std::string& input : options.inputs) {
    const TokenDataset input_train = TokenDataset::open(input, "train");
    const TokenDataset input_validation = TokenDataset::open(input, "validation");
    const TokenFileInfo input_info{input_train.vocab_size(), input_train.eod_token(),
                                   input_train.tokenizer_fingerprint()};
    if (!info) {
      info = input_info;
    } else if (input_info.vocab_size != info->vocab_size || input_info.eod_token != info->eod_token ||
               input_info.tokenizer_fingerprint != info->tokenizer_fingerprint) {
      sdmoe::fail("{}: made with a different tokenizer than {} (fingerprint {:016x} vs {:016x})", input,
                  options.inputs.front(), input_info.tokenizer_fingerprint, info->tokenizer_fingerprint);
    }
    append_split(train, input_train);
    append_split(validation, input_validation);
  }
  write_token_file(options.output, *info, train, validation);
  std::printf("sdmoe_preprocess: wrote %s: merged %zu files, train %lld docs / %zu tokens, validation %lld docs / "
              "%zu tokens\n",
              options.output.c_str(), options.inputs.size(), static_cast<long long>(train.documents()),
              train.tokens.size(), static_cast<long long>(validation.documents()), validation.tokens.size());
  return 0;
}

int run(const Options& options) {
  const auto start_time = std::chrono::steady_clock::now();
  for (const std::string& input : options.inputs) {
    std::error_code ec;
    if (!std::filesystem::exists(input, ec)) sdmoe::fail("{}: no such input file", input);
    if (!std::filesystem::is_regular_file(input, ec)) sdmoe::fail("{}: not a regular file (a directory?)", input);
  }
  const BpeTokenizer tokenizer = BpeTokenizer::load(options.tokenizer_dir);
  std::optional<std::regex> split_at;
  if (options.split_regex) {
    try {
      split_at.emplace(*options.split_regex, std::regex::ECMAScript | std::regex::optimize);
    } catch (const std::regex_error& e) {
      sdmoe::fail("--split-regex '{}' is not a valid ECMAScript regex: {}", *options.split_regex, e.what());
    }
  }

  // All documents are tokenized into one buffer first: the split assignment must know the
  // document count to guarantee both splits are non-empty. Tokens cost 4 bytes each here.
  std::vector<int32_t> all_tokens;
  std::vector<DocumentSpan> documents;
  double tokenize_seconds = 0;
  bool stop = false;
  const DocumentSink add_document = [&](std::string text) {
    if (stop) return;
    if (options.strip_pos_tags) text = strip_brown_pos_tags(text);
    if (is_blank(text)) return;
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = tokenizer.encode(text);
    tokenize_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto begin = static_cast<int64_t>(all_tokens.size());
    all_tokens.insert(all_tokens.end(), ids.begin(), ids.end());
    all_tokens.push_back(tokenizer.eod_token());
    documents.push_back({begin, static_cast<int64_t>(all_tokens.size())});
    if (options.max_documents && static_cast<int64_t>(documents.size()) >= *options.max_documents) stop = true;
  };
  for (const std::string& input : options.inputs) {
    if (stop) break;
    std::string extension = std::filesystem::path(input).extension().string();
    std::transform(extension.begin(), extension.end(), extension.begin(),
                   [](unsigned char c) { return char(std::tolower(c)); });
    if (extension == ".jsonl") read_jsonl_documents(input, add_document);
    else read_text_documents(input, split_at, add_document);
  }
  if (documents.empty()) sdmoe::fail("the inputs contain no non-blank documents");

  // Split assignment: a pure function of (seed, document index), then the guarantee that
  // each split gets a document when there are two: the most validation-like train
  // document (lowest hash) moves over, or the least validation-like one moves back.
  std::vector<double> hash(documents.size());
  std::vector<bool> is_validation(documents.size());
  size_t validation_count = 0;
  for (size_t d = 0; d < documents.size(); ++d) {
    hash[d] = document_hash_unit(options.seed, d);
    is_validation[d] = hash[d] < options.validation_fraction;
    validation_count += is_validation[d] ? 1 : 0;
  }
  if (documents.size() >= 2 && (validation_count == 0 || validation_count == documents.size())) {
    const bool need_validation = validation_count == 0;
    size_t pick = 0;
    for (size_t d = 1; d < documents.size(); ++d)
      if (need_validation ? hash[d] < hash[pick] : hash[d] > hash[pick]) pick = d;
    is_validation[pick] = need_validation;
  }

  Split train, validation;
  for (size_t d = 0; d < documents.size(); ++d) {
    Split& split = is_validation[d] ? validation : train;
    split.tokens.insert(split.tokens.end(), all_tokens.begin() + documents[d].begin,
                        all_tokens.begin() + documents[d].end);
    split.doc_offsets.push_back(static_cast<int64_t>(split.tokens.size()));
  }

  write_token_file(options.output,
                   TokenFileInfo{tokenizer.vocab_size(), tokenizer.eod_token(), tokenizer.fingerprint()}, train,
                   validation);

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  std::printf(
      "sdmoe_preprocess: wrote %s: %zu documents, train %lld docs / %zu tokens, validation %lld docs / %zu "
      "tokens, %.0f tokens/s tokenizing, %.1f s total\n",
      options.output.c_str(), documents.size(), static_cast<long long>(train.documents()), train.tokens.size(),
      static_cast<long long>(validation.documents()), validation.tokens.size(),
      tokenize_seconds > 0 ? static_cast<double>(all_tokens.size()) / tokenize_seconds : 0.0, seconds);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::optional<Options> options = parse_arguments(argc, argv);
    if (!options) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    return options->merge ? run_merge(*options) : run(*options);
  } catch (const sdmoe::Error& e) {
    std::fprintf(stderr, "sdmoe_preprocess: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sdmoe_preprocess: error: %s\n", e.what());
    return 2;
  }
}
