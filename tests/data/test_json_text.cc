#include <gtest/gtest.h>

#include "core/check.h"
#include "data/json_text.h"

namespace sdmoe::data {
namespace {

const std::string kContext = "test.json";

TEST(JsonText, StringToIntObjectWithEscapes) {
  const auto entries = parse_string_to_int_object(
      R"( { "plain": 0, "q\"uote\\": 1 , "\u0120the": 262, "\ud83d\ude42": 7, "tab\t\/": -3 } )", kContext);
  ASSERT_EQ(entries.size(), 5u);
  EXPECT_EQ(entries[0], (std::pair<std::string, int64_t>{"plain", 0}));
  EXPECT_EQ(entries[1].first, "q\"uote\\");
  EXPECT_EQ(entries[2].first, "\xc4\xa0the");  // U+0120 in UTF-8
  EXPECT_EQ(entries[2].second, 262);
  EXPECT_EQ(entries[3].first, "\xf0\x9f\x99\x82");  // U+1F642 from a surrogate pair
  EXPECT_EQ(entries[4], (std::pair<std::string, int64_t>{"tab\t/", -3}));
  EXPECT_TRUE(parse_string_to_int_object("{}", kContext).empty());
}

TEST(JsonText, LoneSurrogateBecomesReplacementCharacter) {
  const auto entries = parse_string_to_int_object(R"({"a\ud800b": 1, "\udc00\ud83d": 2})", kContext);
  EXPECT_EQ(entries[0].first, "a\xef\xbf\xbd" "b");
  EXPECT_EQ(entries[1].first, "\xef\xbf\xbd\xef\xbf\xbd");
}

TEST(JsonText, MalformedInputNamesContextAndByte) {
  for (const char* bad : {R"({"a": 1)", R"({"a" 1})", R"({"a": 1.5})", R"({"a": "x"})", R"({"a": 1} x)",
                          R"({"a\q": 1})", R"({"a\u12": 1})", "[1]", ""}) {
    try {
      parse_string_to_int_object(bad, kContext);
      ADD_FAILURE() << "accepted: " << bad;
    } catch (const sdmoe::Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("test.json: malformed JSON at byte ", 0), 0u) << e.what();
    }
  }
}

TEST(JsonText, FindStringMemberSkipsOtherValues) {
  const std::string line =
      R"({"id": 12, "meta": {"tags": ["a", {"b": null}], "ok": true, "x": -1.5e3}, "text": "caf\u00e9\n\ud83d\ude42", "z": false})";
  EXPECT_EQ(find_string_member(line, "text", kContext), std::optional<std::string>("café\n🙂"));
  EXPECT_EQ(find_string_member(line, "missing", kContext), std::nullopt);
  // Raw (even invalid UTF-8) bytes inside strings pass through untouched.
  EXPECT_EQ(find_string_member("{\"text\": \"a\xff\"}", "text", kContext), std::optional<std::string>("a\xff"));
  EXPECT_THROW(find_string_member(R"({"text": 5})", "text", kContext), sdmoe::Error);
  EXPECT_THROW(find_string_member(R"({"text": "a")", "text", kContext), sdmoe::Error);
  EXPECT_THROW(find_string_member(R"(["text"])", "text", kContext), sdmoe::Error);
}

TEST(JsonText, AppendUtf8) {
  std::string out;
  append_utf8(out, 0x41);
  append_utf8(out, 0xE9);
  append_utf8(out, 0x65E5);
  append_utf8(out, 0x1F642);
  append_utf8(out, 0xD800);
  EXPECT_EQ(out, "Aé日🙂\xef\xbf\xbd");
}

}  // namespace
}  // namespace sdmoe::data
