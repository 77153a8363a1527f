// Megatron-LM indexed datasets (.bin/.idx, "MMIDIDX" version 1, as written by Megatron's
// tools/preprocess_data.py): read into a TokenDataset.
//
// prefix.idx, little-endian:
//   magic "MMIDIDX\0\0" (9 bytes), version uint64 = 1, dtype code uint8,
//   sequence count S uint64, document-index count D uint64 (= documents + 1),
//   sequence lengths int32[S] (tokens), sequence pointers int64[S] (bytes into .bin),
//   document indices int64[D] (first sequence of each document; first 0, last S),
//   optionally sequence modes int8[S] (multimodal datasets; ignored).
// prefix.bin: the tokens of every sequence, back to back, in the dtype.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/check.h"
#include "data/token_dataset.h"

namespace sdmoe::data {
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};

// Megatron's DType codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
// 7 float32, 8 uint16.
int token_bytes(const std::string& where, uint8_t code) {
  switch (code) {
    case 1: return 1;
    case 3: return 2;
    case 4: return 4;
    case 5: return 8;
    case 8: return 2;
    default: fail("{}: token dtype code {} is not an integer type this reader takes (uint8, int16, int32, int64, uint16)", where, int(code));
  }
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open", path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return bytes;
}

// A read-only mapping of a whole file: the .bin of a large corpus is paged in as its
// documents are copied, never held twice.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY);
    if (fd_ < 0) fail("{}: cannot open", path);
    size_ = size_t(std::filesystem::file_size(path));
    if (size_ > 0) {
      data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
      if (data_ == MAP_FAILED) fail("{}: cannot map", path);
      ::madvise(data_, size_, MADV_SEQUENTIAL);
    }
  }
  ~MappedFile() {
    if (data_ && data_ != MAP_FAILED) ::munmap(data_, size_);
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const char* data() const { return static_cast<const char*>(data_); }
  size_t size() const { return size_; }

 private:
  int fd_ = -1;
  void* data_ = nullptr;
  size_t size_ = 0;
};

template <typename T>
T take(const std::vector<char>& bytes, size_t& at, const std::string& where) {
  if (at + sizeof(T) > bytes.size()) fail("{}: truncated (header or index ends early)", where);
  T value;
  std::memcpy(&value, bytes.data() + at, sizeof(T));
  at += sizeof(T);
  return value;
}

int64_t token_at(const char* p, uint8_t code) {
  switch (code) {
    case 1: return *reinterpret_cast<const uint8_t*>(p);
    case 3: { int16_t v; std::memcpy(&v, p, 2); return v; }
    case 4: { int32_t v; std::memcpy(&v, p, 4); return v; }
    case 5: { int64_t v; std::memcpy(&v, p, 8); return v; }
    default: { uint16_t v; std::memcpy(&v, p, 2); return v; }
  }
}

}  // namespace

std::string megatron_prefix(const std::string& path) {
  for (const char* ext : {".bin", ".idx"})
    if (path.size() > 4 && path.compare(path.size() - 4, 4, ext) == 0) return path.substr(0, path.size() - 4);
  return path;
}

bool is_megatron_dataset(const std::string& path) {
  const std::string prefix = megatron_prefix(path);
  std::error_code ec;
  return std::filesystem::is_regular_file(prefix + ".idx", ec) && std::filesystem::is_regular_file(prefix + ".bin", ec);
}

TokenDataset TokenDataset::open_megatron(const std::string& path, const MegatronSelection& selection) {
  const std::string prefix = megatron_prefix(path), idx_path = prefix + ".idx", bin_path = prefix + ".bin";
  std::error_code ec;
  for (const std::string& p : {idx_path, bin_path})
    if (!std::filesystem::is_regular_file(p, ec)) fail("{}: no such file (Megatron datasets are PREFIX.bin and PREFIX.idx)", p);
  const std::vector<char> idx = read_file(idx_path);
  size_t at = 0;
  if (idx.size() < sizeof(kMagic) || std::memcmp(idx.data(), kMagic, sizeof(kMagic)) != 0)
    fail("{}: not a Megatron index (no MMIDIDX header)", idx_path);
  at = sizeof(kMagic);
  const auto version = take<uint64_t>(idx, at, idx_path);
  if (version != 1) fail("{}: index version {}, this reader takes version 1", idx_path, version);
  const auto code = take<uint8_t>(idx, at, idx_path);
  const int width = token_bytes(idx_path, code);
  const auto sequences = take<uint64_t>(idx, at, idx_path), doc_entries = take<uint64_t>(idx, at, idx_path);
  const uint64_t needed = sequences * (4 + 8) + doc_entries * 8;
  if (sequences > idx.size() || doc_entries > idx.size() || at + needed > idx.size())
    fail("{}: truncated ({} sequences and {} document indices need {} bytes, the file has {})", idx_path, sequences,
         doc_entries, at + needed, idx.size());
  std::vector<int32_t> lengths(sequences);
  std::vector<int64_t> pointers(sequences), doc_index(doc_entries);
  // memcpy of zero bytes from or to an empty vector's null data() is still undefined.
  if (sequences > 0) {
    std::memcpy(lengths.data(), idx.data() + at, sequences * 4);
    std::memcpy(pointers.data(), idx.data() + at + sequences * 4, sequences * 8);
  }
  at += sequences * 12;
  if (doc_entries > 0) std::memcpy(doc_index.data(), idx.data() + at, doc_entries * 8);

  if (doc_entries < 2 || doc_index.front() != 0 || doc_index.back() != int64_t(sequences))
    fail("{}: document indices must run from 0 to the sequence count {}", idx_path, sequences);
  for (uint64_t d = 1; d < doc_entries; ++d)
    if (doc_index[d] < doc_index[d - 1])
      fail("{}: document index {} ({}) is below the previous one ({}) (corrupt index)", idx_path, d, doc_index[d],
           doc_index[d - 1]);
  int64_t expected_pointer = 0;
  for (uint64_t s = 0; s < sequences; ++s) {
    if (lengths[s] < 0 || pointers[s] != expected_pointer)
      fail("{}: sequence {} has length {} at byte {}, expected byte {} (corrupt index)", idx_path, s, lengths[s],
           pointers[s], expected_pointer);
    expected_pointer += int64_t(lengths[s]) * width;
  }
  const uintmax_t bin_bytes = std::filesystem::file_size(bin_path, ec);
  if (ec || bin_bytes != uintmax_t(expected_pointer))
    fail("{}: {} bytes, the index describes {} (truncated or from another index)", bin_path, ec ? 0 : bin_bytes,
         expected_pointer);

  // Documents [first, last) of the selection.
  const int64_t documents = int64_t(doc_entries) - 1;
  int64_t first = 0, last = documents;
  if (selection.part != MegatronSelection::Part::ALL) {
    const int64_t held_out = std::max<int64_t>(1, int64_t(double(documents) * selection.validation_fraction + 0.5));
    if (held_out >= documents)
      fail("{}: {} document(s) cannot be split into training and validation (fraction {})", prefix, documents,
           selection.validation_fraction);
    if (selection.part == MegatronSelection::Part::TRAIN) last = documents - held_out;
    else first = documents - held_out;
  }
  const MappedFile bin(bin_path);
  TokenDataset ds;
  ds.info_.eod_token = selection.eod_token;
  ds.info_.tokenizer_fingerprint = 0;  // Megatron files do not record their tokenizer
  int64_t max_token = selection.eod_token, selected_tokens = 0;
  for (int64_t s = doc_index[first]; s < doc_index[last]; ++s) selected_tokens += lengths[s];
  ds.tokens_.reserve(size_t(selected_tokens));
  ds.doc_offsets_.reserve(size_t(last - first + 1));
  ds.doc_offsets_.push_back(0);
  for (int64_t d = first; d < last; ++d) {
    for (int64_t s = doc_index[d]; s < doc_index[d + 1]; ++s) {
      const char* p = bin.data() + pointers[s];
      for (int32_t i = 0; i < lengths[s]; ++i) {
        const int64_t token = token_at(p + int64_t(i) * width, code);
        if (token < 0 || token > INT32_MAX) fail("{}: token {} in sequence {} is out of range", bin_path, token, s);
        max_token = std::max(max_token, token);
        ds.tokens_.push_back(int32_t(token));
      }
    }
    // Megatron writes an empty document for an empty input text; it holds no tokens.
    if (int64_t(ds.tokens_.size()) > ds.doc_offsets_.back()) ds.doc_offsets_.push_back(int64_t(ds.tokens_.size()));
  }
  if (ds.tokens_.empty()) fail("{}: the selected documents hold no tokens", prefix);
  // The vocabulary is not recorded either: the largest token bounds it from below.
  ds.info_.vocab_size = max_token + 1;
  validate_split(fmt::format("{} (Megatron, documents {}..{})", prefix, first, last - 1), ds.info_, ds.tokens_,
                 ds.doc_offsets_);
  return ds;
}

}  // namespace sdmoe::data
