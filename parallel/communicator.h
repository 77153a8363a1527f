// Collectives. Only parallel/ talks to MPI (and, later, NCCL); layers and the training
// loop receive communicators as explicit values.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"

namespace sdmoe {

enum class ReduceOp : uint8_t { SUM, MAX };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In place, on tensors of the communicator's backend device.
  virtual void all_reduce(const Tensor& x, ReduceOp op) = 0;
  virtual void broadcast(const Tensor& x, int root) = 0;
  virtual void barrier() = 0;
  // Small host-side reductions (statistics, agreement on errors).
  virtual void all_reduce_host(std::vector<double>& values, ReduceOp op) = 0;
  // Bytes this rank has handed to collectives since the last reset (payload size).
  uint64_t bytes_sent() const { return bytes_sent_; }
  void reset_bytes_sent() { bytes_sent_ = 0; }

 protected:
  uint64_t bytes_sent_ = 0;
};

// MPI over host memory; device tensors are staged through host buffers.
class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, Backend& backend);  // takes ownership of a duplicate of comm
  ~MpiCommunicator() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce(const Tensor& x, ReduceOp op) override;
  void broadcast(const Tensor& x, int root) override;
  void barrier() override;
  void all_reduce_host(std::vector<double>& values, ReduceOp op) override;

 private:
  // Returns a host pointer with the tensor's contents (the tensor itself on CPU).
  void* stage_in(const Tensor& x);
  void stage_out(const Tensor& x);
  MPI_Comm comm_ = MPI_COMM_NULL;
  Backend& backend_;
  int rank_ = 0, size_ = 1;
  std::vector<char> staging_;
};

// MPI_Init/MPI_Finalize for the lifetime of main().
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  int world_rank() const { return rank_; }
  int world_size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }

 private:
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
};

// Parallel degrees. Until tensor and expert parallelism exist every rank is a
// data-parallel replica: dp = world size.
struct ParallelDims {
  int world = 1;
  int dp = 1;
  static ParallelDims data_parallel(int world_size) { return ParallelDims{world_size, world_size}; }
};

// The process groups a component communicates over, passed as one explicit value.
struct ProcessGroups {
  std::shared_ptr<Communicator> world;
  std::shared_ptr<Communicator> dp;
};

ProcessGroups make_process_groups(const ParallelDims& dims, Backend& backend);

}  // namespace sdmoe
