#include "launcher/checkpoint_writer.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <sstream>

#include "core/check.h"
#include "data/hdf5_handle.h"
#include "parallel/watchdog.h"

namespace sdmoe {
namespace h5 = data::hdf5;

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The first failure's message, with HDF5's reason where it gives one.
void keep_first(std::string& error, const std::string& what) {
  if (!error.empty()) return;
  const std::string reason = hdf5_failure_reason();
  error = reason.empty() ? what : what + ": " + reason;
}

}  // namespace

void write_checkpoint_attribute(hid_t where, const char* name, int64_t value) {
  h5::Handle space = h5::dataspace(H5Screate(H5S_SCALAR));
  h5::Handle attr = h5::attribute(H5Acreate2(where, name, H5T_NATIVE_INT64, space.get(), H5P_DEFAULT, H5P_DEFAULT));
  if (!attr.valid() || H5Awrite(attr.get(), H5T_NATIVE_INT64, &value) < 0) fail("cannot write attribute {}", name);
}

void write_checkpoint_attribute(hid_t where, const char* name, const std::string& value) {
  h5::Handle type = h5::datatype(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.get(), std::max<size_t>(1, value.size()));
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  h5::Handle space = h5::dataspace(H5Screate(H5S_SCALAR));
  h5::Handle attr = h5::attribute(H5Acreate2(where, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT));
  std::string padded = value.empty() ? std::string(1, '\0') : value;
  if (!attr.valid() || H5Awrite(attr.get(), type.get(), padded.data()) < 0) fail("cannot write attribute {}", name);
}

void write_checkpoint_string_dataset(hid_t where, const char* name, const std::string& value, hid_t transfer) {
  h5::Handle type = h5::datatype(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.get(), std::max<size_t>(1, value.size()));
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  h5::Handle space = h5::dataspace(H5Screate(H5S_SCALAR));
  h5::Handle ds = h5::dataset(H5Dcreate2(where, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  if (!ds.valid() || H5Dwrite(ds.get(), type.get(), H5S_ALL, H5S_ALL, transfer, padded.data()) < 0)
    fail("cannot write dataset {}", name);
}

namespace {

// The dataset's dims (a scalar is stored as [1]) and its chunk: whole trailing axes and as
// many rows of the first axis that does not fit whole as fit kCheckpointChunkElements,
// evened out over that axis (HDF5 stores every chunk whole: 1536 rows in chunks of 1365
// would store 2730).
std::pair<std::vector<hsize_t>, std::vector<hsize_t>> dims_and_chunk(const std::vector<int64_t>& shape) {
  const std::vector<hsize_t> dims =
      shape.empty() ? std::vector<hsize_t>{1} : std::vector<hsize_t>(shape.begin(), shape.end());
  std::vector<hsize_t> chunk(dims.size(), 1);
  int64_t inner = 1;
  for (size_t a = dims.size(); a-- > 0;) {
    const int64_t d = int64_t(dims[a]);
    int64_t c = std::max<int64_t>(1, std::min<int64_t>(d, kCheckpointChunkElements / inner));
    const int64_t count = (d + c - 1) / c;
    c = (d + count - 1) / count;
    chunk[a] = hsize_t(c);
    inner *= c;
  }
  return {dims, chunk};
}

}  // namespace

int64_t checkpoint_dataset_bytes(const std::vector<int64_t>& shape) {
  if (product(shape) == 0) return 0;
  const auto [dims, chunk] = dims_and_chunk(shape);
  int64_t elements = 1;  // every chunk is stored whole, the edge ones too
  for (size_t a = 0; a < dims.size(); ++a) elements *= int64_t((dims[a] + chunk[a] - 1) / chunk[a] * chunk[a]);
  return elements * int64_t(sizeof(float));
}

h5::Handle create_checkpoint_dataset(hid_t file, const std::string& path, const std::vector<int64_t>& shape) {
  const auto [dims, chunk] = dims_and_chunk(shape);
  h5::Handle space = h5::dataspace(H5Screate_simple(int(dims.size()), dims.data(), nullptr));
  h5::Handle links = h5::plist(H5Pcreate(H5P_LINK_CREATE));
  H5Pset_create_intermediate_group(links.get(), 1);
  h5::Handle layout = h5::plist(H5Pcreate(H5P_DATASET_CREATE));
  if (product(shape) > 0) {
    H5Pset_chunk(layout.get(), int(chunk.size()), chunk.data());
    H5Pset_fletcher32(layout.get());
    // Every element is written: fill values would only double the bytes (parallel HDF5
    // allocates every chunk when the dataset is created).
    H5Pset_fill_time(layout.get(), H5D_FILL_TIME_NEVER);
  }
  h5::Handle ds = h5::dataset(
      H5Dcreate2(file, path.c_str(), H5T_IEEE_F32LE, space.get(), links.get(), layout.get(), H5P_DEFAULT));
  if (!ds.valid()) fail("cannot create dataset {}", path);
  return ds;
}

namespace {

// ---- GATHER: rank 0 writes what the others send --------------------------------------

// The logical tensor of `numel` elements on world rank 0, assembled from every rank's
// (runs, values); empty elsewhere. Every element must come exactly once.
std::vector<float> gather_logical(const std::vector<int64_t>& runs, const std::vector<float>& values, int64_t numel,
                                  const std::string& what) {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const bool root = world_rank() == 0;
  SDMOE_ASSERT(values.size() < size_t(INT32_MAX), "checkpoint: {} elements of {} on one rank", values.size(), what);
  const int mine[2] = {int(runs.size()), int(values.size())};
  std::vector<int> counts(root ? 2 * size : 0);
  MPI_Gather(mine, 2, MPI_INT, counts.data(), 2, MPI_INT, 0, MPI_COMM_WORLD);
  std::vector<int> run_counts(size), run_displs(size), value_counts(size), value_displs(size);
  int64_t total_runs = 0, total_values = 0;
  if (root)
    for (int r = 0; r < size; ++r) {
      run_counts[r] = counts[2 * r];
      value_counts[r] = counts[2 * r + 1];
      run_displs[r] = int(total_runs);
      value_displs[r] = int(total_values);
      total_runs += run_counts[r];
      total_values += value_counts[r];
    }
  SDMOE_ASSERT(total_values < INT32_MAX, "checkpoint: {} has {} elements; gathers are limited to 2^31", what,
               total_values);
  std::vector<int64_t> all_runs(total_runs);
  std::vector<float> all_values(total_values);
  MPI_Gatherv(runs.data(), mine[0], MPI_INT64_T, all_runs.data(), run_counts.data(), run_displs.data(), MPI_INT64_T, 0,
              MPI_COMM_WORLD);
  MPI_Gatherv(values.data(), mine[1], MPI_FLOAT, all_values.data(), value_counts.data(), value_displs.data(), MPI_FLOAT,
              0, MPI_COMM_WORLD);
  if (!root) return {};
  std::vector<float> out(numel);
  int64_t covered = 0, source = 0;
  for (size_t i = 0; i + 1 < all_runs.size(); i += 2) {
    const int64_t offset = all_runs[i], count = all_runs[i + 1];
    SDMOE_ASSERT(offset >= 0 && offset + count <= numel, "checkpoint: {}: run [{}, +{}) outside {}", what, offset,
                 count, numel);
    std::copy_n(all_values.data() + source, count, out.data() + offset);
    source += count;
    covered += count;
  }
  SDMOE_ASSERT(covered == numel && source == total_values, "checkpoint: {}: {} of {} elements gathered", what, covered,
               numel);
  return out;
}

class GatherWriter final : public CheckpointWriter {
 public:
  GatherWriter(const std::string& path, int64_t slab_elements)
      : path_(path), slab_elements_(slab_elements), root_(world_rank() == 0) {
    if (!root_) return;
    h5::silence_error_printing();
    file_ = h5::file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT));
    if (!file_.valid()) keep_first(error_, "cannot create " + path);
  }
  void attribute(const char* name, int64_t value) override { on_root([&] { write_checkpoint_attribute(file_.get(), name, value); }); }
  void attribute(const char* name, const std::string& value) override {
    on_root([&] { write_checkpoint_attribute(file_.get(), name, value); });
  }
  void string_dataset(const char* name, const std::string& value) override {
    on_root([&] { write_checkpoint_string_dataset(file_.get(), name, value, H5P_DEFAULT); });
  }
  // Slab by slab: every rank runs the same gathers whatever happened on rank 0 (which may
  // have failed already: it then only takes part).
  void tensor(const std::string& path, const std::vector<int64_t>& shape, const std::vector<Piece>& pieces,
              const float* source) override {
    h5::Handle ds;
    on_root([&] { ds = create_checkpoint_dataset(file_.get(), path, shape); });
    const int64_t leading = shape.empty() ? 1 : shape[0], row = checkpoint_row_elements(shape);
    const int64_t rows_per_slab = std::max<int64_t>(1, slab_elements_ / row);
    for (int64_t first = 0; first < leading; first += rows_per_slab) {
      const int64_t rows = std::min(rows_per_slab, leading - first), lo = first * row, hi = lo + rows * row;
      std::vector<int64_t> runs;
      std::vector<float> values;
      for (const Piece& p : pieces) {
        const int64_t a = std::max(p.logical, lo), b = std::min(p.logical + p.count, hi);
        if (a >= b) continue;
        runs.insert(runs.end(), {a - lo, b - a});
        values.insert(values.end(), source + p.source + (a - p.logical), source + p.source + (b - p.logical));
      }
      const std::vector<float> slab = gather_logical(runs, values, hi - lo, path);
      Watchdog::note_progress();  // a large checkpoint is many slabs, none of them a stall
      if (!root_ || !error_.empty() || slab.empty()) continue;
      auto [file_space, memory_space] = checkpoint_row_selection(ds.get(), first, rows);
      if (H5Dwrite(ds.get(), H5T_NATIVE_FLOAT, memory_space.get(), file_space.get(), H5P_DEFAULT, slab.data()) < 0)
        keep_first(error_, "cannot write dataset " + path + " to " + path_);
    }
  }
  std::string finish() override {
    if (root_ && error_.empty() && H5Fflush(file_.get(), H5F_SCOPE_GLOBAL) < 0)
      keep_first(error_, "cannot flush " + path_);
    file_.reset();
    return error_;
  }

 private:
  template <typename Fn>
  void on_root(Fn&& fn) {
    if (!root_ || !error_.empty()) return;
    try {
      fn();
    } catch (const Error& e) {
      keep_first(error_, std::string(e.what()) + " in " + path_);
    }
  }

  std::string path_;
  int64_t slab_elements_;
  bool root_;
  h5::Handle file_;
  std::string error_;
};

}  // namespace

int64_t checkpoint_row_elements(const std::vector<int64_t>& shape) {
  int64_t row = 1;
  for (size_t a = 1; a < shape.size(); ++a) row *= shape[a];
  return std::max<int64_t>(1, row);
}

std::pair<data::hdf5::Handle, data::hdf5::Handle> checkpoint_row_selection(hid_t ds, int64_t first, int64_t rows) {
  h5::Handle file_space = h5::dataspace(H5Dget_space(ds));
  const int rank = H5Sget_simple_extent_ndims(file_space.get());
  std::vector<hsize_t> dims(std::max(rank, 1), 1);
  H5Sget_simple_extent_dims(file_space.get(), dims.data(), nullptr);
  std::vector<hsize_t> start(dims.size(), 0), count = dims;
  start[0] = hsize_t(first);
  count[0] = hsize_t(rows);
  H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr);
  h5::Handle memory_space = h5::dataspace(H5Screate_simple(int(count.size()), count.data(), nullptr));
  return {std::move(file_space), std::move(memory_space)};
}

std::string hdf5_failure_reason() {
  // The innermost entries name the system or MPI call that failed and its message, as
  // "... errno = 28, error message = 'No space left on device' ..." (POSIX drivers) or
  // "... MPI error string is 'No space left on device'" (MPI-IO).
  std::vector<std::string> descriptions;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* e, void* data) -> herr_t {
        if (e && e->desc) static_cast<std::vector<std::string>*>(data)->push_back(e->desc);
        return 0;
      },
      &descriptions);
  for (auto it = descriptions.rbegin(); it != descriptions.rend(); ++it)
    for (const char* marker : {"error message = '", "MPI error string is '"}) {
      const size_t at = it->find(marker);
      if (at == std::string::npos) continue;
      const size_t begin = at + std::string(marker).size(), end = it->find('\'', begin);
      return it->substr(begin, end == std::string::npos ? std::string::npos : end - begin);
    }
  return "";
}

std::vector<CheckpointTensor> agree_on_checkpoint_tensors(std::vector<CheckpointTensor> local) {
  // Each rank's list as text, one tensor per line: the path, then its dimensions.
  std::string mine;
  for (const CheckpointTensor& t : local) {
    SDMOE_ASSERT(t.path.find_first_of(" \n") == std::string::npos, "checkpoint tensor path '{}' has a blank", t.path);
    mine += t.path;
    for (int64_t d : t.shape) mine += " " + std::to_string(d);
    mine += "\n";
  }
  int ranks = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  std::vector<int> lengths(static_cast<size_t>(ranks)), offsets(static_cast<size_t>(ranks));
  const int my_length = int(mine.size());
  SDMOE_CHECK_MPI(MPI_Allgather(&my_length, 1, MPI_INT, lengths.data(), 1, MPI_INT, MPI_COMM_WORLD));
  int64_t total = 0;
  for (int r = 0; r < ranks; ++r) {
    offsets[size_t(r)] = int(total);
    total += lengths[size_t(r)];
  }
  SDMOE_ASSERT(total < INT32_MAX, "checkpoint tensor lists of {} bytes", total);
  std::string all(static_cast<size_t>(total), '\0');
  SDMOE_CHECK_MPI(MPI_Allgatherv(mine.data(), my_length, MPI_CHAR, all.data(), lengths.data(), offsets.data(),
                                 MPI_CHAR, MPI_COMM_WORLD));

  std::map<std::string, size_t> index;  // path -> position in the agreed list
  std::vector<CheckpointTensor> agreed;
  std::vector<int> first_rank;
  for (int r = 0; r < ranks; ++r) {
    std::istringstream lines(all.substr(size_t(offsets[size_t(r)]), size_t(lengths[size_t(r)])));
    std::string line;
    while (std::getline(lines, line)) {
      std::istringstream fields(line);
      CheckpointTensor t;
      fields >> t.path;
      for (int64_t d = 0; fields >> d;) t.shape.push_back(d);
      const auto [it, added] = index.emplace(t.path, agreed.size());
      if (added) {
        agreed.push_back(std::move(t));
        first_rank.push_back(r);
      } else if (agreed[it->second].shape != t.shape) {
        fail("checkpoint: ranks {} and {} hold tensor {} with different shapes", first_rank[it->second], r, t.path);
      }
    }
  }
  for (CheckpointTensor& t : local) {
    CheckpointTensor& slot = agreed[index.at(t.path)];
    slot.pieces = std::move(t.pieces);
    slot.source = t.source;
  }
  return agreed;
}

std::unique_ptr<CheckpointWriter> make_checkpoint_writer(CheckpointWriterKind kind, const std::string& file,
                                                         int64_t slab_elements) {
  if (kind == CheckpointWriterKind::PARALLEL) return make_parallel_checkpoint_writer(file);
  return std::make_unique<GatherWriter>(file, slab_elements);
}

}  // namespace sdmoe
