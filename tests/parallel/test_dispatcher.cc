// TokenDispatcher under mpirun: the all-to-all dispatcher (ep > 1, and with etp > 1)
// against the local one (ep = etp = 1) on random routings.
//
//   mpirun -np N test_dispatcher --ep E --etp X
//
// Every rank routes its own random rows (a mixture of cases: uniform, all rows to one
// expert, some experts with none, no rows at all). Each row carries (expert, source rank,
// row index) in its first three columns, so the test checks where rows land:
//   - after dispatch, the rows in local expert j's block were all routed to that expert,
//     and every row routed to one of this rank's experts by any rank of its ep (and etp)
//     group is there exactly once, in (source, index) order within an expert;
//   - after "running the experts" (row -> row * (e + 1) + e, split over the etp parts so
//     that only the sum over etp is the full value) and combine, every row holds what the
//     local dispatcher gives for it: exactly, since all values are small integers;
//   - the same with two micro-batches in flight, each with its own Routing (both count
//     exchanges, both dispatches, then the combines in reverse order).
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "core/check.h"
#include "parallel/communicator.h"
#include "parallel/token_dispatcher.h"

namespace {

using namespace sdmoe;

constexpr int kExperts = 8, kWidth = 5;

// Rows per expert for routing case `c` on rank `rank`.
std::vector<int64_t> routing(int c, int rank, int trial) {
  std::mt19937 gen(1000 * c + 31 * rank + trial);
  std::vector<int64_t> rows(kExperts, 0);
  switch (c) {
    case 0:  // uniform random
      for (auto& r : rows) r = std::uniform_int_distribution<int>(0, 9)(gen);
      break;
    case 1:  // all rows to one expert, the same on every rank
      rows[5] = 17;
      break;
    case 2:  // all rows to an expert that depends on the rank
      rows[rank % kExperts] = 11;
      break;
    case 3:  // half the experts receive nothing
      for (int e = 0; e < kExperts; e += 2) rows[e] = std::uniform_int_distribution<int>(1, 6)(gen);
      break;
    default:  // this rank sends nothing
      break;
  }
  return rows;
}

int run(int argc, char** argv) {
  int ep = 1, etp = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--ep")) ep = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--etp")) etp = std::atoi(argv[i + 1]);
  }
  int world = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  auto be = make_cpu_backend(1);
  const ParallelDims dims = ParallelDims::make(world, 1, ep, etp, kExperts);
  ProcessGroups groups = make_process_groups(dims, *be);
  TokenDispatcher dispatcher(groups.ep, groups.etp, *be, kExperts);
  // The ranks whose rows can reach this rank's experts: its ep group, for each etp peer.
  std::vector<int32_t> ep_members(ep), etp_members(etp);
  {
    Buffer one(*be, 4), all_ep(*be, 4 * ep), all_etp(*be, 4 * etp);
    const Tensor me(one.data(), DType::I32, Device::CPU, {1});
    std::memcpy(one.data(), &rank, 4);
    groups.ep->all_gather(me, Tensor(all_ep.data(), DType::I32, Device::CPU, {ep}));
    groups.etp->all_gather(me, Tensor(all_etp.data(), DType::I32, Device::CPU, {etp}));
    std::memcpy(ep_members.data(), all_ep.data(), 4 * ep);
    std::memcpy(etp_members.data(), all_etp.data(), 4 * etp);
  }

  int failures = 0;
  auto fail_case = [&](int c, int trial, const std::string& what) {
    std::fprintf(stderr, "rank %d case %d trial %d: %s\n", rank, c, trial, what.c_str());
    ++failures;
  };
  for (int c = 0; c < 5; ++c)
    for (int trial = 0; trial < 3; ++trial) {
      const std::vector<int64_t> rows_per_expert = routing(c, rank, trial);
      int64_t n = 0;
      for (int64_t r : rows_per_expert) n += r;
      // This rank's rows, sorted by expert: (expert, source, index, two payload columns).
      std::vector<float> sorted(std::max<int64_t>(n, 1) * kWidth);
      for (int e = 0, row = 0; e < kExperts; ++e)
        for (int64_t i = 0; i < rows_per_expert[e]; ++i, ++row) {
          float* x = &sorted[row * kWidth];
          x[0] = float(e), x[1] = float(rank), x[2] = float(row), x[3] = float(trial + 1), x[4] = float(row % 7);
        }
      dispatcher.exchange_counts(rows_per_expert);
      const int64_t received = dispatcher.received_rows();
      Buffer in(*be, std::max<int64_t>(n, 1) * kWidth * 4), out(*be, std::max<int64_t>(n, 1) * kWidth * 4),
          mid(*be, std::max<int64_t>(received, 1) * kWidth * 4);
      const Tensor t_in(in.data(), DType::F32, Device::CPU, {n, kWidth}),
          t_out(out.data(), DType::F32, Device::CPU, {n, kWidth}),
          t_mid(mid.data(), DType::F32, Device::CPU, {received, kWidth});
      std::memcpy(in.data(), sorted.data(), size_t(n) * kWidth * 4);
      dispatcher.dispatch(t_in, t_mid);

      // Where the rows landed: expert blocks, expected rows in (source, index) order.
      const std::vector<int64_t>& offsets = dispatcher.local_expert_offsets();
      float* m = static_cast<float*>(mid.data());
      for (int j = 0; j < dispatcher.local_experts(); ++j) {
        const int e = dispatcher.first_local_expert() + j;
        std::vector<std::pair<float, float>> got, want;
        for (int64_t r = offsets[j]; r < offsets[j + 1]; ++r) {
          if (m[r * kWidth] != float(e)) fail_case(c, trial, "a row routed elsewhere is in expert " + std::to_string(e));
          got.emplace_back(m[r * kWidth + 1], m[r * kWidth + 2]);
        }
        // Every rank of this rank's ep group, for every etp peer, sends its rows for e.
        std::vector<int32_t> sources;
        for (int32_t peer_of_etp : etp_members)
          for (int32_t p : ep_members) sources.push_back(p - rank + peer_of_etp);
        std::sort(sources.begin(), sources.end());
        for (int32_t src : sources) {
          const std::vector<int64_t> theirs = routing(c, src, trial);
          int64_t first = 0;
          for (int x = 0; x < e; ++x) first += theirs[x];
          for (int64_t i = 0; i < theirs[e]; ++i) want.emplace_back(float(src), float(first + i));
        }
        std::vector<std::pair<float, float>> got_sorted = got;
        std::sort(got_sorted.begin(), got_sorted.end());
        if (got_sorted != want) fail_case(c, trial, "expert " + std::to_string(e) + " did not receive its rows");
      }
      // "Experts": y = x * (e + 1) + e, each etp part computing 1/etp of it.
      for (int64_t r = 0; r < received; ++r) {
        const float e = m[r * kWidth];
        for (int k = 0; k < kWidth; ++k) m[r * kWidth + k] = (m[r * kWidth + k] * (e + 1) + e) / float(etp);
      }
      dispatcher.combine(t_mid, t_out);
      const float* y = static_cast<const float*>(out.data());
      for (int64_t r = 0; r < n; ++r)
        for (int k = 0; k < kWidth; ++k) {
          const float x = sorted[r * kWidth + k], e = sorted[r * kWidth];
          if (y[r * kWidth + k] != x * (e + 1) + e) {
            fail_case(c, trial, "row " + std::to_string(r) + " came back wrong");
            r = n;
            break;
          }
        }
    }
  // Two micro-batches in flight, each with its own Routing: both count exchanges first,
  // then both dispatches, then the combines in reverse order. Each must come back as it
  // does alone (the rows' values tell the micro-batches apart: column 3 is trial + 1).
  for (int c = 0; c < 5; ++c) {
    TokenDispatcher::Routing first, second;
    std::vector<std::vector<float>> sorted(2), mids(2), outs(2);
    std::vector<int64_t> n(2, 0);
    for (int b = 0; b < 2; ++b) {
      const std::vector<int64_t> rows_per_expert = routing(c, rank, b);
      for (int64_t r : rows_per_expert) n[b] += r;
      sorted[b].assign(std::max<int64_t>(n[b], 1) * kWidth, 0.0f);
      for (int e = 0, row = 0; e < kExperts; ++e)
        for (int64_t i = 0; i < rows_per_expert[e]; ++i, ++row) {
          float* x = &sorted[b][row * kWidth];
          x[0] = float(e), x[1] = float(rank), x[2] = float(row), x[3] = float(b + 1), x[4] = float(row % 5);
        }
      dispatcher.exchange_counts(b == 0 ? first : second, rows_per_expert);
    }
    auto rows_tensor = [](std::vector<float>& v, int64_t rows) {
      return Tensor(v.data(), DType::F32, Device::CPU, {rows, kWidth});
    };
    for (int b = 0; b < 2; ++b) {
      const TokenDispatcher::Routing& r = b == 0 ? first : second;
      mids[b].assign(std::max<int64_t>(r.received_rows(), 1) * kWidth, 0.0f);
      outs[b].assign(std::max<int64_t>(n[b], 1) * kWidth, 0.0f);
      dispatcher.dispatch(r, rows_tensor(sorted[b], n[b]), rows_tensor(mids[b], r.received_rows()));
      for (int64_t row = 0; row < r.received_rows(); ++row) {
        float* m = &mids[b][row * kWidth];
        const float e = m[0];
        for (int k = 0; k < kWidth; ++k) m[k] = (m[k] * (e + 1) + e) / float(etp);
      }
    }
    for (int b = 1; b >= 0; --b) {
      const TokenDispatcher::Routing& r = b == 0 ? first : second;
      dispatcher.combine(r, rows_tensor(mids[b], r.received_rows()), rows_tensor(outs[b], n[b]));
    }
    for (int b = 0; b < 2; ++b)
      for (int64_t row = 0; row < n[b]; ++row) {
        bool ok = true;
        for (int k = 0; k < kWidth; ++k) {
          const float x = sorted[b][row * kWidth + k], e = sorted[b][row * kWidth];
          ok = ok && outs[b][row * kWidth + k] == x * (e + 1) + e;
        }
        if (!ok) {
          fail_case(c, b, "with two micro-batches in flight, row " + std::to_string(row) + " came back wrong");
          break;
        }
      }
  }

  std::vector<double> total{double(failures)};
  groups.world->all_reduce_host(total, ReduceOp::SUM);
  if (rank == 0)
    std::printf("%s: dispatcher over %s, 5 routing cases x 3 trials, and 2 routings in flight\n", total[0] == 0 ? "PASS" : "FAIL",
                dims.describe().c_str());
  return total[0] == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  sdmoe::MpiRuntime mpi(&argc, &argv);
  try {
    return run(argc, argv);
  } catch (const sdmoe::Error& e) {
    std::fprintf(stderr, "test_dispatcher: error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return 2;
}
