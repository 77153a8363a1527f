// sdmoe_comm_bench: communication figures for the collectives sdmoe uses, on the CPU
// backend with the MPI communicator over MPI_COMM_WORLD. Run under mpirun:
//
//   mpirun -np N sdmoe_comm_bench [--tokens T] [--dim D] [--experts E] [--top-k K] [--reps R]
//
// Part 1: all-reduce, all-gather, reduce-scatter and all-to-all (even counts) of fp32
// buffers from 4 KiB to 64 MiB in powers of 4. Part 2: the MoE token dispatcher
// (count exchange, dispatch, combine) for one layer shape with random routing.
// Figures only; nothing is asserted (docs/performance.md, docs/parallelism.md).
//
// Definitions, as nccl-tests uses them so that figures compare:
//   size    all-reduce: the buffer; all-gather: the gathered output (p blocks);
//           reduce-scatter: the input (p blocks); all-to-all: the whole send buffer.
//   algbw   size / time.
//   busbw   bytes this rank sends under the bandwidth-optimal algorithm / time, where the
//           bytes are Communicator::bytes_sent() (ring all-reduce 2(p-1)/p size,
//           all-gather and reduce-scatter (p-1)/p size, all-to-all the (p-1)/p of the
//           send buffer bound for other ranks). It reads as the link speed the algorithm
//           achieved, independent of p.
//   time    the median over repetitions of the slowest rank's time: a collective is done
//           only when every rank is.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/check.h"
#include "core/cpu/cpu_backend.h"
#include "core/rng.h"
#include "parallel/communicator.h"
#include "parallel/token_dispatcher.h"

namespace {

using namespace sdmoe;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

constexpr int64_t kMinBytes = int64_t{4} << 10, kMaxBytes = int64_t{64} << 20;
// A (collective, size) pair stops repeating once its repetitions took this long (with at
// least kMinReps), so that 64 MiB on oversubscribed ranks does not run for minutes.
constexpr double kBudgetSeconds = 2.0;
constexpr int kMinReps = 3;
// One repetition runs several operations back to back when one takes less than this:
// for small messages the barrier's release skew and the clock would otherwise dominate.
constexpr double kMinRepSeconds = 1e-3;
constexpr int kMaxOpsPerRep = 64;

const char* kUsage =
    "usage: mpirun -np N sdmoe_comm_bench [--tokens T] [--dim D] [--experts E] [--top-k K] [--reps R]\n"
    "Times all-reduce, all-gather, reduce-scatter and all-to-all of fp32 buffers from 4 KiB to\n"
    "64 MiB (powers of 4) over MPI_COMM_WORLD with the MPI communicator on the CPU backend, and\n"
    "the MoE token dispatcher (count exchange + dispatch + combine) for T tokens of width D per\n"
    "rank routed at random to K of E experts spread over all ranks. Prints the median time of R\n"
    "repetitions after warm-up, algbw = size / time and busbw = bytes sent (bandwidth-optimal\n"
    "algorithm, as Communicator::bytes_sent counts them) / time, as nccl-tests defines them.\n"
    "Defaults: --tokens 1024 --dim 192 --experts 8 --top-k 2 --reps 9. E must be a multiple of N.\n";

struct Options {
  int64_t tokens = 1024, dim = 192;
  int64_t experts = 8, top_k = 2;
  int64_t reps = 9;
};

// Returns "" on success, else the one-line error. Checks that need the world size come
// later, identically on every rank.
std::string parse(int argc, char** argv, Options& o, bool& help) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help = true;
      return "";
    }
    int64_t* target = arg == "--tokens"  ? &o.tokens
                      : arg == "--dim"     ? &o.dim
                      : arg == "--experts" ? &o.experts
                      : arg == "--top-k"   ? &o.top_k
                      : arg == "--reps"    ? &o.reps
                                           : nullptr;
    if (!target) return fmt::format("unknown argument '{}' (see --help)", arg);
    if (i + 1 >= argc) return fmt::format("{} needs a value", arg);
    const std::string value = argv[++i];
    char* end = nullptr;
    const long long v = std::strtoll(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || v < 1 || v > (int64_t{1} << 30))
      return fmt::format("{} needs a positive integer, got '{}'", arg, value);
    *target = v;
  }
  if (o.top_k > o.experts) return fmt::format("--top-k ({}) must not exceed --experts ({})", o.top_k, o.experts);
  return "";
}

// The median; the list is short and ours.
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The slowest rank's value, on every rank (so that every rank takes the same decisions).
double slowest(Communicator& comm, double seconds) {
  std::vector<double> v{seconds};
  comm.all_reduce_host(v, ReduceOp::MAX);
  return v[0];
}

struct Timing {
  double seconds = 0.0;  // per operation, median over repetitions
  uint64_t bytes = 0;    // bytes_sent of one operation on this rank
  int reps = 0, ops_per_rep = 1;
};

// Times `op`, a collective every rank calls identically. Two untimed calls first: they
// fault in the pages and let MPI set up its shared-memory segments and pick protocols.
Timing time_collective(Communicator& comm, int reps, const std::function<void()>& op) {
  op();
  comm.barrier();
  auto start = Clock::now();
  op();
  const double once = slowest(comm, seconds_since(start));
  Timing t;
  t.ops_per_rep = int(std::clamp(kMinRepSeconds / std::max(once, 1e-9), 1.0, double(kMaxOpsPerRep)));
  std::vector<double> samples;
  double spent = 0.0;
  for (int r = 0; r < reps; ++r) {
    comm.barrier();
    comm.reset_bytes_sent();
    start = Clock::now();
    for (int i = 0; i < t.ops_per_rep; ++i) op();
    const double local = seconds_since(start);
    t.bytes = comm.bytes_sent() / uint64_t(t.ops_per_rep);
    const double s = slowest(comm, local);
    samples.push_back(s / t.ops_per_rep);
    spent += s;
    if (r + 1 >= kMinReps && spent > kBudgetSeconds) break;
  }
  t.seconds = median(samples);
  t.reps = int(samples.size());
  return t;
}

// ---- part 1: collectives ----------------------------------------------------------------

struct Row {
  int64_t size_bytes;
  Timing t;
};

void print_table(const char* name, const std::vector<Row>& rows) {
  std::printf("\n%s\n", name);
  std::printf("%12s %12s %12s %12s %12s %14s %6s\n", "size (B)", "sent/rank(B)", "time (us)", "algbw GB/s",
              "busbw GB/s", "busbw/largest", "reps");
  const double largest = double(rows.back().t.bytes) / rows.back().t.seconds;
  for (const Row& r : rows) {
    const double busbw = double(r.t.bytes) / r.t.seconds;
    std::printf("%12lld %12llu %12.1f %12.3f %12.3f %14.2f %3dx%-2d\n", (long long)r.size_bytes,
                (unsigned long long)r.t.bytes, r.t.seconds * 1e6, double(r.size_bytes) / r.t.seconds / 1e9,
                busbw / 1e9, largest > 0 ? busbw / largest : 0.0, r.t.reps, r.t.ops_per_rep);
  }
}

void bench_collectives(Communicator& comm, Backend& be, int reps, bool root) {
  const int p = comm.size();
  // Zeros: repeated in-place sums stay finite and never become denormals.
  Buffer a(be, size_t(kMaxBytes)), b(be, size_t(kMaxBytes));
  const Tensor whole_a(a.data(), DType::F32, be.device(), {kMaxBytes / 4});
  const Tensor whole_b(b.data(), DType::F32, be.device(), {kMaxBytes / 4});
  be.fill(whole_a, 0.0);
  be.fill(whole_b, 0.0);
  auto view = [&](const Buffer& buf, int64_t n) { return Tensor(buf.data(), DType::F32, be.device(), {n}); };

  std::vector<Row> reduce, gather, scatter, a2a;
  for (int64_t bytes = kMinBytes; bytes <= kMaxBytes; bytes *= 4) {
    // Blocked collectives need p equal blocks: the count is rounded down to a multiple of p.
    const int64_t n = bytes / 4, nb = n / p * p, block = nb / p;
    const Tensor x = view(a, n), in_full = view(a, nb), in_block = view(a, block), out_full = view(b, nb),
                 out_block = view(b, block);
    const std::vector<int64_t> counts(p, block);
    reduce.push_back({n * 4, time_collective(comm, reps, [&] { comm.all_reduce(x, ReduceOp::SUM); })});
    gather.push_back({nb * 4, time_collective(comm, reps, [&] { comm.all_gather(in_block, out_full); })});
    scatter.push_back(
        {nb * 4, time_collective(comm, reps, [&] { comm.reduce_scatter(in_full, out_block, ReduceOp::SUM); })});
    a2a.push_back({nb * 4, time_collective(comm, reps, [&] { comm.all_to_all(in_full, counts, out_full, counts); })});
  }
  if (!root) return;
  std::printf("\ncollectives: fp32, MPI communicator over MPI_COMM_WORLD (%d ranks), reps shown as RxOPS\n", p);
  print_table("all_reduce (SUM, in place; sent = 2(p-1)/p size)", reduce);
  print_table("all_gather (size = output; sent = (p-1) x block)", gather);
  print_table("reduce_scatter (SUM, size = input; sent = (p-1)/p size)", scatter);
  print_table("all_to_all (even counts, size = send buffer; sent = (p-1)/p size)", a2a);
}

// ---- part 2: the token dispatcher ---------------------------------------------------------

// Routing of one repetition: each token picks k distinct experts uniformly at random, as
// an untrained router roughly does; on average (p-1)/p of a rank's rows leave it.
std::vector<int64_t> random_rows_per_expert(const Options& o, int rank, int rep) {
  std::vector<int64_t> rows(o.experts, 0);
  std::vector<int64_t> chosen;
  for (int64_t t = 0; t < o.tokens; ++t) {
    chosen.clear();
    for (uint64_t draw = 0; int64_t(chosen.size()) < o.top_k; ++draw) {
      const int64_t e = int64_t(random_bits(uint64_t(rank) + 1, uint64_t(rep), uint64_t(t) * 1024 + draw) %
                                uint64_t(o.experts));
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    for (int64_t e : chosen) ++rows[e];
  }
  return rows;
}

void bench_dispatcher(const std::shared_ptr<Communicator>& comm, Backend& be, const Options& o, bool root) {
  const int p = comm->size(), rank = comm->rank();
  TokenDispatcher dispatcher(comm, nullptr, be, int(o.experts));
  const int64_t sent_rows = o.tokens * o.top_k, width = o.dim;
  Buffer sorted_buf(be, size_t(sent_rows * width * 4));
  const Tensor sorted(sorted_buf.data(), DType::F32, be.device(), {sent_rows, width});
  be.fill(sorted, 0.0);
  // Sized for even routing up front; grown (outside the timed phases) when a repetition
  // receives more rows.
  int64_t expert_capacity = sent_rows + sent_rows / 4;
  Buffer expert_buf(be, size_t(expert_capacity * width * 4));

  std::vector<double> t_counts, t_dispatch, t_combine, t_total;
  uint64_t dispatch_bytes = 0, combine_bytes = 0;
  int64_t received = 0;
  const int warmup = 2;
  double spent = 0.0;
  for (int rep = 0; rep < warmup + int(o.reps); ++rep) {
    const std::vector<int64_t> rows = random_rows_per_expert(o, rank, rep);
    comm->barrier();
    const auto start = Clock::now();
    dispatcher.exchange_counts(rows);
    const double c = seconds_since(start);
    // Growth is not timed: the model keeps a buffer that only grows, so steady-state steps
    // do not allocate.
    const int64_t need = dispatcher.received_rows();
    const auto pause = Clock::now();
    if (need > expert_capacity) {
      expert_capacity = need + need / 4;
      expert_buf = Buffer(be, size_t(expert_capacity * width * 4));
    }
    const double paused = seconds_since(pause);
    const Tensor expert_major(expert_buf.data(), DType::F32, be.device(), {std::max<int64_t>(need, 1), width});
    comm->reset_bytes_sent();
    const auto d0 = Clock::now();
    dispatcher.dispatch(sorted, expert_major);
    const double d = seconds_since(d0);
    const uint64_t db = comm->bytes_sent();
    comm->reset_bytes_sent();
    const auto c0 = Clock::now();
    dispatcher.combine(expert_major, sorted);
    const double cb = seconds_since(c0);
    const double total = seconds_since(start) - paused;
    const uint64_t bb = comm->bytes_sent();
    // Per phase, the slowest rank; then the slowest rank's whole sequence.
    std::vector<double> v{c, d, cb, total};
    comm->all_reduce_host(v, ReduceOp::MAX);
    if (rep < warmup) continue;
    t_counts.push_back(v[0]);
    t_dispatch.push_back(v[1]);
    t_combine.push_back(v[2]);
    t_total.push_back(v[3]);
    dispatch_bytes += db;
    combine_bytes += bb;
    received += need;
    spent += v[3];
    if (rep + 1 - warmup >= kMinReps && spent > kBudgetSeconds) break;
  }
  const int reps = int(t_total.size());
  // Bytes averaged over repetitions, then over ranks: routing is random per rank.
  std::vector<double> bytes{double(dispatch_bytes) / reps, double(combine_bytes) / reps, double(received) / reps};
  comm->all_reduce_host(bytes, ReduceOp::SUM);
  for (double& x : bytes) x /= p;
  // The busiest rank's received rows: the mean is T x K by conservation, the maximum shows
  // the imbalance that random routing leaves.
  std::vector<double> busiest{double(received) / reps};
  comm->all_reduce_host(busiest, ReduceOp::MAX);
  if (!root) return;
  const double row_bytes = double(width) * 4;
  const double expected = double(sent_rows) * double(p - 1) / double(p) * row_bytes;
  std::printf("\ntoken dispatcher: %lld tokens x dim %lld per rank, %lld experts (%lld per rank), top-%lld, "
              "random routing, fp32, ep = %d ranks\n",
              (long long)o.tokens, (long long)o.dim, (long long)o.experts, (long long)(o.experts / p),
              (long long)o.top_k, p);
  std::printf("  rows sent per rank: %lld (T x K); rows received per rank: %.1f on average, %.1f on the busiest rank\n",
              (long long)sent_rows, bytes[2], busiest[0]);
  std::printf("  bytes sent per rank to other ranks: dispatch %.0f, combine %.0f (uniform routing predicts "
              "T K (p-1)/p D 4 = %.0f each);\n  count exchange: E/p int64 to each peer = %lld B to others, not "
              "in bytes_sent\n",
              bytes[0], bytes[1], expected, (long long)((o.experts / p) * 8 * (p - 1)));
  std::printf("  %-34s %12s %12s\n", "phase (median of the slowest rank)", "time (us)", "busbw GB/s");
  auto line = [&](const char* name, const std::vector<double>& t, double b) {
    const double s = median(t);
    if (b > 0) std::printf("  %-34s %12.1f %12.3f\n", name, s * 1e6, b / s / 1e9);
    else std::printf("  %-34s %12.1f %12s\n", name, s * 1e6, "-");
  };
  line("exchange_counts (+ permutation)", t_counts, 0.0);
  line("dispatch (all-to-all + gather)", t_dispatch, bytes[0]);
  line("combine (gather + all-to-all)", t_combine, bytes[1]);
  line("total", t_total, bytes[0] + bytes[1]);
  std::printf("  %d repetitions after %d warm-up; one MoE layer's training step runs dispatch and combine twice\n"
              "  (forward and backward) and exchange_counts once%s\n",
              reps, warmup, p == 1 ? "; with 1 rank the dispatcher is local (copies only)" : "");
}

int run(int argc, char** argv, const MpiRuntime& mpi) {
  const bool root = mpi.world_rank() == 0;
  Options o;
  bool help = false;
  std::string error = parse(argc, argv, o, help);
  if (help) {
    if (root) std::printf("%s", kUsage);
    return 0;
  }
  const int p = mpi.world_size();
  if (error.empty() && o.experts % p != 0)
    error = fmt::format("--experts ({}) must be a multiple of the number of ranks ({})", o.experts, p);
  // Every rank must have the same arguments (the collectives' sizes come from them) and
  // none may have failed: agreed on, then every rank prints a line and exits.
  std::string args;
  for (int i = 1; i < argc; ++i) args += std::string(argv[i]) + '\0';
  const bool failed = mpi.any_rank(!error.empty());
  if (error.empty() && failed) error = "another rank's arguments are wrong (its message says why)";
  if (error.empty() && !mpi.same_on_every_rank(args)) error = "the ranks were given different arguments";
  if (!error.empty()) {
    std::fprintf(stderr, "sdmoe_comm_bench: error: %s\n", error.c_str());
    return 2;
  }
  // The CPU backend does the dispatcher's row gathers; split the node's cores among its ranks.
  const int threads = std::max(1, cpu_cores_available() / std::max(1, mpi.local_size()));
  std::unique_ptr<Backend> be = make_cpu_backend(threads);
  auto comm = std::make_shared<MpiCommunicator>(MPI_COMM_WORLD, *be);
  if (root) {
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(version, &len);
    std::string first_line(version, size_t(len));
    first_line = first_line.substr(0, first_line.find_first_of("\n,"));
    std::printf("sdmoe_comm_bench: %d rank(s), %d on this node, %s, %d CPU thread(s) per rank\n", p,
                mpi.local_size(), first_line.c_str(), threads);
    std::printf("time = median over repetitions of the slowest rank; busbw = bytes_sent / time (nccl-tests busbw)\n");
    std::fflush(stdout);
  }
  bench_collectives(*comm, *be, int(o.reps), root);
  if (root) std::fflush(stdout);
  bench_dispatcher(comm, *be, o, root);
  if (root) std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  sdmoe::MpiRuntime mpi(&argc, &argv);
  try {
    return run(argc, argv, mpi);
  } catch (const sdmoe::Error& e) {
    std::fprintf(stderr, "sdmoe_comm_bench: error: %s\n", e.what());
    return 2;
  }
}
