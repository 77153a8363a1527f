// Checkpoint writers when the ranks hold different tensors, as pipeline stages hold
// different layers, run under mpirun (see CMakeLists.txt):
//   - agree_on_checkpoint_tensors gives every rank the same list in the same order (rank
//     0's tensors first, then each later rank's new ones), although odd ranks list theirs
//     in reverse and each rank holds a tensor no other rank has;
//   - with that list both writers (GATHER, and PARALLEL where HDF5 is parallel) write a
//     file in which rank 0, reading with plain serial HDF5, finds every element where its
//     holder put it: a tensor split by rows over all ranks, and one tensor per rank;
//   - two ranks listing one path with different shapes get the same error on every rank.
// Expected values come from formulas of (rank, row, column), not from the writer.
#include <hdf5.h>
#include <mpi.h>
#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "core/check.h"
#include "data/hdf5_handle.h"
#include "launcher/checkpoint_writer.h"
#include "parallel/communicator.h"

namespace sdmoe {
namespace {
namespace h5 = data::hdf5;

constexpr int64_t kCols = 3;
// Rows of the shared tensor: two per rank, and one more on the last rank.
int64_t shared_rows(int ranks) { return 2 * int64_t(ranks) + 1; }
float shared_value(int64_t row, int64_t col) { return float(1000 * row + col) + 0.5f; }
// Rank r's own tensor: [r + 1, 2].
float own_value(int rank, int64_t i) { return float(100 * rank + i) - 0.25f; }

struct Local {
  std::vector<float> host;  // the source the pieces index
  std::vector<CheckpointTensor> tensors;
};

Local local_tensors(int rank, int ranks) {
  Local l;
  const int64_t first = 2 * int64_t(rank), rows = rank == ranks - 1 ? 3 : 2;
  for (int64_t r = first; r < first + rows; ++r)
    for (int64_t c = 0; c < kCols; ++c) l.host.push_back(shared_value(r, c));
  const int64_t own_begin = int64_t(l.host.size());
  for (int64_t i = 0; i < 2 * (rank + 1); ++i) l.host.push_back(own_value(rank, i));
  l.tensors.push_back({"shared/rows", {shared_rows(ranks), kCols}, {{first * kCols, rows * kCols, 0}}, nullptr});
  l.tensors.push_back({"stage" + std::to_string(rank) + "/w", {rank + 1, 2}, {{0, 2 * (rank + 1), own_begin}}, nullptr});
  if (rank % 2 == 1) std::swap(l.tensors[0], l.tensors[1]);
  for (CheckpointTensor& t : l.tensors) t.source = l.host.data();
  return l;
}

std::vector<float> read_dataset(hid_t file, const std::string& path, std::vector<int64_t>* shape) {
  h5::Handle ds = h5::dataset(H5Dopen2(file, path.c_str(), H5P_DEFAULT));
  if (!ds.valid()) return {};
  h5::Handle space = h5::dataspace(H5Dget_space(ds.get()));
  hsize_t dims[8] = {};
  const int rank = H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  shape->assign(dims, dims + rank);
  int64_t n = 1;
  for (int64_t d : *shape) n *= d;
  std::vector<float> v(static_cast<size_t>(n));
  if (H5Dread(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0) return {};
  return v;
}

int check_file(const std::string& file, int ranks) {
  int failures = 0;
  h5::Handle f = h5::file(H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
  if (!f.valid()) {
    std::fprintf(stderr, "cannot open %s\n", file.c_str());
    return 1;
  }
  std::vector<int64_t> shape;
  std::vector<float> got = read_dataset(f.get(), "shared/rows", &shape);
  std::vector<float> want;
  for (int64_t r = 0; r < shared_rows(ranks); ++r)
    for (int64_t c = 0; c < kCols; ++c) want.push_back(shared_value(r, c));
  if (got != want || shape != std::vector<int64_t>{shared_rows(ranks), kCols}) {
    std::fprintf(stderr, "shared/rows: wrong shape or values (%zu elements read, %zu expected)\n", got.size(), want.size());
    ++failures;
  }
  for (int r = 0; r < ranks; ++r) {
    const std::string path = "stage" + std::to_string(r) + "/w";
    got = read_dataset(f.get(), path, &shape);
    want.clear();
    for (int64_t i = 0; i < 2 * (r + 1); ++i) want.push_back(own_value(r, i));
    if (got != want || shape != std::vector<int64_t>{r + 1, 2}) {
      std::fprintf(stderr, "%s: wrong shape or values (%zu elements read)\n", path.c_str(), got.size());
      ++failures;
    }
  }
  return failures;
}

int run() {
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  h5::silence_error_printing();
  int failures = 0;

  // The agreed order: rank 0's tensors (shared/rows, stage0/w), then stage1/w, stage2/w, ...
  Local local = local_tensors(rank, ranks);
  const std::vector<CheckpointTensor> agreed = agree_on_checkpoint_tensors(local.tensors);
  std::vector<std::string> want_order{"shared/rows"};
  for (int r = 0; r < ranks; ++r) want_order.push_back("stage" + std::to_string(r) + "/w");
  std::vector<std::string> order;
  for (const CheckpointTensor& t : agreed) order.push_back(t.path);
  if (order != want_order) {
    std::fprintf(stderr, "rank %d: %zu tensors agreed, not in the expected order\n", rank, order.size());
    ++failures;
  }
  for (const CheckpointTensor& t : agreed) {
    const bool holds = t.path == "shared/rows" || t.path == "stage" + std::to_string(rank) + "/w";
    if (holds != !t.pieces.empty()) {
      std::fprintf(stderr, "rank %d: %s comes with %zu pieces\n", rank, t.path.c_str(), t.pieces.size());
      ++failures;
    }
  }

  // Both writers, into a directory rank 0 makes and names to all.
  char dir[256] = {};
  if (rank == 0) {
    std::snprintf(dir, sizeof(dir), "%s", (std::filesystem::temp_directory_path() / "sdmoe_ckpt_XXXXXX").c_str());
    if (mkdtemp(dir) == nullptr) dir[0] = '\0';
  }
  MPI_Bcast(dir, sizeof(dir), MPI_CHAR, 0, MPI_COMM_WORLD);
  if (dir[0] == '\0') {
    if (rank == 0) std::fprintf(stderr, "cannot make a temporary directory\n");
    return 1;
  }
  std::vector<CheckpointWriterKind> kinds{CheckpointWriterKind::GATHER};
  if (parallel_checkpoint_io_compiled()) kinds.push_back(CheckpointWriterKind::PARALLEL);
  for (CheckpointWriterKind kind : kinds) {
    const char* name = kind == CheckpointWriterKind::GATHER ? "GATHER" : "PARALLEL";
    const std::string file = std::string(dir) + "/" + name + ".h5";
    std::unique_ptr<CheckpointWriter> writer = make_checkpoint_writer(kind, file, /*slab_elements=*/4);
    for (const CheckpointTensor& t : agreed) writer->tensor(t.path, t.shape, t.pieces, t.source);
    const std::string error = writer->finish();
    writer.reset();
    int failed = error.empty() ? 0 : 1;
    if (failed) std::fprintf(stderr, "rank %d: %s writer: %s\n", rank, name, error.c_str());
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (!failed && rank == 0) {
      const int bad = check_file(file, ranks);
      if (bad) std::fprintf(stderr, "%s writer: %d tensors wrong\n", name, bad);
      failures += bad;
    }
    failures += failed;
  }
  if (rank == 0) std::filesystem::remove_all(dir);

  // One path with two shapes: every rank refuses, naming the path.
  if (ranks > 1) {
    std::vector<CheckpointTensor> clash{{"shared/x", {rank == 0 ? 4 : 5}, {}, nullptr}};
    std::string message;
    try {
      agree_on_checkpoint_tensors(clash);
    } catch (const Error& e) {
      message = e.what();
    }
    if (message.find("ranks 0 and 1 hold tensor shared/x with different shapes") == std::string::npos) {
      std::fprintf(stderr, "rank %d: a shape clash gave '%s'\n", rank, message.c_str());
      ++failures;
    }
  }

  MPI_Allreduce(MPI_IN_PLACE, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0)
    std::printf("%s: %d rank(s) holding different tensors; %zu writer(s) checked; %d failure(s)\n",
                failures == 0 ? "PASS" : "FAIL", ranks, kinds.size(), failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace sdmoe

int main(int argc, char** argv) {
  sdmoe::MpiRuntime mpi(&argc, &argv);
  try {
    return sdmoe::run();
  } catch (const sdmoe::Error& e) {
    std::fprintf(stderr, "test_checkpoint_tensors: error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return 2;
}
