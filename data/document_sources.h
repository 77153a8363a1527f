// Turning corpus files into documents for sdmoe_preprocess: .jsonl records, plain text
// files (whole, or split at header lines), and Brown-corpus tagged text.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <regex>
#include <string>
#include <string_view>

namespace sdmoe::data {

using DocumentSink = std::function<void(std::string document)>;

// One JSON object per line; each object's "text" string member is one document. Blank
// lines are skipped; a line that is not a JSON object, or lacks a "text" string, throws
// sdmoe::Error "<path>:<line>: ...".
void read_jsonl_documents(const std::string& path, const DocumentSink& sink);

// A plain text file. Without `split_at`, the file is one document. With it, every line
// that matches (std::regex_search, ECMAScript) starts a new document that includes the
// line; text before the first match is a document of its own. Documents keep the file's
// bytes exactly (line endings included): concatenating them gives back the file.
void read_text_documents(const std::string& path, const std::optional<std::regex>& split_at,
                         const DocumentSink& sink);

// Brown-corpus tagged text ("The/at Fulton/np-tl ... ./.") back to plain text: each
// whitespace-separated token word/tag becomes word (cut at the last '/'; tokens without '/'
// stay as they are), tokens are joined by single spaces, paragraphs (runs of lines
// separated by blank lines) are joined by "\n\n", and the quote tokens `` and '' become ".
std::string strip_brown_pos_tags(std::string_view tagged);

// True when the text is empty or only ASCII whitespace; such documents are dropped.
bool is_blank(std::string_view text);

// Deterministic uniform value in [0, 1) for document `index` under `seed`, used to assign
// documents to the validation split.
double document_hash_unit(uint64_t seed, uint64_t index);

}  // namespace sdmoe::data
