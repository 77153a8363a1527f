// Fuzz target: the checkpoint loader's metadata checks (launcher/checkpoint.cc,
// CheckpointFile and Checkpointer::load) and read_checkpoint_parameters
// (launcher/hf_format.h), on a real checkpoint whose root attributes (and a few
// datasets) the input rewrites.
//
// Start-up: MPI (a world of one), a tiny CPU GptModel (2 layers, MoE, no SD-MoE) with
// AdamW, and one checkpoint of it saved by Checkpointer::save into a private temp
// directory: the base file.
//
// Per input: the base file's bytes are written to a work file, the input's edits are made
// with the HDF5 C API, then read_checkpoint_parameters(work) and Checkpointer::load(work)
// run. Each must return or throw sdmoe::Error. With no edits both must succeed and load
// must give the saved step and data position.
//
// Input: byte 0 flags (bit 0: load(parameters_only)); then edits, each
//   byte  target (kTargets[b % size]) and action ((b / size) % kActions)
//   then the action's operands, taken from the input (zeros once it runs out).
// Actions (the object is replaced by a new one of that kind):
//   0 delete             1 int64 scalar (8 bytes)   2 fixed string (2 length bytes, bytes)
//   3 variable string (2 length bytes, bytes)        4 float64 scalar           5 int64 array (count byte, 8 each)
//   6 fixed string array (count byte, len byte, bytes)
//   7 null dataspace     8 uint64 scalar            9 int8 scalar (1 byte)
//   10 int64[2] array type scalar                    11 float32 dataset of the given dims
//      (rank byte, 1 byte per dim): only for datasets
//   12 chunked float32 dataset of huge dims never written (rank byte, 8 bytes per dim)
// Numeric writes to data_seed keep the run's seed: another one only prints a warning
// per load (by design), flooding the log.
//
// SDMOE_FUZZ_SKIP_KNOWN=1: skip the edits that reach findings already reported (see
// fuzz/regressions/checkpoint_meta/), to look for others.
//
// SDMOE_FUZZ_WRITE_SEEDS=DIR: write inputs to DIR (no edit; the attributes rewritten with
// their own values; one bad value per check) and exit.
#include <mpi.h>
#include <sanitizer/lsan_interface.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/backend.h"
#include "core/check.h"
#include "data/hdf5_handle.h"
#include "fuzz/fuzz_temp_dir.h"
#include "launcher/checkpoint.h"
#include "launcher/config.h"
#include "launcher/hf_format.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "parallel/communicator.h"

namespace {

namespace fs = std::filesystem;
namespace h5 = sdmoe::data::hdf5;

// Root attributes the loader reads (and two it does not), the config dataset and two
// parameter datasets.
constexpr const char* kTargets[] = {"format",   "format_version", "step",   "data_position", "architecture",
                                    "sdmoe",    "data_seed",      "layout", "training_seed", "config",
                                    "params/embedding", "params/final_norm"};
constexpr int kNumTargets = int(sizeof(kTargets) / sizeof(kTargets[0]));
constexpr int kActions = 13;
constexpr int64_t kSavedStep = 5;
constexpr uint64_t kSavedPosition = 17;
constexpr int64_t kDataSeed = 4321;

bool is_dataset_target(int t) { return t >= 9; }

bool g_skip_known = false;
// Edits that reach a finding still open, skipped whole under SKIP_KNOWN (none now: every
// finding in fuzz/regressions/checkpoint_meta/ is fixed). Kept for the next one.
bool known_finding(int, int) { return false; }

struct State {
  std::string dir, work;
  std::string base_bytes;
  sdmoe::config::Run run;
  std::unique_ptr<sdmoe::Backend> backend;
  std::unique_ptr<sdmoe::ProcessGroups> groups;
  std::unique_ptr<sdmoe::GptModel> model;
  std::unique_ptr<sdmoe::AdamW> optimizer;
  std::unique_ptr<sdmoe::Checkpointer> checkpointer;
  std::string architecture;
};
State* g = nullptr;

std::string tiny_config(const std::string& dir) {
  return R"(device: CPU
threads: 1
model {
  vocab_size: 16 seq_len: 8 dim: 8 layers: 2 heads: 2 ffn_dim: 8
  moe { num_experts: 2 top_k: 1 expert_ffn_dim: 4 shared_expert_ffn_dim: 4 first_dense_layers: 1 }
}
data { path: "unused.h5" seed: )" + std::to_string(kDataSeed) + R"( }
training { steps: 10 micro_batch_size: 1 global_batch_size: 1 }
checkpoint { dir: ")" + dir + R"(" writer: GATHER keep: 0 }
)";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "fuzz_checkpoint_meta: cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

[[noreturn]] void harness_error(const std::string& what) {
  std::fprintf(stderr, "fuzz_checkpoint_meta: %s\n", what.c_str());
  std::exit(1);
}

[[noreturn]] void property_failed(const std::string& what, std::string_view input) {
  std::fprintf(stderr, "fuzz_checkpoint_meta: property failed: %s\ninput (%zu bytes): ", what.c_str(), input.size());
  for (unsigned char c : input) std::fprintf(stderr, "\\x%02x", c);
  std::fprintf(stderr, "\n");
  std::abort();
}

// Operands, zero once the input runs out.
class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  bool done() const { return at_ >= in_.size(); }
  uint8_t byte() { return at_ < in_.size() ? uint8_t(in_[at_++]) : 0; }
  uint64_t u64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t(byte()) << (8 * i);
    return v;
  }
  std::string bytes(size_t n) {
    std::string s;
    for (size_t i = 0; i < n; ++i) s.push_back(char(byte()));
    return s;
  }

 private:
  std::string_view in_;
  size_t at_ = 0;
};

// Removes `name` (an attribute of the root, or a dataset) if it exists.
void remove_target(hid_t file, int t) {
  const char* name = kTargets[t];
  if (is_dataset_target(t)) {
    if (H5Lexists(file, name, H5P_DEFAULT) > 0) H5Ldelete(file, name, H5P_DEFAULT);
  } else if (H5Aexists(file, name) > 0) {
    H5Adelete(file, name);
  }
}

// Creates `name` (attribute or dataset) with this type and space and writes `buffer`.
void create_target(hid_t file, int t, hid_t type, hid_t space, const void* buffer, hid_t dcpl = H5P_DEFAULT) {
  remove_target(file, t);
  const char* name = kTargets[t];
  if (is_dataset_target(t)) {
    h5::Handle ds = h5::dataset(H5Dcreate2(file, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT));
    if (ds.valid() && buffer) H5Dwrite(ds.get(), type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer);
  } else {
    h5::Handle attr = h5::attribute(H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT));
    if (attr.valid() && buffer) H5Awrite(attr.get(), type, buffer);
  }
}

// Two bytes, little-endian, below 1024.
size_t string_length(Reader& r) {
  const size_t low = r.byte();
  return low | size_t(r.byte() & 3) << 8;
}

h5::Handle fixed_string_type(size_t length) {
  h5::Handle type = h5::datatype(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.get(), std::max<size_t>(1, length));
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  return type;
}

void apply_edit(hid_t file, int t, int action, Reader& r) {
  const bool numeric_seed = std::string_view(kTargets[t]) == "data_seed";
  h5::Handle scalar = h5::dataspace(H5Screate(H5S_SCALAR));
  switch (action) {
    case 0: remove_target(file, t); break;
    case 1: {
      int64_t v = int64_t(r.u64());
      if (numeric_seed) v = kDataSeed;
      create_target(file, t, H5T_NATIVE_INT64, scalar.get(), &v);
      break;
    }
    case 2: {
      const std::string s = r.bytes(string_length(r));
      h5::Handle type = fixed_string_type(s.size());
      std::string padded = s.empty() ? std::string(1, '\0') : s;
      create_target(file, t, type.get(), scalar.get(), padded.data());
      break;
    }
    case 3: {
      const std::string s = r.bytes(string_length(r));
      h5::Handle type = h5::datatype(H5Tcopy(H5T_C_S1));
      H5Tset_size(type.get(), H5T_VARIABLE);
      const char* p = s.c_str();
      create_target(file, t, type.get(), scalar.get(), &p);
      break;
    }
    case 4: {
      uint64_t bits = r.u64();
      double v;
      std::memcpy(&v, &bits, 8);
      if (numeric_seed) v = double(kDataSeed);
      create_target(file, t, H5T_NATIVE_DOUBLE, scalar.get(), &v);
      break;
    }
    case 5: {
      const hsize_t n = r.byte() % 5;
      std::vector<int64_t> values(n + 1);
      for (hsize_t i = 0; i < n; ++i) values[i] = numeric_seed ? kDataSeed : int64_t(r.u64());
      h5::Handle space = h5::dataspace(H5Screate_simple(1, &n, nullptr));
      create_target(file, t, H5T_NATIVE_INT64, space.get(), values.data());
      break;
    }
    case 6: {
      const hsize_t n = r.byte() % 5;
      const size_t length = std::max<size_t>(1, r.byte() % 64);
      std::string all = r.bytes(size_t(n) * length);
      all.resize(std::max<size_t>(1, size_t(n) * length), '\0');
      h5::Handle type = fixed_string_type(length);
      h5::Handle space = h5::dataspace(H5Screate_simple(1, &n, nullptr));
      create_target(file, t, type.get(), space.get(), all.data());
      break;
    }
    case 7: {
      h5::Handle space = h5::dataspace(H5Screate(H5S_NULL));
      create_target(file, t, H5T_NATIVE_INT64, space.get(), nullptr);
      break;
    }
    case 8: {
      uint64_t v = r.u64();
      if (numeric_seed) v = uint64_t(kDataSeed);
      create_target(file, t, H5T_NATIVE_UINT64, scalar.get(), &v);
      break;
    }
    case 9: {
      const int8_t v = int8_t(r.byte());
      if (numeric_seed) break;  // the run's seed does not fit in an int8
      create_target(file, t, H5T_NATIVE_INT8, scalar.get(), &v);
      break;
    }
    case 10: {
      const hsize_t two = 2;
      h5::Handle type = h5::datatype(H5Tarray_create2(H5T_NATIVE_INT64, 1, &two));
      int64_t v[2] = {int64_t(r.u64()), int64_t(r.u64())};
      if (numeric_seed) v[0] = v[1] = kDataSeed;
      create_target(file, t, type.get(), scalar.get(), v);
      break;
    }
    case 11: {
      if (!is_dataset_target(t)) break;
      const int rank = r.byte() % 5;
      std::vector<hsize_t> dims(size_t(rank) + 1, 1);
      hsize_t n = 1;
      for (int i = 0; i < rank; ++i) n *= (dims[size_t(i)] = r.byte() % 12);
      std::vector<float> zeros(size_t(n) + 1, 0.0f);
      h5::Handle space = h5::dataspace(rank == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(rank, dims.data(), nullptr));
      create_target(file, t, H5T_NATIVE_FLOAT, space.get(), zeros.data());
      break;
    }
    case 12: {
      if (!is_dataset_target(t)) break;
      const int rank = 1 + r.byte() % 3;
      std::vector<hsize_t> dims(static_cast<size_t>(rank)), chunk(static_cast<size_t>(rank), 1);
      for (int i = 0; i < rank; ++i) dims[size_t(i)] = std::max<hsize_t>(1, r.u64() >> (r.byte() % 64));
      h5::Handle space = h5::dataspace(H5Screate_simple(rank, dims.data(), nullptr));
      if (!space.valid()) break;
      h5::Handle dcpl = h5::plist(H5Pcreate(H5P_DATASET_CREATE));
      H5Pset_chunk(dcpl.get(), rank, chunk.data());
      create_target(file, t, H5T_NATIVE_FLOAT, space.get(), nullptr, dcpl.get());
      break;
    }
    default: break;
  }
}

// Seeds: flags byte, then edits.
std::string edit_int(int t, int64_t v) {
  std::string s(1, char(t + kNumTargets * 1));
  for (int i = 0; i < 8; ++i) s.push_back(char(uint64_t(v) >> (8 * i)));
  return s;
}
std::string edit_string(int t, const std::string& v, int action = 2) {
  std::string s(1, char(t + kNumTargets * action));
  const size_t n = std::min<size_t>(v.size(), 1023);
  s.push_back(char(n & 0xff));
  s.push_back(char(n >> 8));
  return s + v.substr(0, n);
}
std::string edit_action(int t, int action, const std::string& operands = "") {
  return std::string(1, char(t + kNumTargets * action)) + operands;
}

void write_seeds(const std::string& out) {
  fs::create_directories(out);
  const std::string arch = g->architecture;
  const std::vector<std::pair<std::string, std::string>> seeds = {
      {"none", std::string(1, '\0')},
      {"parameters_only", std::string(1, '\1')},
      {"same_values", std::string(1, '\0') + edit_string(0, "sdmoe-checkpoint") + edit_int(1, 1) + edit_int(2, kSavedStep) +
                          edit_int(3, int64_t(kSavedPosition)) + edit_int(5, 0)},
      {"architecture", std::string(1, '\0') + edit_string(4, arch)},
      {"step_negative", std::string(1, '\0') + edit_int(2, -3)},
      {"data_position_negative", std::string(1, '\0') + edit_int(3, -100)},
      {"format_version_2", std::string(1, '\0') + edit_int(1, 2)},
      {"sdmoe_1", std::string(1, '\0') + edit_int(5, 1)},
      {"format_other", std::string(1, '\0') + edit_string(0, "sdmoe-tokens-v1")},
      {"step_array", std::string(1, '\0') + edit_action(2, 5, std::string("\x02") + std::string(16, '\x01'))},
      {"format_vlen", std::string(1, '\0') + edit_string(0, "sdmoe-checkpoint", 3)},
      {"config_text", std::string(1, '\0') + edit_string(9, "model { dim: 8 }")},
      {"embedding_shape", std::string(1, '\0') + edit_action(10, 11, std::string("\x02\x10\x08"))},
  };
  for (const auto& [name, bytes] : seeds) write_file(out + "/" + name, bytes);
}

}  // namespace

// Open MPI keeps what MPI_Init allocates (some of it on its own threads) until exit,
// without MPI_Finalize: not ours to report.
extern "C" const char* __lsan_default_suppressions() {
  return "leak:libpmix\nleak:libhwloc\nleak:libopen-pal\nleak:libopen-rte\nleak:libmpi\nleak:mca_\n";
}

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  __lsan_disable();
  MPI_Init(argc, argv);
  __lsan_enable();
  sdmoe::data::hdf5::silence_error_printing();
  g = new State;
  g->dir = sdmoe_fuzz::make_temp_dir("checkpoint");
  g->work = g->dir + "/work.h5";
  g_skip_known = std::getenv("SDMOE_FUZZ_SKIP_KNOWN") != nullptr;
  try {
    g->run = sdmoe::parse_config_text(tiny_config(g->dir + "/saved"), "fuzz", {});
    const sdmoe::ModelSpec spec = sdmoe::model_spec_from(g->run.model());
    spec.validate();
    g->architecture = sdmoe::checkpoint_architecture(spec);
    g->backend = sdmoe::make_cpu_backend(1);
    const sdmoe::ParallelDims dims = sdmoe::ParallelDims::make(1, 1, 1, 1, spec.moe.num_experts);
    g->groups = std::make_unique<sdmoe::ProcessGroups>(sdmoe::make_process_groups(dims, *g->backend));
    g->model = std::make_unique<sdmoe::GptModel>(spec, *g->backend, sdmoe::DType::F32, 1,
                                                 sdmoe::placement_for(*g->groups, false));
    g->model->init_parameters(7);
    g->optimizer = std::make_unique<sdmoe::AdamW>(
        *g->model, sdmoe::optimizer_spec_from(g->run.optimizer(), g->run.training().steps()));
    g->checkpointer = std::make_unique<sdmoe::Checkpointer>(g->run, *g->model, g->optimizer.get(), nullptr, *g->groups,
                                                            sdmoe::MomentSharding{});
    g->checkpointer->save({kSavedStep, kSavedPosition});
  } catch (const std::exception& e) {
    harness_error(std::string("cannot make the base checkpoint: ") + e.what());
  }
  const std::string saved = sdmoe::Checkpointer::step_directory(g->dir + "/saved", kSavedStep) + "/checkpoint.h5";
  g->base_bytes = read_file(saved);
  if (g->base_bytes.empty()) harness_error("no checkpoint at " + saved);
  if (const char* seeds = std::getenv("SDMOE_FUZZ_WRITE_SEEDS")) {
    write_seeds(seeds);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  Reader r(input);
  const bool parameters_only = r.byte() & 1;
  write_file(g->work, g->base_bytes);
  bool edited = false;
  {
    h5::Handle file = h5::file(H5Fopen(g->work.c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
    if (!file.valid()) harness_error("cannot reopen the work file");
    for (int edits = 0; !r.done() && edits < 16; ++edits) {
      const uint8_t op = r.byte();
      if (g_skip_known && known_finding(op % kNumTargets, (op / kNumTargets) % kActions)) return 0;
      apply_edit(file.get(), op % kNumTargets, (op / kNumTargets) % kActions, r);
      edited = true;
    }
  }
  try {
    sdmoe::read_checkpoint_parameters(g->work);
  } catch (const sdmoe::Error& e) {
    if (!edited) property_failed(std::string("read_checkpoint_parameters rejects the unedited file: ") + e.what(), input);
  }
  try {
    const sdmoe::TrainingPosition p = g->checkpointer->load(g->work, parameters_only);
    if (!edited && (p.step != kSavedStep || p.data_position != kSavedPosition))
      property_failed("load of the unedited file gives another position", input);
  } catch (const sdmoe::Error& e) {
    if (!edited) property_failed(std::string("load rejects the unedited file: ") + e.what(), input);
  }
  return 0;
}
