// How a checkpoint file gets written: the tensors of the logical (unsharded) state, each
// assembled from the pieces that the ranks hold (docs/checkpoint.md).
//
// Two writers produce the same file:
//   PARALLEL  every rank opens the file through MPI-IO (parallel HDF5) and writes its own
//             pieces of each tensor in one collective write; nothing is gathered, so the
//             save is bounded by the file system rather than by rank 0's bandwidth and
//             memory. Needs an HDF5 built with MPI (Debian's libhdf5-openmpi-dev) and a
//             checkpoint.dir that every rank sees.
//   GATHER    each tensor is gathered to world rank 0 in slabs of leading-axis rows
//             (checkpoint.slab_mb) and rank 0 writes it with serial HDF5; works with any
//             HDF5 and any file system rank 0 can write.
// Either way the file is a plain HDF5 file that h5py reads.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/hdf5_handle.h"

namespace sdmoe {

// Where part of a local block goes in its logical tensor: `count` elements from
// `source` (an index into a host copy of the local state) to logical offset `logical`.
struct Piece {
  int64_t logical = 0, count = 0, source = 0;
};

// Chunks of at most this many elements, each with a Fletcher-32 checksum that HDF5
// verifies on every read: a flipped byte fails the load instead of loading wrong.
inline constexpr int64_t kCheckpointChunkElements = int64_t(1) << 20;

enum class CheckpointWriterKind { GATHER, PARALLEL };

// Whether this build's HDF5 can write in parallel (H5_HAVE_PARALLEL).
bool parallel_checkpoint_io_compiled();

// Collective over MPI_COMM_WORLD: every rank makes the same calls in the same order with
// the same names, shapes and attribute values; only the pieces differ. Errors do not
// throw: the first one is kept (error()) and later calls still take part in the
// collectives, so that no rank is left waiting; the caller agrees on the outcome.
class CheckpointWriter {
 public:
  virtual ~CheckpointWriter() = default;
  virtual void attribute(const char* name, int64_t value) = 0;
  virtual void attribute(const char* name, const std::string& value) = 0;
  // A scalar string dataset (for text beyond the 64 KiB limit of attributes).
  virtual void string_dataset(const char* name, const std::string& value) = 0;
  // Tensor `path` of logical `shape` (float32) from this rank's `pieces` of `source`;
  // every element must be written by exactly one rank.
  virtual void tensor(const std::string& path, const std::vector<int64_t>& shape, const std::vector<Piece>& pieces,
                      const float* source) = 0;
  // Flushes and closes the file. Returns this rank's first error, empty when none.
  virtual std::string finish() = 0;
};

// A tensor to write: its logical path and shape, and this rank's pieces of `source`.
struct CheckpointTensor {
  std::string path;
  std::vector<int64_t> shape;
  std::vector<Piece> pieces;
  const float* source = nullptr;
};

// Collective over MPI_COMM_WORLD. The writer needs the same tensors in the same order on
// every rank, but ranks may hold different parts of the model (pipeline stages hold
// different layers): this returns the union of every rank's list, rank 0's tensors first
// and then each later rank's new ones in its order, the same on every rank; a tensor this
// rank does not hold comes without pieces. A path that two ranks list with different
// shapes is an Error on every rank.
std::vector<CheckpointTensor> agree_on_checkpoint_tensors(std::vector<CheckpointTensor> local);

// Creates `file` (which every rank names alike) for writing. slab_elements bounds the
// gather writer's slabs.
std::unique_ptr<CheckpointWriter> make_checkpoint_writer(CheckpointWriterKind kind, const std::string& file,
                                                         int64_t slab_elements);

// The system's or MPI's reason for the last failed HDF5 call (for instance "No space left
// on device"), from HDF5's error stack; empty when it holds none.
std::string hdf5_failure_reason();

// ---- shared by the writers and the reader (launcher/checkpoint*.cc) ---------------------
// Elements per leading-axis row of a tensor of `shape`.
int64_t checkpoint_row_elements(const std::vector<int64_t>& shape);
// The file and memory dataspaces of leading-axis rows [first, first + rows) of `ds`.
std::pair<data::hdf5::Handle, data::hdf5::Handle> checkpoint_row_selection(hid_t ds, int64_t first, int64_t rows);
// Dataset `path` of `shape`: float32, chunked (whole trailing axes, leading rows up to
// kCheckpointChunkElements), Fletcher-32 per chunk. Throws sdmoe::Error.
data::hdf5::Handle create_checkpoint_dataset(hid_t file, const std::string& path, const std::vector<int64_t>& shape);
// Bytes such a dataset takes in the file (whole chunks, the edge ones included).
int64_t checkpoint_dataset_bytes(const std::vector<int64_t>& shape);
void write_checkpoint_attribute(hid_t where, const char* name, int64_t value);
void write_checkpoint_attribute(hid_t where, const char* name, const std::string& value);
void write_checkpoint_string_dataset(hid_t where, const char* name, const std::string& value, hid_t transfer);
// The PARALLEL writer (checkpoint_parallel_writer.cc); throws where HDF5 is serial.
std::unique_ptr<CheckpointWriter> make_parallel_checkpoint_writer(const std::string& file);

}  // namespace sdmoe
