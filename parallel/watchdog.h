// The watchdog: ends a job whose ranks stop making progress, instead of letting it wait
// forever on a rank that hangs (a stalled GPU, file system or network, a stopped process).
//
// Each rank runs one watchdog thread. The main thread marks progress (a collective
// completed, a step finished, an evaluation batch or a checkpoint slab done); when a rank
// has made none for longer than `parallel.timeout_s`, it prints one line on stderr that
// names the rank, its host, the step, and the collective and group it is waiting in (or
// the phase it is computing in), aborts its NCCL communicators (so that kernels waiting on
// a dead peer end), and ends the job with MPI_Abort. The ranks still alive all report:
// the first one waits a short grace period before aborting, so that the others, blocked in
// the same collective, print their lines too. Which rank stalled is then the one whose
// line is missing, or the one that names a compute phase rather than a collective.
//
// Checkpoints are written into a partial directory that is renamed when complete, so an
// abort during a save leaves the previous `latest` intact.
//
// Collectives are watched through WatchedCommunicator, a decorator that every process
// group is wrapped in (watch_groups); it also accumulates the time spent inside
// collectives, which the trainer subtracts from the step time to compare the ranks'
// compute times (stragglers). On NCCL the host does not wait inside the collective calls
// but in the next device synchronisation, which the watchdog then reports as a compute
// phase after the last collective issued.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"

namespace sdmoe {

class Watchdog {
 public:
  // `tool` prefixes the line ("sdmoe_pretrain"); `host` is this rank's host name.
  Watchdog(double timeout_s, int world_rank, std::string host, std::string tool);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // The process's watchdog, or null before one exists: components that run long loops
  // without collectives (checkpoint I/O, evaluation) mark progress through it.
  static Watchdog* current();
  // current()->progress() when there is one.
  static void note_progress();

  // Marks, callable from the main thread at any rate (relaxed atomics).
  void progress();
  void set_step(int64_t step);  // the step now running, as the logs number it
  // What the rank is doing between collectives: a string with static storage duration.
  void set_phase(const char* phase);
  // A blocking collective: op and group name strings of static storage duration.
  void enter_collective(const char* op, const char* group, int group_size);
  void leave_collective();
  // Seconds spent inside collectives since the watchdog started.
  double collective_seconds() const;

  // Called before the process ends on a timeout (NCCL communicator aborts).
  void on_abort(std::shared_ptr<Communicator> comm);

  double timeout_s() const { return timeout_s_; }

 private:
  using Clock = std::chrono::steady_clock;
  static int64_t now_ns();
  void watch();
  [[noreturn]] void fire(double idle_seconds);

  const double timeout_s_;
  const int world_rank_;
  const std::string host_, tool_;
  std::atomic<int64_t> last_progress_ns_;
  std::atomic<int64_t> collective_start_ns_{0};  // 0: not inside a collective
  std::atomic<int64_t> collective_total_ns_{0};
  std::atomic<int64_t> step_{0};
  std::atomic<const char*> phase_{"start-up"};
  std::atomic<const char*> op_{""};
  std::atomic<const char*> group_{""};
  std::atomic<int> group_size_{0};
  std::atomic<bool> stop_{false};
  std::mutex abort_mutex_;
  std::vector<std::shared_ptr<Communicator>> abort_list_;
  std::thread thread_;
};

// A communicator whose every collective is reported to the watchdog: entered, left (which
// marks progress), and timed. `group` names the axis in the watchdog's line ("dp", "ep").
class WatchedCommunicator final : public Communicator {
 public:
  WatchedCommunicator(std::shared_ptr<Communicator> inner, std::string group, Watchdog& watchdog);
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string kind() const override { return inner_->kind(); }
  void all_reduce(const Tensor& x, ReduceOp op) override;
  void all_gather(const Tensor& in, const Tensor& out) override;
  void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) override;
  void all_to_all(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                  std::span<const int64_t> recv_counts) override;
  void broadcast(const Tensor& x, int root) override;
  void barrier() override;
  std::unique_ptr<PendingCollective> all_reduce_async(const Tensor& x, ReduceOp op) override;
  std::unique_ptr<PendingCollective> reduce_scatter_async(const Tensor& in, const Tensor& out, ReduceOp op) override;
  std::unique_ptr<PendingCollective> all_gather_async(const Tensor& in, const Tensor& out) override;
  std::unique_ptr<PendingCollective> all_to_all_async(const Tensor& send, std::span<const int64_t> send_counts,
                                                      const Tensor& recv, std::span<const int64_t> recv_counts) override;
  std::unique_ptr<PendingCollective> exchange_async(std::span<const PeerTransfer> transfers) override;
  void all_reduce_host(std::vector<double>& values, ReduceOp op) override;
  std::vector<int64_t> exchange_counts(std::span<const int64_t> counts) override;
  void abort() override { inner_->abort(); }

 private:
  // Runs fn as one watched collective and counts the bytes the inner one sent.
  template <typename Fn>
  auto watched(const char* op, Fn&& fn);

  std::shared_ptr<Communicator> inner_;
  const std::string group_;  // the watchdog keeps a pointer to it while a collective runs
  Watchdog& watchdog_;
};

// Wraps every group of `groups` (the same communicator shared by several axes stays shared
// underneath) and registers the NCCL ones for abort. The watchdog must stop before the
// groups are destroyed (declare it after them).
void watch_groups(ProcessGroups& groups, Watchdog& watchdog);

// This process's host name (MPI_Get_processor_name), and every rank's in world-rank order
// (a collective over MPI_COMM_WORLD).
std::string host_name();
std::vector<std::string> all_host_names();

// Stragglers: each step, every rank's compute time (its step time less its time inside
// collectives: a rank waiting for a slow peer spends the difference in a collective) is
// shared over the world; a rank above `factor` x the (lower) median for kConsecutiveSteps steps in
// a row is a straggler, reported once when it becomes one and every 100 steps while it
// stays one.
class StragglerWatch {
 public:
  static constexpr int kConsecutiveSteps = 5;
  struct Spread {
    double min = 0.0, median = 0.0, max = 0.0;
    int slowest = 0;
    int straggler = -1;  // a rank to report at this step, else -1
    double straggler_seconds = 0.0;
  };
  StragglerWatch(double factor, int world_size) : factor_(factor), slow_steps_(size_t(world_size), 0) {}
  // Collective over `world`: every rank calls it once per step.
  Spread record(double compute_seconds, Communicator& world);

 private:
  double factor_;
  std::vector<int> slow_steps_;  // consecutive slow steps per rank
};

}  // namespace sdmoe
