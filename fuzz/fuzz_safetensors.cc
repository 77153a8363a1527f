// Fuzz target: the Hugging Face readers of launcher/hf_format.h, read_safetensors and
// read_hf_config, which take files from the internet, and the import path after them
// (from_hf_tensors for a fixed tiny model).
//
// Input layout: byte 0 flags, then parts separated by kSeparator.
//   flags bit 0 clear: part 0 is model.safetensors.
//   flags bit 0 set:   part 0 is model.safetensors.index.json, and the next parts are the
//                      shards it names (sorted, as the reader opens them; when the index
//                      does not parse, model-00001-of-00002.safetensors and -00002-).
//   flags bit 1 set:   the last part is config.json.
//   flags bits 2-3:    the model imported into (kSpecs: Llama, Mixtral, Qwen2-MoE).
// Every reader must return or throw sdmoe::Error. On success:
//   - each tensor holds product(shape) values, and write_safetensors + read_safetensors
//     gives the same tensors back, bit for bit (one file and shards);
//   - from_hf_tensors either throws sdmoe::Error or gives our tensors, which to_hf_tensors
//     and from_hf_tensors take back to themselves exactly.
//
// SDMOE_FUZZ_WRITE_SEEDS=DIR: write valid inputs (each model, one file and shards, with
// its config.json) to DIR and exit.
// SDMOE_FUZZ_SKIP_KNOWN=1: skip inputs that reach findings still open (see
// known_bad_index and fuzz/regressions/safetensors/). Counted; the count is printed at
// exit.
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "core/check.h"
#include "fuzz/fuzz_temp_dir.h"
#include "launcher/hf_format.h"

namespace {

namespace fs = std::filesystem;
using sdmoe::HfArchitecture;
using sdmoe::LogicalTensor;
using sdmoe::ModelSpec;
using sdmoe::TensorMap;

constexpr std::string_view kSeparator = "#SPLIT#";

struct Case {
  ModelSpec spec;
  HfArchitecture arch;
};
std::vector<Case> g_cases;
std::string g_dir, g_copy_dir;
bool g_skip_known = false;
long g_skipped = 0;

// An index that reaches a finding still open: a weight_map that is not an object (its
// items() is then the value itself under the key ""), or a shard name "", "." or "..",
// which names a directory: read_file's std::ifstream opens it, and reading throws
// std::ios_base::failure (index_shard_name_is_directory_ios_failure).
bool known_bad_index(std::string_view index) {
  try {
    const nlohmann::json j = nlohmann::json::parse(index);
    if (!j.is_object() || !j.contains("weight_map")) return false;
    const nlohmann::json& map = j["weight_map"];
    if (!map.is_object()) return true;
    for (const auto& [tensor, file] : map.items())
      if (file == "" || file == "." || file == "..") return true;
  } catch (const nlohmann::json::exception&) {
  }
  return false;
}

[[noreturn]] void property_failed(const std::string& what, std::string_view input) {
  std::fprintf(stderr, "fuzz_safetensors: property failed: %s\ninput (%zu bytes): ", what.c_str(), input.size());
  for (unsigned char c : input) std::fprintf(stderr, "\\x%02x", c);
  std::fprintf(stderr, "\n");
  std::abort();
}

std::vector<Case> make_cases() {
  ModelSpec llama;
  llama.vocab_size = 8, llama.seq_len = 8, llama.dim = 4, llama.layers = 1, llama.heads = 2, llama.ffn_dim = 6;
  llama.tie_embeddings = false;
  llama.moe.num_experts = 0;
  ModelSpec mixtral = llama;
  mixtral.tie_embeddings = true;
  mixtral.moe.num_experts = 2, mixtral.moe.top_k = 1, mixtral.moe.expert_ffn_dim = 3;
  ModelSpec qwen = llama;
  qwen.layers = 2, qwen.ffn_dim = 5;
  qwen.moe.num_experts = 2, qwen.moe.top_k = 2, qwen.moe.expert_ffn_dim = 2, qwen.moe.shared_expert_ffn_dim = 2;
  qwen.moe.first_dense_layers = 1, qwen.moe.normalize_topk = false;
  std::vector<Case> cases;
  for (const ModelSpec& s : {llama, mixtral, qwen}) {
    s.validate();
    cases.push_back({s, sdmoe::choose_hf_architecture(s)});
  }
  if (cases[0].arch != HfArchitecture::LLAMA || cases[1].arch != HfArchitecture::MIXTRAL ||
      cases[2].arch != HfArchitecture::QWEN2_MOE) {
    std::fprintf(stderr, "fuzz_safetensors: the tiny models do not map to Llama, Mixtral and Qwen2-MoE\n");
    std::exit(1);
  }
  return cases;
}

// Wraps instead of overflowing: the harness must not add undefined behaviour of its own.
int64_t product(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= uint64_t(d);
  return int64_t(n);
}

bool same(const TensorMap& a, const TensorMap& b) {
  if (a.size() != b.size()) return false;
  for (auto x = a.begin(), y = b.begin(); x != a.end(); ++x, ++y)
    if (x->first != y->first || x->second.shape != y->second.shape || x->second.values.size() != y->second.values.size() ||
        (!x->second.values.empty() &&
         std::memcmp(x->second.values.data(), y->second.values.data(), x->second.values.size() * sizeof(float)) != 0))
      return false;
  return true;
}

void write_file(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void fresh_dir(const std::string& dir) {
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir);
}

// Our parameter names and shapes for `s` (what to_hf_tensors needs), random values.
TensorMap our_tensors(const ModelSpec& s, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 0.02f);
  TensorMap m;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    LogicalTensor t{std::move(shape), {}};
    for (int64_t i = 0; i < product(t.shape); ++i) t.values.push_back(normal(rng));
    m[name] = std::move(t);
  };
  const int64_t d = s.dim, f = s.ffn_dim, e = s.moe.num_experts, fe = s.moe.expert_ffn_dim, fs = s.moe.shared_expert_ffn_dim;
  add("embedding", {s.vocab_size, d});
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add(p + "attn_norm", {d});
    add(p + "ffn_norm", {d});
    add(p + "attn.qkv", {3, d, d});
    add(p + "attn.proj", {d, d});
    if (!s.moe.is_moe_layer(l)) {
      add(p + "mlp.gate_up", {2, f, d});
      add(p + "mlp.down", {d, f});
      continue;
    }
    add(p + "moe.router", {e, d});
    add(p + "moe.experts.gate_up", {e, 2, fe, d});
    add(p + "moe.experts.down", {e, d, fe});
    if (fs > 0) {
      add(p + "moe.shared_expert.gate_up", {2, fs, d});
      add(p + "moe.shared_expert.down", {d, fs});
    }
  }
  add("final_norm", {d});
  if (!s.tie_embeddings) add("output", {s.vocab_size, d});
  return m;
}

void write_seeds(const std::string& out_dir) {
  fs::create_directories(out_dir);
  std::mt19937 rng(1234);
  const std::string tmp = g_dir + "/seed";
  for (size_t c = 0; c < g_cases.size(); ++c) {
    const Case& k = g_cases[c];
    const TensorMap hf = sdmoe::to_hf_tensors(k.spec, k.arch, our_tensors(k.spec, rng));
    const std::string config = sdmoe::hf_config_json(k.spec, k.arch);
    for (int sharded = 0; sharded < 2; ++sharded) {
      fresh_dir(tmp);
      sdmoe::write_safetensors(tmp, hf, sharded ? 256 : int64_t(1) << 40);
      std::string input(1, char(sharded | 2 | int(c) << 2));
      if (!sharded) {
        input += read_file(fs::path(tmp) / "model.safetensors");
      } else {
        input += read_file(fs::path(tmp) / "model.safetensors.index.json");
        std::set<std::string> shards;
        for (const auto& entry : fs::directory_iterator(tmp))
          if (entry.path().filename() != "model.safetensors.index.json") shards.insert(entry.path().filename().string());
        for (const std::string& shard : shards) input += std::string(kSeparator) + read_file(fs::path(tmp) / shard);
      }
      input += std::string(kSeparator) + config;
      const char* names[3] = {"llama", "mixtral", "qwen2_moe"};
      write_file(fs::path(out_dir) / (std::string(names[c]) + (sharded ? "_sharded" : "_single")), input);
    }
  }
}

std::vector<std::string_view> split(std::string_view s) {
  std::vector<std::string_view> parts;
  while (true) {
    const size_t at = s.find(kSeparator);
    parts.push_back(s.substr(0, at));
    if (at == std::string_view::npos) return parts;
    s.remove_prefix(at + kSeparator.size());
  }
}

// The shard names the index lists, sorted like the reader's std::set; names a file in
// the directory cannot have are dropped (the reader refuses '/' itself).
std::vector<std::string> shard_names(std::string_view index) {
  std::set<std::string> names;
  try {
    const nlohmann::json j = nlohmann::json::parse(index);
    for (const auto& [tensor, file] : j.at("weight_map").items())
      if (file.is_string()) names.insert(file.get<std::string>());
  } catch (const nlohmann::json::exception&) {
    return {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
  }
  std::vector<std::string> out;
  for (const std::string& n : names)
    if (!n.empty() && n != "." && n != ".." && n.size() < 200 && n.find('/') == std::string::npos &&
        n.find('\0') == std::string::npos && n != "config.json" && n != "model.safetensors.index.json")
      out.push_back(n);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_dir = sdmoe_fuzz::make_temp_dir("safetensors");
  g_copy_dir = g_dir + "/copy";
  g_cases = make_cases();
  g_skip_known = std::getenv("SDMOE_FUZZ_SKIP_KNOWN") != nullptr;
  if (g_skip_known)
    std::atexit([] { std::fprintf(stderr, "fuzz_safetensors: %ld input(s) skipped (known findings)\n", g_skipped); });
  if (const char* seeds = std::getenv("SDMOE_FUZZ_WRITE_SEEDS")) {
    write_seeds(seeds);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  if (size < 1) return 0;
  const uint8_t flags = data[0];
  std::vector<std::string_view> parts = split(input.substr(1));
  const std::string dir = g_dir + "/model";
  fresh_dir(dir);
  std::string_view config;
  const bool has_config = (flags & 2) && parts.size() > 1;
  if (has_config) config = parts.back(), parts.pop_back();
  if (g_skip_known && (flags & 1) && known_bad_index(parts[0])) {
    ++g_skipped;
    return 0;
  }
  if (!(flags & 1)) {
    write_file(fs::path(dir) / "model.safetensors", parts[0]);
  } else {
    write_file(fs::path(dir) / "model.safetensors.index.json", parts[0]);
    const std::vector<std::string> names = shard_names(parts[0]);
    for (size_t i = 0; i < names.size() && i + 1 < parts.size(); ++i) write_file(fs::path(dir) / names[i], parts[i + 1]);
  }
  if (has_config) write_file(fs::path(dir) / "config.json", config);

  try {
    sdmoe::read_hf_config(dir);
  } catch (const sdmoe::Error&) {
  }

  TensorMap tensors;
  try {
    tensors = sdmoe::read_safetensors(dir);
  } catch (const sdmoe::Error&) {
    return 0;
  }
  for (const auto& [name, t] : tensors)
    if (int64_t(t.values.size()) != product(t.shape)) property_failed("tensor " + name + ": values != product(shape)", input);
  // Written back (one file, then shards of a few tensors each) and read again: the same.
  for (const int64_t shard_bytes : {int64_t(1) << 40, int64_t(64)}) {
    fresh_dir(g_copy_dir);
    TensorMap again;
    try {
      sdmoe::write_safetensors(g_copy_dir, tensors, shard_bytes);
      again = sdmoe::read_safetensors(g_copy_dir);
    } catch (const sdmoe::Error& e) {
      property_failed(std::string("write_safetensors + read_safetensors of what was read threw: ") + e.what(), input);
    }
    if (!same(tensors, again)) property_failed("write_safetensors + read_safetensors differs", input);
  }

  const Case& k = g_cases[std::min<size_t>((flags >> 2) & 3, g_cases.size() - 1)];
  TensorMap ours;
  try {
    ours = sdmoe::from_hf_tensors(k.spec, k.arch, tensors);
  } catch (const sdmoe::Error&) {
    return 0;
  }
  TensorMap back;
  try {
    back = sdmoe::from_hf_tensors(k.spec, k.arch, sdmoe::to_hf_tensors(k.spec, k.arch, ours));
  } catch (const sdmoe::Error& e) {
    property_failed(std::string("to_hf_tensors + from_hf_tensors of an import threw: ") + e.what(), input);
  }
  if (!same(ours, back)) property_failed("to_hf_tensors + from_hf_tensors of an import differs", input);
  return 0;
}
