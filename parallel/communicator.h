// Collectives. Only parallel/ talks to MPI and NCCL; layers and the training loop receive
// communicators as explicit values (ProcessGroups).
//
// Two implementations of one interface:
//   MpiCommunicator   host memory; tensors on a GPU are staged through host buffers, so
//                     several ranks may share one GPU (tests, small machines).
//   NcclCommunicator  device memory on the backend's stream; one rank per GPU. Its NCCL
//                     unique id is bootstrapped over MPI.
// All tensors handed to a communicator live on its backend's device. Every rank of the
// group must make the same sequence of calls with matching sizes.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/backend.h"
#include "parallel/parallel_dims.h"

namespace sdmoe {

enum class ReduceOp : uint8_t { SUM, MAX };

// One side of a point-to-point transfer (Communicator::exchange_async): `tensor` goes to
// or comes from the rank `peer` of the group. Transfers between two ranks in one
// direction match in the order they are started, on both implementations (MPI's
// non-overtaking order on one tag; NCCL's order on its stream), so the two sides start
// them in the same order; sizes and dtypes must match.
struct PeerTransfer {
  enum class Kind : uint8_t { SEND, RECV };
  Kind kind = Kind::SEND;
  Tensor tensor;
  int peer = 0;
  static PeerTransfer send(const Tensor& t, int peer) { return {Kind::SEND, t, peer}; }
  static PeerTransfer recv(const Tensor& t, int peer) { return {Kind::RECV, t, peer}; }
};

// A collective or point-to-point exchange started by one of the *_async calls. wait()
// completes it: afterwards its tensors hold the result for the host and for work queued
// later on the backend's stream. Until then they must be neither read nor written (a
// send's tensor may be read). Not waiting is only allowed when the job is ending with an
// error (the request is then abandoned, not completed).
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string kind() const = 0;  // "mpi" or "nccl"

  // In place: x <- op over ranks of x. F32, F64, I32 (BF16 too on NCCL).
  virtual void all_reduce(const Tensor& x, ReduceOp op) = 0;
  // out = [in of rank 0, in of rank 1, ...]; out.numel() == size() * in.numel(). Any dtype.
  // In place when `in` is this rank's block of `out`.
  virtual void all_gather(const Tensor& in, const Tensor& out) = 0;
  // in holds size() equal blocks; rank r receives block r reduced over all ranks:
  // in.numel() == size() * out.numel().
  virtual void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) = 0;
  // send holds one contiguous block per peer in rank order, send_counts[p] elements for
  // peer p; recv receives recv_counts[p] elements from peer p, blocks in rank order.
  // Counts may be zero. Both spans have size() entries; the caller knows the receive
  // counts (exchanged beforehand, e.g. with exchange_counts). Any dtype.
  virtual void all_to_all(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                          std::span<const int64_t> recv_counts) = 0;
  virtual void broadcast(const Tensor& x, int root) = 0;
  virtual void barrier() = 0;

  // The same collectives, started now and completed by wait(), so that they overlap the
  // work that follows (a gradient bucket against the rest of the backward). MPI on host
  // memory: nonblocking MPI, progressed inside later MPI calls and in wait(); NCCL: on a
  // communication stream ordered after the work queued so far on the backend's stream.
  // Otherwise (MPI staging device memory) the blocking collective, already complete.
  virtual std::unique_ptr<PendingCollective> all_reduce_async(const Tensor& x, ReduceOp op);
  virtual std::unique_ptr<PendingCollective> reduce_scatter_async(const Tensor& in, const Tensor& out, ReduceOp op);
  virtual std::unique_ptr<PendingCollective> all_gather_async(const Tensor& in, const Tensor& out);
  // The MoE dispatch and combine of one micro-batch while another computes. The count
  // spans are copied; the tensors follow the PendingCollective rules.
  virtual std::unique_ptr<PendingCollective> all_to_all_async(const Tensor& send, std::span<const int64_t> send_counts,
                                                              const Tensor& recv, std::span<const int64_t> recv_counts);

  // Point to point (pipeline stages' activations and gradients). The transfers of one call
  // start together and complete together (MPI: nonblocking sends and receives, device
  // tensors staged through buffers the pending exchange owns; NCCL: one group call on the
  // communication stream), so one call may send to and receive from the same peers
  // without deadlock. A transfer to this rank itself needs its receive in the same call.
  virtual std::unique_ptr<PendingCollective> exchange_async(std::span<const PeerTransfer> transfers) = 0;
  void send(const Tensor& x, int peer) { exchange_one(PeerTransfer::send(x, peer)); }
  void recv(const Tensor& x, int peer) { exchange_one(PeerTransfer::recv(x, peer)); }

  // Small host-side collectives (statistics, token counts, agreement on errors).
  virtual void all_reduce_host(std::vector<double>& values, ReduceOp op) = 0;
  // counts holds k values per peer (k = counts.size() / size()), peer p's at [p*k, p*k+k).
  // Returns what every peer sent to this rank, k values per peer in rank order:
  // result[p*k + i] = counts of peer p [rank()*k + i].
  virtual std::vector<int64_t> exchange_counts(std::span<const int64_t> counts) = 0;

  // Bytes this rank sent since the last reset, under the bandwidth-optimal algorithm of
  // each collective (docs/parallelism.md): ring all-reduce 2(p-1)/p B, all-gather (p-1) B
  // of its block, reduce-scatter (p-1)/p B of its input, all-to-all what goes to other
  // ranks, broadcast B on the root. A group of one sends nothing.
  uint64_t bytes_sent() const { return bytes_sent_; }
  void reset_bytes_sent() { bytes_sent_ = 0; }

  // Ends the communicator's outstanding device work without waiting for the peers, so
  // that a job can end while a peer is dead (NCCL: ncclCommAbort). Callable from another
  // thread while a collective blocks; the communicator is unusable afterwards. MPI's
  // collectives end with the job (MPI_Abort), so for them it does nothing.
  virtual void abort() {}

 protected:
  // Checks a batch of transfers (peers within the group) and returns the bytes its sends
  // move to other ranks.
  uint64_t check_transfers(std::span<const PeerTransfer> transfers) const;
  uint64_t bytes_sent_ = 0;

 private:
  void exchange_one(const PeerTransfer& t) { exchange_async(std::span<const PeerTransfer>(&t, 1))->wait(); }
};

// MPI over host memory; device tensors are staged through host buffers.
class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, Backend& backend);  // works on its own duplicate of comm
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string kind() const override { return "mpi"; }
  void all_reduce(const Tensor& x, ReduceOp op) override;
  void all_gather(const Tensor& in, const Tensor& out) override;
  void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) override;
  void all_to_all(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                  std::span<const int64_t> recv_counts) override;
  void broadcast(const Tensor& x, int root) override;
  void barrier() override;
  std::unique_ptr<PendingCollective> all_reduce_async(const Tensor& x, ReduceOp op) override;
  std::unique_ptr<PendingCollective> all_gather_async(const Tensor& in, const Tensor& out) override;
  std::unique_ptr<PendingCollective> all_to_all_async(const Tensor& send, std::span<const int64_t> send_counts,
                                                      const Tensor& recv, std::span<const int64_t> recv_counts) override;
  std::unique_ptr<PendingCollective> exchange_async(std::span<const PeerTransfer> transfers) override;
  void all_reduce_host(std::vector<double>& values, ReduceOp op) override;
  std::vector<int64_t> exchange_counts(std::span<const int64_t> counts) override;

  MPI_Comm comm() const { return comm_; }

 private:
  // A host pointer holding x's contents: x itself on CPU, else a staging buffer.
  void* stage_in(const Tensor& x, std::vector<char>& staging);
  // A host pointer to write x's new contents to; stage_out copies them to the device.
  void* stage_target(const Tensor& x, std::vector<char>& staging);
  void stage_out(const Tensor& x, const std::vector<char>& staging);

  void ring_reduce_scatter(const void* src, void* dst, int64_t block, DType dtype, ReduceOp op);
  static void add_block(const char* a, const char* b, char* out, int64_t n, DType dtype, ReduceOp op);

  MPI_Comm comm_ = MPI_COMM_NULL;
  Backend& backend_;
  int rank_ = 0, size_ = 1;
  std::vector<char> send_staging_, recv_staging_, ring_acc_, ring_incoming_;
};

// True when this binary has NCCL (built with CUDA and NCCL found).
bool nccl_compiled();

// A communicator over NCCL for the ranks of `comm`, on backend's device and stream.
// Throws sdmoe::Error when NCCL is not compiled in or the backend is not a GPU.
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, Backend& backend);

// MPI_Init/MPI_Finalize for the lifetime of main().
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  int world_rank() const { return rank_; }
  int world_size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }

  // Start-up agreement over MPI_COMM_WORLD, before any communicator exists; every rank
  // must call them in the same order. True on every rank when any rank passes true:
  bool any_rank(bool flag) const;
  // and when every rank passes the same text (compared by a 52-bit hash).
  bool same_on_every_rank(const std::string& text) const;

 private:
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
};

enum class CommBackend : uint8_t { MPI, NCCL };

// The process groups a component communicates over, passed as one explicit value. Each
// axis of ParallelDims has its group containing this rank; a degree of 1 gives a group of
// one rank whose collectives are no-ops.
struct ProcessGroups {
  ParallelDims dims;
  std::shared_ptr<Communicator> world;
  std::shared_ptr<Communicator> tp, dp;          // dense axes
  std::shared_ptr<Communicator> etp, ep, edp;    // MoE axes
};

// Collective over MPI_COMM_WORLD: every rank must call it with the same dims.
ProcessGroups make_process_groups(const ParallelDims& dims, Backend& backend, CommBackend kind = CommBackend::MPI);

}  // namespace sdmoe
