#include "launcher/hf_format.h"

#include <bit>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "data/hdf5_handle.h"

namespace sdmoe {
namespace fs = std::filesystem;
namespace h5 = data::hdf5;
using json = nlohmann::ordered_json;

static_assert(std::endian::native == std::endian::little, "safetensors and HDF5 reads assume a little-endian host");

namespace {

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Rows [first, first + rows) of a tensor whose leading axis is split in `parts` equal
// blocks, as a tensor of its own: block p of a stacked [parts, ...] tensor.
LogicalTensor block(const LogicalTensor& t, int64_t index, std::vector<int64_t> shape) {
  const int64_t n = product(shape);
  LogicalTensor out{std::move(shape), {}};
  out.values.assign(t.values.begin() + index * n, t.values.begin() + (index + 1) * n);
  return out;
}

LogicalTensor scaled(LogicalTensor t, float factor) {
  for (float& v : t.values) v *= factor;
  return t;
}

LogicalTensor zeros(std::vector<int64_t> shape) {
  LogicalTensor t{std::move(shape), {}};
  t.values.assign(size_t(product(t.shape)), 0.0f);
  return t;
}

// Stacks equal-shaped tensors along a new leading axis.
LogicalTensor stack(const std::vector<const LogicalTensor*>& parts) {
  LogicalTensor out;
  out.shape = parts.front()->shape;
  out.shape.insert(out.shape.begin(), int64_t(parts.size()));
  for (const LogicalTensor* p : parts) out.values.insert(out.values.end(), p->values.begin(), p->values.end());
  return out;
}

const LogicalTensor& need(const TensorMap& m, const std::string& name, const std::vector<int64_t>& shape,
                          const char* where) {
  const auto it = m.find(name);
  if (it == m.end()) fail("{}: no tensor {}", where, name);
  if (it->second.shape != shape)
    fail("{}: tensor {} has shape {}, the model needs {}", where, name, shape_text(it->second.shape),
         shape_text(shape));
  return it->second;
}

// Our tensor names and shapes (docs/checkpoint.md, "Rebuilding the model from the file").
struct Dims {
  int64_t d, f, e, fe, fs, v;
};
Dims dims_of(const ModelSpec& s) {
  return {s.dim, s.ffn_dim, s.moe.num_experts, s.moe.expert_ffn_dim, s.moe.shared_expert_ffn_dim, s.vocab_size};
}

// The names the architecture gives one layer's tensors.
struct LayerNames {
  std::string prefix, attn, mlp;
};
LayerNames hf_layer(HfArchitecture arch, int layer) {
  const std::string p = fmt::format("model.layers.{}.", layer);
  return {p, p + "self_attn.", p + (arch == HfArchitecture::MIXTRAL ? "block_sparse_moe." : "mlp.")};
}

// Which expert tensor of the architecture holds our gate, up and down.
struct ExpertNames {
  std::string gate, up, down;
};
ExpertNames expert_names(HfArchitecture arch, const std::string& mlp, int64_t e) {
  if (arch == HfArchitecture::MIXTRAL) {
    const std::string x = fmt::format("{}experts.{}.", mlp, e);
    return {x + "w1.weight", x + "w3.weight", x + "w2.weight"};
  }
  const std::string x = fmt::format("{}experts.{}.", mlp, e);
  return {x + "gate_proj.weight", x + "up_proj.weight", x + "down_proj.weight"};
}

// The shared expert's width in the export: ours, or 1 (zero weights) when there is none.
int64_t exported_shared_width(const ModelSpec& s) { return std::max(1, s.moe.shared_expert_ffn_dim); }

}  // namespace

const char* hf_model_type(HfArchitecture a) {
  switch (a) {
    case HfArchitecture::LLAMA: return "llama";
    case HfArchitecture::MIXTRAL: return "mixtral";
    case HfArchitecture::QWEN2_MOE: return "qwen2_moe";
  }
  return "?";
}

HfArchitecture choose_hf_architecture(const ModelSpec& s) {
  if (s.moe.num_experts == 0) return HfArchitecture::LLAMA;
  if (s.moe.router_score != RouterScore::SOFTMAX)
    fail("the model routes with sigmoid scores (model.moe.router_score SIGMOID); the Hugging Face MoE architectures "
         "it could become (Mixtral, Qwen2-MoE) route with a softmax, so the export would compute something else");
  bool every_layer_moe = true;
  for (int l = 0; l < s.layers; ++l) every_layer_moe = every_layer_moe && s.moe.is_moe_layer(l);
  if (every_layer_moe && s.moe.normalize_topk && s.moe.shared_expert_ffn_dim == 0) return HfArchitecture::MIXTRAL;
  return HfArchitecture::QWEN2_MOE;
}

// ---- our checkpoint ---------------------------------------------------------------------

CheckpointParameters read_checkpoint_parameters(const std::string& where) {
  const std::string path = fs::is_directory(where) ? (fs::path(where) / "checkpoint.h5").string() : where;
  h5::silence_error_printing();
  if (!fs::exists(path)) fail("checkpoint {} does not exist", path);
  h5::Handle file = h5::file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
  if (!file.valid()) fail("{}: cannot open (truncated or not an HDF5 file)", path);
  CheckpointParameters out;
  {
    h5::Handle ds = h5::dataset(H5Dopen2(file.get(), "config", H5P_DEFAULT));
    if (!ds.valid()) fail("{}: not an sdmoe checkpoint (no config dataset)", path);
    h5::Handle type = h5::datatype(H5Dget_type(ds.get()));
    h5::Handle space = h5::dataspace(H5Dget_space(ds.get()));
    // One fixed-length string, as the writer stores it; anything else is an altered file
    // (reading an array or a variable-length string into one string would overrun it).
    if (H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) > 0 || !space.valid() ||
        H5Sget_simple_extent_npoints(space.get()) != 1)
      fail("{}: its config dataset is not one fixed-length string (the file was altered)", path);
    std::string text(H5Tget_size(type.get()), '\0');
    if (H5Dread(ds.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, text.data()) < 0)
      fail("{}: cannot read its config", path);
    out.run = parse_config_text(text.substr(0, text.find('\0')), path + ":config", {});
  }
  h5::Handle params = h5::group(H5Gopen2(file.get(), "params", H5P_DEFAULT));
  if (!params.valid()) fail("{}: not an sdmoe checkpoint (no params group)", path);
  std::vector<std::string> names;
  H5Literate(
      params.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr,
      [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
        static_cast<std::vector<std::string>*>(data)->push_back(name);
        return 0;
      },
      &names);
  for (const std::string& name : names) {
    h5::Handle ds = h5::dataset(H5Dopen2(params.get(), name.c_str(), H5P_DEFAULT));
    h5::Handle space = h5::dataspace(H5Dget_space(ds.get()));
    const int rank = H5Sget_simple_extent_ndims(space.get());
    if (rank < 0 || rank > 8) fail("{}: params/{} has {} dimensions (the file was altered)", path, name, rank);
    std::vector<hsize_t> dims(static_cast<size_t>(rank));
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    LogicalTensor t;
    // The element count, checked against overflow and against the file's size before any
    // allocation: a dataset can claim dimensions no file holds.
    uint64_t count = 1;
    for (hsize_t d : dims) {
      if (d != 0 && count > (uint64_t(1) << 62) / d)
        fail("{}: params/{} claims more elements than fit 64 bits (the file was altered)", path, name);
      count *= d;
    }
    const uint64_t file_bytes = uint64_t(fs::file_size(path));
    if (count > file_bytes + (uint64_t(1) << 18))  // 4 x the file's bytes in floats: generous, and no wrap-around
      fail("{}: params/{} claims {} elements, more than the {}-byte file can hold (truncated or altered)", path, name,
           count, file_bytes);
    t.shape.assign(dims.begin(), dims.end());
    t.values.resize(size_t(count));
    if (!t.values.empty() && H5Dread(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.values.data()) < 0)
      fail("{}: cannot read params/{} (checksum mismatch or truncated file)", path, name);
    out.params.emplace(name, std::move(t));
  }
  return out;
}

// ---- the mapping ----------------------------------------------------------------------

std::string hf_config_json(const ModelSpec& s, HfArchitecture arch) {
  json c;
  const char* cls = arch == HfArchitecture::LLAMA     ? "LlamaForCausalLM"
                    : arch == HfArchitecture::MIXTRAL ? "MixtralForCausalLM"
                                                      : "Qwen2MoeForCausalLM";
  c["architectures"] = json::array({cls});
  c["model_type"] = hf_model_type(arch);
  c["vocab_size"] = s.vocab_size;
  c["hidden_size"] = s.dim;
  // Mixtral's experts take intermediate_size; the others' dense MLPs do.
  c["intermediate_size"] = arch == HfArchitecture::MIXTRAL ? s.moe.expert_ffn_dim : s.ffn_dim;
  c["num_hidden_layers"] = s.layers;
  c["num_attention_heads"] = s.heads;
  c["num_key_value_heads"] = s.heads;
  c["head_dim"] = s.head_dim();
  c["max_position_embeddings"] = s.seq_len;
  c["rms_norm_eps"] = s.norm_eps;
  c["rope_theta"] = s.rope_theta;
  c["tie_word_embeddings"] = s.tie_embeddings;
  c["hidden_act"] = "silu";
  c["attention_dropout"] = 0.0;
  c["attention_bias"] = false;
  c["torch_dtype"] = "float32";
  c["bos_token_id"] = 50256;
  c["eos_token_id"] = 50256;
  if (arch == HfArchitecture::MIXTRAL) {
    c["num_local_experts"] = s.moe.num_experts;
    c["num_experts_per_tok"] = s.moe.top_k;
    c["output_router_logits"] = false;
    c["router_aux_loss_coef"] = s.moe.aux_loss_coef;
  } else if (arch == HfArchitecture::QWEN2_MOE) {
    c["num_experts"] = s.moe.num_experts;
    c["num_experts_per_tok"] = s.moe.top_k;
    c["moe_intermediate_size"] = s.moe.expert_ffn_dim;
    c["shared_expert_intermediate_size"] = exported_shared_width(s);
    c["norm_topk_prob"] = s.moe.normalize_topk;
    c["decoder_sparse_step"] = 1;
    json dense = json::array();
    for (int l = 0; l < s.layers; ++l)
      if (!s.moe.is_moe_layer(l)) dense.push_back(l);
    c["mlp_only_layers"] = dense;
    c["output_router_logits"] = false;
    c["router_aux_loss_coef"] = s.moe.aux_loss_coef;
    c["use_sliding_window"] = false;
  }
  return c.dump(2) + "\n";
}

TensorMap to_hf_tensors(const ModelSpec& s, HfArchitecture arch, const TensorMap& ours) {
  const Dims d = dims_of(s);
  const char* where = "export";
  TensorMap hf;
  hf["model.embed_tokens.weight"] = need(ours, "embedding", {d.v, d.d}, where);
  for (int l = 0; l < s.layers; ++l) {
    const std::string our = fmt::format("layers.{}.", l);
    const LayerNames n = hf_layer(arch, l);
    hf[n.prefix + "input_layernorm.weight"] = need(ours, our + "attn_norm", {d.d}, where);
    hf[n.prefix + "post_attention_layernorm.weight"] = need(ours, our + "ffn_norm", {d.d}, where);
    const LogicalTensor& qkv = need(ours, our + "attn.qkv", {3, d.d, d.d}, where);
    const char* proj[3] = {"q_proj", "k_proj", "v_proj"};
    for (int p = 0; p < 3; ++p) {
      hf[n.attn + proj[p] + ".weight"] = block(qkv, p, {d.d, d.d});
      if (arch == HfArchitecture::QWEN2_MOE) hf[n.attn + proj[p] + ".bias"] = zeros({d.d});
    }
    hf[n.attn + "o_proj.weight"] = need(ours, our + "attn.proj", {d.d, d.d}, where);
    if (!s.moe.is_moe_layer(l)) {
      const LogicalTensor& gate_up = need(ours, our + "mlp.gate_up", {2, d.f, d.d}, where);
      hf[n.prefix + "mlp.gate_proj.weight"] = block(gate_up, 0, {d.f, d.d});
      hf[n.prefix + "mlp.up_proj.weight"] = block(gate_up, 1, {d.f, d.d});
      hf[n.prefix + "mlp.down_proj.weight"] = need(ours, our + "mlp.down", {d.d, d.f}, where);
      continue;
    }
    hf[n.mlp + "gate.weight"] = need(ours, our + "moe.router", {d.e, d.d}, where);
    const LogicalTensor& gate_up = need(ours, our + "moe.experts.gate_up", {d.e, 2, d.fe, d.d}, where);
    const LogicalTensor& down = need(ours, our + "moe.experts.down", {d.e, d.d, d.fe}, where);
    for (int64_t e = 0; e < d.e; ++e) {
      const ExpertNames x = expert_names(arch, n.mlp, e);
      hf[x.gate] = block(gate_up, 2 * e, {d.fe, d.d});
      hf[x.up] = block(gate_up, 2 * e + 1, {d.fe, d.d});
      hf[x.down] = block(down, e, {d.d, d.fe});
    }
    if (arch != HfArchitecture::QWEN2_MOE) continue;
    const int64_t fs = exported_shared_width(s);
    if (d.fs > 0) {
      const LogicalTensor& shared = need(ours, our + "moe.shared_expert.gate_up", {2, d.fs, d.d}, where);
      hf[n.mlp + "shared_expert.gate_proj.weight"] = block(shared, 0, {d.fs, d.d});
      hf[n.mlp + "shared_expert.up_proj.weight"] = block(shared, 1, {d.fs, d.d});
      hf[n.mlp + "shared_expert.down_proj.weight"] =
          scaled(need(ours, our + "moe.shared_expert.down", {d.d, d.fs}, where), 2.0f);
    } else {
      hf[n.mlp + "shared_expert.gate_proj.weight"] = zeros({fs, d.d});
      hf[n.mlp + "shared_expert.up_proj.weight"] = zeros({fs, d.d});
      hf[n.mlp + "shared_expert.down_proj.weight"] = zeros({d.d, fs});
    }
    hf[n.mlp + "shared_expert_gate.weight"] = zeros({1, d.d});
  }
  hf["model.norm.weight"] = need(ours, "final_norm", {d.d}, where);
  if (!s.tie_embeddings) hf["lm_head.weight"] = need(ours, "output", {d.v, d.d}, where);
  return hf;
}

TensorMap from_hf_tensors(const ModelSpec& s, HfArchitecture arch, const TensorMap& hf) {
  const Dims d = dims_of(s);
  const char* where = "import";
  TensorMap ours;
  ours["embedding"] = need(hf, "model.embed_tokens.weight", {d.v, d.d}, where);
  for (int l = 0; l < s.layers; ++l) {
    const std::string our = fmt::format("layers.{}.", l);
    const LayerNames n = hf_layer(arch, l);
    ours[our + "attn_norm"] = need(hf, n.prefix + "input_layernorm.weight", {d.d}, where);
    ours[our + "ffn_norm"] = need(hf, n.prefix + "post_attention_layernorm.weight", {d.d}, where);
    const char* proj[3] = {"q_proj", "k_proj", "v_proj"};
    std::vector<const LogicalTensor*> qkv;
    for (int p = 0; p < 3; ++p) {
      qkv.push_back(&need(hf, n.attn + proj[p] + ".weight", {d.d, d.d}, where));
      // Our attention has no biases: a nonzero one cannot be imported without changing
      // the model.
      if (auto bias = hf.find(n.attn + proj[p] + ".bias"); bias != hf.end())
        for (float b : bias->second.values)
          if (b != 0.0f) fail("import: {} is nonzero; sdmoe's attention has no biases", bias->first);
    }
    ours[our + "attn.qkv"] = stack(qkv);
    ours[our + "attn.proj"] = need(hf, n.attn + "o_proj.weight", {d.d, d.d}, where);
    if (!s.moe.is_moe_layer(l)) {
      ours[our + "mlp.gate_up"] = stack({&need(hf, n.prefix + "mlp.gate_proj.weight", {d.f, d.d}, where),
                                         &need(hf, n.prefix + "mlp.up_proj.weight", {d.f, d.d}, where)});
      ours[our + "mlp.down"] = need(hf, n.prefix + "mlp.down_proj.weight", {d.d, d.f}, where);
      continue;
    }
    ours[our + "moe.router"] = need(hf, n.mlp + "gate.weight", {d.e, d.d}, where);
    std::vector<const LogicalTensor*> gate_up, down;
    for (int64_t e = 0; e < d.e; ++e) {
      const ExpertNames x = expert_names(arch, n.mlp, e);
      gate_up.push_back(&need(hf, x.gate, {d.fe, d.d}, where));
      gate_up.push_back(&need(hf, x.up, {d.fe, d.d}, where));
      down.push_back(&need(hf, x.down, {d.d, d.fe}, where));
    }
    LogicalTensor stacked = stack(gate_up);
    stacked.shape = {d.e, 2, d.fe, d.d};
    ours[our + "moe.experts.gate_up"] = std::move(stacked);
    ours[our + "moe.experts.down"] = stack(down);
    if (arch != HfArchitecture::QWEN2_MOE) continue;
    const LogicalTensor& gate = need(hf, n.mlp + "shared_expert_gate.weight", {1, d.d}, where);
    for (float g : gate.values)
      if (g != 0.0f)
        fail("import: {}shared_expert_gate.weight is nonzero; sdmoe adds the shared expert with weight 1, not through "
             "a learned gate",
             n.mlp);
    if (d.fs > 0) {
      ours[our + "moe.shared_expert.gate_up"] =
          stack({&need(hf, n.mlp + "shared_expert.gate_proj.weight", {d.fs, d.d}, where),
                 &need(hf, n.mlp + "shared_expert.up_proj.weight", {d.fs, d.d}, where)});
      ours[our + "moe.shared_expert.down"] =
          scaled(need(hf, n.mlp + "shared_expert.down_proj.weight", {d.d, d.fs}, where), 0.5f);
    }
  }
  ours["final_norm"] = need(hf, "model.norm.weight", {d.d}, where);
  if (!s.tie_embeddings) ours["output"] = need(hf, "lm_head.weight", {d.v, d.d}, where);
  return ours;
}

// ---- safetensors ----------------------------------------------------------------------

namespace {

// One file: an 8-byte little-endian header length, the JSON header (padded with spaces to
// a multiple of 8 bytes), then the tensors' bytes in header order.
void write_one_safetensors(const fs::path& path, const std::vector<const TensorMap::value_type*>& tensors) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const auto* t : tensors) {
    const uint64_t bytes = t->second.values.size() * sizeof(float);
    header[t->first] = {{"dtype", "F32"}, {"shape", t->second.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary);
  const uint64_t length = text.size();
  out.write(reinterpret_cast<const char*>(&length), sizeof(length));
  out.write(text.data(), std::streamsize(text.size()));
  for (const auto* t : tensors)
    out.write(reinterpret_cast<const char*>(t->second.values.data()),
              std::streamsize(t->second.values.size() * sizeof(float)));
  out.close();
  if (!out) fail("cannot write {} ({})", path.string(), std::strerror(errno));
}

std::string read_file(const fs::path& path) {
  // A directory opens as a stream and throws on the first read: refuse it plainly.
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) fail("{} is not a regular file", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open {}", path.string());
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A tensor's shape from its header entry: non-negative integers whose product fits in 62
// bits (a header can claim anything; nothing is allocated before this holds).
std::vector<int64_t> header_shape(const json& value, const fs::path& path, const std::string& name) {
  if (!value.is_array()) fail("{}: tensor {} has no shape array", path.string(), name);
  std::vector<int64_t> shape;
  uint64_t count = 1;
  for (const json& d : value) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0)
      fail("{}: tensor {} has a dimension that is not a non-negative integer", path.string(), name);
    const uint64_t n = d.get<uint64_t>();
    if (n != 0 && count > (uint64_t(1) << 62) / n)
      fail("{}: tensor {} claims more elements than fit 64 bits", path.string(), name);
    count *= n;
    shape.push_back(int64_t(n));
  }
  return shape;
}

void read_one_safetensors(const fs::path& path, TensorMap& out) {
  const std::string bytes = read_file(path);
  uint64_t length = 0;
  if (bytes.size() < 8) fail("{}: truncated safetensors file ({} bytes)", path.string(), bytes.size());
  std::memcpy(&length, bytes.data(), 8);
  if (length > bytes.size() - 8) fail("{}: truncated safetensors file (header of {} bytes)", path.string(), length);
  json header;
  try {
    header = json::parse(bytes.substr(8, length));
  } catch (const json::exception& e) {
    fail("{}: malformed safetensors header ({})", path.string(), e.what());
  }
  if (!header.is_object()) fail("{}: malformed safetensors header (not an object)", path.string());
  const uint64_t data_size = bytes.size() - 8 - length;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    try {
      if (info.at("dtype") != "F32")
        fail("{}: tensor {} is {}; only F32 is read", path.string(), name, info.at("dtype").get<std::string>());
      LogicalTensor t;
      t.shape = header_shape(info.at("shape"), path, name);
      const json& range = info.at("data_offsets");
      if (!range.is_array() || range.size() != 2 || !range[0].is_number_unsigned() || !range[1].is_number_unsigned())
        fail("{}: tensor {} has no pair of data offsets", path.string(), name);
      const uint64_t offsets[2] = {range[0].get<uint64_t>(), range[1].get<uint64_t>()};
      const uint64_t elements = uint64_t(product(t.shape));
      if (offsets[0] > offsets[1] || offsets[1] > data_size || elements > data_size / sizeof(float) ||
          offsets[1] - offsets[0] != elements * sizeof(float))
        fail("{}: tensor {} lies outside the file or does not match its shape (truncated file?)", path.string(), name);
      t.values.resize(size_t(elements));
      if (elements > 0)  // a zero-element tensor's data() may be null, and memcpy must not see it
        std::memcpy(t.values.data(), bytes.data() + 8 + length + offsets[0], offsets[1] - offsets[0]);
      out[name] = std::move(t);
    } catch (const json::exception& e) {
      fail("{}: malformed entry for {} ({})", path.string(), name, e.what());
    }
  }
}

}  // namespace

void write_safetensors(const std::string& dir, const TensorMap& tensors, int64_t shard_bytes) {
  std::vector<std::vector<const TensorMap::value_type*>> shards(1);
  int64_t total = 0, in_shard = 0;
  for (const auto& entry : tensors) {
    const int64_t bytes = int64_t(entry.second.values.size() * sizeof(float));
    if (in_shard > 0 && in_shard + bytes > shard_bytes) shards.emplace_back(), in_shard = 0;
    shards.back().push_back(&entry);
    in_shard += bytes;
    total += bytes;
  }
  if (shards.size() == 1) {
    write_one_safetensors(fs::path(dir) / "model.safetensors", shards[0]);
    return;
  }
  json index;
  index["metadata"] = {{"total_size", total}};
  index["weight_map"] = json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
    write_one_safetensors(fs::path(dir) / name, shards[i]);
    for (const auto* t : shards[i]) index["weight_map"][t->first] = name;
  }
  std::ofstream(fs::path(dir) / "model.safetensors.index.json") << index.dump(2) << "\n";
}

TensorMap read_safetensors(const std::string& dir) {
  TensorMap out;
  const fs::path single = fs::path(dir) / "model.safetensors", index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) {
    read_one_safetensors(single, out);
    return out;
  }
  if (!fs::exists(index)) fail("{}: neither model.safetensors nor model.safetensors.index.json exists", dir);
  json map;
  try {
    map = json::parse(read_file(index));
    std::set<std::string> files;
    if (!map.at("weight_map").is_object()) fail("{}: weight_map is not an object", index.string());
    for (const auto& [name, file] : map.at("weight_map").items()) files.insert(file.get<std::string>());
    for (const std::string& file : files) {
      if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos) fail("{}: shard name {} is not a file in the directory", index.string(), file);
      read_one_safetensors(fs::path(dir) / file, out);
    }
    for (const auto& [name, file] : map.at("weight_map").items())
      if (!out.count(name)) fail("{}: the index names {} in {}, which does not hold it", index.string(), name, file.get<std::string>());
  } catch (const json::exception& e) {
    fail("{}: malformed index ({})", index.string(), e.what());
  }
  return out;
}

HfModelConfig read_hf_config(const std::string& dir) {
  const fs::path path = fs::path(dir) / "config.json";
  if (!fs::exists(path)) fail("{} does not exist", path.string());
  json c;
  try {
    c = json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail("{}: malformed JSON ({})", path.string(), e.what());
  }
  HfModelConfig out{};
  // Integer fields must be JSON integers that fit an int (a float such as 1e300 is refused,
  // not converted).
  const auto integer = [&](const char* key) {
    const json& v = c.at(key);
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
      fail("{}: {} must be a non-negative integer, got {}", path.string(), key, v.dump());
    return int(v.get<int64_t>());
  };
  const auto integer_or = [&](const char* key, int fallback) { return c.contains(key) ? integer(key) : fallback; };
  const auto number = [&](const char* key, double fallback) {
    if (!c.contains(key)) return fallback;
    if (!c.at(key).is_number()) fail("{}: {} must be a number, got {}", path.string(), key, c.at(key).dump());
    return c.at(key).get<double>();
  };
  try {
    const std::string type = c.at("model_type").get<std::string>();
    if (type == "llama") out.arch = HfArchitecture::LLAMA;
    else if (type == "mixtral") out.arch = HfArchitecture::MIXTRAL;
    else if (type == "qwen2_moe") out.arch = HfArchitecture::QWEN2_MOE;
    else fail("{}: model_type '{}' is not one sdmoe imports (llama, mixtral, qwen2_moe)", path.string(), type);
    ModelSpec& s = out.spec;
    s.vocab_size = integer("vocab_size");
    s.dim = integer("hidden_size");
    s.layers = integer("num_hidden_layers");
    s.heads = integer("num_attention_heads");
    if (const int kv = integer_or("num_key_value_heads", s.heads); kv != s.heads)
      fail("{}: grouped-query attention (num_key_value_heads {} of {} heads) is not an sdmoe model", path.string(), kv,
           s.heads);
    s.seq_len = integer_or("max_position_embeddings", s.seq_len);
    if (!c.at("rms_norm_eps").is_number()) fail("{}: rms_norm_eps must be a number", path.string());
    s.norm_eps = c.at("rms_norm_eps").get<double>();
    s.rope_theta = number("rope_theta", 10000.0);
    s.tie_embeddings = c.value("tie_word_embeddings", false);
    if (out.arch == HfArchitecture::MIXTRAL) {
      s.moe.num_experts = integer("num_local_experts");
      s.moe.top_k = integer("num_experts_per_tok");
      s.moe.expert_ffn_dim = integer("intermediate_size");
      s.moe.normalize_topk = true;
      s.moe.shared_expert_ffn_dim = 0;
      s.moe.first_dense_layers = 0;
      s.moe.layer_freq = 1;
    } else if (out.arch == HfArchitecture::QWEN2_MOE) {
      s.ffn_dim = integer("intermediate_size");
      s.moe.num_experts = integer("num_experts");
      s.moe.top_k = integer("num_experts_per_tok");
      s.moe.expert_ffn_dim = integer("moe_intermediate_size");
      s.moe.normalize_topk = c.value("norm_topk_prob", false);
      s.moe.shared_expert_ffn_dim = integer("shared_expert_intermediate_size");
    } else {
      s.ffn_dim = integer("intermediate_size");
      s.moe.num_experts = 0;
    }
  } catch (const json::exception& e) {
    fail("{}: {}", path.string(), e.what());
  }
  return out;
}

}  // namespace sdmoe
