// Fuzz target: data/json_text.h on arbitrary bytes.
//
// Both readers must return or throw sdmoe::Error (never crash, hang or throw anything
// else). Properties checked on what they return:
//   - a serialisation built from parse_string_to_int_object's result parses back to it;
//   - find_string_member finds a value again in an object serialised from it, under its
//     own key and with other members of every JSON kind around it;
//   - where nlohmann-json (strict JSON) accepts the input as an object, our lenient reader
//     agrees with it: the same "text" member, the same string -> integer map.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "core/check.h"
#include "data/json_text.h"

namespace {

using sdmoe::data::find_string_member;
using sdmoe::data::parse_string_to_int_object;

[[noreturn]] void property_failed(const char* what, std::string_view input) {
  std::fprintf(stderr, "fuzz_json: property failed: %s\ninput (%zu bytes): ", what, input.size());
  for (unsigned char c : input) std::fprintf(stderr, "\\x%02x", c);
  std::fprintf(stderr, "\n");
  std::abort();
}

// A JSON string literal for arbitrary bytes: quotes, backslashes and control bytes
// escaped, everything else (invalid UTF-8 included) raw, which our reader passes through.
std::string quote(std::string_view bytes) {
  std::string out = "\"";
  for (unsigned char c : bytes) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + "\"";
}

const std::string kContext = "fuzz";

void check_int_object(std::string_view text) {
  std::vector<std::pair<std::string, int64_t>> entries;
  try {
    entries = parse_string_to_int_object(text, kContext);
  } catch (const sdmoe::Error&) {
    return;
  }
  std::string again = "{";
  for (size_t i = 0; i < entries.size(); ++i)
    again += (i ? ", " : "") + quote(entries[i].first) + ": " + std::to_string(entries[i].second);
  again += "}";
  std::vector<std::pair<std::string, int64_t>> reparsed;
  try {
    reparsed = parse_string_to_int_object(again, kContext);
  } catch (const sdmoe::Error& e) {
    property_failed("parse_string_to_int_object rejects the serialisation of its own result", text);
  }
  if (reparsed != entries) property_failed("parse_string_to_int_object round trip differs", text);
  // Each key found again by find_string_member, between members of every kind.
  for (size_t i = 0; i < entries.size() && i < 4; ++i) {
    const std::string& key = entries[i].first;
    const std::string other = key + "x";
    const std::string object = "{" + quote(other) + ": [1, -2.5e3, {\"a\": null}, true, false, \"s\\\"\"], " +
                               quote(key) + ": " + quote(key) + ", " + quote(other + "y") + ": {}}";
    std::optional<std::string> found;
    try {
      found = find_string_member(object, key, kContext);
    } catch (const sdmoe::Error&) {
      property_failed("find_string_member rejects a well-formed object", text);
    }
    if (!found || *found != key) property_failed("find_string_member misses a member", text);
  }
}

void check_find_member(std::string_view text, std::string_view key) {
  std::optional<std::string> found;
  try {
    found = find_string_member(text, key, kContext);
  } catch (const sdmoe::Error&) {
    return;
  }
  if (!found) return;
  const std::string object = "{" + quote(key) + ": " + quote(*found) + "}";
  std::optional<std::string> again;
  try {
    again = find_string_member(object, key, kContext);
  } catch (const sdmoe::Error&) {
    property_failed("find_string_member rejects the serialisation of its own result", text);
  }
  if (again != found) property_failed("find_string_member round trip differs", text);
}

// Where strict JSON accepts the input, the lenient reader must give the same answers.
void check_against_nlohmann(std::string_view text) {
  // nlohmann's lexer takes a 0x00 byte outside a string for the end of input.
  if (text.find('\0') != std::string_view::npos) return;
  nlohmann::ordered_json j;
  int text_keys = 0;  // "text" members of the top-level object: nlohmann keeps the last
  size_t keys = 0;     // all members of the top-level object, repeated ones each time
  try {
    j = nlohmann::ordered_json::parse(text, [&](int depth, nlohmann::ordered_json::parse_event_t event,
                                                nlohmann::ordered_json& parsed) {
      if (depth == 1 && event == nlohmann::ordered_json::parse_event_t::key) {
        ++keys;
        if (parsed == "text") ++text_keys;
      }
      return true;
    });
  } catch (const nlohmann::json::exception&) {
    return;
  }
  if (!j.is_object()) return;
  // "text" member.
  std::optional<std::string> ours;
  bool threw = false;
  std::string error;
  try {
    ours = find_string_member(text, "text", kContext);
  } catch (const sdmoe::Error& e) {
    threw = true;
    error = e.what();
  }
  // Our nesting bound (256) is the one documented difference.
  const bool too_deep = error.find("nesting too deep") != std::string::npos;
  const auto it = j.find("text");
  if (text_keys > 1) {
    // Ours stops at the first non-string one; nlohmann keeps the last. Only a returned
    // value is comparable.
    if (!threw && (it == j.end() || !it->is_string() || ours != it->get<std::string>()))
      property_failed("repeated \"text\": ours differs from the last one", text);
  } else if (it == j.end()) {
    if ((threw && !too_deep) || ours) property_failed("\"text\": nlohmann finds none, ours differs", text);
  } else if (it->is_string()) {
    if (!threw && ours != it->get<std::string>()) property_failed("\"text\" differs from nlohmann's", text);
    if (threw && !too_deep) property_failed("\"text\": nlohmann reads a string, ours throws", text);
  } else if (!threw) {
    property_failed("\"text\" is not a string but find_string_member returned", text);
  }
  // String -> integer map, when every value is an integer well inside int64 and no key
  // repeats (nlohmann keeps the last value only, ours checks each).
  if (keys != j.size()) return;
  std::map<std::string, int64_t> theirs;
  for (const auto& [key, value] : j.items()) {
    if (!value.is_number_integer()) return;
    if (value.is_number_unsigned() && value.get<uint64_t>() > (uint64_t(1) << 62)) return;
    const int64_t v = value.get<int64_t>();
    if (v > (int64_t(1) << 62) || v < -(int64_t(1) << 62)) return;
    theirs[key] = v;
  }
  std::vector<std::pair<std::string, int64_t>> entries;
  try {
    entries = parse_string_to_int_object(text, kContext);
  } catch (const sdmoe::Error&) {
    property_failed("parse_string_to_int_object rejects a strict-JSON string -> integer object", text);
  }
  std::map<std::string, int64_t> mine;
  for (const auto& [key, value] : entries) mine[key] = value;  // a repeated key: the last wins
  if (mine != theirs) property_failed("parse_string_to_int_object differs from nlohmann", text);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  check_int_object(text);
  check_find_member(text, "text");
  // A key taken from the input itself: up to the first 8 bytes before a 0x00.
  const size_t key_end = std::min<size_t>(text.find('\0') == std::string_view::npos ? 0 : text.find('\0'), 8);
  check_find_member(text.substr(key_end ? key_end + 1 : 0), text.substr(0, key_end));
  check_against_nlohmann(text);
  return 0;
}
