// GPT-2's pre-tokenization: the split of text into pieces that BPE then encodes one by
// one. GPT-2 defines it by the Python `regex` pattern
//
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// which we reproduce with a hand-written scanner over code points (std::regex has no
// \p{..} classes, and a regex engine would also choke on invalid UTF-8). Character
// classes come from ICU: \p{L} = general category L*, \p{N} = N*, \s = White_Space.
//
// Bytes that are not part of a well-formed UTF-8 sequence are each treated as one code
// point of the "other" class (neither letter, number nor space). The pieces always tile
// the input exactly, which is what makes byte-level BPE round trip on any byte string.
#pragma once
#include <string_view>
#include <vector>

namespace sdmoe::data {

// Splits `text` into consecutive pieces whose concatenation is `text`.
std::vector<std::string_view> split_gpt2_pieces(std::string_view text);

}  // namespace sdmoe::data
