// Writing token files (see token_dataset.h for the layout).
#include <algorithm>
#include <utility>
#include <vector>

#include "core/check.h"
#include "data/hdf5_handle.h"
#include "data/token_dataset.h"

namespace sdmoe::data {

namespace {

void write_scalar_attribute(const std::string& path, hid_t file, const char* name, hid_t file_type,
                            hid_t memory_type, const void* value) {
  const hdf5::Handle space = hdf5::dataspace(H5Screate(H5S_SCALAR));
  const hdf5::Handle attr = hdf5::attribute(H5Acreate2(file, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT));
  if (!attr.valid() || H5Awrite(attr.get(), memory_type, value) < 0)
    fail("{}: cannot write attribute '{}'", path, name);
}

// Variable-length UTF-8, which h5py returns as a Python str.
void write_string_attribute(const std::string& path, hid_t file, const char* name, const std::string& value) {
  const hdf5::Handle type = hdf5::datatype(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  const char* data = value.c_str();
  write_scalar_attribute(path, file, name, type.get(), type.get(), &data);
}

// Chunked + deflate when the data is non-empty: token files compress ~2x and are read once.
void write_1d(const std::string& where, hid_t group, const char* name, hid_t file_type, hid_t memory_type,
              const void* data, hsize_t length) {
  const hdf5::Handle space = hdf5::dataspace(H5Screate_simple(1, &length, nullptr));
  const hdf5::Handle create = hdf5::plist(H5Pcreate(H5P_DATASET_CREATE));
  if (length > 0) {
    const hsize_t chunk = std::min<hsize_t>(length, hsize_t{1} << 18);  // elements per chunk
    H5Pset_chunk(create.get(), 1, &chunk);
    if (H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0) H5Pset_deflate(create.get(), 4);
  }
  const hdf5::Handle dataset =
      hdf5::dataset(H5Dcreate2(group, name, file_type, space.get(), H5P_DEFAULT, create.get(), H5P_DEFAULT));
  if (!dataset.valid()) fail("{}: cannot create dataset '{}'", where, name);
  if (length > 0 && H5Dwrite(dataset.get(), memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
    fail("{}: cannot write dataset '{}' (disk full?)", where, name);
}

}  // namespace

TokenDatasetWriter::TokenDatasetWriter(const std::string& path, const TokenFileInfo& info)
    : path_(path), info_(info) {
  hdf5::silence_error_printing();
  if (info.vocab_size <= 0 || info.eod_token < 0 || info.eod_token >= info.vocab_size)
    fail("{}: bad token file info (vocab_size {}, eod_token {})", path, info.vocab_size, info.eod_token);
  hdf5::Handle file = hdf5::file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT));
  if (!file.valid()) fail("{}: cannot create HDF5 file (does the directory exist and is it writable?)", path);
  write_string_attribute(path, file.get(), "format", kTokenFileFormat);
  write_scalar_attribute(path, file.get(), "vocab_size", H5T_STD_I64LE, H5T_NATIVE_INT64, &info.vocab_size);
  const int64_t eod = info.eod_token;
  write_scalar_attribute(path, file.get(), "eod_token", H5T_STD_I64LE, H5T_NATIVE_INT64, &eod);
  write_scalar_attribute(path, file.get(), "tokenizer_fingerprint", H5T_STD_U64LE, H5T_NATIVE_UINT64,
                         &info.tokenizer_fingerprint);
  file_id_ = file.release();
}

TokenDatasetWriter::~TokenDatasetWriter() {
  if (file_id_ >= 0) H5Fclose(file_id_);
}

void TokenDatasetWriter::write_split(const std::string& split, std::span<const int32_t> tokens,
                                     std::span<const int64_t> doc_offsets) {
  if (file_id_ < 0) fail("{}: write_split after close", path_);
  const std::string where = fmt::format("{}: /{}", path_, split);
  validate_split(where, info_, tokens, doc_offsets);
  const hdf5::Handle group =
      hdf5::group(H5Gcreate2(file_id_, split.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  if (!group.valid()) fail("{}: cannot create group (written twice?)", where);

  // uint16 halves the file and the page cache footprint; GPT-2's 50257 fits.
  if (info_.vocab_size <= 65535) {
    std::vector<uint16_t> narrow(tokens.begin(), tokens.end());
    write_1d(where, group.get(), "tokens", H5T_STD_U16LE, H5T_NATIVE_UINT16, narrow.data(), narrow.size());
  } else {
    write_1d(where, group.get(), "tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, tokens.data(), tokens.size());
  }
  write_1d(where, group.get(), "doc_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, doc_offsets.data(),
           doc_offsets.size());
}

void TokenDatasetWriter::close() {
  if (file_id_ < 0) return;
  const hid_t id = std::exchange(file_id_, -1);
  const bool flushed = H5Fflush(id, H5F_SCOPE_GLOBAL) >= 0;
  const bool closed = H5Fclose(id) >= 0;
  if (!flushed || !closed) fail("{}: cannot finish writing (disk full?)", path_);
}

}  // namespace sdmoe::data
