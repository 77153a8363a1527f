#include "parallel/communicator.h"

#include <cstring>

#include "core/check.h"

namespace sdmoe {

namespace {
MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::F32: return MPI_FLOAT;
    case DType::F64: return MPI_DOUBLE;
    case DType::I32: return MPI_INT;
    default: SDMOE_FATAL("MPI", fmt::format("no MPI reduction for dtype {}", dtype_name(t)));
  }
}
MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::SUM ? MPI_SUM : MPI_MAX; }
}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, Backend& backend) : backend_(backend) {
  SDMOE_CHECK_MPI(MPI_Comm_dup(comm, &comm_));
  SDMOE_CHECK_MPI(MPI_Comm_rank(comm_, &rank_));
  SDMOE_CHECK_MPI(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

void* MpiCommunicator::stage_in(const Tensor& x) {
  if (x.device == Device::CPU) return x.data;
  staging_.resize(x.bytes());
  backend_.copy_to_host(x, staging_.data());
  return staging_.data();
}

void MpiCommunicator::stage_out(const Tensor& x) {
  if (x.device != Device::CPU) backend_.copy_from_host(staging_.data(), x);
}

void MpiCommunicator::all_reduce(const Tensor& x, ReduceOp op) {
  bytes_sent_ += x.bytes();
  if (size_ == 1) return;
  void* buf = stage_in(x);
  SDMOE_ASSERT(x.numel() <= INT32_MAX, "all_reduce of {} elements needs chunking", x.numel());
  SDMOE_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, buf, static_cast<int>(x.numel()), mpi_type(x.dtype), mpi_op(op), comm_));
  stage_out(x);
}

void MpiCommunicator::broadcast(const Tensor& x, int root) {
  if (rank_ == root) bytes_sent_ += x.bytes() * (size_ - 1);
  if (size_ == 1) return;
  void* buf = stage_in(x);
  SDMOE_CHECK_MPI(MPI_Bcast(buf, static_cast<int>(x.bytes()), MPI_BYTE, root, comm_));
  stage_out(x);
}

void MpiCommunicator::barrier() { SDMOE_CHECK_MPI(MPI_Barrier(comm_)); }

void MpiCommunicator::all_reduce_host(std::vector<double>& values, ReduceOp op) {
  if (size_ == 1) return;
  SDMOE_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()), MPI_DOUBLE, mpi_op(op), comm_));
}

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

ProcessGroups make_process_groups(const ParallelDims& dims, Backend& backend) {
  SDMOE_ASSERT(dims.dp == dims.world, "only data parallelism is implemented");
  ProcessGroups g;
  g.world = std::make_shared<MpiCommunicator>(MPI_COMM_WORLD, backend);
  g.dp = g.world;
  return g;
}

}  // namespace sdmoe
