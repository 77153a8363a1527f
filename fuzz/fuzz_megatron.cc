// Fuzz target: the Megatron-LM .idx/.bin reader (TokenDataset::open_megatron,
// data/megatron_dataset.cc).
//
// Input layout (fuzz_input below):
//   byte 0      flags: bits 0-1 how the .bin is made (0: the bytes given, 1: resized to
//               what the index describes, 2: one byte longer than that, 3: one byte
//               shorter); bits 2-3 which name opens it (prefix, .bin, .idx, prefix);
//               bits 4-7 the EOD token (kEods)
//   byte 1      validation fraction (byte + 1) / 257, in (0, 1) as the trainer demands
//   bytes 2-5   .bin length N, little-endian (clamped to what is there)
//   N bytes     .bin contents
//   the rest    .idx contents
// The files go to a private temp directory; every part (ALL, TRAIN, VALIDATION) is opened.
// Each open must succeed or throw sdmoe::Error. When all three succeed: TRAIN's tokens
// followed by VALIDATION's are ALL's, ALL holds the whole .bin, every document ends with
// the EOD token.
//
// SDMOE_FUZZ_WRITE_SEEDS=DIR: write valid inputs (every dtype) to DIR and exit.
// (SDMOE_FUZZ_SKIP_KNOWN: no known finding is open for this target; the memcpy from an
// empty vector's null data() of fuzz/regressions/megatron/ is fixed.)
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/check.h"
#include "data/token_dataset.h"
#include "fuzz/fuzz_temp_dir.h"

namespace {

namespace fs = std::filesystem;
using sdmoe::data::MegatronSelection;
using sdmoe::data::TokenDataset;

constexpr int32_t kEods[16] = {50256, 0, 1, 2, 3, 7, 255, 256, 65535, 65536, -1, INT32_MAX, INT32_MIN, 100, 5, 50255};

std::string g_dir;

[[noreturn]] void property_failed(const std::string& what, std::string_view input) {
  std::fprintf(stderr, "fuzz_megatron: property failed: %s\ninput (%zu bytes): ", what.c_str(), input.size());
  for (unsigned char c : input) std::fprintf(stderr, "\\x%02x", c);
  std::fprintf(stderr, "\n");
  std::abort();
}

void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "fuzz_megatron: cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

template <typename T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <typename T>
bool get(std::string_view in, size_t at, T& v) {
  if (at + sizeof(T) > in.size()) return false;
  std::memcpy(&v, in.data() + at, sizeof(T));
  return true;
}

int width_of(uint8_t code) {
  switch (code) {
    case 1: return 1;
    case 3: case 8: return 2;
    case 4: return 4;
    case 5: return 8;
    default: return 1;
  }
}

// The .bin size the index describes, or -1 (harness-side only, to make sizes match
// often; the reader's own checks are what is tested).
int64_t described_bin_bytes(std::string_view idx) {
  uint8_t code = 0;
  uint64_t sequences = 0;
  if (!get(idx, 17, code) || !get(idx, 18, sequences) || sequences > idx.size()) return -1;
  int64_t total = 0;
  for (uint64_t s = 0; s < sequences; ++s) {
    int32_t length = 0;
    if (!get(idx, 34 + 4 * s, length)) return -1;
    total += std::max(0, length);
    if (total > (1 << 20)) return -1;
  }
  return total * width_of(code);
}

// A valid dataset: docs of tokens, each ending with eod, one sequence per document.
template <typename T>
std::string make_input(uint8_t code, const std::vector<std::vector<int64_t>>& docs, uint8_t flags, uint8_t fraction) {
  std::string bin, idx;
  std::vector<int32_t> lengths;
  std::vector<int64_t> pointers, doc_index{0};
  int64_t at = 0;
  for (const auto& doc : docs) {
    for (int64_t t : doc) put<T>(bin, T(t));
    lengths.push_back(int32_t(doc.size()));
    pointers.push_back(at);
    at += int64_t(doc.size() * sizeof(T));
    doc_index.push_back(int64_t(lengths.size()));
  }
  idx.append("MMIDIDX\0\0", 9);
  put<uint64_t>(idx, 1);
  put<uint8_t>(idx, code);
  put<uint64_t>(idx, lengths.size());
  put<uint64_t>(idx, doc_index.size());
  for (int32_t l : lengths) put<int32_t>(idx, l);
  for (int64_t p : pointers) put<int64_t>(idx, p);
  for (int64_t d : doc_index) put<int64_t>(idx, d);
  std::string input;
  put<uint8_t>(input, flags);
  put<uint8_t>(input, fraction);
  put<uint32_t>(input, uint32_t(bin.size()));
  return input + bin + idx;
}

void write_seeds(const std::string& dir) {
  fs::create_directories(dir);
  const std::vector<std::vector<int64_t>> docs = {{5, 9, 50256}, {7, 50256}, {1, 2, 3, 4, 50256}, {50256}};
  write_file(dir + "/uint16", make_input<uint16_t>(8, docs, 0x00, 64));
  write_file(dir + "/int32", make_input<int32_t>(4, docs, 0x04, 128));
  write_file(dir + "/int64", make_input<int64_t>(5, docs, 0x08, 200));
  write_file(dir + "/int16", make_input<int16_t>(3, {{5, 9, 100}, {7, 100}, {100}}, 0xd0, 30));
  write_file(dir + "/uint8", make_input<uint8_t>(1, {{5, 9, 2}, {2}, {7, 7, 2}, {1, 2}}, 0x31, 100));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* seeds = std::getenv("SDMOE_FUZZ_WRITE_SEEDS")) {
    write_seeds(seeds);
    std::exit(0);
  }
  g_dir = sdmoe_fuzz::make_temp_dir("megatron");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  if (size < 6) return 0;
  const uint8_t flags = data[0];
  const double fraction = (double(data[1]) + 1) / 257;
  uint32_t bin_length = 0;
  std::memcpy(&bin_length, data + 2, 4);
  const size_t n = std::min<size_t>(bin_length, size - 6);
  std::string bin(input.substr(6, n));
  const std::string_view idx = input.substr(6 + n);
  const int bin_mode = flags & 3;
  if (bin_mode != 0) {
    const int64_t want = described_bin_bytes(idx);
    if (want >= 0) bin.resize(size_t(std::max<int64_t>(0, want + (bin_mode == 2 ? 1 : bin_mode == 3 ? -1 : 0))), '\0');
  }
  const std::string prefix = g_dir + "/data";
  write_file(prefix + ".bin", bin);
  write_file(prefix + ".idx", idx);
  const int name = (flags >> 2) & 3;
  const std::string path = name == 1 ? prefix + ".bin" : name == 2 ? prefix + ".idx" : prefix;
  const int32_t eod = kEods[flags >> 4];

  std::optional<TokenDataset> parts[3];
  const MegatronSelection::Part kinds[3] = {MegatronSelection::Part::ALL, MegatronSelection::Part::TRAIN,
                                            MegatronSelection::Part::VALIDATION};
  for (int p = 0; p < 3; ++p) {
    try {
      parts[p] = TokenDataset::open_megatron(path, MegatronSelection{kinds[p], fraction, eod});
    } catch (const sdmoe::Error&) {
    }
  }
  if (parts[0]) {
    const TokenDataset& all = *parts[0];
    // Every token of the .bin, in order; the width is the dtype's.
    uint8_t code = 0;
    get(idx, 17, code);
    if (int64_t(bin.size()) != all.num_tokens() * width_of(code)) property_failed("ALL does not hold the whole .bin", input);
    for (int64_t d = 0; d < all.num_documents(); ++d)
      if (all.tokens()[size_t(all.doc_offsets()[size_t(d) + 1] - 1)] != eod)
        property_failed("a document does not end with the EOD token", input);
    if (all.eod_token() != eod || all.vocab_size() <= eod) property_failed("EOD token or vocabulary wrong", input);
  }
  if (parts[0] && parts[1] && parts[2]) {
    std::vector<int32_t> joined(parts[1]->tokens().begin(), parts[1]->tokens().end());
    joined.insert(joined.end(), parts[2]->tokens().begin(), parts[2]->tokens().end());
    if (!std::equal(joined.begin(), joined.end(), parts[0]->tokens().begin(), parts[0]->tokens().end()))
      property_failed("TRAIN + VALIDATION != ALL", input);
  }
  return 0;
}
