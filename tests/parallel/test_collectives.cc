// Communicators, parallel dims and process groups, run under mpiexec at several world
// sizes (see CMakeLists.txt). Every expected value is computed here from rank-dependent
// formulas, never by the code under test.
//
// Hang safety: all ranks run the same tests in the same order and make the same
// collective calls whatever the outcome, so checks are EXPECT_* after the collectives,
// never ASSERT_* (an early return) before a collective that other ranks still make.
//
// --device=cpu (default) or --device=cuda. With cuda and no visible GPU every test skips.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "core/check.h"
#include "parallel/communicator.h"
#include "parallel/gradient_sync.h"
#include "parallel/parallel_dims.h"

namespace sdmoe {
namespace {

// ---- process-wide state, set up in main() before the tests run ------------------------
MpiRuntime* g_mpi = nullptr;
std::unique_ptr<Backend> g_backend;
bool g_cuda_requested = false;
bool g_no_cuda_device = false;

Backend& backend() { return *g_backend; }

// Every test skips when --device=cuda found no GPU, so ctest reports the run as skipped.
class CollectiveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (g_no_cuda_device) GTEST_SKIP() << "no CUDA device";
  }
};

// ---- device arrays ---------------------------------------------------------------------
// One allocation viewed as a flat tensor on the backend's device. At least 64 bytes are
// allocated so that zero-element tensors still carry a valid pointer (as an arena gives).
struct DeviceArray {
  Buffer buf;
  Tensor t;
};

DeviceArray device_array(DType dt, int64_t n) {
  DeviceArray a;
  a.buf = Buffer(backend(), std::max<size_t>(static_cast<size_t>(n) * dtype_size(dt), 64));
  a.t = Tensor(a.buf.data(), dt, backend().device(), {n});
  return a;
}

template <typename T>
DeviceArray upload(DType dt, const std::vector<T>& host) {
  SDMOE_ASSERT(sizeof(T) == dtype_size(dt), "host type does not match {}", dtype_name(dt));
  DeviceArray a = device_array(dt, static_cast<int64_t>(host.size()));
  if (!host.empty()) backend().copy_from_host(host.data(), a.t);
  return a;
}

template <typename T>
std::vector<T> download(const Tensor& t) {
  std::vector<T> host(static_cast<size_t>(t.numel()));
  if (!host.empty()) backend().copy_to_host(t, host.data());
  return host;
}

// ---- communicator variants ---------------------------------------------------------------
// NCCL needs one GPU per rank. In a cuda run where it cannot run (not compiled in, or
// ranks sharing a GPU as gpu_np2 on a one-GPU machine) main leaves the NCCL variants out
// instead of skipping them: ctest's SKIP_REGULAR_EXPRESSION takes precedence over a
// failing exit code, so one skip would hide failures of the MPI variants on the GPU.
bool nccl_runnable() {
  return nccl_compiled() && g_cuda_requested && g_backend && g_mpi->local_size() <= cuda_device_count();
}

// Parameter: "mpi" or "nccl". SetUp makes the world communicator of that kind.
class WorldComm : public CollectiveTest, public ::testing::WithParamInterface<std::string> {
 protected:
  void SetUp() override {
    CollectiveTest::SetUp();
    if (IsSkipped()) return;
    if (GetParam() == "nccl") {
      if (!nccl_compiled()) GTEST_SKIP() << "NCCL not compiled in";
      if (!g_cuda_requested) GTEST_SKIP() << "NCCL needs --device=cuda";
      comm_ = make_nccl_communicator(MPI_COMM_WORLD, backend());
    } else {
      comm_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, backend());
    }
  }
  void TearDown() override { comm_.reset(); }
  Communicator& comm() { return *comm_; }
  std::unique_ptr<Communicator> comm_;
};

std::string param_name(const ::testing::TestParamInfo<std::string>& info) { return info.param; }

const char* op_name(ReduceOp op) { return op == ReduceOp::SUM ? "SUM" : "MAX"; }

// ---- all_reduce --------------------------------------------------------------------------
// x_r[i] = ((r + i) % p) * 1000 + i - 500: integers (negative too) exact in every dtype;
// the largest value moves between ranks with i, so MAX cannot return one rank's own row.
template <typename T>
void check_all_reduce(Communicator& c, DType dt) {
  const int p = c.size(), r = c.rank();
  const int64_t n = 37;
  for (ReduceOp op : {ReduceOp::SUM, ReduceOp::MAX}) {
    std::vector<T> host(n), expected(n);
    for (int64_t i = 0; i < n; ++i) {
      host[i] = static_cast<T>(((r + i) % p) * 1000 + i - 500);
      const int64_t sum = 1000LL * p * (p - 1) / 2 + p * (i - 500);
      const int64_t max = (p - 1) * 1000LL + i - 500;
      expected[i] = static_cast<T>(op == ReduceOp::SUM ? sum : max);
    }
    DeviceArray x = upload(dt, host);
    c.reset_bytes_sent();
    c.all_reduce(x.t, op);
    const uint64_t sent = c.bytes_sent();
    EXPECT_EQ(download<T>(x.t), expected) << dtype_name(dt) << " " << op_name(op);
    const uint64_t bytes = n * sizeof(T);
    EXPECT_EQ(sent, uint64_t(2 * (p - 1) * bytes / p)) << dtype_name(dt) << " " << op_name(op);
  }
}

TEST_P(WorldComm, Identity) {
  EXPECT_EQ(comm().rank(), g_mpi->world_rank());
  EXPECT_EQ(comm().size(), g_mpi->world_size());
  EXPECT_EQ(comm().kind(), GetParam());
}

// BF16 reductions exist on NCCL only. Small integers keep every partial sum exact. (No
// GTEST_SKIP for the MPI variant: any skip makes ctest report a whole gpu run as skipped.)
void check_all_reduce_bf16(Communicator& c) {
  const int p = c.size(), r = c.rank();
  const int64_t n = 24;
  for (ReduceOp op : {ReduceOp::SUM, ReduceOp::MAX}) {
    std::vector<uint16_t> host(n), expected(n);
    for (int64_t i = 0; i < n; ++i) {
      host[i] = float_to_bf16(static_cast<float>((r + 1) * (i % 8))).bits;
      const int64_t e = op == ReduceOp::SUM ? p * (p + 1) / 2 * (i % 8) : p * (i % 8);
      expected[i] = float_to_bf16(static_cast<float>(e)).bits;
    }
    DeviceArray x = upload(DType::BF16, host);
    c.all_reduce(x.t, op);
    EXPECT_EQ(download<uint16_t>(x.t), expected) << "bf16 " << op_name(op);
  }
}

TEST_P(WorldComm, AllReduce) {
  check_all_reduce<float>(comm(), DType::F32);
  check_all_reduce<double>(comm(), DType::F64);
  check_all_reduce<int32_t>(comm(), DType::I32);
  if (comm().kind() == "nccl") check_all_reduce_bf16(comm());
}

// ---- all_gather --------------------------------------------------------------------------
// Element i of rank r is enc(r, i); out must hold every rank's block in rank order.
template <typename T>
void check_all_gather(Communicator& c, DType dt, const std::function<T(int, int64_t)>& enc, bool async = false) {
  const int p = c.size(), r = c.rank();
  for (int64_t n : {int64_t{13}, int64_t{0}}) {
    std::vector<T> host(n), expected;
    for (int64_t i = 0; i < n; ++i) host[i] = enc(r, i);
    for (int q = 0; q < p; ++q)
      for (int64_t i = 0; i < n; ++i) expected.push_back(enc(q, i));
    DeviceArray in = upload(dt, host);
    DeviceArray out = device_array(dt, p * n);
    c.reset_bytes_sent();
    if (async) c.all_gather_async(in.t, out.t)->wait();
    else c.all_gather(in.t, out.t);
    const uint64_t sent = c.bytes_sent();
    EXPECT_EQ(download<T>(out.t), expected) << dtype_name(dt) << " n=" << n << (async ? " async" : "");
    EXPECT_EQ(sent, uint64_t((p - 1) * n * sizeof(T))) << dtype_name(dt) << " n=" << n;
  }
}

TEST_P(WorldComm, AllGather) {
  check_all_gather<float>(comm(), DType::F32, [](int r, int64_t i) { return r * 100.0f + i + 0.25f; });
  check_all_gather<int32_t>(comm(), DType::I32, [](int r, int64_t i) { return int32_t(-r * 1000 - i); });
  // BF16 is moved as raw bits: arbitrary patterns (signs, subnormals) must survive.
  check_all_gather<uint16_t>(comm(), DType::BF16, [](int r, int64_t i) { return uint16_t(r * 4099 + i * 37 + 1); });
}

// ---- reduce_scatter ----------------------------------------------------------------------
// in_r[k] = (r + 1) * (k + 1): rank q receives block q, element i = k - q*n, so
// SUM = p(p+1)/2 * (k + 1) and MAX = p * (k + 1); both depend on which block arrived.
template <typename T>
void check_reduce_scatter(Communicator& c, DType dt) {
  const int p = c.size(), r = c.rank();
  const int64_t n = 11;
  for (ReduceOp op : {ReduceOp::SUM, ReduceOp::MAX}) {
    std::vector<T> host(p * n), expected(n);
    for (int64_t k = 0; k < p * n; ++k) host[k] = static_cast<T>((r + 1) * (k + 1));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = r * n + i;
      expected[i] = static_cast<T>(op == ReduceOp::SUM ? p * (p + 1) / 2 * (k + 1) : p * (k + 1));
    }
    DeviceArray in = upload(dt, host);
    DeviceArray out = device_array(dt, n);
    c.reset_bytes_sent();
    c.reduce_scatter(in.t, out.t, op);
    const uint64_t sent = c.bytes_sent();
    EXPECT_EQ(download<T>(out.t), expected) << dtype_name(dt) << " " << op_name(op);
    const uint64_t in_bytes = p * n * sizeof(T);
    EXPECT_EQ(sent, uint64_t((p - 1) * in_bytes / p)) << dtype_name(dt) << " " << op_name(op);
  }
}

TEST_P(WorldComm, ReduceScatter) {
  check_reduce_scatter<float>(comm(), DType::F32);
  check_reduce_scatter<double>(comm(), DType::F64);
}

// ---- async collectives ----------------------------------------------------------------
// Several started before any is waited (as gradient buckets are), completed in reverse
// order; the results must be those of the blocking collectives above.
TEST_P(WorldComm, AsyncCollectivesInFlightTogether) {
  const int p = comm().size(), r = comm().rank();
  const int64_t n = 29, block = 7;
  std::vector<float> a(n), b(n), expected_a(n), expected_b(n), rs_in(p * block), expected_rs(block);
  for (int64_t i = 0; i < n; ++i) {
    a[i] = float((r + 1) * (i + 1));
    b[i] = float(r * 3 - i);
    expected_a[i] = float(p * (p + 1) / 2 * (i + 1));
    expected_b[i] = float(3 * p * (p - 1) / 2 - p * i);
  }
  for (int64_t k = 0; k < p * block; ++k) rs_in[k] = float((r + 2) * (k + 1));
  for (int64_t i = 0; i < block; ++i) expected_rs[i] = float((p * (p + 1) / 2 + p) * (r * block + i + 1));
  DeviceArray da = upload(DType::F32, a), db = upload(DType::F32, b), din = upload(DType::F32, rs_in);
  DeviceArray dout = device_array(DType::F32, block);
  auto first = comm().all_reduce_async(da.t, ReduceOp::SUM);
  auto second = comm().reduce_scatter_async(din.t, dout.t, ReduceOp::SUM);
  auto third = comm().all_reduce_async(db.t, ReduceOp::SUM);
  third->wait();
  second->wait();
  first->wait();
  EXPECT_EQ(download<float>(da.t), expected_a);
  EXPECT_EQ(download<float>(db.t), expected_b);
  EXPECT_EQ(download<float>(dout.t), expected_rs);
}

// ---- gradient buckets --------------------------------------------------------------------
// Tensors as ready ranges: [begin, end) with the backward stage that finishes them.
TEST(GradientBuckets, CutAtTensorStartsFromTheEnd) {
  // Region [100, 400): tensors of 50 elements, declared in order, the later ones finished
  // earlier in the backward (stage 5 first ... stage 0 last).
  std::vector<GradientReadyRange> ready;
  for (int t = 0; t < 6; ++t) ready.push_back({100 + 50 * t, 150 + 50 * t, 5 - t});
  const auto buckets = plan_gradient_buckets(100, 400, ready, 120, 1);
  // From the end: [250, 400) is the first range of >= 120 cut at a tensor start, then
  // [100, 250) holds the rest.
  ASSERT_EQ(buckets.size(), 2u);
  EXPECT_EQ(buckets[0].begin, 250);
  EXPECT_EQ(buckets[0].end, 400);
  EXPECT_EQ(buckets[0].ready_stage, 2);  // waits for the tensor at [250, 300)
  EXPECT_EQ(buckets[1].begin, 100);
  EXPECT_EQ(buckets[1].end, 250);
  EXPECT_EQ(buckets[1].ready_stage, 5);
}

TEST(GradientBuckets, GranularityPaddingAndDefaults) {
  std::vector<GradientReadyRange> ready{{0, 30, 3}, {30, 61, 2}, {61, 90, 1}};  // [90, 96) is padding
  // Cuts rounded up to multiples of 4: the start 61 becomes 64, 30 becomes 32.
  const auto zero1 = plan_gradient_buckets(0, 96, ready, 20, 4);
  ASSERT_EQ(zero1.size(), 3u);
  EXPECT_EQ(zero1[0].begin, 64);
  EXPECT_EQ(zero1[0].end, 96);
  EXPECT_EQ(zero1[0].ready_stage, 1);  // the padding does not delay it
  EXPECT_EQ(zero1[1].begin, 32);
  EXPECT_EQ(zero1[1].ready_stage, 2);
  EXPECT_EQ(zero1[2].begin, 0);
  EXPECT_EQ(zero1[2].end, 32);
  EXPECT_EQ(zero1[2].ready_stage, 3);  // holds elements 30, 31 of the stage-2 tensor too
  for (const auto& b : zero1) EXPECT_EQ((b.end - b.begin) % 4, 0);
  // No bucket size: one bucket. No readiness: it waits for the end of the backward.
  const auto one = plan_gradient_buckets(0, 96, ready, 0, 1);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].ready_stage, 3);
  const auto unknown = plan_gradient_buckets(0, 96, {}, 20, 1);
  ASSERT_EQ(unknown.size(), 1u);
  EXPECT_EQ(unknown[0].ready_stage, kAfterBackward);
  EXPECT_TRUE(plan_gradient_buckets(50, 50, ready, 20, 1).empty());
}

// ---- exchange_counts and all_to_all ------------------------------------------------------
// Values carry (sender, receiver, index), so a block delivered to the wrong rank or in the
// wrong order shows. Three guard elements after the receive tensor must stay untouched.
template <typename T>
void check_all_to_all(Communicator& c, DType dt, const std::function<int64_t(int, int)>& count,
                      const char* label, bool async = false) {
  const int p = c.size(), r = c.rank();
  auto enc = [](int s, int d, int64_t j) { return static_cast<T>(s * 10000 + d * 100 + j); };
  const T sentinel = static_cast<T>(-7);
  const int64_t guard = 3;

  std::vector<int64_t> send_counts(p), recv_counts(p);
  std::vector<T> send;
  uint64_t expected_sent = 0;
  for (int d = 0; d < p; ++d) {
    send_counts[d] = count(r, d);
    recv_counts[d] = count(d, r);
    for (int64_t j = 0; j < send_counts[d]; ++j) send.push_back(enc(r, d, j));
    if (d != r) expected_sent += send_counts[d] * sizeof(T);
  }
  std::vector<T> expected;
  for (int s = 0; s < p; ++s)
    for (int64_t j = 0; j < recv_counts[s]; ++j) expected.push_back(enc(s, r, j));
  const int64_t total = static_cast<int64_t>(expected.size());
  expected.insert(expected.end(), guard, sentinel);

  // The receive counts passed on come from the formula, so that a wrong exchange_counts
  // is reported here instead of derailing the all_to_all into a mismatch.
  const std::vector<int64_t> exchanged = c.exchange_counts(send_counts);
  EXPECT_EQ(exchanged, recv_counts) << label << " " << dtype_name(dt);

  DeviceArray in = upload(dt, send);
  DeviceArray out = upload(dt, std::vector<T>(total + guard, sentinel));
  const Tensor recv = out.t.prefix({total});
  c.reset_bytes_sent();
  if (async) {
    // The counts are copied at the start: the caller's may change before the wait.
    std::vector<int64_t> send_copy = send_counts, recv_copy = recv_counts;
    auto pending = c.all_to_all_async(in.t, send_copy, recv, recv_copy);
    std::fill(send_copy.begin(), send_copy.end(), -1);
    std::fill(recv_copy.begin(), recv_copy.end(), -1);
    pending->wait();
  } else {
    c.all_to_all(in.t, send_counts, recv, recv_counts);
  }
  const uint64_t sent = c.bytes_sent();
  EXPECT_EQ(download<T>(out.t), expected) << label << " " << dtype_name(dt);
  EXPECT_EQ(sent, expected_sent) << label << " " << dtype_name(dt);
}

template <typename T>
void check_all_to_all_cases(Communicator& c, DType dt, bool async = false) {
  const int p = c.size();
  // Uneven blocks, zeros included (to self too on some ranks).
  check_all_to_all<T>(c, dt, [](int s, int d) { return int64_t((s + 2 * d) % 4); }, "uneven", async);
  // Every rank routes all its tokens to the last rank (one hot expert).
  check_all_to_all<T>(c, dt, [p](int s, int d) { return d == p - 1 ? int64_t(3 + s) : 0; }, "one peer", async);
  // Nothing moves at all: zero-element send and receive tensors.
  check_all_to_all<T>(c, dt, [](int, int) { return int64_t{0}; }, "all zero", async);
}

TEST_P(WorldComm, AllToAll) {
  check_all_to_all_cases<int32_t>(comm(), DType::I32);
  check_all_to_all_cases<double>(comm(), DType::F64);
  check_all_to_all_cases<uint16_t>(comm(), DType::BF16);  // 2-byte elements, raw bits
}

// The asynchronous all-gather and all-to-all give what the blocking ones give.
TEST_P(WorldComm, AsyncAllGatherAndAllToAll) {
  check_all_gather<float>(comm(), DType::F32, [](int r, int64_t i) { return r * 100.0f + i + 0.25f; }, true);
  check_all_gather<uint16_t>(comm(), DType::BF16, [](int r, int64_t i) { return uint16_t(r * 4099 + i * 37 + 1); },
                             true);
  check_all_to_all_cases<int32_t>(comm(), DType::I32, true);
  check_all_to_all_cases<uint16_t>(comm(), DType::BF16, true);
}

// Several asynchronous collectives in flight together, completed in reverse order: the
// in-place all-gather (ZeRO-1's), an all-to-all, and an all-reduce.
TEST_P(WorldComm, AsyncGatherAndAllToAllInFlightTogether) {
  const int p = comm().size(), r = comm().rank();
  const int64_t block = 5;
  std::vector<float> gathered(p * block, -1.0f), expected_gathered(p * block);
  for (int q = 0; q < p; ++q)
    for (int64_t i = 0; i < block; ++i) {
      expected_gathered[q * block + i] = float(q * 10 + i);
      if (q == r) gathered[q * block + i] = float(q * 10 + i);
    }
  std::vector<int64_t> counts(p, 2);
  std::vector<int32_t> send(2 * p), expected_recv(2 * p);
  for (int q = 0; q < p; ++q)
    for (int j = 0; j < 2; ++j) {
      send[2 * q + j] = r * 1000 + q * 10 + j;
      expected_recv[2 * q + j] = q * 1000 + r * 10 + j;
    }
  std::vector<double> x(7, double(r + 1)), expected_x(7, double(p * (p + 1) / 2));
  DeviceArray dg = upload(DType::F32, gathered), ds = upload(DType::I32, send), dx = upload(DType::F64, x);
  DeviceArray dr = device_array(DType::I32, 2 * p);
  const Tensor own = dg.t.slice_rows(r * block, block);
  auto first = comm().all_gather_async(own, dg.t);
  auto second = comm().all_to_all_async(ds.t, counts, dr.t, counts);
  auto third = comm().all_reduce_async(dx.t, ReduceOp::SUM);
  third->wait();
  second->wait();
  first->wait();
  EXPECT_EQ(download<float>(dg.t), expected_gathered);
  EXPECT_EQ(download<int32_t>(dr.t), expected_recv);
  EXPECT_EQ(download<double>(dx.t), expected_x);
}

// ---- point to point ------------------------------------------------------------------------
// Element i of the k-th transfer from rank s to rank d is enc(s, d, k, i): a swapped pair,
// a wrong order or a lost piece shows.
int32_t transfer_value(int s, int d, int k, int64_t i) { return s * 100000 + d * 1000 + k * 100 + int32_t(i); }

// In one exchange every rank sends two tensors of different sizes to every rank (itself
// included) and receives two from each, in the same order: both directions between every
// pair at once, as pipeline stages pass activations forward and gradients back.
TEST_P(WorldComm, ExchangeBothWaysWithEveryPeer) {
  const int p = comm().size(), r = comm().rank();
  auto length = [](int k, int s, int d) { return int64_t(k == 0 ? 3 + s + d : (s + d) % 3); };  // zeros too
  std::vector<DeviceArray> sends, recvs;
  std::vector<PeerTransfer> transfers;
  uint64_t expected_bytes = 0;
  for (int q = 0; q < p; ++q)
    for (int k = 0; k < 2; ++k) {
      std::vector<int32_t> v(size_t(length(k, r, q)));
      for (int64_t i = 0; i < int64_t(v.size()); ++i) v[size_t(i)] = transfer_value(r, q, k, i);
      sends.push_back(upload(DType::I32, v));
      recvs.push_back(upload(DType::I32, std::vector<int32_t>(size_t(length(k, q, r)), -1)));
      if (q != r) expected_bytes += v.size() * sizeof(int32_t);
    }
  // Receives first for some peers and sends first for others: the order within a call
  // must not matter.
  for (size_t j = 0; j < sends.size(); ++j) {
    const int q = int(j / 2);
    if (q % 2 == 0) {
      transfers.push_back(PeerTransfer::send(sends[j].t, q));
      transfers.push_back(PeerTransfer::recv(recvs[j].t, q));
    } else {
      transfers.push_back(PeerTransfer::recv(recvs[j].t, q));
      transfers.push_back(PeerTransfer::send(sends[j].t, q));
    }
  }
  comm().reset_bytes_sent();
  comm().exchange_async(transfers)->wait();
  EXPECT_EQ(comm().bytes_sent(), expected_bytes);
  for (int q = 0; q < p; ++q)
    for (int k = 0; k < 2; ++k) {
      std::vector<int32_t> want(size_t(length(k, q, r)));
      for (int64_t i = 0; i < int64_t(want.size()); ++i) want[size_t(i)] = transfer_value(q, r, k, i);
      EXPECT_EQ(download<int32_t>(recvs[size_t(2 * q + k)].t), want) << "from rank " << q << ", transfer " << k;
    }
}

// Blocking send and receive around a ring, in BF16 bits: even ranks send first, odd ranks
// receive first, so no wait cycle forms even without MPI's buffering of small messages
// (with an odd ring, rank 0 sends to rank 1, which receives first, before receiving from
// rank p-1). Then a ring shift each way in F64, as two exchanges in flight together,
// waited in reverse order.
TEST_P(WorldComm, SendRecvRing) {
  const int p = comm().size(), r = comm().rank();
  const int right = (r + 1) % p, left = (r + p - 1) % p;
  const int64_t n = 33;
  std::vector<uint16_t> bits(n), want_bits(n);
  std::vector<double> wide(n), want_wide(n);
  for (int64_t i = 0; i < n; ++i) {
    bits[size_t(i)] = uint16_t(r * 977 + i * 13 + 1);
    want_bits[size_t(i)] = uint16_t(left * 977 + i * 13 + 1);
    wide[size_t(i)] = r + i / 8.0;
    want_wide[size_t(i)] = left + i / 8.0;
  }
  DeviceArray sb = upload(DType::BF16, bits), rb = device_array(DType::BF16, n);
  DeviceArray sw = upload(DType::F64, wide), rw = device_array(DType::F64, n);
  if (p == 1) {
    // A rank sending to itself needs the receive in the same call.
    const PeerTransfer both[] = {PeerTransfer::send(sb.t, 0), PeerTransfer::recv(rb.t, 0)};
    comm().exchange_async(both)->wait();
  } else if (r % 2 == 0) {
    comm().send(sb.t, right);
    comm().recv(rb.t, left);
  } else {
    comm().recv(rb.t, left);
    comm().send(sb.t, right);
  }
  EXPECT_EQ(download<uint16_t>(rb.t), want_bits);
  const PeerTransfer forward[] = {PeerTransfer::send(sw.t, right), PeerTransfer::recv(rw.t, left)};
  DeviceArray back_send = upload(DType::F64, want_wide), back_recv = device_array(DType::F64, n);
  const PeerTransfer backward[] = {PeerTransfer::send(back_send.t, left), PeerTransfer::recv(back_recv.t, right)};
  auto first = comm().exchange_async(forward);
  auto second = comm().exchange_async(backward);
  second->wait();
  first->wait();
  EXPECT_EQ(download<double>(rw.t), want_wide);
  EXPECT_EQ(download<double>(back_recv.t), wide) << "the backward shift returns each rank its own values";
}

// Counts beyond 32 bits must arrive intact: result[q] = counts of peer q for this rank.
TEST_P(WorldComm, ExchangeCounts) {
  const int p = comm().size(), r = comm().rank();
  const int64_t big = int64_t{1} << 33;
  std::vector<int64_t> counts(p), expected(p);
  for (int q = 0; q < p; ++q) {
    counts[q] = big + r * 100 + q;
    expected[q] = big + q * 100 + r;
  }
  EXPECT_EQ(comm().exchange_counts(counts), expected);
}

// ---- broadcast ---------------------------------------------------------------------------
template <typename T>
void check_broadcast(Communicator& c, DType dt, int root) {
  const int p = c.size(), r = c.rank();
  const int64_t n = 19;
  std::vector<T> host(n), expected(n);
  for (int64_t i = 0; i < n; ++i) {
    expected[i] = static_cast<T>(root * 100 + i + 0.5);
    host[i] = r == root ? expected[i] : static_cast<T>(-1);
  }
  DeviceArray x = upload(dt, host);
  c.reset_bytes_sent();
  c.broadcast(x.t, root);
  const uint64_t sent = c.bytes_sent();
  EXPECT_EQ(download<T>(x.t), expected) << dtype_name(dt) << " root " << root;
  const uint64_t bytes = n * sizeof(T);
  EXPECT_EQ(sent, p > 1 && r == root ? bytes : 0) << dtype_name(dt) << " root " << root;
}

TEST_P(WorldComm, Broadcast) {
  const int last = comm().size() - 1;
  check_broadcast<float>(comm(), DType::F32, 0);
  check_broadcast<float>(comm(), DType::F32, last);
  check_broadcast<double>(comm(), DType::F64, last);
  check_broadcast<int32_t>(comm(), DType::I32, 0);
}

// ---- host collectives and barrier --------------------------------------------------------
TEST_P(WorldComm, AllReduceHost) {
  const int p = comm().size(), r = comm().rank();
  for (ReduceOp op : {ReduceOp::SUM, ReduceOp::MAX}) {
    std::vector<double> values(5), expected(5);
    for (int i = 0; i < 5; ++i) {
      values[i] = 0.5 * (r + 1) * (i + 1);  // halves: exact in double
      expected[i] = op == ReduceOp::SUM ? 0.5 * (i + 1) * p * (p + 1) / 2 : 0.5 * (i + 1) * p;
    }
    comm().all_reduce_host(values, op);
    EXPECT_EQ(values, expected) << op_name(op);
  }
}

// A barrier completes, and the communicator is still usable after it.
TEST_P(WorldComm, Barrier) {
  comm().barrier();
  comm().barrier();
  std::vector<double> v{1.0};
  comm().all_reduce_host(v, ReduceOp::SUM);
  EXPECT_EQ(v[0], double(comm().size()));
}

INSTANTIATE_TEST_SUITE_P(Kinds, WorldComm, ::testing::Values("mpi", "nccl"), param_name);

// ---- ParallelDims::make (pure, no communication) -------------------------------------------
// A sdmoe::Error whose message names every field in `fields` as a whole word (so "tp" is
// not satisfied by "etp").
void expect_error(const std::function<void()>& f, const std::vector<std::string>& fields,
                  const std::string& what) {
  try {
    f();
    ADD_FAILURE() << what << ": no sdmoe::Error thrown";
  } catch (const Error& e) {
    for (const std::string& field : fields)
      EXPECT_TRUE(std::regex_search(e.what(), std::regex("\\b" + field + "\\b")))
          << what << ": message does not name '" << field << "': " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw a non-sdmoe::Error: " << e.what();
  }
}

class ParallelDimsTest : public CollectiveTest {};

TEST_F(ParallelDimsTest, ValidCombinationsAndCoordinates) {
  int checked = 0;
  for (int world : {1, 2, 3, 4, 6, 8, 16})
    for (int tp : {1, 2, 4, 8})
      for (int ep : {1, 2, 4, 8})
        for (int etp : {1, 2, 4, 8}) {
          if (world % tp != 0 || world % (ep * etp) != 0) continue;
          const std::string what = fmt::format("world {} tp {} ep {} etp {}", world, tp, ep, etp);
          ParallelDims d;
          try {
            d = ParallelDims::make(world, tp, ep, etp, 8);
          } catch (const std::exception& e) {
            ADD_FAILURE() << what << ": rejected: " << e.what();
            continue;
          }
          ++checked;
          EXPECT_EQ(d.world, world) << what;
          EXPECT_EQ(d.tp, tp) << what;
          EXPECT_EQ(d.dp, world / tp) << what;
          EXPECT_EQ(d.etp, etp) << what;
          EXPECT_EQ(d.ep, ep) << what;
          EXPECT_EQ(d.edp, world / (etp * ep)) << what;
          for (int rank = 0; rank < world; ++rank) {
            EXPECT_TRUE(d.tp_rank(rank) >= 0 && d.tp_rank(rank) < tp && d.dp_rank(rank) < d.dp) << what;
            EXPECT_TRUE(d.etp_rank(rank) < etp && d.ep_rank(rank) < ep && d.edp_rank(rank) < d.edp) << what;
            EXPECT_EQ(rank, d.dp_rank(rank) * tp + d.tp_rank(rank)) << what << " rank " << rank;
            EXPECT_EQ(rank, (d.edp_rank(rank) * ep + d.ep_rank(rank)) * etp + d.etp_rank(rank))
                << what << " rank " << rank;
          }
        }
  EXPECT_EQ(checked, 124);  // how many of the combinations above divide their world
  EXPECT_EQ(ParallelDims::make(8, 2, 4, 1, 8).describe(), "tp 2 x dp 4 | etp 1 x ep 4 x edp 2");
  const ParallelDims dp = ParallelDims::data_parallel(6);
  EXPECT_TRUE(dp.dp == 6 && dp.edp == 6 && dp.tp == 1 && dp.ep == 1 && dp.etp == 1);
}

TEST_F(ParallelDimsTest, InvalidCombinationsName) {
  expect_error([] { ParallelDims::make(6, 4, 1, 1, 8); }, {"tp"}, "tp 4 does not divide 6");
  expect_error([] { ParallelDims::make(8, 3, 1, 1, 8); }, {"tp"}, "tp 3 does not divide 8");
  expect_error([] { ParallelDims::make(4, 1, 2, 4, 8); }, {"etp", "ep"}, "etp*ep 8 does not divide 4");
  expect_error([] { ParallelDims::make(6, 1, 2, 2, 8); }, {"etp", "ep"}, "etp*ep 4 does not divide 6");
  expect_error([] { ParallelDims::make(8, 1, 4, 1, 6); }, {"ep"}, "ep 4 does not divide 6 experts");
  expect_error([] { ParallelDims::make(4, 1, 2, 1, 0); }, {"ep"}, "ep 2 without experts");
  expect_error([] { ParallelDims::make(4, 0, 1, 1, 8); }, {"tp"}, "tp 0");
  expect_error([] { ParallelDims::make(4, -2, 1, 1, 8); }, {"tp"}, "tp -2");
  expect_error([] { ParallelDims::make(4, 1, 0, 1, 8); }, {"ep"}, "ep 0");
  expect_error([] { ParallelDims::make(4, 1, -1, 1, 8); }, {"ep"}, "ep -1");
  expect_error([] { ParallelDims::make(4, 1, 1, 0, 8); }, {"etp"}, "etp 0");
  expect_error([] { ParallelDims::make(4, 1, 1, -4, 8); }, {"etp"}, "etp -4");
}

// ---- make_process_groups -----------------------------------------------------------------
class ProcessGroupsTest : public CollectiveTest, public ::testing::WithParamInterface<std::string> {
 protected:
  void SetUp() override {
    CollectiveTest::SetUp();
    if (IsSkipped()) return;
    if (GetParam() == "nccl" && !nccl_compiled()) GTEST_SKIP() << "NCCL not compiled in";
    if (GetParam() == "nccl" && !g_cuda_requested) GTEST_SKIP() << "NCCL needs --device=cuda";
  }
};

struct ExpectedGroup {
  const char* name;
  std::shared_ptr<Communicator> comm;
  std::vector<int> ranks;  // world ranks in group-rank order
  int position;            // this rank's index in `ranks`
};

// Every (tp, ep, etp) in {1,2,4,8}^3 that make() accepts for this world with 8 experts.
// Each group all-gathers its members' world ranks; the list must be exactly the one the
// numbering in parallel_dims.h predicts (written out here independently).
TEST_P(ProcessGroupsTest, GroupsMatchRankLayout) {
  const CommBackend kind = GetParam() == "nccl" ? CommBackend::NCCL : CommBackend::MPI;
  const int world = g_mpi->world_size(), r = g_mpi->world_rank();
  int layouts = 0;
  for (int tp : {1, 2, 4, 8})
    for (int ep : {1, 2, 4, 8})
      for (int etp : {1, 2, 4, 8}) {
        ParallelDims dims;
        try {
          dims = ParallelDims::make(world, tp, ep, etp, 8);
        } catch (const Error&) {
          continue;  // the same on every rank: no collective skipped unevenly
        }
        ++layouts;
        const std::string what = fmt::format("world {} tp {} ep {} etp {}", world, tp, ep, etp);
        const int dp = world / tp, edp = world / (etp * ep);
        const int tp_rank = r % tp, dp_rank = r / tp;
        const int etp_rank = r % etp, ep_rank = (r / etp) % ep, edp_rank = r / (etp * ep);

        ProcessGroups g = make_process_groups(dims, backend(), kind);
        EXPECT_TRUE(g.dims.tp == tp && g.dims.dp == dp && g.dims.ep == ep && g.dims.etp == etp &&
                    g.dims.edp == edp && g.dims.world == world)
            << what << ": dims " << g.dims.describe();
        std::vector<ExpectedGroup> groups = {
            {"world", g.world, {}, r},   {"tp", g.tp, {}, tp_rank},   {"dp", g.dp, {}, dp_rank},
            {"etp", g.etp, {}, etp_rank}, {"ep", g.ep, {}, ep_rank}, {"edp", g.edp, {}, edp_rank}};
        for (int i = 0; i < world; ++i) groups[0].ranks.push_back(i);
        for (int i = 0; i < tp; ++i) groups[1].ranks.push_back(dp_rank * tp + i);
        for (int j = 0; j < dp; ++j) groups[2].ranks.push_back(j * tp + tp_rank);
        for (int i = 0; i < etp; ++i) groups[3].ranks.push_back((edp_rank * ep + ep_rank) * etp + i);
        for (int i = 0; i < ep; ++i) groups[4].ranks.push_back((edp_rank * ep + i) * etp + etp_rank);
        for (int j = 0; j < edp; ++j) groups[5].ranks.push_back((j * ep + ep_rank) * etp + etp_rank);

        for (ExpectedGroup& e : groups) {
          if (!e.comm) {  // null on every rank alike, so no collective is skipped unevenly
            ADD_FAILURE() << what << ": group " << e.name << " is null";
            continue;
          }
          Communicator& c = *e.comm;
          // Sized by the group's own size() so the collective is consistent even if the
          // size is wrong; the comparison below then reports it.
          DeviceArray in = upload(DType::I32, std::vector<int32_t>{r});
          DeviceArray out = device_array(DType::I32, c.size());
          c.reset_bytes_sent();
          c.all_gather(in.t, out.t);
          const uint64_t sent = c.bytes_sent();
          const std::vector<int32_t> got = download<int32_t>(out.t);
          EXPECT_EQ(c.size(), static_cast<int>(e.ranks.size())) << what << " group " << e.name;
          EXPECT_EQ(std::vector<int>(got.begin(), got.end()), e.ranks) << what << " group " << e.name;
          EXPECT_EQ(c.rank(), e.position) << what << " group " << e.name;
          // A group of one may be a plain MPI communicator whatever the kind (no-ops).
          if (c.size() > 1) EXPECT_EQ(c.kind(), GetParam()) << what << " group " << e.name;
          // A group of one sends nothing; otherwise (p-1) blocks of 4 bytes.
          EXPECT_EQ(sent, uint64_t(4 * (c.size() - 1))) << what << " group " << e.name;
        }
      }
  EXPECT_GE(layouts, 1);
}

INSTANTIATE_TEST_SUITE_P(Kinds, ProcessGroupsTest, ::testing::Values("mpi", "nccl"), param_name);

// ---- output on ranks other than 0 ----------------------------------------------------------
// Rank 0 prints the usual gtest report; the others print only their failed assertions,
// tagged with the rank, so that a failure seen on rank 2 alone is not silent.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // The name is kept here: UnitTest::current_test_info() inside OnTestPartResult would
  // take gtest's (non-recursive) mutex a second time and deadlock.
  void OnTestStart(const ::testing::TestInfo& t) override {
    test_ = std::string(t.test_suite_name()) + "." + t.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] FAILED %s at %s:%d\n%s\n", rank_, test_.c_str(),
                 result.file_name() ? result.file_name() : "?", result.line_number(), result.message());
    std::fflush(stderr);
  }

 private:
  int rank_;
  std::string test_;
};

}  // namespace
}  // namespace sdmoe

int main(int argc, char** argv) {
  sdmoe::MpiRuntime mpi(&argc, &argv);
  sdmoe::g_mpi = &mpi;

  // --device=cpu|cuda, taken out of argv before gtest sees it.
  std::string device = "cpu";
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--device=", 0) == 0)
      device = arg.substr(9);
    else
      argv[kept++] = argv[i];
  }
  argc = kept;
  argv[argc] = nullptr;
  if (device != "cpu" && device != "cuda") {
    if (mpi.world_rank() == 0) std::fprintf(stderr, "--device must be cpu or cuda, not '%s'\n", device.c_str());
    return 2;
  }

  ::testing::InitGoogleTest(&argc, argv);
  ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (mpi.world_rank() != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new sdmoe::RankFailurePrinter(mpi.world_rank()));
  }

  if (device == "cuda") {
    sdmoe::g_cuda_requested = true;
    const int count = sdmoe::cuda_device_count();
    if (count == 0) {
      sdmoe::g_no_cuda_device = true;
    } else {
      sdmoe::g_backend = sdmoe::make_cuda_backend(mpi.local_rank() % count);
      if (!sdmoe::nccl_runnable()) {
        // See nccl_runnable: left out rather than skipped, so ctest still sees the result.
        std::string filter = ::testing::GTEST_FLAG(filter);
        filter += filter.find('-') == std::string::npos ? "-*/nccl" : ":*/nccl";
        ::testing::GTEST_FLAG(filter) = filter;
        if (mpi.world_rank() == 0)
          std::printf("NCCL variants left out: %s\n",
                      sdmoe::nccl_compiled() ? "ranks share a GPU" : "NCCL not compiled in");
      }
    }
  } else {
    sdmoe::g_backend = sdmoe::make_cpu_backend(1);
  }

  const int local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  sdmoe::g_backend.reset();
  // Every rank exits nonzero when any rank failed, and rank 0 says so even when its own
  // tests passed (the failing rank printed its assertions above).
  int any_failed = local_failed;
  MPI_Allreduce(&local_failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any_failed && !local_failed && mpi.world_rank() == 0)
    std::printf("[  FAILED  ] tests failed on another rank (see [rank N] lines)\n");
  return any_failed;
}
