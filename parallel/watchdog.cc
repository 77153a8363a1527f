#include "parallel/watchdog.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>

#include "core/check.h"

namespace sdmoe {

namespace {

std::atomic<Watchdog*> the_watchdog{nullptr};

// A pending collective whose wait() is watched like a blocking collective.
class WatchedPending final : public PendingCollective {
 public:
  WatchedPending(std::unique_ptr<PendingCollective> inner, const char* op, const char* group, int size,
                 Watchdog& watchdog)
      : inner_(std::move(inner)), op_(op), group_(group), size_(size), watchdog_(watchdog) {}
  void wait() override {
    watchdog_.enter_collective(op_, group_, size_);
    inner_->wait();
    watchdog_.leave_collective();
  }

 private:
  std::unique_ptr<PendingCollective> inner_;
  const char *op_, *group_;
  int size_;
  Watchdog& watchdog_;
};

}  // namespace

// ---- Watchdog -------------------------------------------------------------------------

Watchdog::Watchdog(double timeout_s, int world_rank, std::string host, std::string tool)
    : timeout_s_(timeout_s), world_rank_(world_rank), host_(std::move(host)), tool_(std::move(tool)),
      last_progress_ns_(now_ns()) {
  SDMOE_ASSERT(timeout_s > 0, "watchdog timeout {} s must be positive", timeout_s);
  Watchdog* expected = nullptr;
  SDMOE_ASSERT(the_watchdog.compare_exchange_strong(expected, this), "a second watchdog in one process");
  thread_ = std::thread([this] { watch(); });
}

Watchdog::~Watchdog() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  the_watchdog = nullptr;
}

Watchdog* Watchdog::current() { return the_watchdog.load(); }

void Watchdog::note_progress() {
  if (Watchdog* w = current()) w->progress();
}

int64_t Watchdog::now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

void Watchdog::progress() { last_progress_ns_.store(now_ns(), std::memory_order_relaxed); }

void Watchdog::set_step(int64_t step) { step_.store(step, std::memory_order_relaxed); }

void Watchdog::set_phase(const char* phase) {
  phase_.store(phase, std::memory_order_relaxed);
  progress();
}

void Watchdog::enter_collective(const char* op, const char* group, int group_size) {
  op_.store(op, std::memory_order_relaxed);
  group_.store(group, std::memory_order_relaxed);
  group_size_.store(group_size, std::memory_order_relaxed);
  collective_start_ns_.store(now_ns(), std::memory_order_release);
}

void Watchdog::leave_collective() {
  const int64_t now = now_ns(), start = collective_start_ns_.exchange(0, std::memory_order_acq_rel);
  if (start != 0) collective_total_ns_.fetch_add(now - start, std::memory_order_relaxed);
  last_progress_ns_.store(now, std::memory_order_relaxed);
}

double Watchdog::collective_seconds() const {
  int64_t total = collective_total_ns_.load(std::memory_order_relaxed);
  const int64_t start = collective_start_ns_.load(std::memory_order_acquire);
  if (start != 0) total += now_ns() - start;
  return double(total) * 1e-9;
}

void Watchdog::on_abort(std::shared_ptr<Communicator> comm) {
  std::lock_guard<std::mutex> lock(abort_mutex_);
  abort_list_.push_back(std::move(comm));
}

void Watchdog::watch() {
  // Checks a few times per timeout, at most once a second: a report comes at most 25%
  // late, and an idle job costs nothing measurable.
  const auto period = std::chrono::duration<double>(std::clamp(timeout_s_ / 4.0, 0.05, 1.0));
  while (!stop_.load()) {
    std::this_thread::sleep_for(period);
    const double idle = double(now_ns() - last_progress_ns_.load(std::memory_order_relaxed)) * 1e-9;
    if (idle > timeout_s_ && !stop_.load()) fire(idle);
  }
}

void Watchdog::fire(double idle_seconds) {
  const int64_t in_collective = collective_start_ns_.load(std::memory_order_acquire);
  std::string where;
  if (in_collective != 0)
    where = fmt::format("waiting in {} on {} ({} ranks) for {:.1f} s; a rank of that group has stopped or died",
                        op_.load(), group_.load(), group_size_.load(), double(now_ns() - in_collective) * 1e-9);
  else
    where = fmt::format("no progress for {:.1f} s in {}{}{}", idle_seconds, phase_.load(),
                        *op_.load() ? fmt::format(" (last collective: {} on {})", op_.load(), group_.load()) : "",
                        "; this rank may be the one that hangs");
  std::fprintf(stderr, "%s: error: watchdog: rank %d (%s) at step %ld: %s (parallel.timeout_s = %g); ending the job\n",
               tool_.c_str(), world_rank_, host_.c_str(), long(step_.load()), where.c_str(), timeout_s_);
  std::fflush(stderr);
  {
    std::lock_guard<std::mutex> lock(abort_mutex_);
    for (auto& comm : abort_list_) comm->abort();
  }
  // The other live ranks are blocked in the same collective and reach their timeout within
  // a check period or so: give them time to print their lines before the job ends.
  std::this_thread::sleep_for(std::chrono::duration<double>(std::min(5.0, std::max(1.0, timeout_s_ / 4.0))));
  // MPI_Abort ends every rank of the job, also one that is stopped; the main thread may be
  // inside MPI, but MPI_Abort is the one call meant for this.
  MPI_Abort(MPI_COMM_WORLD, 4);
  _exit(4);  // MPI_Abort does not return; should it, the job still ends with an error
}

// ---- WatchedCommunicator --------------------------------------------------------------

WatchedCommunicator::WatchedCommunicator(std::shared_ptr<Communicator> inner, std::string group, Watchdog& watchdog)
    : inner_(std::move(inner)), group_(std::move(group)), watchdog_(watchdog) {}

template <typename Fn>
auto WatchedCommunicator::watched(const char* op, Fn&& fn) {
  const uint64_t before = inner_->bytes_sent();
  watchdog_.enter_collective(op, group_.c_str(), inner_->size());
  struct Leave {
    WatchedCommunicator* self;
    uint64_t before;
    ~Leave() {
      self->watchdog_.leave_collective();
      self->bytes_sent_ += self->inner_->bytes_sent() - before;
    }
  } leave{this, before};
  return fn();
}

void WatchedCommunicator::all_reduce(const Tensor& x, ReduceOp op) {
  watched("all_reduce", [&] { inner_->all_reduce(x, op); });
}
void WatchedCommunicator::all_gather(const Tensor& in, const Tensor& out) {
  watched("all_gather", [&] { inner_->all_gather(in, out); });
}
void WatchedCommunicator::reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) {
  watched("reduce_scatter", [&] { inner_->reduce_scatter(in, out, op); });
}
void WatchedCommunicator::all_to_all(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                                     std::span<const int64_t> recv_counts) {
  watched("all_to_all", [&] { inner_->all_to_all(send, send_counts, recv, recv_counts); });
}
void WatchedCommunicator::broadcast(const Tensor& x, int root) {
  watched("broadcast", [&] { inner_->broadcast(x, root); });
}
void WatchedCommunicator::barrier() {
  watched("barrier", [&] { inner_->barrier(); });
}
std::unique_ptr<PendingCollective> WatchedCommunicator::all_reduce_async(const Tensor& x, ReduceOp op) {
  auto pending = watched("all_reduce (start)", [&] { return inner_->all_reduce_async(x, op); });
  return std::make_unique<WatchedPending>(std::move(pending), "all_reduce", group_.c_str(), inner_->size(), watchdog_);
}
std::unique_ptr<PendingCollective> WatchedCommunicator::reduce_scatter_async(const Tensor& in, const Tensor& out,
                                                                             ReduceOp op) {
  auto pending = watched("reduce_scatter (start)", [&] { return inner_->reduce_scatter_async(in, out, op); });
  return std::make_unique<WatchedPending>(std::move(pending), "reduce_scatter", group_.c_str(), inner_->size(), watchdog_);
}
std::unique_ptr<PendingCollective> WatchedCommunicator::all_gather_async(const Tensor& in, const Tensor& out) {
  auto pending = watched("all_gather (start)", [&] { return inner_->all_gather_async(in, out); });
  return std::make_unique<WatchedPending>(std::move(pending), "all_gather", group_.c_str(), inner_->size(), watchdog_);
}
std::unique_ptr<PendingCollective> WatchedCommunicator::all_to_all_async(const Tensor& send,
                                                                         std::span<const int64_t> send_counts,
                                                                         const Tensor& recv,
                                                                         std::span<const int64_t> recv_counts) {
  auto pending = watched("all_to_all (start)",
                         [&] { return inner_->all_to_all_async(send, send_counts, recv, recv_counts); });
  return std::make_unique<WatchedPending>(std::move(pending), "all_to_all", group_.c_str(), inner_->size(), watchdog_);
}
std::unique_ptr<PendingCollective> WatchedCommunicator::exchange_async(std::span<const PeerTransfer> transfers) {
  auto pending = watched("send/recv (start)", [&] { return inner_->exchange_async(transfers); });
  return std::make_unique<WatchedPending>(std::move(pending), "send/recv", group_.c_str(), inner_->size(), watchdog_);
}
void WatchedCommunicator::all_reduce_host(std::vector<double>& values, ReduceOp op) {
  watched("all_reduce (host values)", [&] { inner_->all_reduce_host(values, op); });
}
std::vector<int64_t> WatchedCommunicator::exchange_counts(std::span<const int64_t> counts) {
  return watched("exchange_counts", [&] { return inner_->exchange_counts(counts); });
}

// ---- groups ---------------------------------------------------------------------------

void watch_groups(ProcessGroups& groups, Watchdog& watchdog) {
  struct Axis {
    const char* name;
    std::shared_ptr<Communicator>* group;
  };
  Axis axes[] = {{"world", &groups.world}, {"tp", &groups.tp},   {"dp", &groups.dp},
                 {"etp", &groups.etp},     {"ep", &groups.ep},   {"edp", &groups.edp}};
  // One decorator per distinct communicator, named by every axis it serves ("dp=world"),
  // so that groups that shared one still do (the traffic figures count it once).
  std::map<Communicator*, std::string> names;
  for (const Axis& a : axes) {
    std::string& n = names[a.group->get()];
    n += (n.empty() ? "" : "=") + std::string(a.name);
  }
  std::map<Communicator*, std::shared_ptr<Communicator>> wrapped;
  for (const Axis& a : axes) {
    std::shared_ptr<Communicator>& w = wrapped[a.group->get()];
    if (!w) {
      w = std::make_shared<WatchedCommunicator>(*a.group, names[a.group->get()], watchdog);
      if ((*a.group)->kind() == "nccl") watchdog.on_abort(*a.group);
    }
    *a.group = w;
  }
}

std::string host_name() {
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int length = 0;
  if (MPI_Get_processor_name(name, &length) != MPI_SUCCESS) return "unknown host";
  return std::string(name, size_t(length));
}

std::vector<std::string> all_host_names() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::string mine = host_name();
  mine.resize(MPI_MAX_PROCESSOR_NAME, '\0');
  std::vector<char> all(size_t(size) * MPI_MAX_PROCESSOR_NAME);
  SDMOE_CHECK_MPI(MPI_Allgather(mine.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(), MPI_MAX_PROCESSOR_NAME,
                                MPI_CHAR, MPI_COMM_WORLD));
  std::vector<std::string> names;
  for (int r = 0; r < size; ++r) names.emplace_back(all.data() + size_t(r) * MPI_MAX_PROCESSOR_NAME);
  return names;
}

StragglerWatch::Spread StragglerWatch::record(double compute_seconds, Communicator& world) {
  std::vector<double> times(slow_steps_.size(), 0.0);
  times[size_t(world.rank())] = compute_seconds;
  world.all_reduce_host(times, ReduceOp::SUM);
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  Spread spread;
  spread.min = sorted.front();
  spread.max = sorted.back();
  // The lower median: with two ranks the faster one, so that one rank at twice the other's
  // time counts as slow (the mean of the two never lets it reach a factor above 1.33).
  spread.median = sorted[(sorted.size() - 1) / 2];
  spread.slowest = int(std::max_element(times.begin(), times.end()) - times.begin());
  for (size_t r = 0; r < times.size(); ++r) {
    slow_steps_[r] = times[r] > factor_ * spread.median ? slow_steps_[r] + 1 : 0;
    const int k = slow_steps_[r];
    // The slowest of this step's newly reported ranks, if several.
    if ((k == kConsecutiveSteps || (k > kConsecutiveSteps && (k - kConsecutiveSteps) % 100 == 0)) &&
        (spread.straggler < 0 || times[r] > spread.straggler_seconds)) {
      spread.straggler = int(r);
      spread.straggler_seconds = times[r];
    }
  }
  return spread;
}

}  // namespace sdmoe
