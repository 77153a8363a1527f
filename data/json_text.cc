#include "data/json_text.h"

#include <cstring>

#include "core/check.h"

namespace sdmoe::data {

void append_utf8(std::string& out, uint32_t code_point) {
  if ((code_point >= 0xD800 && code_point <= 0xDFFF) || code_point > 0x10FFFF) code_point = 0xFFFD;
  if (code_point < 0x80) {
    out.push_back(static_cast<char>(code_point));
  } else if (code_point < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (code_point >> 6)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else if (code_point < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (code_point >> 12)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (code_point >> 18)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  }
}

namespace {

// Recursive-descent reader over a byte buffer. Errors name the byte offset because
// encoder.json is one 1 MB line, where a line number would say nothing.
class JsonCursor {
 public:
  JsonCursor(std::string_view text, const std::string& context) : text_(text), context_(context) {}

  [[noreturn]] void error(std::string_view what) const {
    fail("{}: malformed JSON at byte {}: {}", context_, pos_, what);
  }

  void skip_whitespace() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[pos_]; }

  void expect(char c) {
    skip_whitespace();
    if (peek() != c) error(fmt::format("expected '{}'", c));
    ++pos_;
  }

  // Consumes `c` (after whitespace) if it is next.
  bool consume(char c) {
    skip_whitespace();
    if (peek() != c) return false;
    ++pos_;
    return true;
  }

  uint32_t parse_hex4() {
    if (pos_ + 4 > text_.size()) error("truncated \\u escape");
    uint32_t value = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_++];
      value <<= 4;
      if (c >= '0' && c <= '9') value |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') value |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') value |= static_cast<uint32_t>(c - 'A' + 10);
      else error("bad hex digit in \\u escape");
    }
    return value;
  }

  std::string parse_string() {
    skip_whitespace();
    if (peek() != '"') error("expected string");
    ++pos_;
    std::string out;
    while (true) {
      // Copy the run of plain bytes in one go: encoder.json and corpus text are mostly that.
      size_t run_end = pos_;
      while (run_end < text_.size() && text_[run_end] != '"' && text_[run_end] != '\\') ++run_end;
      out.append(text_.substr(pos_, run_end - pos_));
      pos_ = run_end;
      if (at_end()) error("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return out;
      if (at_end()) error("unterminated escape");
      char e = text_[pos_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          uint32_t unit = parse_hex4();
          if (unit >= 0xD800 && unit <= 0xDBFF && pos_ + 6 <= text_.size() && text_[pos_] == '\\' &&
              text_[pos_ + 1] == 'u') {
            size_t saved = pos_;
            pos_ += 2;
            uint32_t low = parse_hex4();
            if (low >= 0xDC00 && low <= 0xDFFF) {
              append_utf8(out, 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00));
              break;
            }
            pos_ = saved;  // not a pair: the high half stands alone, the next escape is reread
          }
          append_utf8(out, unit);  // lone surrogates become U+FFFD inside append_utf8
          break;
        }
        default: error(fmt::format("unknown escape '\\{}'", e));
      }
    }
  }

  int64_t parse_integer() {
    skip_whitespace();
    size_t start = pos_;
    bool negative = consume_raw('-');
    if (at_end() || text_[pos_] < '0' || text_[pos_] > '9') error("expected integer");
    int64_t value = 0;
    while (!at_end() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      if (value > (INT64_MAX - 9) / 10) error("integer too large");
      value = value * 10 + (text_[pos_++] - '0');
    }
    if (peek() == '.' || peek() == 'e' || peek() == 'E') {
      pos_ = start;
      error("expected integer, found a fractional number");
    }
    return negative ? -value : value;
  }

  // Skips any JSON value; depth bounds recursion on hostile input.
  void skip_value(int depth = 0) {
    if (depth > 256) error("nesting too deep");
    skip_whitespace();
    char c = peek();
    if (c == '"') {
      parse_string();
    } else if (c == '{') {
      ++pos_;
      if (consume('}')) return;
      do {
        parse_string();
        expect(':');
        skip_value(depth + 1);
      } while (consume(','));
      expect('}');
    } else if (c == '[') {
      ++pos_;
      if (consume(']')) return;
      do skip_value(depth + 1);
      while (consume(','));
      expect(']');
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      consume_raw('-');
      size_t digits_start = pos_;
      while (!at_end() && std::strchr("0123456789.eE+-", text_[pos_]) != nullptr) ++pos_;
      if (pos_ == digits_start) error("bad number");
    } else if (!consume_word("true") && !consume_word("false") && !consume_word("null")) {
      error("expected a value");
    }
  }

  void expect_end() {
    skip_whitespace();
    if (!at_end()) error("trailing characters after the JSON value");
  }

 private:
  bool consume_raw(char c) {
    if (peek() != c) return false;
    ++pos_;
    return true;
  }
  bool consume_word(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  std::string_view text_;
  const std::string& context_;
  size_t pos_ = 0;
};

}  // namespace

std::vector<std::pair<std::string, int64_t>> parse_string_to_int_object(std::string_view text,
                                                                        const std::string& context) {
  JsonCursor cursor(text, context);
  std::vector<std::pair<std::string, int64_t>> entries;
  cursor.expect('{');
  if (!cursor.consume('}')) {
    do {
      std::string key = cursor.parse_string();
      cursor.expect(':');
      entries.emplace_back(std::move(key), cursor.parse_integer());
    } while (cursor.consume(','));
    cursor.expect('}');
  }
  cursor.expect_end();
  return entries;
}

std::optional<std::string> find_string_member(std::string_view object_text, std::string_view key,
                                              const std::string& context) {
  JsonCursor cursor(object_text, context);
  std::optional<std::string> found;
  cursor.expect('{');
  if (!cursor.consume('}')) {
    do {
      std::string member = cursor.parse_string();
      cursor.expect(':');
      if (member == key) {
        cursor.skip_whitespace();
        if (cursor.peek() != '"') cursor.error(fmt::format("member \"{}\" is not a string", key));
        found = cursor.parse_string();  // a repeated key keeps the last value, like Python's json
      } else {
        cursor.skip_value();
      }
    } while (cursor.consume(','));
    cursor.expect('}');
  }
  cursor.expect_end();
  return found;
}

}  // namespace sdmoe::data
