// Minimal JSON reading for the two shapes the data layer meets: the tokenizer's
// encoder.json (one flat object of string -> integer) and one line of a .jsonl corpus
// (an object whose "text" member we want; other members may be any JSON value).
//
// A full JSON library would be a dependency for ~200 lines of need. Strings decode to
// UTF-8 bytes; \uXXXX escapes including surrogate pairs are honored, and a lone
// surrogate becomes U+FFFD (it has no UTF-8 encoding). Raw bytes inside strings are
// passed through unchanged, so invalid UTF-8 in a corpus survives to the tokenizer.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sdmoe::data {

// Parses `{"key": int, ...}`. Throws sdmoe::Error "<context>: malformed JSON at byte N: ...".
std::vector<std::pair<std::string, int64_t>> parse_string_to_int_object(std::string_view text,
                                                                        const std::string& context);

// Parses one JSON object and returns the value of the top-level string member `key`, or
// nullopt if the object has no such member. Throws sdmoe::Error if the text is not one
// JSON object or if `key` holds something other than a string.
std::optional<std::string> find_string_member(std::string_view object_text, std::string_view key,
                                              const std::string& context);

// Appends the UTF-8 encoding of a Unicode scalar value (or U+FFFD for surrogates/out of range).
void append_utf8(std::string& out, uint32_t code_point);

}  // namespace sdmoe::data
