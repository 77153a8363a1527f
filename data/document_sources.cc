#include "data/document_sources.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/check.h"
#include "data/json_text.h"

namespace sdmoe::data {

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot read input ({})", path, std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) fail("{}: read error", path);
  return buffer.str();
}

bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

}  // namespace

bool is_blank(std::string_view text) {
  for (char c : text)
    if (!is_ascii_space(c)) return false;
  return true;
}

void read_jsonl_documents(const std::string& path, const DocumentSink& sink) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot read input ({})", path, std::strerror(errno));
  std::string line;
  int64_t line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    if (is_blank(line)) continue;
    const std::string where = fmt::format("{}:{}", path, line_number);
    std::optional<std::string> text = find_string_member(line, "text", where);
    if (!text) fail("{}: JSON object has no \"text\" string member", where);
    sink(std::move(*text));
  }
  if (in.bad()) fail("{}: read error", path);
}

void read_text_documents(const std::string& path, const std::optional<std::regex>& split_at,
                         const DocumentSink& sink) {
  std::string content = read_file(path);
  if (!split_at) {
    sink(std::move(content));
    return;
  }
  size_t document_start = 0;
  size_t line_start = 0;
  while (line_start < content.size()) {
    size_t line_end = content.find('\n', line_start);
    const size_t next_line = line_end == std::string::npos ? content.size() : line_end + 1;
    if (line_end == std::string::npos) line_end = content.size();
    // Match against the line without its terminator (and without a CR of CRLF), so that
    // "$" in the pattern means end of line as a user would expect.
    size_t match_end = line_end;
    if (match_end > line_start && content[match_end - 1] == '\r') --match_end;
    const bool starts_document =
        std::regex_search(content.begin() + static_cast<std::ptrdiff_t>(line_start),
                          content.begin() + static_cast<std::ptrdiff_t>(match_end), *split_at);
    if (starts_document && line_start > document_start) {
      sink(content.substr(document_start, line_start - document_start));
      document_start = line_start;
    }
    line_start = next_line;
  }
  if (document_start < content.size()) sink(content.substr(document_start));
}

std::string strip_brown_pos_tags(std::string_view tagged) {
  std::string plain;
  bool paragraph_open = false;   // a word has been emitted in the current paragraph
  bool paragraph_break = false;  // a blank line was seen since the last word
  size_t line_start = 0;
  while (line_start <= tagged.size()) {
    size_t line_end = tagged.find('\n', line_start);
    if (line_end == std::string_view::npos) line_end = tagged.size();
    const std::string_view line = tagged.substr(line_start, line_end - line_start);
    line_start = line_end + 1;
    if (is_blank(line)) {
      paragraph_break = paragraph_open;
      continue;
    }
    size_t pos = 0;
    while (pos < line.size()) {
      while (pos < line.size() && is_ascii_space(line[pos])) ++pos;
      const size_t token_start = pos;
      while (pos < line.size() && !is_ascii_space(line[pos])) ++pos;
      if (token_start == pos) break;
      std::string_view word = line.substr(token_start, pos - token_start);
      if (const size_t slash = word.rfind('/'); slash != std::string_view::npos) word = word.substr(0, slash);
      if (word.empty()) continue;  // "/tag" alone carries no text
      if (word == "``" || word == "''") word = "\"";
      if (paragraph_break) {
        plain += "\n\n";
        paragraph_break = false;
      } else if (paragraph_open) {
        plain += ' ';
      }
      plain += word;
      paragraph_open = true;
    }
  }
  return plain;
}

double document_hash_unit(uint64_t seed, uint64_t index) {
  // splitmix64 finalizer over a mix of both inputs; top 53 bits -> [0, 1).
  uint64_t z = seed * 0x9e3779b97f4a7c15ULL + index + 0x632be59bd9b4e019ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

}  // namespace sdmoe::data
