// NCCL communicator: collectives on device memory, enqueued on the backend's stream so they
// are ordered with the compute around them without host synchronisation. The *_async
// collectives and the point-to-point exchanges go on a second, communication stream that
// waits for an event recorded on the backend's stream, so they overlap the compute queued
// after them; wait() makes the backend's stream wait for their completion event in turn. Host-side collectives
// (counts, statistics) go over an MPI communicator of the same ranks.
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>

#include "core/check.h"
#include "core/cuda/cuda_check.h"
#include "parallel/communicator.h"

namespace sdmoe {

namespace {

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
  }
  SDMOE_FATAL("NCCL", "unknown dtype");
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::SUM ? ncclSum : ncclMax; }

cudaEvent_t record_event(cudaStream_t stream) {
  cudaEvent_t event = nullptr;
  SDMOE_CHECK_CUDA(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  SDMOE_CHECK_CUDA(cudaEventRecord(event, stream));
  return event;
}

// Completion of work on the communication stream, as seen by the compute stream.
class StreamPendingCollective final : public PendingCollective {
 public:
  StreamPendingCollective(cudaEvent_t done, cudaStream_t compute) : done_(done), compute_(compute) {}
  ~StreamPendingCollective() override {
    if (done_) cudaEventDestroy(done_);  // unwaited: the job is failing; errors ignored
  }
  void wait() override {
    if (!done_) return;
    SDMOE_CHECK_CUDA(cudaStreamWaitEvent(compute_, done_, 0));
    SDMOE_CHECK_CUDA(cudaEventDestroy(done_));
    done_ = nullptr;
  }

 private:
  cudaEvent_t done_;
  cudaStream_t compute_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(MPI_Comm comm, Backend& backend)
      : host_(comm, backend), backend_(backend), stream_(static_cast<cudaStream_t>(backend.native_stream())) {
    if (backend.device() != Device::CUDA || stream_ == nullptr)
      fail("comm_backend NCCL needs device: CUDA (the backend is {})", backend.name());
    ncclUniqueId id{};
    if (host_.rank() == 0) SDMOE_CHECK_NCCL(ncclGetUniqueId(&id));
    SDMOE_CHECK_MPI(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, host_.comm()));
    SDMOE_CHECK_CUDA(cudaSetDevice(backend.device_ordinal()));
    SDMOE_CHECK_NCCL(ncclCommInitRank(&comm_, host_.size(), id, host_.rank()));
  }

  ~NcclCommunicator() override {
    // Teardown: errors ignored.
    if (comm_ && !aborted_) ncclCommDestroy(comm_);
    if (comm_stream_) cudaStreamDestroy(comm_stream_);
  }

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  std::string kind() const override { return "nccl"; }
  void abort() override {
    if (!aborted_.exchange(true) && comm_) ncclCommAbort(comm_);  // the job is ending: its status is of no use
  }

  void all_reduce(const Tensor& x, ReduceOp op) override { all_reduce_on(x, op, stream_); }

  std::unique_ptr<PendingCollective> all_reduce_async(const Tensor& x, ReduceOp op) override {
    const cudaStream_t side = begin_async();
    all_reduce_on(x, op, side);
    return std::make_unique<StreamPendingCollective>(record_event(side), stream_);
  }

  std::unique_ptr<PendingCollective> reduce_scatter_async(const Tensor& in, const Tensor& out, ReduceOp op) override {
    const cudaStream_t side = begin_async();
    reduce_scatter_on(in, out, op, side);
    return std::make_unique<StreamPendingCollective>(record_event(side), stream_);
  }

  std::unique_ptr<PendingCollective> all_gather_async(const Tensor& in, const Tensor& out) override {
    const cudaStream_t side = begin_async();
    all_gather_on(in, out, side);
    return std::make_unique<StreamPendingCollective>(record_event(side), stream_);
  }

  std::unique_ptr<PendingCollective> all_to_all_async(const Tensor& send, std::span<const int64_t> send_counts,
                                                      const Tensor& recv, std::span<const int64_t> recv_counts) override {
    const cudaStream_t side = begin_async();
    all_to_all_on(send, send_counts, recv, recv_counts, side);
    return std::make_unique<StreamPendingCollective>(record_event(side), stream_);
  }

  std::unique_ptr<PendingCollective> exchange_async(std::span<const PeerTransfer> transfers) override {
    bytes_sent_ += check_transfers(transfers);
    const cudaStream_t side = begin_async();
    // One group call: NCCL schedules its sends and receives together, so a rank may send
    // to and receive from the same peer without deadlock.
    SDMOE_CHECK_NCCL(ncclGroupStart());
    for (const PeerTransfer& t : transfers) {
      if (t.tensor.numel() == 0) continue;
      const size_t n = size_t(t.tensor.numel());
      if (t.kind == PeerTransfer::Kind::SEND)
        SDMOE_CHECK_NCCL(ncclSend(t.tensor.data, n, nccl_type(t.tensor.dtype), t.peer, comm_, side));
      else
        SDMOE_CHECK_NCCL(ncclRecv(t.tensor.data, n, nccl_type(t.tensor.dtype), t.peer, comm_, side));
    }
    SDMOE_CHECK_NCCL(ncclGroupEnd());
    return std::make_unique<StreamPendingCollective>(record_event(side), stream_);
  }

  void all_gather(const Tensor& in, const Tensor& out) override { all_gather_on(in, out, stream_); }

  void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) override {
    reduce_scatter_on(in, out, op, stream_);
  }

  void all_to_all(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                  std::span<const int64_t> recv_counts) override {
    all_to_all_on(send, send_counts, recv, recv_counts, stream_);
  }

  void broadcast(const Tensor& x, int root) override {
    SDMOE_ASSERT(root >= 0 && root < size(), "broadcast: root {} of {} ranks", root, size());
    if (size() == 1 || x.numel() == 0) return;
    if (rank() == root) bytes_sent_ += x.bytes();
    SDMOE_CHECK_NCCL(ncclBroadcast(x.data, x.data, size_t(x.numel()), nccl_type(x.dtype), root, comm_, stream_));
  }

  void barrier() override {
    SDMOE_CHECK_CUDA(cudaStreamSynchronize(stream_));
    host_.barrier();
  }

  void all_reduce_host(std::vector<double>& values, ReduceOp op) override { host_.all_reduce_host(values, op); }
  std::vector<int64_t> exchange_counts(std::span<const int64_t> counts) override {
    return host_.exchange_counts(counts);
  }

 private:
  void all_gather_on(const Tensor& in, const Tensor& out, cudaStream_t stream) {
    SDMOE_ASSERT(in.dtype == out.dtype, "all_gather: dtypes differ");
    SDMOE_ASSERT(out.numel() == in.numel() * size(), "all_gather: out has {} elements for {} ranks x {}",
                 out.numel(), size(), in.numel());
    if (in.numel() == 0) return;
    bytes_sent_ += uint64_t(size() - 1) * in.bytes();
    SDMOE_CHECK_NCCL(ncclAllGather(in.data, out.data, size_t(in.numel()), nccl_type(in.dtype), comm_, stream));
  }

  void all_to_all_on(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                     std::span<const int64_t> recv_counts, cudaStream_t stream) {
    SDMOE_ASSERT(send.dtype == recv.dtype, "all_to_all: dtypes differ");
    SDMOE_ASSERT(int(send_counts.size()) == size() && int(recv_counts.size()) == size(),
                 "all_to_all: {} send and {} receive counts for {} ranks", send_counts.size(), recv_counts.size(),
                 size());
    const size_t width = dtype_size(send.dtype);
    const ncclDataType_t type = nccl_type(send.dtype);
    const char* src = static_cast<const char*>(send.data);
    char* dst = static_cast<char*>(recv.data);
    int64_t total_send = 0, total_recv = 0;
    for (int p = 0; p < size(); ++p) {
      SDMOE_ASSERT(send_counts[p] >= 0 && recv_counts[p] >= 0, "all_to_all: negative count for peer {}", p);
      total_send += send_counts[p];
      total_recv += recv_counts[p];
    }
    SDMOE_ASSERT(total_send <= send.numel() && total_recv <= recv.numel(), "all_to_all: counts exceed the tensors");
    int64_t soff = 0, roff = 0;
    // Point-to-point pairs inside one group call: NCCL schedules them together, so no
    // ordering of peers can deadlock. Zero counts post nothing.
    SDMOE_CHECK_NCCL(ncclGroupStart());
    for (int p = 0; p < size(); ++p) {
      if (send_counts[p] > 0)
        SDMOE_CHECK_NCCL(ncclSend(src + soff * width, size_t(send_counts[p]), type, p, comm_, stream));
      if (recv_counts[p] > 0)
        SDMOE_CHECK_NCCL(ncclRecv(dst + roff * width, size_t(recv_counts[p]), type, p, comm_, stream));
      if (p != rank()) bytes_sent_ += uint64_t(send_counts[p]) * width;
      soff += send_counts[p];
      roff += recv_counts[p];
    }
    SDMOE_CHECK_NCCL(ncclGroupEnd());
  }

  void all_reduce_on(const Tensor& x, ReduceOp op, cudaStream_t stream) {
    if (size() == 1 || x.numel() == 0) return;
    bytes_sent_ += 2 * uint64_t(size() - 1) * x.bytes() / uint64_t(size());
    SDMOE_CHECK_NCCL(
        ncclAllReduce(x.data, x.data, size_t(x.numel()), nccl_type(x.dtype), nccl_op(op), comm_, stream));
  }

  void reduce_scatter_on(const Tensor& in, const Tensor& out, ReduceOp op, cudaStream_t stream) {
    SDMOE_ASSERT(in.dtype == out.dtype, "reduce_scatter: dtypes differ");
    SDMOE_ASSERT(in.numel() == out.numel() * size(), "reduce_scatter: in has {} elements for {} ranks x {}",
                 in.numel(), size(), out.numel());
    if (out.numel() == 0) return;
    bytes_sent_ += uint64_t(size() - 1) * in.bytes() / uint64_t(size());
    SDMOE_CHECK_NCCL(ncclReduceScatter(in.data, out.data, size_t(out.numel()), nccl_type(in.dtype), nccl_op(op),
                                       comm_, stream));
  }

  // The communication stream, made to wait for everything queued so far on the backend's.
  cudaStream_t begin_async() {
    if (!comm_stream_) SDMOE_CHECK_CUDA(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
    const cudaEvent_t ready = record_event(stream_);
    SDMOE_CHECK_CUDA(cudaStreamWaitEvent(comm_stream_, ready, 0));
    SDMOE_CHECK_CUDA(cudaEventDestroy(ready));  // released once the wait is satisfied
    return comm_stream_;
  }

  MpiCommunicator host_;
  Backend& backend_;
  cudaStream_t stream_;
  cudaStream_t comm_stream_ = nullptr;
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> aborted_{false};
};

}  // namespace

bool nccl_compiled() { return true; }

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, Backend& backend) {
  return std::make_unique<NcclCommunicator>(comm, backend);
}

}  // namespace sdmoe
