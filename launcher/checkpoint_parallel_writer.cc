// The PARALLEL checkpoint writer (checkpoint_writer.h): every rank opens the file through
// HDF5's MPI-IO driver and writes its own pieces of each tensor.
//
// Parallel HDF5 rules that shape the code: creating the file, datasets and attributes is
// collective (every rank, same arguments); datasets with filters (our Fletcher-32 chunks)
// can only be written collectively, so every rank calls H5Dwrite for every tensor, with an
// empty selection when it holds nothing of it. A rank's pieces become one selection of
// the file dataspace (a union of hyperslabs), and HDF5 takes the memory buffer in the
// order of that selection, which is row-major file order: the pieces are sorted by
// logical offset and their values concatenated in that order.
#include <mpi.h>

#include <algorithm>

#include "core/check.h"
#include "launcher/checkpoint_writer.h"
#include "parallel/watchdog.h"

namespace sdmoe {

#ifdef H5_HAVE_PARALLEL

bool parallel_checkpoint_io_compiled() { return true; }

namespace {
namespace h5 = data::hdf5;

// Adds [begin, end) of the row-major flattening of `dims` to `space` as hyperslabs
// (H5S_SELECT_OR): at each axis the partial leading block, the whole middle blocks and the
// partial trailing block, so a range costs at most 2 x rank + 1 hyperslabs. `prefix`
// fixes the indices of the axes before `axis`.
void select_range(hid_t space, const std::vector<hsize_t>& dims, std::vector<hsize_t>& prefix, size_t axis,
                  int64_t begin, int64_t end) {
  if (begin >= end) return;
  int64_t inner = 1;
  for (size_t a = axis + 1; a < dims.size(); ++a) inner *= int64_t(dims[a]);
  auto block = [&](int64_t first, int64_t count) {  // whole sub-blocks [first, first + count) on this axis
    std::vector<hsize_t> start(dims.size(), 0), size = dims;
    for (size_t a = 0; a < axis; ++a) start[a] = prefix[a], size[a] = 1;
    start[axis] = hsize_t(first);
    size[axis] = hsize_t(count);
    H5Sselect_hyperslab(space, H5S_SELECT_OR, start.data(), nullptr, size.data(), nullptr);
  };
  const int64_t first_full = (begin + inner - 1) / inner, last_full = end / inner;  // whole sub-blocks [ff, lf)
  if (first_full > last_full) {  // inside one sub-block
    prefix[axis] = hsize_t(begin / inner);
    select_range(space, dims, prefix, axis + 1, begin % inner, begin % inner + (end - begin));
    return;
  }
  if (begin % inner != 0) {
    prefix[axis] = hsize_t(begin / inner);
    select_range(space, dims, prefix, axis + 1, begin % inner, inner);
  }
  if (last_full > first_full) block(first_full, last_full - first_full);
  if (end % inner != 0) {
    prefix[axis] = hsize_t(last_full);
    select_range(space, dims, prefix, axis + 1, 0, end % inner);
  }
}

// Consecutive rows with the same column range (a tensor-parallel column shard: one piece
// per row) as one block [rows, columns] of the last two axes; other pieces by range.
void select_pieces(hid_t space, const std::vector<hsize_t>& dims, const std::vector<Piece>& sorted) {
  const int64_t width = int64_t(dims.back());
  const int64_t plane = dims.size() >= 2 ? int64_t(dims[dims.size() - 2]) : 1;  // rows per leading index
  std::vector<hsize_t> prefix(dims.size(), 0);
  for (size_t i = 0; i < sorted.size();) {
    const Piece& p = sorted[i];
    const int64_t row = p.logical / width, column = p.logical % width;
    size_t j = i + 1;
    if (dims.size() >= 2 && column + p.count <= width)
      while (j < sorted.size() && sorted[j].count == p.count &&
             sorted[j].logical == p.logical + int64_t(j - i) * width && (row + int64_t(j - i)) / plane == row / plane)
        ++j;
    if (j - i > 1) {
      std::vector<hsize_t> start(dims.size(), 0), size(dims.size(), 1);
      int64_t rest = row;  // row index over all axes but the last: split it back into axes
      for (size_t a = dims.size() - 1; a-- > 0;) {
        start[a] = hsize_t(rest % int64_t(dims[a]));
        rest /= int64_t(dims[a]);
      }
      size[dims.size() - 2] = hsize_t(j - i);
      start.back() = hsize_t(column);
      size.back() = hsize_t(p.count);
      H5Sselect_hyperslab(space, H5S_SELECT_OR, start.data(), nullptr, size.data(), nullptr);
    } else {
      select_range(space, dims, prefix, 0, p.logical, p.logical + p.count);
    }
    i = j;
  }
}

class ParallelWriter final : public CheckpointWriter {
 public:
  explicit ParallelWriter(const std::string& path) : path_(path) {
    h5::silence_error_printing();
    h5::Handle access = h5::plist(H5Pcreate(H5P_FILE_ACCESS));
    H5Pset_fapl_mpio(access.get(), MPI_COMM_WORLD, MPI_INFO_NULL);
    // Metadata written by one rank collectively instead of by all: fewer small writes.
    H5Pset_coll_metadata_write(access.get(), true);
    H5Pset_all_coll_metadata_ops(access.get(), true);
    file_ = h5::file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, access.get()));
    if (!file_.valid()) fail_with("cannot create " + path);
    transfer_ = h5::plist(H5Pcreate(H5P_DATASET_XFER));
    H5Pset_dxpl_mpio(transfer_.get(), H5FD_MPIO_COLLECTIVE);
  }

  void attribute(const char* name, int64_t value) override {
    guarded([&] { write_checkpoint_attribute(file_.get(), name, value); });
  }
  void attribute(const char* name, const std::string& value) override {
    guarded([&] { write_checkpoint_attribute(file_.get(), name, value); });
  }
  void string_dataset(const char* name, const std::string& value) override {
    guarded([&] { write_checkpoint_string_dataset(file_.get(), name, value, transfer_.get()); });
  }

  void tensor(const std::string& path, const std::vector<int64_t>& shape, const std::vector<Piece>& pieces,
              const float* source) override {
    if (!file_.valid()) return;  // the file could not be created on any rank: nothing is collective any more
    h5::Handle ds;
    guarded([&] { ds = create_checkpoint_dataset(file_.get(), path, shape); });
    if (!ds.valid()) return;  // dataset creation is collective: it failed everywhere
    std::vector<Piece> sorted;
    for (const Piece& p : pieces)
      if (p.count > 0) sorted.push_back(p);
    std::sort(sorted.begin(), sorted.end(), [](const Piece& a, const Piece& b) { return a.logical < b.logical; });
    int64_t total = 0;
    for (const Piece& p : sorted) total += p.count;
    std::vector<float> values;
    values.reserve(size_t(total));
    for (const Piece& p : sorted) values.insert(values.end(), source + p.source, source + p.source + p.count);
    h5::Handle file_space = h5::dataspace(H5Dget_space(ds.get()));
    const int rank = H5Sget_simple_extent_ndims(file_space.get());
    std::vector<hsize_t> dims(size_t(std::max(rank, 1)), 1);
    H5Sget_simple_extent_dims(file_space.get(), dims.data(), nullptr);
    H5Sselect_none(file_space.get());
    if (!sorted.empty()) select_pieces(file_space.get(), dims, sorted);
    const hsize_t memory_size = hsize_t(std::max<int64_t>(total, 1));
    h5::Handle memory_space = h5::dataspace(H5Screate_simple(1, &memory_size, nullptr));
    if (total == 0) H5Sselect_none(memory_space.get());
    SDMOE_ASSERT(H5Sget_select_npoints(file_space.get()) == total,
                 "checkpoint: {}: this rank's pieces overlap ({} elements selected for {})", path,
                 (long long)H5Sget_select_npoints(file_space.get()), total);
    static const float nothing = 0.0f;  // a rank with no pieces still joins the collective write
    if (H5Dwrite(ds.get(), H5T_NATIVE_FLOAT, memory_space.get(), file_space.get(), transfer_.get(),
                 values.empty() ? &nothing : values.data()) < 0)
      fail_with("cannot write dataset " + path + " to " + path_);
    Watchdog::note_progress();
  }

  std::string finish() override {
    if (file_.valid() && H5Fclose(file_.release()) < 0) fail_with("cannot close " + path_);
    return error_;
  }

 private:
  void fail_with(const std::string& what) {
    if (!error_.empty()) return;
    const std::string reason = hdf5_failure_reason();
    error_ = reason.empty() ? what : what + ": " + reason;
  }
  template <typename Fn>
  void guarded(Fn&& fn) {
    if (!file_.valid()) return;
    try {
      fn();
    } catch (const Error& e) {
      fail_with(std::string(e.what()) + " in " + path_);
    }
  }

  std::string path_;
  h5::Handle file_, transfer_;
  std::string error_;
};

}  // namespace

std::unique_ptr<CheckpointWriter> make_parallel_checkpoint_writer(const std::string& file) {
  return std::make_unique<ParallelWriter>(file);
}

#else  // serial HDF5

bool parallel_checkpoint_io_compiled() { return false; }

std::unique_ptr<CheckpointWriter> make_parallel_checkpoint_writer(const std::string&) {
  fail("checkpoint.writer PARALLEL: this build's HDF5 has no MPI-IO support (install libhdf5-openmpi-dev and "
       "rebuild)");
}

#endif

}  // namespace sdmoe
