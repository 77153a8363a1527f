#include "data/gpt2_pretokenizer.h"

#include <unicode/uchar.h>

#include <array>
#include <cstdint>

namespace sdmoe::data {

namespace {

enum class CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

// One decoded unit of the input: a well-formed UTF-8 code point or a single stray byte.
struct CodeUnit {
  size_t byte_offset;    // start of this unit in the input, bytes
  char32_t code_point;   // the scalar value; stray bytes get 0xFFFFFFFF (never ' ' or '\'')
  CharClass char_class;
};

CharClass classify(char32_t c) {
  const uint32_t mask = U_GET_GC_MASK(static_cast<UChar32>(c));
  if (mask & U_GC_L_MASK) return CharClass::kLetter;
  if (mask & U_GC_N_MASK) return CharClass::kNumber;
  if (u_isUWhiteSpace(static_cast<UChar32>(c))) return CharClass::kSpace;
  return CharClass::kOther;
}

// ASCII dominates English corpora; a table avoids an ICU call per character.
const std::array<CharClass, 128>& ascii_classes() {
  static const std::array<CharClass, 128> table = [] {
    std::array<CharClass, 128> t{};
    for (char32_t c = 0; c < 128; ++c) t[c] = classify(c);
    return t;
  }();
  return table;
}

constexpr char32_t kStrayByte = 0xFFFFFFFF;

// Decodes one strict UTF-8 sequence at text[pos]: rejects overlong forms, surrogates
// and values above U+10FFFF, so that every byte outside a valid sequence is "stray".
// Returns the sequence length (0 when text[pos] does not start a valid sequence).
int decode_utf8(std::string_view text, size_t pos, char32_t& code_point) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  const uint8_t b0 = byte(pos);
  const size_t left = text.size() - pos;
  const auto continuation = [&](size_t i) { return (byte(pos + i) & 0xC0) == 0x80; };
  if (b0 < 0x80) {
    code_point = b0;
    return 1;
  }
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    if (left < 2 || !continuation(1)) return 0;
    code_point = (char32_t(b0 & 0x1F) << 6) | (byte(pos + 1) & 0x3F);
    return 2;
  }
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (left < 3 || !continuation(1) || !continuation(2)) return 0;
    const uint8_t b1 = byte(pos + 1);
    if (b0 == 0xE0 && b1 < 0xA0) return 0;   // overlong
    if (b0 == 0xED && b1 >= 0xA0) return 0;  // UTF-16 surrogate
    code_point = (char32_t(b0 & 0x0F) << 12) | (char32_t(b1 & 0x3F) << 6) | (byte(pos + 2) & 0x3F);
    return 3;
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (left < 4 || !continuation(1) || !continuation(2) || !continuation(3)) return 0;
    const uint8_t b1 = byte(pos + 1);
    if (b0 == 0xF0 && b1 < 0x90) return 0;   // overlong
    if (b0 == 0xF4 && b1 >= 0x90) return 0;  // above U+10FFFF
    code_point = (char32_t(b0 & 0x07) << 18) | (char32_t(b1 & 0x3F) << 12) |
                 (char32_t(byte(pos + 2) & 0x3F) << 6) | (byte(pos + 3) & 0x3F);
    return 4;
  }
  return 0;
}

std::vector<CodeUnit> decode_units(std::string_view text) {
  std::vector<CodeUnit> units;
  units.reserve(text.size());
  const auto& ascii = ascii_classes();
  size_t pos = 0;
  while (pos < text.size()) {
    char32_t cp = 0;
    const int length = decode_utf8(text, pos, cp);
    if (length == 0) {
      units.push_back({pos, kStrayByte, CharClass::kOther});
      pos += 1;
    } else {
      units.push_back({pos, cp, cp < 128 ? ascii[cp] : classify(cp)});
      pos += static_cast<size_t>(length);
    }
  }
  return units;
}

// Length in units of a contraction ('s 't 're 've 'm 'll 'd) starting at i, or 0.
// The pattern is case-sensitive: "'S" is not a contraction.
size_t contraction_length(const std::vector<CodeUnit>& units, size_t i) {
  if (units[i].code_point != U'\'' || i + 1 >= units.size()) return 0;
  const char32_t a = units[i + 1].code_point;
  if (a == U's' || a == U't' || a == U'm' || a == U'd') return 2;
  if (i + 2 >= units.size()) return 0;
  const char32_t b = units[i + 2].code_point;
  if ((a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l')) return 3;
  return 0;
}

}  // namespace

std::vector<std::string_view> split_gpt2_pieces(std::string_view text) {
  const std::vector<CodeUnit> units = decode_units(text);
  const size_t n = units.size();
  const auto offset = [&](size_t unit) { return unit < n ? units[unit].byte_offset : text.size(); };
  const auto run_end = [&](size_t from, CharClass cls) {
    while (from < n && units[from].char_class == cls) ++from;
    return from;
  };

  std::vector<std::string_view> pieces;
  size_t i = 0;
  while (i < n) {
    size_t end = 0;
    // Alternatives in the regex's order; the first that matches wins.
    if (const size_t c = contraction_length(units, i); c > 0) {
      end = i + c;
    } else {
      // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": the optional prefix is U+0020 only.
      // Without the space the unit at i would be whitespace, which none of the three accept.
      const size_t body = (units[i].code_point == U' ' && i + 1 < n) ? i + 1 : i;
      const CharClass cls = units[body].char_class;
      if (cls != CharClass::kSpace) {
        end = run_end(body, cls);
      } else {
        // "\s+(?!\S)" backs off one unit so that a following word keeps its leading
        // space; a single whitespace unit before non-space falls through to "\s+".
        const size_t spaces_end = run_end(i, CharClass::kSpace);
        end = (spaces_end < n && spaces_end - i >= 2) ? spaces_end - 1 : spaces_end;
      }
    }
    pieces.push_back(text.substr(offset(i), offset(end) - offset(i)));
    i = end;
  }
  return pieces;
}

}  // namespace sdmoe::data
