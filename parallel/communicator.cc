#include "parallel/communicator.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <numeric>

#include "core/check.h"

namespace sdmoe {

namespace {

MPI_Datatype mpi_reduce_type(DType t) {
  switch (t) {
    case DType::F32: return MPI_FLOAT;
    case DType::F64: return MPI_DOUBLE;
    case DType::I32: return MPI_INT;
    default: SDMOE_FATAL("MPI", fmt::format("no MPI reduction for dtype {}", dtype_name(t)));
  }
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::SUM ? MPI_SUM : MPI_MAX; }

// Data movement without arithmetic goes as elements of the tensor's width, so counts stay
// within MPI's int range for 4x more bytes than with MPI_BYTE.
MPI_Datatype mpi_move_type(DType t) {
  switch (dtype_size(t)) {
    case 2: return MPI_UINT16_T;
    case 4: return MPI_UINT32_T;
    case 8: return MPI_UINT64_T;
    default: SDMOE_FATAL("MPI", fmt::format("no MPI type for dtype {}", dtype_name(t)));
  }
}

int mpi_count(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX) SDMOE_FATAL("MPI", fmt::format("{}: {} elements do not fit an MPI count", what, n));
  return static_cast<int>(n);
}

// An all-to-all's MPI count and displacement arrays (elements), checked against the group
// size and the tensors, with the bytes this rank sends to other ranks.
struct AllToAllCounts {
  std::vector<int> send_count, send_displ, recv_count, recv_displ;
  int64_t send_elements = 0, recv_elements = 0;
  uint64_t bytes_to_others = 0;
};

AllToAllCounts all_to_all_counts(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                                 std::span<const int64_t> recv_counts, int size, int rank) {
  SDMOE_ASSERT(send.dtype == recv.dtype, "all_to_all: dtypes differ");
  SDMOE_ASSERT(int(send_counts.size()) == size && int(recv_counts.size()) == size,
               "all_to_all: {} send and {} receive counts for {} ranks", send_counts.size(), recv_counts.size(), size);
  AllToAllCounts c;
  c.send_count.resize(size), c.send_displ.resize(size), c.recv_count.resize(size), c.recv_displ.resize(size);
  for (int p = 0; p < size; ++p) {
    SDMOE_ASSERT(send_counts[p] >= 0 && recv_counts[p] >= 0, "all_to_all: negative count for peer {}", p);
    c.send_count[p] = mpi_count(send_counts[p], "all_to_all");
    c.recv_count[p] = mpi_count(recv_counts[p], "all_to_all");
    c.send_displ[p] = mpi_count(c.send_elements, "all_to_all displacement");
    c.recv_displ[p] = mpi_count(c.recv_elements, "all_to_all displacement");
    c.send_elements += send_counts[p];
    c.recv_elements += recv_counts[p];
    if (p != rank) c.bytes_to_others += uint64_t(send_counts[p]) * dtype_size(send.dtype);
  }
  SDMOE_ASSERT(c.send_elements <= send.numel(), "all_to_all: {} elements to send from a tensor of {}", c.send_elements,
               send.numel());
  SDMOE_ASSERT(c.recv_elements <= recv.numel(), "all_to_all: {} elements to receive into a tensor of {}",
               c.recv_elements, recv.numel());
  return c;
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, Backend& backend) : backend_(backend) {
  SDMOE_CHECK_MPI(MPI_Comm_dup(comm, &comm_));
  SDMOE_CHECK_MPI(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  SDMOE_CHECK_MPI(MPI_Comm_rank(comm_, &rank_));
  SDMOE_CHECK_MPI(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

void* MpiCommunicator::stage_in(const Tensor& x, std::vector<char>& staging) {
  if (x.device == Device::CPU) return x.data;
  staging.resize(x.bytes());
  if (x.bytes() > 0) backend_.copy_to_host(x, staging.data());
  return staging.data();
}

void* MpiCommunicator::stage_target(const Tensor& x, std::vector<char>& staging) {
  if (x.device == Device::CPU) return x.data;
  staging.resize(x.bytes());
  return staging.data();
}

void MpiCommunicator::stage_out(const Tensor& x, const std::vector<char>& staging) {
  if (x.device != Device::CPU && x.bytes() > 0) backend_.copy_from_host(staging.data(), x);
}

void MpiCommunicator::all_reduce(const Tensor& x, ReduceOp op) {
  if (size_ == 1) return;
  bytes_sent_ += 2 * uint64_t(size_ - 1) * x.bytes() / uint64_t(size_);
  void* buf = stage_in(x, send_staging_);
  // In pieces of at most 2^30 elements: MPI counts are ints, and a large model's dense
  // gradient is one tensor.
  constexpr int64_t kPiece = int64_t(1) << 30;
  const size_t width = dtype_size(x.dtype);
  for (int64_t begin = 0; begin < x.numel(); begin += kPiece) {
    const int64_t count = std::min(kPiece, x.numel() - begin);
    SDMOE_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, static_cast<char*>(buf) + begin * width, static_cast<int>(count),
                                  mpi_reduce_type(x.dtype), mpi_op(op), comm_));
  }
  stage_out(x, send_staging_);
}

namespace {

class CompletedCollective final : public PendingCollective {
 public:
  void wait() override {}
};

class MpiPendingCollective final : public PendingCollective {
 public:
  explicit MpiPendingCollective(std::vector<MPI_Request> requests) : requests_(std::move(requests)) {}
  void wait() override {
    if (requests_.empty()) return;
    SDMOE_CHECK_MPI(MPI_Waitall(int(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE));
    requests_.clear();
  }

 private:
  std::vector<MPI_Request> requests_;
};

// Nonblocking MPI requests and what they use until they complete: the count arrays of a
// vector collective, host staging for device tensors, and the device tensors that wait()
// fills from their staging.
class MpiPending final : public PendingCollective {
 public:
  explicit MpiPending(Backend& backend) : backend_(backend) {}
  // Dropped unwaited (the job is ending with an error): MPI may still write into the
  // receive staging while later calls progress it, so the buffers are leaked, not freed.
  ~MpiPending() override {
    if (!requests_.empty()) new std::vector<std::vector<char>>(std::move(staging_));
  }
  // A host buffer that lives until wait() (moving the outer vector keeps inner buffers).
  char* stage(size_t bytes) {
    staging_.emplace_back(std::max<size_t>(bytes, 1));
    return staging_.back().data();
  }
  // The last staged buffer is copied into `device` once the requests complete.
  void copy_out_last(const Tensor& device) { copy_out_.push_back({device, staging_.size() - 1}); }
  AllToAllCounts& keep(AllToAllCounts counts) {
    counts_.push_back(std::move(counts));
    return counts_.back();
  }
  // Where the next MPI call writes its request handle (valid until the next request()).
  MPI_Request* request() {
    requests_.push_back(MPI_REQUEST_NULL);
    return &requests_.back();
  }
  void wait() override {
    if (!requests_.empty()) SDMOE_CHECK_MPI(MPI_Waitall(int(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE));
    requests_.clear();
    for (const CopyOut& c : copy_out_)
      if (c.device.bytes() > 0) backend_.copy_from_host(staging_[c.staging].data(), c.device);
    copy_out_.clear();
    staging_.clear();
  }

 private:
  struct CopyOut {
    Tensor device;
    size_t staging;
  };
  Backend& backend_;
  std::vector<MPI_Request> requests_;  // each address is used only by the call that fills it
  std::vector<std::vector<char>> staging_;
  std::deque<AllToAllCounts> counts_;  // a deque: references stay valid as more are kept
  std::vector<CopyOut> copy_out_;
};

// One tag for every point-to-point transfer, so that transfers between two ranks match in
// the order they start (MPI's non-overtaking rule). The ring reduce-scatter tags its
// messages with its steps, 1 .. size - 1, on the same communicator: this one lies above
// them (the largest tag every MPI allows).
constexpr int kTransferTag = 32767;

}  // namespace

uint64_t Communicator::check_transfers(std::span<const PeerTransfer> transfers) const {
  uint64_t bytes = 0;
  for (const PeerTransfer& t : transfers) {
    SDMOE_ASSERT(t.peer >= 0 && t.peer < size(), "exchange: peer {} outside a group of {} ranks", t.peer, size());
    if (t.kind == PeerTransfer::Kind::SEND && t.peer != rank()) bytes += t.tensor.bytes();
  }
  return bytes;
}

std::unique_ptr<PendingCollective> Communicator::all_gather_async(const Tensor& in, const Tensor& out) {
  all_gather(in, out);
  return std::make_unique<CompletedCollective>();
}

std::unique_ptr<PendingCollective> Communicator::all_to_all_async(const Tensor& send,
                                                                  std::span<const int64_t> send_counts,
                                                                  const Tensor& recv,
                                                                  std::span<const int64_t> recv_counts) {
  all_to_all(send, send_counts, recv, recv_counts);
  return std::make_unique<CompletedCollective>();
}

std::unique_ptr<PendingCollective> MpiCommunicator::exchange_async(std::span<const PeerTransfer> transfers) {
  bytes_sent_ += check_transfers(transfers);
  auto pending = std::make_unique<MpiPending>(backend_);
  constexpr int64_t kPiece = int64_t(1) << 30;  // MPI counts are ints
  for (const PeerTransfer& t : transfers) {
    const Tensor& x = t.tensor;
    if (x.numel() == 0) continue;  // the peer's matching transfer is empty too
    const MPI_Datatype type = mpi_move_type(x.dtype);
    const bool sending = t.kind == PeerTransfer::Kind::SEND;
    char* buf = static_cast<char*>(x.data);
    if (x.device != Device::CPU) {
      buf = pending->stage(x.bytes());
      if (sending) backend_.copy_to_host(x, buf);
      else pending->copy_out_last(x);
    }
    const size_t width = dtype_size(x.dtype);
    for (int64_t begin = 0; begin < x.numel(); begin += kPiece) {
      const int count = static_cast<int>(std::min(kPiece, x.numel() - begin));
      if (sending)
        SDMOE_CHECK_MPI(MPI_Isend(buf + begin * width, count, type, t.peer, kTransferTag, comm_, pending->request()));
      else
        SDMOE_CHECK_MPI(MPI_Irecv(buf + begin * width, count, type, t.peer, kTransferTag, comm_, pending->request()));
    }
  }
  return pending;
}

std::unique_ptr<PendingCollective> MpiCommunicator::all_gather_async(const Tensor& in, const Tensor& out) {
  SDMOE_ASSERT(in.dtype == out.dtype, "all_gather: dtypes differ");
  SDMOE_ASSERT(out.numel() == in.numel() * size_, "all_gather: out has {} elements for {} ranks x {}", out.numel(),
               size_, in.numel());
  if (size_ == 1 || in.numel() == 0) return Communicator::all_gather_async(in, out);
  bytes_sent_ += uint64_t(size_ - 1) * in.bytes();
  auto pending = std::make_unique<MpiPending>(backend_);
  const MPI_Datatype type = mpi_move_type(in.dtype);
  const int n = mpi_count(in.numel(), "all_gather");
  char* own_block = static_cast<char*>(out.data) + int64_t(rank_) * int64_t(in.bytes());
  if (out.device == Device::CPU) {
    if (in.data == own_block)
      SDMOE_CHECK_MPI(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, out.data, n, type, comm_, pending->request()));
    else
      SDMOE_CHECK_MPI(MPI_Iallgather(in.data, n, type, out.data, n, type, comm_, pending->request()));
    return pending;
  }
  // Device tensors: the rank's block is staged into its place in a host copy of `out`,
  // gathered in place there, and copied to the device at wait().
  char* buf = pending->stage(out.bytes());
  backend_.copy_to_host(in, buf + int64_t(rank_) * int64_t(in.bytes()));
  pending->copy_out_last(out);
  SDMOE_CHECK_MPI(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, n, type, comm_, pending->request()));
  return pending;
}

std::unique_ptr<PendingCollective> MpiCommunicator::all_to_all_async(const Tensor& send,
                                                                     std::span<const int64_t> send_counts,
                                                                     const Tensor& recv,
                                                                     std::span<const int64_t> recv_counts) {
  auto pending = std::make_unique<MpiPending>(backend_);
  // MPI reads the count arrays until the request completes: the pending exchange owns them.
  AllToAllCounts& c = pending->keep(all_to_all_counts(send, send_counts, recv, recv_counts, size_, rank_));
  bytes_sent_ += c.bytes_to_others;
  const int64_t soff = c.send_elements, roff = c.recv_elements;
  const Tensor send_part = send.prefix({soff}), recv_part = recv.prefix({roff});
  char* src = static_cast<char*>(send.data);
  char* dst = static_cast<char*>(recv.data);
  if (send.device != Device::CPU) {
    src = pending->stage(send_part.bytes());
    if (send_part.bytes() > 0) backend_.copy_to_host(send_part, src);
  }
  if (recv.device != Device::CPU) {
    dst = pending->stage(recv_part.bytes());
    pending->copy_out_last(recv_part);
  }
  const MPI_Datatype type = mpi_move_type(send.dtype);
  SDMOE_CHECK_MPI(MPI_Ialltoallv(src, c.send_count.data(), c.send_displ.data(), type, dst, c.recv_count.data(),
                                 c.recv_displ.data(), type, comm_, pending->request()));
  return pending;
}

std::unique_ptr<PendingCollective> Communicator::all_reduce_async(const Tensor& x, ReduceOp op) {
  all_reduce(x, op);
  return std::make_unique<CompletedCollective>();
}

std::unique_ptr<PendingCollective> Communicator::reduce_scatter_async(const Tensor& in, const Tensor& out,
                                                                      ReduceOp op) {
  reduce_scatter(in, out, op);
  return std::make_unique<CompletedCollective>();
}

std::unique_ptr<PendingCollective> MpiCommunicator::all_reduce_async(const Tensor& x, ReduceOp op) {
  // Device memory would need its staging buffer kept per request; it goes blocking.
  if (size_ == 1 || x.device != Device::CPU) return Communicator::all_reduce_async(x, op);
  bytes_sent_ += 2 * uint64_t(size_ - 1) * x.bytes() / uint64_t(size_);
  constexpr int64_t kPiece = int64_t(1) << 30;
  const size_t width = dtype_size(x.dtype);
  std::vector<MPI_Request> requests;
  for (int64_t begin = 0; begin < x.numel(); begin += kPiece) {
    const int64_t count = std::min(kPiece, x.numel() - begin);
    MPI_Request request = MPI_REQUEST_NULL;
    SDMOE_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, static_cast<char*>(x.data) + begin * width, static_cast<int>(count),
                                   mpi_reduce_type(x.dtype), mpi_op(op), comm_, &request));
    requests.push_back(request);
  }
  return std::make_unique<MpiPendingCollective>(std::move(requests));
}

void MpiCommunicator::all_gather(const Tensor& in, const Tensor& out) {
  SDMOE_ASSERT(in.dtype == out.dtype, "all_gather: dtypes differ");
  SDMOE_ASSERT(out.numel() == in.numel() * size_, "all_gather: out has {} elements for {} ranks x {}", out.numel(),
               size_, in.numel());
  if (size_ == 1) {
    if (in.data != out.data && in.bytes() > 0) backend_.copy(in, out);
    return;
  }
  bytes_sent_ += uint64_t(size_ - 1) * in.bytes();
  const MPI_Datatype type = mpi_move_type(in.dtype);
  const int n = mpi_count(in.numel(), "all_gather");
  // In place when `in` is this rank's block of `out` (ZeRO-1's parameter gather).
  if (in.data == static_cast<char*>(out.data) + int64_t(rank_) * int64_t(in.bytes())) {
    void* buf = stage_in(out, recv_staging_);
    SDMOE_CHECK_MPI(MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, n, type, comm_));
    stage_out(out, recv_staging_);
    return;
  }
  void* src = stage_in(in, send_staging_);
  void* dst = stage_target(out, recv_staging_);
  SDMOE_CHECK_MPI(MPI_Allgather(src, n, type, dst, n, type, comm_));
  stage_out(out, recv_staging_);
}

void MpiCommunicator::reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) {
  SDMOE_ASSERT(in.dtype == out.dtype, "reduce_scatter: dtypes differ");
  SDMOE_ASSERT(in.numel() == out.numel() * size_, "reduce_scatter: in has {} elements for {} ranks x {}",
               in.numel(), size_, out.numel());
  if (size_ == 1) {
    if (in.data != out.data && in.bytes() > 0) backend_.copy(in, out);
    return;
  }
  bytes_sent_ += uint64_t(size_ - 1) * in.bytes() / uint64_t(size_);
  void* src = stage_in(in, send_staging_);
  void* dst = stage_target(out, recv_staging_);
  ring_reduce_scatter(src, dst, out.numel(), in.dtype, op);
  stage_out(out, recv_staging_);
}

// Ring reduce-scatter over host memory: in p - 1 steps each rank adds the block it
// receives from its left neighbour to its own copy of that block and passes the sum on;
// after the last step it holds the sum of block `rank` over all ranks. Each rank sends
// (p - 1)/p of the buffer, the bandwidth-optimal amount. Open MPI's
// MPI_Reduce_scatter_block ran at 0.26 of all-gather's bus bandwidth here
// (docs/performance.md), which made ZeRO-1's gradient step slower than an all-reduce.
void MpiCommunicator::ring_reduce_scatter(const void* src, void* dst, int64_t block, DType dtype, ReduceOp op) {
  const size_t width = dtype_size(dtype), block_bytes = size_t(block) * width;
  const int right = (rank_ + 1) % size_, left = (rank_ + size_ - 1) % size_;
  const char* in = static_cast<const char*>(src);
  // acc: the running sum of the block this rank passes on; incoming: its left neighbour's.
  ring_acc_.resize(block_bytes);
  ring_incoming_.resize(block_bytes);
  // Step s sends the sum of block (rank - s - 1) so far; after p - 1 steps the block this
  // rank keeps is its own: block `rank`.
  std::memcpy(ring_acc_.data(), in + size_t((rank_ + size_ - 1) % size_) * block_bytes, block_bytes);
  const MPI_Datatype type = mpi_move_type(dtype);
  for (int step = 1; step < size_; ++step) {
    for (int64_t begin = 0; begin < block; begin += int64_t(1) << 30) {
      const int64_t count = std::min<int64_t>(int64_t(1) << 30, block - begin);
      SDMOE_CHECK_MPI(MPI_Sendrecv(ring_acc_.data() + begin * width, int(count), type, right, step,
                                   ring_incoming_.data() + begin * width, int(count), type, left, step, comm_,
                                   MPI_STATUS_IGNORE));
    }
    const int block_index = (rank_ + size_ - 1 - step) % size_;
    add_block(ring_incoming_.data(), in + size_t(block_index) * block_bytes, ring_acc_.data(), block, dtype, op);
  }
  std::memcpy(dst, ring_acc_.data(), block_bytes);
}

// out = a op b, elementwise, in the tensor's type; the order of the operands is fixed
// (received partial sum first), so every rank's result is the same function of the data.
void MpiCommunicator::add_block(const char* a, const char* b, char* out, int64_t n, DType dtype, ReduceOp op) {
  auto apply = [&](auto zero) {
    using T = decltype(zero);
    const T* x = reinterpret_cast<const T*>(a);
    const T* y = reinterpret_cast<const T*>(b);
    T* z = reinterpret_cast<T*>(out);
    if (op == ReduceOp::SUM)
      for (int64_t i = 0; i < n; ++i) z[i] = x[i] + y[i];
    else
      for (int64_t i = 0; i < n; ++i) z[i] = std::max(x[i], y[i]);
  };
  switch (dtype) {
    case DType::F32: apply(float{}); break;
    case DType::F64: apply(double{}); break;
    case DType::I32: apply(int32_t{}); break;
    default: SDMOE_FATAL("MPI", fmt::format("reduce_scatter: no reduction for dtype {}", dtype_name(dtype)));
  }
}

void MpiCommunicator::all_to_all(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                                 std::span<const int64_t> recv_counts) {
  const AllToAllCounts c = all_to_all_counts(send, send_counts, recv, recv_counts, size_, rank_);
  bytes_sent_ += c.bytes_to_others;
  void* src = stage_in(send.prefix({c.send_elements}), send_staging_);
  const Tensor recv_part = recv.prefix({c.recv_elements});
  void* dst = stage_target(recv_part, recv_staging_);
  const MPI_Datatype type = mpi_move_type(send.dtype);
  SDMOE_CHECK_MPI(MPI_Alltoallv(src, c.send_count.data(), c.send_displ.data(), type, dst, c.recv_count.data(),
                                c.recv_displ.data(), type, comm_));
  stage_out(recv_part, recv_staging_);
}

void MpiCommunicator::broadcast(const Tensor& x, int root) {
  SDMOE_ASSERT(root >= 0 && root < size_, "broadcast: root {} of {} ranks", root, size_);
  if (size_ == 1) return;
  if (rank_ == root) bytes_sent_ += x.bytes();
  void* buf = stage_in(x, send_staging_);
  SDMOE_CHECK_MPI(MPI_Bcast(buf, mpi_count(x.numel(), "broadcast"), mpi_move_type(x.dtype), root, comm_));
  stage_out(x, send_staging_);
}

void MpiCommunicator::barrier() { SDMOE_CHECK_MPI(MPI_Barrier(comm_)); }

void MpiCommunicator::all_reduce_host(std::vector<double>& values, ReduceOp op) {
  if (size_ == 1) return;
  SDMOE_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, values.data(), mpi_count(int64_t(values.size()), "all_reduce_host"),
                                MPI_DOUBLE, mpi_op(op), comm_));
}

std::vector<int64_t> MpiCommunicator::exchange_counts(std::span<const int64_t> counts) {
  SDMOE_ASSERT(!counts.empty() && counts.size() % size_ == 0, "exchange_counts: {} counts for {} ranks",
               counts.size(), size_);
  const int per_peer = mpi_count(int64_t(counts.size()) / size_, "exchange_counts");
  std::vector<int64_t> received(counts.size());
  SDMOE_CHECK_MPI(
      MPI_Alltoall(counts.data(), per_peer, MPI_INT64_T, received.data(), per_peer, MPI_INT64_T, comm_));
  return received;
}

// ---- runtime --------------------------------------------------------------------------

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int provided = 0;
  SDMOE_CHECK_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  // Errors come back as return codes so that the check macros can name the call.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  MPI_Comm node;
  SDMOE_CHECK_MPI(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_size(node, &local_size_);
  MPI_Comm_free(&node);
}

MpiRuntime::~MpiRuntime() { MPI_Finalize(); }

bool MpiRuntime::any_rank(bool flag) const {
  int any = flag ? 1 : 0;
  SDMOE_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  return any != 0;
}

bool MpiRuntime::same_on_every_rank(const std::string& text) const {
  // The largest and the smallest hash over the ranks in one reduction, as max(h), max(-h);
  // 52 bits are exact in a double.
  const double hash = double(std::hash<std::string>{}(text) % (uint64_t(1) << 52));
  double extremes[2] = {hash, -hash};
  SDMOE_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, extremes, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
  return extremes[0] == -extremes[1];
}

// ---- process groups -------------------------------------------------------------------

namespace {

// Builds the groups of one rank. Groups with the same members (dp and world when tp = 1,
// tp and etp when they are equal, ...) share one communicator: with NCCL each one holds
// device buffers and channels. Which groups coincide follows from the degrees alone, so
// every rank takes the same decisions and the MPI_Comm_split calls stay matched.
class GroupBuilder {
 public:
  GroupBuilder(Backend& backend, CommBackend kind) : backend_(backend), kind_(kind) {}

  // The group of this rank along one axis: ranks sharing `color`, ordered by `key`.
  std::shared_ptr<Communicator> split(int color, int key) {
    MPI_Comm sub = MPI_COMM_NULL;
    SDMOE_CHECK_MPI(MPI_Comm_split(MPI_COMM_WORLD, color, key, &sub));
    int size = 0, world_rank = 0;
    MPI_Comm_size(sub, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    std::vector<int> members(size);
    SDMOE_CHECK_MPI(MPI_Allgather(&world_rank, 1, MPI_INT, members.data(), 1, MPI_INT, sub));
    std::shared_ptr<Communicator>& group = by_members_[members];
    if (!group) {
      // A group of one needs no device communicator: its collectives are copies or no-ops.
      if (kind_ == CommBackend::NCCL && size > 1) group = make_nccl_communicator(sub, backend_);
      else group = std::make_shared<MpiCommunicator>(sub, backend_);
    }
    MPI_Comm_free(&sub);
    return group;
  }

 private:
  Backend& backend_;
  CommBackend kind_;
  std::map<std::vector<int>, std::shared_ptr<Communicator>> by_members_;
};

}  // namespace

ProcessGroups make_process_groups(const ParallelDims& d, Backend& backend, CommBackend kind) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  SDMOE_ASSERT(world == d.world, "process groups for {} ranks in a world of {}", d.world, world);
  GroupBuilder builder(backend, kind);
  ProcessGroups g;
  g.dims = d;
  g.world = builder.split(0, rank);
  // Color = the coordinates on the other axes; key = the coordinate on this axis.
  g.tp = builder.split(d.dp_rank(rank), d.tp_rank(rank));
  g.dp = builder.split(d.tp_rank(rank), d.dp_rank(rank));
  g.etp = builder.split(d.edp_rank(rank) * d.ep + d.ep_rank(rank), d.etp_rank(rank));
  g.ep = builder.split(d.edp_rank(rank) * d.etp + d.etp_rank(rank), d.ep_rank(rank));
  g.edp = builder.split(d.ep_rank(rank) * d.etp + d.etp_rank(rank), d.edp_rank(rank));
  return g;
}

#ifndef SDMOE_WITH_NCCL
bool nccl_compiled() { return false; }

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm, Backend&) {
  fail("comm_backend NCCL: this binary was built without NCCL");
}
#endif

}  // namespace sdmoe
