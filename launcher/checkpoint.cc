#include "launcher/checkpoint.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/hdf5_handle.h"
#include "launcher/checkpoint_writer.h"
#include "parallel/watchdog.h"

namespace sdmoe {
namespace fs = std::filesystem;
namespace h5 = data::hdf5;

namespace {

constexpr const char* kFileName = kCheckpointFileName;
constexpr const char* kFormat = kCheckpointFormat;
constexpr int64_t kFormatVersion = kCheckpointFormatVersion;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

}  // namespace

std::string checkpoint_architecture(const ModelSpec& s) {
  const MoeSpec& m = s.moe;
  return fmt::format(
      "vocab_size={} dim={} layers={} heads={} ffn_dim={} tie_embeddings={} rope_theta={} norm_eps={} "
      "moe.num_experts={} moe.top_k={} moe.expert_ffn_dim={} moe.router_score={} moe.normalize_topk={} "
      "moe.shared_expert_ffn_dim={} moe.first_dense_layers={} moe.layer_freq={}",
      s.vocab_size, s.dim, s.layers, s.heads, s.ffn_dim, s.tie_embeddings, s.rope_theta, s.norm_eps, m.num_experts,
      m.top_k, m.expert_ffn_dim, int(m.router_score), m.normalize_topk, m.shared_expert_ffn_dim, m.first_dense_layers,
      m.layer_freq);
}

namespace {

// The words of two architecture strings that differ, as "model.heads 4 (checkpoint) vs 2".
std::string architecture_difference(const std::string& saved, const std::string& current) {
  std::istringstream a(saved), b(current);
  std::string x, y, out;
  while (a >> x && b >> y) {
    if (x == y) continue;
    const size_t eq = y.find('=');
    const std::string key = y.substr(0, eq);
    // The router score is stored as its enum's number; the message names it.
    auto value = [&key](const std::string& word) {
      const std::string v = word.substr(word.find('=') + 1);
      if (key != "moe.router_score") return v;
      return v == std::to_string(int(RouterScore::SOFTMAX))   ? std::string("SOFTMAX")
             : v == std::to_string(int(RouterScore::SIGMOID)) ? std::string("SIGMOID")
                                                              : v;
    };
    out += fmt::format("{}model.{} {} in the checkpoint, {} in this config", out.empty() ? "" : "; ", key, value(x),
                       value(y));
  }
  return out.empty() ? saved + " vs " + current : out;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The pieces of local elements [a, b) of `ps`, read from source_base + (i - a): a local
// row (last axis) is one contiguous logical run.
void append_pieces(const ParamSpec& ps, int64_t a, int64_t b, int64_t source_base, std::vector<Piece>& out) {
  const int64_t row = ps.shape.empty() ? 1 : std::max<int64_t>(1, ps.shape.back());
  for (int64_t i = a; i < b;) {
    const int64_t end = std::min(b, (i / row + 1) * row), logical = ps.logical_index(i), source = source_base + (i - a);
    Piece* last = out.empty() ? nullptr : &out.back();
    if (last && last->logical + last->count == logical && last->source + last->count == source) last->count += end - i;
    else out.push_back({logical, end - i, source});
    i = end;
  }
}

// Where this rank's unique-part moments of target t ([experts, m, n], contiguous) lie in
// the logical [total_experts, m_full, n_full] dataset: one run for whole experts, one per
// expert for rows split over etp, one per expert row for columns split over etp.
std::vector<Piece> unique_moment_pieces(const SpectralTarget& t) {
  const int64_t mn = t.m * t.n, full = t.m_full * t.n_full;
  if (t.split == SpectralTarget::Split::NONE) return {{t.first_expert * mn, t.experts * mn, 0}};
  std::vector<Piece> pieces;
  for (int64_t e = 0; e < t.experts; ++e) {
    const int64_t logical = (t.first_expert + e) * full;
    if (t.split == SpectralTarget::Split::ROWS) {
      pieces.push_back({logical + t.split_first * t.n_full, mn, e * mn});
    } else {
      for (int64_t i = 0; i < t.m; ++i) pieces.push_back({logical + i * t.n_full + t.split_first, t.n, e * mn + i * t.n});
    }
  }
  return pieces;
}

constexpr int64_t kMaxSlabElements = int64_t(1) << 28;  // MPI's int counts bound the gather writer's slabs

// A failed save's partial directory goes, so that it cannot fill the disk for the next
// save (a kill leaves one behind; the next successful save prunes it).
void remove_partial(const fs::path& partial) {
  std::error_code ec;
  fs::remove_all(partial, ec);
}

// Collective over the world: "" when no rank has an error, else the error of the lowest
// failing rank prefixed with its number, the same on every rank.
std::string first_error(const std::string& error) {
  int lowest = error.empty() ? INT32_MAX : world_rank();
  MPI_Allreduce(MPI_IN_PLACE, &lowest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (lowest == INT32_MAX) return "";
  std::string reason = error;
  int length = int(reason.size());
  MPI_Bcast(&length, 1, MPI_INT, lowest, MPI_COMM_WORLD);
  reason.resize(size_t(length));
  MPI_Bcast(reason.data(), length, MPI_CHAR, lowest, MPI_COMM_WORLD);
  return fmt::format("rank {}: {}", lowest, reason);
}

// What `dir/latest` names now, for the message of a failed save.
std::string latest_description(const std::string& dir) {
  std::ifstream in(fs::path(dir) / "latest");
  std::string name;
  if (!std::getline(in, name) || name.empty()) return "there is no earlier checkpoint";
  return fmt::format("{}/latest still names {}", dir, name);
}

std::vector<float> host_copy(Backend& be, const Tensor& t) {
  std::vector<float> out(t.numel());
  if (t.numel() > 0) be.copy_to_host(t, out.data());
  be.synchronize();
  return out;
}

// ---- HDF5 ------------------------------------------------------------------------------

bool has_attribute(hid_t where, const char* name) { return H5Aexists(where, name) > 0; }

// An attribute must hold exactly one value: H5Aread writes all of an array attribute's
// elements, which would overrun the one value read into (an altered file).
void expect_single_value(hid_t attr, const char* name, const std::string& file) {
  h5::Handle space = h5::dataspace(H5Aget_space(attr));
  if (!space.valid() || H5Sget_simple_extent_npoints(space.get()) != 1)
    fail("{}: attribute '{}' is not a single value (the file was altered)", file, name);
}

int64_t read_int_attribute(hid_t where, const char* name, const std::string& file) {
  h5::Handle attr = h5::attribute(has_attribute(where, name) ? H5Aopen(where, name, H5P_DEFAULT) : -1);
  if (!attr.valid()) fail("{}: not an sdmoe checkpoint (attribute '{}' missing)", file, name);
  expect_single_value(attr.get(), name, file);
  h5::Handle type = h5::datatype(H5Aget_type(attr.get()));
  if (H5Tget_class(type.get()) != H5T_INTEGER) fail("{}: attribute '{}' is not an integer", file, name);
  int64_t value = 0;
  if (H5Aread(attr.get(), H5T_NATIVE_INT64, &value) < 0) fail("{}: cannot read attribute '{}'", file, name);
  return value;
}

std::string read_string_attribute(hid_t where, const char* name, const std::string& file) {
  h5::Handle attr = h5::attribute(has_attribute(where, name) ? H5Aopen(where, name, H5P_DEFAULT) : -1);
  if (!attr.valid()) fail("{}: not an sdmoe checkpoint (attribute '{}' missing)", file, name);
  expect_single_value(attr.get(), name, file);
  h5::Handle type = h5::datatype(H5Aget_type(attr.get()));
  if (H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) > 0)
    fail("{}: attribute '{}' is not a fixed-length string", file, name);
  std::string value(H5Tget_size(type.get()), '\0');
  if (H5Aread(attr.get(), type.get(), value.data()) < 0) fail("{}: cannot read attribute '{}'", file, name);
  return value.substr(0, value.find('\0'));
}

// A checkpoint file opened for reading, with checks that name the file and the dataset.
class CheckpointFile {
 public:
  explicit CheckpointFile(const std::string& path) : path_(path) {
    h5::silence_error_printing();
    if (!fs::exists(path)) fail("checkpoint {} does not exist", path);
    file_ = h5::file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
    if (!file_.valid()) fail("{}: cannot open checkpoint (truncated or not an HDF5 file)", path);
    if (read_string_attribute(file_.get(), "format", path) != kFormat) fail("{}: not an sdmoe checkpoint", path);
    const int64_t version = read_int_attribute(file_.get(), "format_version", path);
    if (version != kFormatVersion)
      fail("{}: checkpoint format version {}, this build reads version {}", path, version, kFormatVersion);
  }
  hid_t get() const { return file_.get(); }
  const std::string& path() const { return path_; }
  bool exists(const std::string& name) const { return H5Lexists(file_.get(), name.c_str(), H5P_DEFAULT) > 0; }

  // Reads the parts of dataset `name` (which must have `shape`) that `pieces` name into
  // dest[piece.source ...]: only the leading-axis rows the pieces touch.
  void read_pieces(const std::string& name, const std::vector<int64_t>& shape, const std::vector<Piece>& pieces,
                   float* dest) const {
    // H5Lexists fails on a missing parent group, so probe each level.
    for (size_t slash = name.find('/'); slash != std::string::npos; slash = name.find('/', slash + 1))
      if (!exists(name.substr(0, slash))) fail("{}: no dataset {} (the checkpoint is from a different model)", path_, name);
    if (!exists(name)) fail("{}: no dataset {} (the checkpoint is from a different model)", path_, name);
    h5::Handle ds = h5::dataset(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT));
    if (!ds.valid()) fail("{}: cannot open dataset {}", path_, name);
    h5::Handle space = h5::dataspace(H5Dget_space(ds.get()));
    const int rank = H5Sget_simple_extent_ndims(space.get());
    std::vector<hsize_t> dims(std::max(rank, 0));
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    std::vector<int64_t> got(dims.begin(), dims.end());
    const std::vector<int64_t> want = shape.empty() ? std::vector<int64_t>{1} : shape;
    if (got != want)
      fail("{}: {} has shape {} in the checkpoint but {} in this model (the model config differs)", path_, name,
           shape_text(got), shape_text(want));
    const int64_t row = checkpoint_row_elements(want);
    int64_t first = INT64_MAX, last = 0;
    for (const Piece& p : pieces) {
      if (p.count <= 0) continue;
      first = std::min(first, p.logical / row);
      last = std::max(last, (p.logical + p.count - 1) / row + 1);
    }
    if (first >= last) return;  // nothing of this tensor lives on this rank
    std::vector<float> rows(size_t((last - first) * row));
    auto [file_space, memory_space] = checkpoint_row_selection(ds.get(), first, last - first);
    if (H5Dread(ds.get(), H5T_NATIVE_FLOAT, memory_space.get(), file_space.get(), H5P_DEFAULT, rows.data()) < 0)
      fail("{}: cannot read {} (checksum mismatch or truncated file: the checkpoint is corrupt)", path_, name);
    for (const Piece& p : pieces)
      if (p.count > 0) std::copy_n(rows.data() + (p.logical - first * row), p.count, dest + p.source);
    Watchdog::note_progress();
  }

 private:
  std::string path_;
  h5::Handle file_;
};

std::string matrix_group(const SpectralTarget& t) {
  return fmt::format("sdmoe/layers.{}.{}", t.layer, sdmoe_matrix_name(t.matrix));
}

void sync_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// The step of a directory named step_NNNNNNNN (8 or more digits), or -1.
int64_t step_of_directory(const std::string& name) {
  if (name.size() < 13 || name.size() > 23 || name.compare(0, 5, "step_") != 0) return -1;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

// Writes `text` to `path` and syncs it; throws when any part fails (a full disk must not
// leave an empty file behind a rename).
void write_text_file(const fs::path& path, const std::string& text) {
  {
    std::ofstream out(path, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) fail("cannot write {}", path.string());
  }
  sync_file(path);
}

}  // namespace

Checkpointer::Checkpointer(const config::Run& run, GptModel& model, AdamW* optimizer, SpectralDecomposition* sdmoe,
                           const ProcessGroups& groups, MomentSharding sharding)
    : run_(run), model_(model), optimizer_(optimizer), sdmoe_(sdmoe), groups_(groups), sharding_(sharding) {
  SDMOE_ASSERT(model.dtype() == DType::F32, "checkpoints hold fp32 models");
}

void Checkpointer::check_writable(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    fail("checkpoint.dir {}: cannot create it as a directory ({})", dir, ec ? ec.message() : "a file has that name");
  const std::string probe = (fs::path(dir) / fmt::format(".write_probe.{}", ::getpid())).string();
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) fail("checkpoint.dir {}: cannot write in it ({})", dir, std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

std::string Checkpointer::step_directory(const std::string& dir, int64_t step) {
  return (fs::path(dir) / fmt::format("step_{:08d}", step)).string();
}

std::string Checkpointer::resume_path(const config::Checkpoint& cfg) {
  // dir/latest first: a run started from checkpoint.load and then requeued continues from
  // its own checkpoints, not from the starting point again.
  const fs::path latest = fs::path(cfg.dir()) / "latest";
  if ((cfg.dir().empty() || !fs::exists(latest)) && !cfg.load().empty()) {
    if (!fs::exists(cfg.load())) fail("checkpoint.load: {} does not exist", cfg.load());
    return cfg.load();
  }
  if (cfg.dir().empty() || !fs::exists(latest)) {
    if (cfg.resume() == config::Checkpoint::REQUIRED)
      fail("resume requested but {} has no checkpoint ({} does not exist)", cfg.dir().empty() ? "checkpoint.dir" : cfg.dir(),
           latest.string());
    return "";
  }
  std::ifstream in(latest);
  std::string name;
  std::getline(in, name);
  if (step_of_directory(name) < 0) fail("{}: does not name a step directory ('{}')", latest.string(), name);
  const fs::path target = fs::path(cfg.dir()) / name;
  if (!fs::is_directory(target)) fail("{} points to {}, which does not exist", latest.string(), target.string());
  return target.string();
}

void Checkpointer::save(const TrainingPosition& position) {
  const config::Checkpoint& cfg = run_.checkpoint();
  SDMOE_ASSERT(!cfg.dir().empty() && optimizer_, "save without checkpoint.dir or optimizer");
  const AdamW& optimizer = *optimizer_;
  Backend& be = model_.backend();
  const bool root = world_rank() == 0;
  const std::string final_dir = step_directory(cfg.dir(), position.step);
  const fs::path partial = final_dir + ".partial";
  std::string error;
  // Rank 0 prepares the directory; with the parallel writer every rank must then see it
  // (checkpoint.dir on a shared file system), which they agree on before opening the file
  // together.
  if (root) {
    try {
      std::error_code ec;
      fs::remove_all(partial, ec);
      fs::create_directories(partial);
    } catch (const std::exception& e) {  // std::filesystem::filesystem_error
      error = e.what();
    }
  }
  const auto give_up = [&](const std::string& agreed) {
    if (root) remove_partial(partial);
    fail("checkpoint at step {} failed on {}; its partial directory was removed and {}", position.step, agreed,
         latest_description(cfg.dir()));
  };
  if (const std::string agreed = first_error(error); !agreed.empty()) give_up(agreed);
  const bool parallel = cfg.writer() == config::Checkpoint::PARALLEL;
  if (parallel && !fs::is_directory(partial))
    error = fmt::format("{} is not visible on this rank; checkpoint.writer PARALLEL needs a checkpoint.dir on a file "
                        "system shared by all ranks (or use checkpoint.writer GATHER)",
                        partial.string());
  if (const std::string agreed = first_error(error); !agreed.empty()) give_up(agreed);
  // The attributes must be identical on every rank (the parallel writer creates them
  // together): the position is rank 0's.
  TrainingPosition where = position;
  MPI_Bcast(&where.step, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
  MPI_Bcast(&where.data_position, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  // The tensors are listed first and written after a check of the free space: parallel
  // HDF5 cannot recover from a write that fails inside its collective calls (the ranks
  // end up in different collectives), so a save that would fill the disk must not start.
  std::vector<CheckpointTensor> jobs;
  std::deque<std::vector<float>> sources;  // host copies built per tensor, kept until written
  auto write = [&](const std::string& path, const std::vector<int64_t>& shape, const std::vector<Piece>& pieces,
                   const float* source) { jobs.push_back({path, shape, pieces, source}); };

  const ParamRegistry& reg = model_.registry();
  const std::vector<float> params = host_copy(be, model_.params());
  const std::vector<float> m = host_copy(be, optimizer.first_moments()), v = host_copy(be, optimizer.second_moments());
  const bool dp_first = groups_.dp->rank() == 0, edp_first = groups_.edp->rank() == 0, tp_first = groups_.tp->rank() == 0;
  for (const ParamSpec& ps : reg.specs()) {
    const bool expert = ps.role == ParamRole::EXPERT;
    // One replica writes each block: the first of the (expert-)data-parallel group, and
    // for tensors replicated over tensor parallelism the first tp rank.
    const bool writes_block = expert ? edp_first : dp_first && (ps.tp_sharded || tp_first);
    std::vector<Piece> pieces;
    if (writes_block) append_pieces(ps, 0, ps.numel, ps.offset, pieces);
    write("params/" + ps.name, ps.logical_shape, pieces, params.data());
    // Moments: each optimizer range overlapping the tensor. ZeRO-1 shards are distinct on
    // every replica; otherwise the block's writer writes them.
    const bool sharded = expert ? sharding_.experts : sharding_.dense;
    pieces.clear();
    int64_t base = 0;
    for (const ElementRange& r : optimizer.ranges()) {
      const int64_t a = std::max(r.begin, ps.offset), b = std::min(r.end, ps.offset + ps.numel);
      if (a < b && (sharded || writes_block)) append_pieces(ps, a - ps.offset, b - ps.offset, base + (a - r.begin), pieces);
      base += r.end - r.begin;
    }
    write("optimizer/exp_avg/" + ps.name, ps.logical_shape, pieces, m.data());
    write("optimizer/exp_avg_sq/" + ps.name, ps.logical_shape, pieces, v.data());
  }

  if (sdmoe_) {
    const int k = sdmoe_->spec().rank;
    const bool per_expert = sdmoe_->spec().basis == SdmoeBasis::PER_EXPERT;
    sources.push_back(host_copy(be, sdmoe_->bases()));
    const std::vector<float>& bases = sources.back();
    for (size_t ti = 0; ti < sdmoe_->targets().size(); ++ti) {
      const SpectralTarget& t = sdmoe_->targets()[ti];
      const std::string group = matrix_group(t);
      const int64_t logical_bases = per_expert ? t.total_experts : 1, first = per_expert ? t.first_expert : 0;
      // Per-expert bases are split over ep like the experts; layer-shared ones are the
      // same on every ep rank. Both are whole on every etp rank.
      const bool writes_bases = edp_first && groups_.etp->rank() == 0 && (per_expert || groups_.ep->rank() == 0);
      for (int side = 0; side < 2; ++side) {
        const int64_t length = side == 0 ? t.m_full : t.n_full, offset = side == 0 ? t.ut_offset : t.vt_offset;
        std::vector<Piece> pieces;
        if (writes_bases) pieces.push_back({first * k * length, t.bases * k * length, offset});
        write(group + (side == 0 ? "/Ut" : "/Vt"), {logical_bases, k, length}, pieces, bases.data());
      }
      const int64_t mn = t.m * t.n;
      for (int which = 0; which < 2; ++which) {
        std::vector<float> unique;
        std::vector<Piece> pieces;
        if (edp_first) {
          pieces = unique_moment_pieces(t);
          for (int64_t e = 0; e < t.experts; ++e) {
            const std::vector<float> part = host_copy(be, which == 0 ? sdmoe_->unique_m(ti, e) : sdmoe_->unique_v(ti, e));
            unique.insert(unique.end(), part.begin(), part.end());
          }
        }
        sources.push_back(std::move(unique));
        write(group + (which == 0 ? "/unique_exp_avg" : "/unique_exp_avg_sq"), {t.total_experts, t.m_full, t.n_full},
              pieces, sources.back().data());
      }
    }
  }

  // The file's size: the datasets' chunks, plus per dataset its header, chunk index and
  // checksums, plus the attributes and the config (a generous bound for all of them).
  try {
    jobs = agree_on_checkpoint_tensors(std::move(jobs));
  } catch (const Error& e) {
    give_up(e.what());  // every rank reached the same verdict from the same lists
  }
  double need = 4e6;
  for (const CheckpointTensor& j : jobs) need += double(checkpoint_dataset_bytes(j.shape)) + 64e3;
  if (root) {
    struct statvfs fs_stat {};
    if (::statvfs(partial.c_str(), &fs_stat) == 0) {
      const double free_bytes = double(fs_stat.f_bavail) * double(fs_stat.f_frsize);
      if (free_bytes < need)
        error = fmt::format("no space left on device: the checkpoint needs about {:.1f} MB and {} has {:.1f} MB free",
                            need / 1e6, partial.string(), free_bytes / 1e6);
    }
  }
  if (const std::string agreed = first_error(error); !agreed.empty()) give_up(agreed);
  const int64_t slab_elements =
      std::clamp<int64_t>(int64_t(cfg.slab_mb() * 1e6 / sizeof(float)), 1, kMaxSlabElements);
  std::unique_ptr<CheckpointWriter> writer =
      make_checkpoint_writer(parallel ? CheckpointWriterKind::PARALLEL : CheckpointWriterKind::GATHER,
                             (partial / kFileName).string(), slab_elements);
  writer->attribute("format", std::string(kFormat));
  writer->attribute("format_version", kFormatVersion);
  writer->attribute("step", where.step);
  writer->attribute("data_position", int64_t(where.data_position));
  writer->attribute("training_seed", int64_t(run_.training().seed()));
  writer->attribute("data_seed", int64_t(run_.data().seed()));
  writer->attribute("architecture", checkpoint_architecture(model_spec_from(run_.model())));
  writer->attribute("sdmoe", int64_t(sdmoe_ != nullptr));
  writer->string_dataset("config", resolved_config_text(run_));
  writer->attribute("layout", groups_.dims.describe());
  for (const CheckpointTensor& j : jobs) writer->tensor(j.path, j.shape, j.pieces, j.source);
  error = writer->finish();
  writer.reset();
  // Every rank's outcome: a failure anywhere leaves no partial directory behind.
  if (const std::string agreed = first_error(error); !agreed.empty()) give_up(agreed);
  if (root) {
    try {

      write_text_file(partial / "config.textproto", resolved_config_text(run_));
      sync_file(partial / kFileName);
      std::error_code ec;
      fs::remove_all(final_dir, ec);
      fs::rename(partial, final_dir);
      sync_file(cfg.dir());
      // The pointer last: written beside and renamed over the old one.
      const fs::path latest = fs::path(cfg.dir()) / "latest", staging = fs::path(cfg.dir()) / "latest.partial";
      write_text_file(staging, fs::path(final_dir).filename().string() + "\n");
      fs::rename(staging, latest);
      sync_file(cfg.dir());
      // Pruning: the newest `keep` checkpoints up to this step stay. Later steps (left by a
      // run this one restarted from an older checkpoint) are left alone, as are other
      // runs' files; leftover .partial directories of killed writes are removed.
      std::vector<std::pair<int64_t, fs::path>> steps;
      std::vector<fs::path> doomed;
      for (const auto& entry : fs::directory_iterator(cfg.dir())) {
        const std::string name = entry.path().filename().string();
        if (entry.is_directory() && name.size() > 8 && name.compare(name.size() - 8, 8, ".partial") == 0 &&
            step_of_directory(name.substr(0, name.size() - 8)) >= 0)
          doomed.push_back(entry.path());
        const int64_t s = step_of_directory(name);
        if (s >= 0 && s <= position.step && entry.is_directory()) steps.emplace_back(s, entry.path());
      }
      std::sort(steps.begin(), steps.end());
      if (cfg.keep() > 0)
        for (size_t i = 0; i + size_t(cfg.keep()) < steps.size(); ++i) doomed.push_back(steps[i].second);
      for (const fs::path& p : doomed) fs::remove_all(p, ec);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (const std::string agreed = first_error(error); !agreed.empty()) give_up(agreed);
}

TrainingPosition Checkpointer::load(const std::string& where, bool parameters_only) {
  std::string error;
  TrainingPosition position;
  Backend& be = model_.backend();
  try {
    const std::string path = fs::is_directory(where) ? (fs::path(where) / kFileName).string() : where;
    CheckpointFile file(path);
    const std::string want = checkpoint_architecture(model_spec_from(run_.model())),
                      got = read_string_attribute(file.get(), "architecture", path);
    if (got != want) fail("{}: the checkpoint's model differs: {}", path, architecture_difference(got, want));
    const bool saved_sdmoe = read_int_attribute(file.get(), "sdmoe", path) != 0;
    SDMOE_ASSERT(parameters_only || optimizer_, "load of the training state without an optimizer");
    if (!parameters_only && saved_sdmoe != (sdmoe_ != nullptr))
      fail("{}: the checkpoint was written with sdmoe.enabled {}, this run has {}", path, saved_sdmoe,
           sdmoe_ != nullptr);
    position.step = read_int_attribute(file.get(), "step", path);
    if (position.step < 0)
      fail("{}: attribute 'step' is {}, not a step count (the file was altered)", path, position.step);
    const int64_t data_seed = read_int_attribute(file.get(), "data_seed", path);
    if (data_seed != int64_t(run_.data().seed()) && world_rank() == 0)
      std::fprintf(stderr, "sdmoe: warning: %s was written with data.seed %ld, this run has %ld: the sample order changes\n",
                   path.c_str(), (long)data_seed, (long)run_.data().seed());
    const int64_t data_position = read_int_attribute(file.get(), "data_position", path);
    if (data_position < 0)
      fail("{}: attribute 'data_position' is {}, not a sample count (the file was altered)", path, data_position);
    position.data_position = uint64_t(data_position);

    const ParamRegistry& reg = model_.registry();
    std::vector<float> params = host_copy(be, model_.params());
    std::vector<float> m, v;
    if (!parameters_only) {
      m = host_copy(be, optimizer_->first_moments());
      v = host_copy(be, optimizer_->second_moments());
    }
    for (const ParamSpec& ps : reg.specs()) {
      std::vector<Piece> pieces;
      append_pieces(ps, 0, ps.numel, ps.offset, pieces);
      file.read_pieces("params/" + ps.name, ps.logical_shape, pieces, params.data());
      if (parameters_only) continue;
      pieces.clear();
      int64_t base = 0;
      for (const ElementRange& r : optimizer_->ranges()) {
        const int64_t a = std::max(r.begin, ps.offset), b = std::min(r.end, ps.offset + ps.numel);
        if (a < b) append_pieces(ps, a - ps.offset, b - ps.offset, base + (a - r.begin), pieces);
        base += r.end - r.begin;
      }
      file.read_pieces("optimizer/exp_avg/" + ps.name, ps.logical_shape, pieces, m.data());
      file.read_pieces("optimizer/exp_avg_sq/" + ps.name, ps.logical_shape, pieces, v.data());
    }
    if (sdmoe_ && !parameters_only) {
      const int k = sdmoe_->spec().rank;
      const bool per_expert = sdmoe_->spec().basis == SdmoeBasis::PER_EXPERT;
      std::vector<float> bases = host_copy(be, sdmoe_->bases());
      std::vector<std::vector<float>> unique[2];
      for (size_t ti = 0; ti < sdmoe_->targets().size(); ++ti) {
        const SpectralTarget& t = sdmoe_->targets()[ti];
        const std::string group = matrix_group(t);
        const int64_t logical_bases = per_expert ? t.total_experts : 1, first = per_expert ? t.first_expert : 0;
        for (int side = 0; side < 2; ++side) {
          const int64_t length = side == 0 ? t.m_full : t.n_full;
          const std::vector<Piece> pieces{{first * k * length, t.bases * k * length, side == 0 ? t.ut_offset : t.vt_offset}};
          file.read_pieces(group + (side == 0 ? "/Ut" : "/Vt"), {logical_bases, k, length}, pieces, bases.data());
        }
        const int64_t mn = t.m * t.n;
        for (int which = 0; which < 2; ++which) {
          unique[which].emplace_back(size_t(t.experts * mn));
          file.read_pieces(group + (which == 0 ? "/unique_exp_avg" : "/unique_exp_avg_sq"),
                           {t.total_experts, t.m_full, t.n_full}, unique_moment_pieces(t), unique[which].back().data());
        }
      }
      // Everything read: only now is the live state replaced.
      be.copy_from_host(bases.data(), sdmoe_->bases());
      for (size_t ti = 0; ti < sdmoe_->targets().size(); ++ti) {
        const SpectralTarget& t = sdmoe_->targets()[ti];
        for (int64_t e = 0; e < t.experts; ++e) {
          be.copy_from_host(unique[0][ti].data() + e * t.m * t.n, sdmoe_->unique_m(ti, e));
          be.copy_from_host(unique[1][ti].data() + e * t.m * t.n, sdmoe_->unique_v(ti, e));
        }
      }
      sdmoe_->bases_restored();
    }
    be.copy_from_host(params.data(), model_.params());
    model_.weights_changed();  // a BF16 model's working copy follows the loaded fp32 master
    if (!m.empty()) {
      be.copy_from_host(m.data(), optimizer_->first_moments());
      be.copy_from_host(v.data(), optimizer_->second_moments());
    }
    be.synchronize();
  } catch (const Error& e) {
    error = e.what();
  }
  int failed = error.empty() ? 0 : 1;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed) fail("{}", error.empty() ? std::string("another rank could not load the checkpoint") : error);
  return position;
}

}  // namespace sdmoe
