// Reading token files: everything that can be wrong with a file on disk becomes one
// sdmoe::Error line "<path>: <reason>" instead of an HDF5 stack trace or a bad sample later.
#include "data/token_dataset.h"

#include <filesystem>
#include <type_traits>

#include "core/check.h"
#include "data/hdf5_handle.h"

namespace sdmoe::data {

static_assert(std::is_same_v<hid_t, int64_t>, "TokenDatasetWriter stores hid_t as int64_t");

void validate_split(const std::string& where, const TokenFileInfo& info, std::span<const int32_t> tokens,
                    std::span<const int64_t> doc_offsets) {
  if (info.vocab_size <= 0) fail("{}: vocab_size is {}, must be positive", where, info.vocab_size);
  if (info.eod_token < 0 || info.eod_token >= info.vocab_size)
    fail("{}: eod_token {} is outside the vocabulary [0, {})", where, info.eod_token, info.vocab_size);
  const auto n_tokens = static_cast<int64_t>(tokens.size());
  if (doc_offsets.empty()) fail("{}: doc_offsets is empty (needs n_docs + 1 entries)", where);
  if (doc_offsets.front() != 0) fail("{}: doc_offsets[0] is {}, must be 0", where, doc_offsets.front());
  if (doc_offsets.back() != n_tokens)
    fail("{}: last doc_offset is {} but there are {} tokens (truncated or corrupt data)", where,
         doc_offsets.back(), n_tokens);
  for (size_t d = 0; d + 1 < doc_offsets.size(); ++d) {
    const int64_t begin = doc_offsets[d], end = doc_offsets[d + 1];
    if (end <= begin)
      fail("{}: doc_offsets not increasing at document {} ({} then {})", where, d, begin, end);
    if (tokens[static_cast<size_t>(end - 1)] != info.eod_token)
      fail("{}: document {} does not end with the EOD token {}", where, d, info.eod_token);
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= info.vocab_size)
      fail("{}: token {} at position {} is outside the vocabulary [0, {})", where, tokens[i], i,
           info.vocab_size);
  }
}

namespace {

bool has_attribute(hid_t object, const char* name) { return H5Aexists(object, name) > 0; }

template <typename T>
T read_scalar_attribute(const std::string& path, hid_t file, const char* name, hid_t memory_type) {
  if (!has_attribute(file, name)) fail("{}: missing file attribute '{}'", path, name);
  const hdf5::Handle attr = hdf5::attribute(H5Aopen(file, name, H5P_DEFAULT));
  const hdf5::Handle space = hdf5::dataspace(H5Aget_space(attr.get()));
  if (!attr.valid() || !space.valid() || H5Sget_simple_extent_npoints(space.get()) != 1)
    fail("{}: file attribute '{}' is not a single value", path, name);
  T value{};
  if (H5Aread(attr.get(), memory_type, &value) < 0)
    fail("{}: cannot read file attribute '{}' as a number", path, name);
  return value;
}

// Reads a string attribute stored either fixed-length (h5py's np.bytes_) or variable-length
// (h5py's str, which is how we write it).
std::string read_string_attribute(const std::string& path, hid_t file, const char* name) {
  if (!has_attribute(file, name)) fail("{}: missing file attribute '{}'", path, name);
  const hdf5::Handle attr = hdf5::attribute(H5Aopen(file, name, H5P_DEFAULT));
  const hdf5::Handle type = hdf5::datatype(H5Aget_type(attr.get()));
  if (!attr.valid() || !type.valid() || H5Tget_class(type.get()) != H5T_STRING)
    fail("{}: file attribute '{}' is not a string", path, name);
  const hdf5::Handle memory_type = hdf5::datatype(H5Tcopy(type.get()));
  if (H5Tis_variable_str(type.get()) > 0) {
    char* value = nullptr;
    if (H5Aread(attr.get(), memory_type.get(), &value) < 0 || value == nullptr)
      fail("{}: cannot read file attribute '{}'", path, name);
    std::string result(value);
    H5free_memory(value);
    return result;
  }
  const size_t size = H5Tget_size(type.get());
  std::string buffer(size, '\0');
  if (H5Aread(attr.get(), memory_type.get(), buffer.data()) < 0)
    fail("{}: cannot read file attribute '{}'", path, name);
  buffer.resize(std::char_traits<char>::length(buffer.c_str()));  // drop NUL padding
  return buffer;
}

// Reads a whole 1-D integer dataset, converting to the memory type on the way.
template <typename T>
std::vector<T> read_1d(const std::string& path, hid_t group, const std::string& split, const char* name,
                       hid_t memory_type) {
  const std::string where = fmt::format("{}: /{}/{}", path, split, name);
  if (H5Lexists(group, name, H5P_DEFAULT) <= 0) fail("{} is missing", where);
  const hdf5::Handle data = hdf5::dataset(H5Dopen2(group, name, H5P_DEFAULT));
  if (!data.valid()) fail("{} cannot be opened (corrupt file?)", where);
  const hdf5::Handle type = hdf5::datatype(H5Dget_type(data.get()));
  if (!type.valid() || H5Tget_class(type.get()) != H5T_INTEGER) fail("{} is not an integer array", where);
  const hdf5::Handle space = hdf5::dataspace(H5Dget_space(data.get()));
  if (!space.valid() || H5Sget_simple_extent_ndims(space.get()) != 1) fail("{} is not 1-D", where);
  hsize_t length = 0;
  H5Sget_simple_extent_dims(space.get(), &length, nullptr);
  std::vector<T> values(static_cast<size_t>(length));
  if (length > 0 && H5Dread(data.get(), memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) < 0)
    fail("{} cannot be read (truncated or corrupt file)", where);
  return values;
}

}  // namespace

TokenDataset TokenDataset::open(const std::string& path, const std::string& split) {
  hdf5::silence_error_printing();
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail("{}: no such file", path);
  if (std::filesystem::is_directory(path, ec)) fail("{}: is a directory, expected a token file", path);
  if (H5Fis_hdf5(path.c_str()) <= 0) fail("{}: not an HDF5 file", path);
  const hdf5::Handle file = hdf5::file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
  if (!file.valid()) fail("{}: cannot open HDF5 file (truncated or corrupt?)", path);

  if (!has_attribute(file.get(), "format"))
    fail("{}: not an sdmoe token file (no 'format' attribute; expected '{}')", path, kTokenFileFormat);
  const std::string format = read_string_attribute(path, file.get(), "format");
  if (format != kTokenFileFormat)
    fail("{}: unsupported format '{}' (expected '{}')", path, format, kTokenFileFormat);

  TokenDataset ds;
  ds.info_.vocab_size = read_scalar_attribute<int64_t>(path, file.get(), "vocab_size", H5T_NATIVE_INT64);
  const auto eod = read_scalar_attribute<int64_t>(path, file.get(), "eod_token", H5T_NATIVE_INT64);
  if (eod < 0 || eod >= ds.info_.vocab_size)
    fail("{}: eod_token {} is outside the vocabulary [0, {})", path, eod, ds.info_.vocab_size);
  ds.info_.eod_token = static_cast<int32_t>(eod);
  ds.info_.tokenizer_fingerprint =
      read_scalar_attribute<uint64_t>(path, file.get(), "tokenizer_fingerprint", H5T_NATIVE_UINT64);

  if (H5Lexists(file.get(), split.c_str(), H5P_DEFAULT) <= 0)
    fail("{}: no split '{}' in this file (expected group /{})", path, split, split);
  const hdf5::Handle group = hdf5::group(H5Gopen2(file.get(), split.c_str(), H5P_DEFAULT));
  if (!group.valid()) fail("{}: /{} is not a group", path, split);

  ds.tokens_ = read_1d<int32_t>(path, group.get(), split, "tokens", H5T_NATIVE_INT32);
  ds.doc_offsets_ = read_1d<int64_t>(path, group.get(), split, "doc_offsets", H5T_NATIVE_INT64);
  validate_split(fmt::format("{}: /{}", path, split), ds.info_, ds.tokens_, ds.doc_offsets_);
  return ds;
}

TokenDataset TokenDataset::from_memory(const TokenFileInfo& info, std::vector<int32_t> tokens,
                                       std::vector<int64_t> doc_offsets) {
  validate_split("in-memory dataset", info, tokens, doc_offsets);
  TokenDataset ds;
  ds.info_ = info;
  ds.tokens_ = std::move(tokens);
  ds.doc_offsets_ = std::move(doc_offsets);
  return ds;
}

}  // namespace sdmoe::data
