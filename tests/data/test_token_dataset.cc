#include <gtest/gtest.h>
#include <hdf5.h>

#include <cstring>
#include <filesystem>

#include "core/check.h"
#include "data/token_dataset.h"
#include "test_support.h"

namespace sdmoe::data {
namespace {

using testing::ScratchDir;
using testing::write_file;

constexpr TokenFileInfo kInfo{50257, 50256, 0x1234567890abcdefULL};

// Three documents of a made-up stream, each ending with EOD.
struct Split {
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets;
};
Split sample_split(int seed, int32_t eod_token = kInfo.eod_token) {
  Split s;
  s.offsets.push_back(0);
  for (int d = 0; d < 3; ++d) {
    for (int i = 0; i < 5 + d * 7 + seed; ++i) s.tokens.push_back((seed * 1000 + d * 97 + i * 31) % 50000);
    s.tokens.push_back(eod_token);
    s.offsets.push_back(static_cast<int64_t>(s.tokens.size()));
  }
  return s;
}

void write_sample_file(const std::string& path, const TokenFileInfo& info = kInfo, bool with_validation = true) {
  TokenDatasetWriter writer(path, info);
  const Split train = sample_split(1, info.eod_token);
  writer.write_split("train", train.tokens, train.offsets);
  if (with_validation) {
    const Split validation = sample_split(2, info.eod_token);
    writer.write_split("validation", validation.tokens, validation.offsets);
  }
  writer.close();
}

std::string open_error(const std::string& path, const std::string& split = "train") {
  try {
    TokenDataset::open(path, split);
  } catch (const sdmoe::Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << "one line expected: " << message;
    EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << "starts with the path: " << message;
    return message;
  }
  ADD_FAILURE() << "open(" << path << ", " << split << ") succeeded";
  return "";
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST(TokenDataset, WriteReadRoundTrip) {
  ScratchDir dir;
  const std::string path = dir.file("tokens.h5");
  write_sample_file(path);
  for (const auto& [split, expected] : {std::pair{"train", sample_split(1)}, std::pair{"validation", sample_split(2)}}) {
    const TokenDataset ds = TokenDataset::open(path, split);
    EXPECT_EQ(ds.vocab_size(), kInfo.vocab_size);
    EXPECT_EQ(ds.eod_token(), kInfo.eod_token);
    EXPECT_EQ(ds.tokenizer_fingerprint(), kInfo.tokenizer_fingerprint);
    EXPECT_EQ(ds.num_tokens(), static_cast<int64_t>(expected.tokens.size()));
    EXPECT_EQ(ds.num_documents(), 3);
    EXPECT_EQ(std::vector<int32_t>(ds.tokens().begin(), ds.tokens().end()), expected.tokens);
    EXPECT_EQ(std::vector<int64_t>(ds.doc_offsets().begin(), ds.doc_offsets().end()), expected.offsets);
  }
}

// The on-disk types are part of the format that h5py users rely on.
TEST(TokenDataset, OnDiskTypesAndAttributes) {
  ScratchDir dir;
  const std::string narrow = dir.file("narrow.h5"), wide = dir.file("wide.h5");
  write_sample_file(narrow);
  write_sample_file(wide, TokenFileInfo{70000, 69999, 7});
  const auto token_type = [](const std::string& path) {
    const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    const hid_t data = H5Dopen2(file, "/train/tokens", H5P_DEFAULT);
    const hid_t type = H5Dget_type(data);
    const size_t size = H5Tget_size(type);
    const H5T_sign_t sign = H5Tget_sign(type);
    const hid_t offsets = H5Dopen2(file, "/train/doc_offsets", H5P_DEFAULT);
    const hid_t offsets_type = H5Dget_type(offsets);
    EXPECT_EQ(H5Tget_size(offsets_type), 8u);
    EXPECT_EQ(H5Tget_sign(offsets_type), H5T_SGN_2);
    hid_t attr = H5Aopen(file, "tokenizer_fingerprint", H5P_DEFAULT);
    hid_t attr_type = H5Aget_type(attr);
    EXPECT_EQ(H5Tget_sign(attr_type), H5T_SGN_NONE);
    H5Tclose(attr_type);
    H5Aclose(attr);
    H5Tclose(offsets_type);
    H5Dclose(offsets);
    H5Tclose(type);
    H5Dclose(data);
    H5Fclose(file);
    return std::pair{size, sign};
  };
  EXPECT_EQ(token_type(narrow), (std::pair{size_t{2}, H5T_SGN_NONE}));  // uint16
  EXPECT_EQ(token_type(wide), (std::pair{size_t{4}, H5T_SGN_2}));       // int32
  const TokenDataset ds = TokenDataset::open(wide, "train");
  EXPECT_EQ(ds.vocab_size(), 70000);
  EXPECT_EQ(ds.eod_token(), 69999);
}

TEST(TokenDataset, EmptySplitIsValid) {
  ScratchDir dir;
  const std::string path = dir.file("empty.h5");
  TokenDatasetWriter writer(path, kInfo);
  writer.write_split("validation", {}, std::vector<int64_t>{0});
  writer.close();
  const TokenDataset ds = TokenDataset::open(path, "validation");
  EXPECT_EQ(ds.num_tokens(), 0);
  EXPECT_EQ(ds.num_documents(), 0);
}

TEST(TokenDataset, MissingFileNotHdf5MissingSplit) {
  ScratchDir dir;
  EXPECT_TRUE(contains(open_error(dir.file("absent.h5")), "no such file"));
  write_file(dir.file("text.h5"), "just some text, not HDF5\n");
  EXPECT_TRUE(contains(open_error(dir.file("text.h5")), "not an HDF5 file"));
  const std::string path = dir.file("train_only.h5");
  write_sample_file(path, kInfo, /*with_validation=*/false);
  EXPECT_TRUE(contains(open_error(path, "validation"), "no split 'validation'"));
}

TEST(TokenDataset, TruncatedFile) {
  ScratchDir dir;
  const std::string path = dir.file("truncated.h5");
  write_sample_file(path);
  const auto size = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, size * 2 / 3);
  const std::string message = open_error(path);
  EXPECT_TRUE(contains(message, "truncated")) << message;
}

// Opens a finished file for editing with the raw HDF5 API.
struct RawEdit {
  hid_t file;
  explicit RawEdit(const std::string& path) : file(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)) {
    EXPECT_GE(file, 0);
  }
  ~RawEdit() { H5Fclose(file); }
  void replace_dataset(const char* name, hid_t type, const void* data, hsize_t n) {
    H5Ldelete(file, name, H5P_DEFAULT);
    const hid_t space = H5Screate_simple(1, &n, nullptr);
    const hid_t ds = H5Dcreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    EXPECT_GE(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), 0);
    H5Dclose(ds);
    H5Sclose(space);
  }
  void replace_format(const char* value) {
    H5Adelete(file, "format");
    const hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, std::strlen(value) + 1);  // fixed-length this time, as another tool might write
    const hid_t space = H5Screate(H5S_SCALAR);
    const hid_t attr = H5Acreate2(file, "format", type, space, H5P_DEFAULT, H5P_DEFAULT);
    EXPECT_GE(H5Awrite(attr, type, value), 0);
    H5Aclose(attr);
    H5Sclose(space);
    H5Tclose(type);
  }
};

TEST(TokenDataset, WrongOrMissingFormatAttribute) {
  ScratchDir dir;
  const std::string path = dir.file("format.h5");
  write_sample_file(path);
  { RawEdit(path).replace_format("sdmoe-tokens-v1"); }
  EXPECT_NO_THROW(TokenDataset::open(path, "train"));  // fixed-length string is read too
  { RawEdit(path).replace_format("other-format-v9"); }
  EXPECT_TRUE(contains(open_error(path), "unsupported format 'other-format-v9'"));
  { RawEdit edit(path); H5Adelete(edit.file, "format"); }
  EXPECT_TRUE(contains(open_error(path), "not an sdmoe token file"));
}

TEST(TokenDataset, TokenOutsideVocabulary) {
  ScratchDir dir;
  const std::string path = dir.file("vocab.h5");
  write_sample_file(path);
  const Split train = sample_split(1);
  std::vector<uint16_t> tokens(train.tokens.begin(), train.tokens.end());
  tokens[3] = 50257;  // == vocab_size
  { RawEdit(path).replace_dataset("/train/tokens", H5T_NATIVE_UINT16, tokens.data(), tokens.size()); }
  const std::string message = open_error(path);
  EXPECT_TRUE(contains(message, "token 50257 at position 3 is outside the vocabulary")) << message;
}

TEST(TokenDataset, BadDocOffsets) {
  ScratchDir dir;
  const std::string path = dir.file("offsets.h5");
  const Split train = sample_split(1);

  write_sample_file(path);
  std::vector<int64_t> short_last = train.offsets;
  short_last.back() -= 1;
  { RawEdit(path).replace_dataset("/train/doc_offsets", H5T_NATIVE_INT64, short_last.data(), short_last.size()); }
  EXPECT_TRUE(contains(open_error(path), "last doc_offset"));

  write_sample_file(path);
  std::vector<int64_t> backwards = train.offsets;
  std::swap(backwards[1], backwards[2]);
  { RawEdit(path).replace_dataset("/train/doc_offsets", H5T_NATIVE_INT64, backwards.data(), backwards.size()); }
  EXPECT_TRUE(contains(open_error(path), "not increasing"));

  write_sample_file(path);
  std::vector<int64_t> no_eod = train.offsets;
  no_eod[1] -= 1;  // document 0 now ends one token early, before its EOD
  { RawEdit(path).replace_dataset("/train/doc_offsets", H5T_NATIVE_INT64, no_eod.data(), no_eod.size()); }
  EXPECT_TRUE(contains(open_error(path), "does not end with the EOD token"));

  write_sample_file(path);
  { RawEdit edit(path); H5Ldelete(edit.file, "/train/doc_offsets", H5P_DEFAULT); }
  EXPECT_TRUE(contains(open_error(path), "/train/doc_offsets is missing"));
}

TEST(TokenDataset, WriterRefusesInvalidData) {
  ScratchDir dir;
  TokenDatasetWriter writer(dir.file("w.h5"), kInfo);
  const std::vector<int32_t> tokens = {1, 2, 50256};
  EXPECT_THROW(writer.write_split("train", tokens, std::vector<int64_t>{0, 2}), sdmoe::Error);
  EXPECT_THROW(writer.write_split("train", std::vector<int32_t>{1, 60000, 50256}, std::vector<int64_t>{0, 3}),
               sdmoe::Error);
  EXPECT_NO_THROW(writer.write_split("train", tokens, std::vector<int64_t>{0, 3}));
  EXPECT_THROW(writer.write_split("train", tokens, std::vector<int64_t>{0, 3}), sdmoe::Error);  // twice
}

}  // namespace
}  // namespace sdmoe::data
