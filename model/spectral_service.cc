#include "model/spectral_service.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <functional>
#include <thread>

#include "core/check.h"

namespace sdmoe {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

struct SpectralService::Impl {
  static constexpr int64_t kScratchBudgetBytes = int64_t(256) << 20;
  SpectralDecomposition& sd;
  Backend& be;    // the training backend: collectives, install, metrics
  Backend& work;  // where the solvers run (its own stream on a GPU in async mode)
  Backend& ops() { return work; }
  DType dtype;
  int k;
  const ParamRegistry& registry;
  std::vector<int> router_ids;
  std::shared_ptr<Communicator> replicas, ep, etp;
  // The decomposition's targets as the solvers see them: its own, or, with experts split
  // over etp, whole matrices [experts, m_full, n_full] in the gathered buffers (first:
  // their offset there, stride m_full x n_full).
  const std::vector<SpectralTarget>& local_targets;
  const bool gathers;
  std::vector<SpectralTarget> targets;
  SpectralProjector projector;  // the service's own thin products, on `work` (no matrix scratch)
  // What the solvers read: the live flat buffers (region_base 0) or, in async mode,
  // snapshots of the expert region (region_base = its first element).
  Tensor live_params, live_grads;
  Tensor source_params, source_grads;
  int64_t region_base = 0;
  Buffer snapshot_params, snapshot_grads;
  // gathers: whole experts assembled from the etp slices, and the all-gather's buffers.
  Buffer whole_params, whole_grads, gather_send, gather_recv;
  std::thread worker;
  bool pending = false;
  int64_t pending_step = 0, pending_jobs = 0;
  // Whether the refresh in progress measures the gradients' subspaces (not at step 0, nor
  // right after a resume, where no gradient exists yet).
  bool with_gradients = false;
  double pending_seconds = 0.0;
  double pending_gather_comm = 0.0, pending_gather_blocking = 0.0;  // async with etp: the gather at the start

  // Exchange layout, per target: [shared pair (LAYER_SHARED) | per expert: full, tail, grad
  // pairs], each pair Ut [k, m] then Vt [k, n].
  std::vector<int64_t> shared_offset, expert_offset;
  int64_t exchange_elements = 0, expert_area_elements = 0;
  Buffer exchange, staging, gathered;
  // The previous refresh's shared exchange: its tail and gradient pairs warm-start this
  // refresh's metric bases (history_* says which kinds it holds).
  Buffer history;
  bool history_tails = false, history_grads = false;
  // Solver scratch, for up to max_batch experts solved together: Grams and eigenvectors
  // [batch, side, side], tails [batch, m, n], the batch's bases (Ut [batch, k, m] then
  // Vt [batch, k, n]) and the CholeskyQR temporaries.
  int64_t max_batch = 1;
  Buffer gram, eig_w, eig_vecs, tmp, pairs, small, small_inv, small_tmp;
  // Metric scratch: up to six packed basis kinds [experts, k, side] of a layer's experts
  // over the ep group, and their Gram matrices.
  int64_t largest_side = 1;
  Buffer packed, overlap_grams;

  double comm_seconds = 0.0;

  Impl(SpectralDecomposition& sd_in, Backend& work_in, const ParamRegistry& reg, Tensor p, Tensor g,
       std::vector<int> routers, std::shared_ptr<Communicator> rep, std::shared_ptr<Communicator> ep_in,
       std::shared_ptr<Communicator> etp_in)
      : sd(sd_in),
        be(sd_in.backend()),
        work(work_in),
        dtype(p.dtype),
        k(sd_in.spec().rank),
        registry(reg),
        router_ids(std::move(routers)),
        replicas(std::move(rep)),
        ep(std::move(ep_in)),
        etp(std::move(etp_in)),
        local_targets(sd_in.targets()),
        gathers(std::any_of(local_targets.begin(), local_targets.end(),
                            [](const SpectralTarget& t) { return t.split != SpectralTarget::Split::NONE; })),
        targets(solver_targets(local_targets, gathers)),
        projector(work_in, p.dtype, targets, sd_in.spec().rank, 0),
        live_params(p),
        live_grads(g),
        source_params(p),
        source_grads(g) {
    int64_t largest_mn = 1;
    for (const SpectralTarget& t : targets) {
      const int64_t pair = k * (t.m + t.n);
      shared_offset.push_back(exchange_elements);
      if (sd.spec().basis == SdmoeBasis::LAYER_SHARED) exchange_elements += pair;
      expert_offset.push_back(exchange_elements);
      exchange_elements += t.experts * 3 * pair;
      largest_mn = std::max(largest_mn, t.m * t.n);
      largest_side = std::max({largest_side, t.m, t.n});
    }
    auto alloc = [&](Buffer& b, int64_t elements) { b = Buffer(be, std::max<size_t>(size_t(elements) * width(), 64)); };
    alloc(exchange, exchange_elements);
    alloc(history, exchange_elements);
    alloc(staging, bases_elements(targets, k));
    const int ep_size = ep ? ep->size() : 1;
    alloc(gathered, exchange_elements * ep_size);
    int64_t layer_experts = 1;
    for (const SpectralTarget& t : targets) layer_experts = std::max(layer_experts, t.experts * ep_size);
    alloc(packed, 6 * layer_experts * k * largest_side);
    alloc(overlap_grams, 6 * (layer_experts * k) * (layer_experts * k));
    // Batches are bounded by a scratch budget, so very large experts go a few at a time.
    int64_t most_experts = 1;
    for (const SpectralTarget& t : targets) most_experts = std::max(most_experts, t.experts);
    const int64_t per_expert = (2 * largest_side * largest_side + largest_mn) * int64_t(width());
    max_batch = std::clamp<int64_t>(kScratchBudgetBytes / std::max<int64_t>(per_expert, 1), 1, most_experts);
    alloc(gram, max_batch * largest_side * largest_side);
    alloc(eig_w, max_batch * largest_side);
    alloc(eig_vecs, max_batch * largest_side * largest_side);
    alloc(tmp, std::max(max_batch * largest_mn, k * largest_side));
    alloc(pairs, max_batch * k * 2 * largest_side);
    alloc(small, max_batch * k * k);
    alloc(small_inv, max_batch * k * k);
    alloc(small_tmp, max_batch * k * largest_side);
    if (gathers) {
      SDMOE_ASSERT(etp, "SD-MoE experts are split over etp but the spectral service has no etp group");
      int64_t whole_elements = 0, largest_slices = 0;
      for (size_t ti = 0; ti < targets.size(); ++ti) {
        const SpectralTarget& t = local_targets[ti];
        SDMOE_ASSERT(t.split != SpectralTarget::Split::NONE, "layer {} {}: some expert matrices are split over etp, "
                     "this one is not", t.layer, sdmoe_matrix_name(t.matrix));
        const int64_t local = t.split == SpectralTarget::Split::ROWS ? t.m : t.n;
        SDMOE_ASSERT(t.split_first == etp->rank() * local, "layer {} {}: etp rank {} holds slice {} of width {}",
                     t.layer, sdmoe_matrix_name(t.matrix), etp->rank(), t.split_first, local);
        whole_elements += t.experts * t.m_full * t.n_full;
        largest_slices = std::max(largest_slices, t.experts * t.m * t.n);
      }
      alloc(whole_params, whole_elements);
      alloc(whole_grads, whole_elements);
      alloc(gather_send, largest_slices);
      alloc(gather_recv, largest_slices * etp->size());
    }
  }

  static std::vector<SpectralTarget> solver_targets(const std::vector<SpectralTarget>& local, bool gathers) {
    if (!gathers) return local;
    std::vector<SpectralTarget> out = local;
    int64_t offset = 0;
    for (SpectralTarget& t : out) {
      t.m = t.m_full;
      t.n = t.n_full;
      t.split = SpectralTarget::Split::NONE;
      t.split_first = 0;
      t.first = offset;
      t.stride = t.m * t.n;
      offset += t.experts * t.stride;
    }
    return out;
  }

  // gathers: every target's whole experts in `out` (whole_params or whole_grads layout),
  // from this rank's slices in `flat` (its element `base` is the region's first): one
  // all-gather over etp per target, then each rank's rows (or columns) put in place.
  void gather_whole(const Tensor& flat, int64_t base, const Buffer& out) {
    for (size_t ti = 0; ti < targets.size(); ++ti) {
      const SpectralTarget &t = local_targets[ti], &w = targets[ti];
      const int64_t mn = t.m * t.n, slices = t.experts * mn;
      if (slices == 0) continue;
      const Tensor send = at(whole(gather_send), 0, {slices}), recv = at(whole(gather_recv), 0, {slices * etp->size()});
      const int64_t first = registry.spec(t.param_id).offset + t.first - base;
      be.copy_rows(at(flat, first, {(t.experts - 1) * t.stride + mn}), t.stride, send, mn, t.experts, mn);
      timed_comm([&] { etp->all_gather(send, recv); });
      const Tensor dst = whole(out);
      for (int r = 0; r < etp->size(); ++r)
        for (int64_t e = 0; e < t.experts; ++e) {
          const int64_t from = r * slices + e * mn, to = w.first + e * w.stride;
          if (t.split == SpectralTarget::Split::ROWS) {
            be.copy(at(recv, from, {mn}), at(dst, to + r * mn, {mn}));  // rows r m .. (r + 1) m
          } else {  // each row's columns r n .. (r + 1) n
            be.copy_rows(at(recv, from, {mn}), t.n, at(dst, to + r * t.n, {(t.m - 1) * w.n + t.n}), w.n, t.m, t.n);
          }
        }
    }
  }
  // Reads the solvers' inputs from the whole experts (after gather_whole).
  void use_whole_experts() {
    source_params = whole(whole_params);
    source_grads = whole(whole_grads);
    region_base = 0;
  }

  size_t width() const { return dtype_size(dtype); }
  Tensor at(const Tensor& flat, int64_t offset, std::initializer_list<int64_t> shape) const {
    return Tensor(static_cast<char*>(flat.data) + offset * int64_t(width()), dtype, be.device(), shape);
  }
  Tensor whole(const Buffer& b) const {
    return Tensor(b.data(), dtype, be.device(), {int64_t(b.bytes() / width())});
  }
  // Host copies in double, whatever the model's dtype (F32, or F64 in tests).
  std::vector<double> to_host(const Tensor& x, Backend& via) const {
    std::vector<double> out(size_t(x.numel()));
    if (x.dtype == DType::F64) {
      via.copy_to_host(x, out.data());
    } else {
      SDMOE_ASSERT(x.dtype == DType::F32, "spectral service: unsupported dtype {}", dtype_name(x.dtype));
      std::vector<float> f(out.size());
      via.copy_to_host(x, f.data());
      std::copy(f.begin(), f.end(), out.begin());
    }
    return out;
  }
  static uint64_t seed_of(size_t target, int side) { return 0x2545f4914f6cdd1dULL + 7919 * target + side; }
  // The ranks that hold the same experts: the replicas, and with split experts the etp
  // group (whose ranks all gather the whole experts) within each replica.
  int replica_rank() const { return (replicas ? replicas->rank() : 0) * etp_count() + (gathers ? etp->rank() : 0); }
  int replica_count() const { return (replicas ? replicas->size() : 1) * etp_count(); }
  int etp_count() const { return gathers ? etp->size() : 1; }
  // Sums a result that one of the ranks holding the same experts wrote (zeros elsewhere).
  void share_over_replicas(const Tensor& x) {
    if (replicas) replicas->all_reduce(x, ReduceOp::SUM);
    if (gathers) etp->all_reduce(x, ReduceOp::SUM);
  }

  void timed_comm(const std::function<void()>& fn) {
    work.synchronize();
    be.synchronize();
    const auto start = Clock::now();
    fn();
    be.synchronize();
    comm_seconds += seconds_since(start);
  }

  // The rows of each y[b] [k, L] (y contiguous [count, k, L]) made orthonormal: CholeskyQR
  // twice (y <- L^{-1} y with y y^T = L L^T), all on the device and batched.
  void orthonormalize_rows(const Tensor& y, int64_t count, int64_t length) {
    const int64_t kk = int64_t(k) * k, kl = k * length;
    const Tensor g = at(whole(small), 0, {count, int64_t(k), int64_t(k)});
    const Tensor inv = at(whole(small_inv), 0, {count, int64_t(k), int64_t(k)});
    const Tensor out = at(whole(small_tmp), 0, {count * kl});
    // A rank-deficient y (a zero gradient) stays finite; the ridge is below the dtype's
    // rounding, so orthonormal rows stay orthonormal to that rounding.
    const double relative_ridge = dtype == DType::F64 ? 1e-26 : 1e-12;
    for (int pass = 0; pass < 2; ++pass) {
      ops().gemm(false, true, k, k, length, 1.0, y, y, 0.0, g, {count, kl, kl, kk});
      ops().cholesky_inverse(g, inv, relative_ridge);
      ops().gemm(false, false, k, length, k, 1.0, inv, y, 0.0, out, {count, kk, kl, kl});
      ops().copy(out, at(y, 0, {count * kl}));
    }
  }

  // Top-k singular subspaces of `count` matrices x[b] [m, n] (x[b] at x + b * x_stride):
  // rows of ut[b] [k, m] and vt[b] [k, n], ut and vt contiguous. warm: the previous right
  // bases (warm[b] at warm + b * warm_stride; stride 0 repeats one), for subspace
  // iteration; without it a seeded random start (seeds[b]). metric: a basis for the
  // metrics only (tails, gradients), always by subspace iteration: the overlap statistics
  // need no exact basis, and an exact solve per metric would triple a refresh's cost.
  void top_k(const Tensor& x, int64_t x_stride, int64_t m, int64_t n, int64_t count, const Tensor& ut,
             const Tensor& vt, const Tensor* warm, int64_t warm_stride, const std::vector<uint64_t>& seeds,
             bool metric = false) {
    const int64_t km = k * m, kn = k * n;
    if (sd.spec().solver == SdmoeSolver::EXACT && !metric) {
      // syevd of the Gram matrix of the smaller side (its top-k eigenvectors are the
      // top-k singular vectors of that side), then the other side's basis as the
      // orthonormalised image: span(W V_k) = span(U_k).
      const bool right = n <= m;
      const int64_t side = right ? n : m, other = right ? m : n, ss = side * side;
      const Tensor g = at(whole(gram), 0, {count, side, side});
      if (right) ops().gemm(true, false, n, n, m, 1.0, x, x, 0.0, g, {count, x_stride, x_stride, ss});  // W^T W
      else ops().gemm(false, true, m, m, n, 1.0, x, x, 0.0, g, {count, x_stride, x_stride, ss});        // W W^T
      const Tensor w = at(whole(eig_w), 0, {count, side}), vecs = at(whole(eig_vecs), 0, {count, side, side});
      ops().symmetric_eigen(g, w, vecs);  // ascending: the last k rows
      const Tensor top = right ? vt : ut, image = right ? ut : vt;
      ops().copy_rows(at(vecs, (side - k) * side, {(count - 1) * ss + k * side}), ss, at(top, 0, {count * k * side}),
                      k * side, count, k * side);
      if (right) ops().gemm(false, true, k, m, n, 1.0, vt, x, 0.0, ut, {count, kn, x_stride, km});  // Vt W^T
      else ops().gemm(false, false, k, n, m, 1.0, ut, x, 0.0, vt, {count, km, x_stride, kn});       // Ut W
      orthonormalize_rows(image, count, other);
      return;
    }
    int rounds = sd.spec().subspace_iterations;
    if (warm) {
      if (warm_stride == kn) ops().copy(at(*warm, 0, {count * kn}), at(vt, 0, {count * kn}));
      else if (warm_stride > 0) ops().copy_rows(*warm, warm_stride, at(vt, 0, {count * kn}), kn, count, kn);
      else
        for (int64_t b = 0; b < count; ++b) ops().copy(at(*warm, 0, {kn}), at(vt, b * kn, {kn}));
    } else {
      for (int64_t b = 0; b < count; ++b) ops().init_normal(at(vt, b * kn, {kn}), seeds[b], 0x5bd1e995, 1.0, 0);
      orthonormalize_rows(vt, count, n);
      rounds = 3 * rounds + 2;  // a cold start needs more rounds
    }
    for (int i = 0; i < rounds; ++i) {
      ops().gemm(false, true, k, m, n, 1.0, vt, x, 0.0, ut, {count, kn, x_stride, km});  // ut = vt x^T
      orthonormalize_rows(ut, count, m);
      ops().gemm(false, false, k, n, m, 1.0, ut, x, 0.0, vt, {count, km, x_stride, kn});  // vt = ut x
      orthonormalize_rows(vt, count, n);
    }
  }

  // Top-k eigenvectors (rows of out [k, size]) of the symmetric g [size, size].
  void top_k_symmetric(const Tensor& g, int64_t size, const Tensor& out, const Tensor* warm, uint64_t seed) {
    if (sd.spec().solver == SdmoeSolver::EXACT) {
      const Tensor w = at(whole(eig_w), 0, {size}), vecs = at(whole(eig_vecs), 0, {size, size});
      ops().symmetric_eigen(g, w, vecs);  // ascending: the last k rows
      ops().copy(at(vecs, (size - k) * size, {int64_t(k) * size}), at(out, 0, {int64_t(k) * size}));
      return;
    }
    int rounds = sd.spec().subspace_iterations;
    if (warm) {
      ops().copy(*warm, out);
    } else {
      ops().init_normal(out, seed, 0x5bd1e995, 1.0, 0);
      orthonormalize_rows(out, 1, size);
      rounds = 3 * rounds + 2;
    }
    const Tensor y = at(whole(tmp), 0, {int64_t(k), size});
    for (int i = 0; i < rounds; ++i) {
      ops().gemm(false, false, k, size, size, 1.0, out, g, 0.0, y);
      ops().copy(y, out);
      orthonormalize_rows(out, 1, size);
    }
  }

  Tensor pair_ut(int64_t offset, const SpectralTarget& t) const { return at(whole(exchange), offset, {int64_t(k), t.m}); }
  Tensor pair_vt(int64_t offset, const SpectralTarget& t) const {
    return at(whole(exchange), offset + k * t.m, {int64_t(k), t.n});
  }
  int64_t pair_elements(const SpectralTarget& t) const { return int64_t(k) * (t.m + t.n); }
  int64_t expert_pair(size_t ti, int64_t e, int which) const {
    return expert_offset[ti] + (e * 3 + which) * pair_elements(targets[ti]);
  }
  int64_t matrix_offset(const SpectralTarget& t, int64_t e) const {
    if (gathers) return t.first + e * t.stride;  // in the whole experts
    return registry.spec(t.param_id).offset + t.first + e * t.stride - region_base;
  }
  // Computes this rank's jobs of the refresh after `step` steps on a worker thread.
  void start_worker(int64_t step) {
    if (exchange_elements > 0) be.fill(at(whole(exchange), 0, {exchange_elements}), 0.0);
    be.synchronize();
    pending = true;
    pending_step = step;
    worker = std::thread([this, step] {
      work.bind_to_current_thread();  // its GPU (a new thread starts on device 0), its threads
      const auto start = Clock::now();
      pending_jobs = run_expert_jobs(step, true);
      pending_seconds = seconds_since(start);
    });
  }
  // Phase 2 of a refresh (no communication): the jobs of this rank's replica rank.
  int64_t run_expert_jobs(int64_t step, bool installed);
  void share_install_and_measure(int64_t step, const Tensor& m, RefreshReport& report);
  // Mean pairwise overlaps of the first `kinds` basis kinds (full, tail, grad x left,
  // right) of a layer's `experts` experts, gathered in `all`.
  std::vector<double> mean_overlaps(const SpectralTarget& t, const Tensor& all, int64_t experts, int kinds);
};

int64_t SpectralService::Impl::run_expert_jobs(int64_t step, bool installed) {
  // Per expert: its top-k (its new bases in PER_EXPERT mode), the top-k of its tail under
  // the new bases, and of its last gradient. Jobs are dealt to the replicas round robin
  // over (target, expert); a replica's experts of one target are then every R-th, at a
  // fixed stride in memory, and are solved together as strided batches.
  const bool shared = sd.spec().basis == SdmoeBasis::LAYER_SHARED;
  const Tensor exchange = whole(this->exchange);
  const Tensor current = sd.bases();
  const int64_t replicas_n = replica_count();
  int64_t jobs = 0, jobs_before = 0;
  for (size_t ti = 0; ti < targets.size(); ++ti) {
    const SpectralTarget& t = targets[ti];
    const int64_t mine = ((replica_rank() - jobs_before) % replicas_n + replicas_n) % replicas_n;
    jobs_before += t.experts;
    const int64_t km = k * t.m, kn = k * t.n;
    for (int64_t e0 = mine; e0 < t.experts; e0 += max_batch * replicas_n) {
      const int64_t count = std::min(max_batch, (t.experts - 1 - e0) / replicas_n + 1);
      jobs += count;
      const int64_t x_base = matrix_offset(t, e0), x_stride = replicas_n * t.stride;
      std::vector<uint64_t> seeds(static_cast<size_t>(count)), tail_seeds = seeds, grad_seeds = seeds;
      for (int64_t b = 0; b < count; ++b) {
        seeds[b] = 0x9e3779b97f4a7c15ULL ^ (uint64_t(ti) << 32) ^ uint64_t(t.first_expert + e0 + b * replicas_n);
        tail_seeds[b] = seeds[b] + 1;
        grad_seeds[b] = seeds[b] + 2;
      }
      const Tensor ut = at(whole(pairs), 0, {count * km}), vt = at(whole(pairs), count * km, {count * kn});
      // Results go to the exchange: expert e's pairs [full, tail, grad] at expert_pair(),
      // this batch's every 3 R pairs apart.
      const int64_t pair_stride = replicas_n * 3 * pair_elements(t), span = (count - 1) * pair_stride;
      auto publish = [&](int which) {
        const int64_t to = expert_pair(ti, e0, which);
        ops().copy_rows(ut, km, at(exchange, to, {span + km}), pair_stride, count, km);
        ops().copy_rows(vt, kn, at(exchange, to + km, {span + kn}), pair_stride, count, kn);
      };
      // The metric bases start from the previous refresh's right bases of the same kind.
      auto metric_warm = [&](int which) { return at(whole(history), expert_pair(ti, e0, which) + km, {span + kn}); };
      const Tensor x = at(source_params, x_base, {(count - 1) * x_stride + t.m * t.n});
      // Warm start from the installed bases, once there are any (a shared basis repeats).
      const Tensor warm = at(current, t.vt_offset + (t.bases > 1 ? e0 * kn : 0), {(t.bases > 1 ? t.bases - e0 : 1) * kn});
      top_k(x, x_stride, t.m, t.n, count, ut, vt, installed ? &warm : nullptr, t.bases > 1 ? replicas_n * kn : 0,
            seeds);
      publish(0);
      // The tails W - (common part) under the new bases: each expert's own (PER_EXPERT,
      // still in `pairs`) or the layer's (LAYER_SHARED, in the exchange).
      SpectralTarget batch = t;
      batch.experts = count;
      batch.bases = shared ? 1 : int(count);
      batch.ut_offset = shared ? shared_offset[ti] : 0;
      batch.vt_offset = shared ? shared_offset[ti] + km : count * km;
      const Tensor tails = at(whole(tmp), 0, {count, t.m, t.n});
      projector.project_unique(batch, shared ? exchange : whole(pairs), source_params, x_base, x_stride, tails);
      const Tensor tail_warm = metric_warm(1);
      top_k(tails, t.m * t.n, t.m, t.n, count, ut, vt, history_tails ? &tail_warm : nullptr, pair_stride, tail_seeds,
            true);
      publish(1);
      if (with_gradients) {
        const Tensor g = at(source_grads, x_base, {(count - 1) * x_stride + t.m * t.n});
        const Tensor grad_warm = metric_warm(2);
        top_k(g, x_stride, t.m, t.n, count, ut, vt, history_grads ? &grad_warm : nullptr, pair_stride, grad_seeds,
              true);
        publish(2);
      }
    }
  }
  ops().synchronize();
  return jobs;
}

void SpectralService::Impl::share_install_and_measure(int64_t step, const Tensor& m, RefreshReport& report) {
  SpectralService::Impl& s = *this;
  const Tensor exchange = whole(this->exchange);
  const bool shared = sd.spec().basis == SdmoeBasis::LAYER_SHARED;
  s.timed_comm([&] {
    for (size_t ti = 0; ti < s.targets.size(); ++ti) {
      const SpectralTarget& t = s.targets[ti];
      s.share_over_replicas(s.at(exchange, s.expert_offset[ti], {t.experts * 3 * s.pair_elements(t)}));
    }
  });
  // Kept for the next refresh's metric warm starts (the exchange is zeroed when it begins).
  if (s.exchange_elements > 0)
    be.copy(s.at(exchange, 0, {s.exchange_elements}), s.at(s.whole(s.history), 0, {s.exchange_elements}));
  s.history_tails = true;
  s.history_grads = s.with_gradients;

  // Install: the new bases in the decomposition's layout.
  const Tensor staging = s.whole(s.staging);
  for (size_t ti = 0; ti < s.targets.size(); ++ti) {
    const SpectralTarget& t = s.targets[ti];
    if (shared) {
      be.copy(s.at(exchange, s.shared_offset[ti], {int64_t(k) * t.m}), s.at(staging, t.ut_offset, {int64_t(k) * t.m}));
      be.copy(s.at(exchange, s.shared_offset[ti] + k * t.m, {int64_t(k) * t.n}),
              s.at(staging, t.vt_offset, {int64_t(k) * t.n}));
      continue;
    }
    if (t.experts == 0) continue;
    // Each expert's full pair, 3 pairs apart in the exchange, to its place in the bases.
    const int64_t km = int64_t(k) * t.m, kn = int64_t(k) * t.n, pair_stride = 3 * s.pair_elements(t);
    const int64_t first = s.expert_pair(ti, 0, 0), span = (t.experts - 1) * pair_stride;
    be.copy_rows(s.at(exchange, first, {span + km}), pair_stride, s.at(staging, t.ut_offset, {t.experts * km}), km,
                 t.experts, km);
    be.copy_rows(s.at(exchange, first + km, {span + kn}), pair_stride, s.at(staging, t.vt_offset, {t.experts * kn}),
                 kn, t.experts, kn);
  }
  sd.install_bases(s.at(staging, 0, {bases_elements(s.targets, k)}), m);

  // Metrics over all experts of each layer: gather the per-expert pairs over ep, then the
  // overlaps from one Gram matrix per basis kind on the device (below).
  const int ep_size = s.ep ? s.ep->size() : 1;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (size_t ti = 0; ti < s.targets.size(); ++ti) {
    const SpectralTarget& t = s.targets[ti];
    const int64_t area = t.experts * 3 * s.pair_elements(t);
    const Tensor local = s.at(exchange, s.expert_offset[ti], {area});
    const Tensor all = s.at(s.whole(s.gathered), 0, {area * ep_size});
    if (s.ep) s.timed_comm([&] { s.ep->all_gather(local, all); });
    else be.copy(local, all);
    const int64_t experts = t.experts * ep_size;
    // Kinds: full left, full right, tail left, tail right, grad left, grad right.
    const int kinds = s.with_gradients ? 6 : 4;
    const std::vector<double> overlap = s.mean_overlaps(t, all, experts, kinds);
    SpectralMetrics mt;
    mt.layer = t.layer;
    mt.matrix = t.matrix;
    mt.overlap_left = overlap[0];
    mt.overlap_right = overlap[1];
    mt.tail_overlap_left = overlap[2];
    mt.tail_overlap_right = overlap[3];
    mt.grad_overlap_left = s.with_gradients ? overlap[4] : nan;
    mt.grad_overlap_right = s.with_gradients ? overlap[5] : nan;
    mt.has_gradients = s.with_gradients;
    mt.router_alignment = nan;
    const int router = t.layer < int(s.router_ids.size()) ? s.router_ids[t.layer] : -1;
    mt.has_router = router >= 0 && t.matrix != SdmoeMatrix::DOWN;
    if (mt.has_router) {
      // The full right bases, packed [experts, k, n] by mean_overlaps.
      const std::vector<double> full_vt = s.to_host(s.at(s.whole(s.packed), experts * k * s.largest_side, {experts * k * t.n}), s.be);
      const ParamSpec& rs = s.registry.spec(router);
      const std::vector<double> r = s.to_host(s.at(s.live_params, rs.offset, {rs.numel}), s.be);
      double sum = 0.0;
      for (int64_t e = 0; e < experts; ++e) {
        const double* row = &r[e * t.n];
        double norm = 0.0;
        for (int64_t l = 0; l < t.n; ++l) norm += double(row[l]) * row[l];
        const double* vt = &full_vt[e * k * t.n];
        double captured = 0.0;
        for (int p = 0; p < k; ++p) {
          double dot = 0.0;
          for (int64_t l = 0; l < t.n; ++l) dot += double(vt[p * t.n + l]) * row[l];
          captured += dot * dot;
        }
        sum += norm > 0 ? captured / norm : 0.0;
      }
      mt.router_alignment = sum / double(experts);
    }
    report.metrics.push_back(mt);
  }
}

std::vector<double> SpectralService::Impl::mean_overlaps(const SpectralTarget& t, const Tensor& all, int64_t experts,
                                                         int kinds) {
  // Per kind: the experts' row bases packed into P [experts * k, L], then C = P P^T on the
  // device; the overlap of experts i, j is |C_ij|_F^2 / k, the sum of squares of their
  // k x k block. Only C ((experts k)^2 numbers per kind) comes to the host.
  const int64_t pair = pair_elements(t), per_rank = t.experts * 3 * pair, ek = experts * k;
  const Tensor packed_all = whole(packed), grams = whole(overlap_grams);
  for (int kind = 0; kind < kinds; ++kind) {
    const int which = kind / 2;
    const bool right = kind % 2 == 1;
    const int64_t length = right ? t.n : t.m, within = which * pair + (right ? k * t.m : 0);
    const Tensor rows = at(packed_all, kind * experts * k * largest_side, {ek * length});
    // Each ep rank's experts, 3 pairs apart in the gathered exchange, one block of rows.
    for (int64_t r = 0; r < experts / std::max<int64_t>(t.experts, 1); ++r)
      be.copy_rows(at(all, r * per_rank + within, {(t.experts - 1) * 3 * pair + k * length}), 3 * pair,
                   at(rows, r * t.experts * k * length, {t.experts * k * length}), k * length, t.experts, k * length);
    be.gemm(false, true, ek, ek, length, 1.0, rows, rows, 0.0, at(grams, kind * ek * ek, {ek * ek}));
  }
  const std::vector<double> c = to_host(at(grams, 0, {kinds * ek * ek}), be);
  std::vector<double> out(size_t(kinds), std::numeric_limits<double>::quiet_NaN());
  if (experts < 2) return out;
  for (int kind = 0; kind < kinds; ++kind) {
    const double* ck = &c[size_t(kind) * ek * ek];
    double total = 0.0;
    for (int64_t i = 0; i < experts; ++i)
      for (int64_t j = 0; j < experts; ++j) {
        if (i == j) continue;
        double f = 0.0;
        for (int p = 0; p < k; ++p)
          for (int q = 0; q < k; ++q) {
            const double x = ck[(i * k + p) * ek + j * k + q];
            f += x * x;
          }
        total += f / k;
      }
    out[kind] = total / double(experts * (experts - 1));
  }
  return out;
}

SpectralService::SpectralService(SpectralDecomposition& sd, const ParamRegistry& registry, Tensor params,
                                 Tensor grads, std::vector<int> router_ids, std::shared_ptr<Communicator> replicas,
                                 std::shared_ptr<Communicator> ep, Backend* worker_backend,
                                 std::shared_ptr<Communicator> etp)
    : impl_(std::make_unique<Impl>(sd, worker_backend ? *worker_backend : sd.backend(), registry, params, grads,
                                   std::move(router_ids), std::move(replicas), std::move(ep), std::move(etp))),
      sd_(sd) {}

SpectralService::~SpectralService() {
  if (impl_->worker.joinable()) impl_->worker.join();  // a result nobody will install
}

RefreshReport SpectralService::refresh(int64_t step, const Tensor& m) {
  SDMOE_ASSERT(!impl_->pending, "refresh while an asynchronous refresh is pending");
  Impl& s = *impl_;
  Backend& be = s.be;
  const int k = s.k;
  const bool shared = sd_.spec().basis == SdmoeBasis::LAYER_SHARED;
  RefreshReport report;
  report.step = step;
  s.with_gradients = step > 0;
  s.comm_seconds = 0.0;
  be.synchronize();
  const auto start = Clock::now();
  const Tensor exchange = s.whole(s.exchange);
  if (s.exchange_elements > 0) be.fill(s.at(exchange, 0, {s.exchange_elements}), 0.0);
  if (s.gathers) {
    s.gather_whole(s.live_params, 0, s.whole_params);
    if (s.with_gradients) s.gather_whole(s.live_grads, 0, s.whole_grads);
    s.use_whole_experts();
  }
  be.synchronize();
  const Tensor current = sd_.bases();

  // Phase 1 (LAYER_SHARED): one basis job per target from the experts' summed Grams.
  if (shared) {
    int64_t job = 0;
    for (size_t ti = 0; ti < s.targets.size(); ++ti, ++job) {
      const SpectralTarget& t = s.targets[ti];
      if (job % s.replica_count() != s.replica_rank()) continue;
      // The Grams are summed over the ep group; one of its ranks solves (job / replicas mod ep).
      const bool solver_here = (job / s.replica_count()) % (s.ep ? s.ep->size() : 1) == (s.ep ? s.ep->rank() : 0);
      for (int side = 0; side < 2; ++side) {
        // side 0: U from sum_e W_e W_e^T [m, m]; side 1: V from sum_e W_e^T W_e [n, n].
        const int64_t size = side == 0 ? t.m : t.n;
        const Tensor g = s.at(s.whole(s.gram), 0, {size, size});
        for (int64_t e = 0; e < t.experts; ++e) {
          const Tensor w = s.at(s.source_params, s.matrix_offset(t, e), {t.m, t.n});
          if (side == 0) s.ops().gemm(false, true, t.m, t.m, t.n, 1.0, w, w, e == 0 ? 0.0 : 1.0, g);
          else s.ops().gemm(true, false, t.n, t.n, t.m, 1.0, w, w, e == 0 ? 0.0 : 1.0, g);
        }
        if (t.experts == 0) s.ops().fill(g, 0.0);
        // Every rank of this ep group has the same replica rank, so all of them are here.
        if (s.ep) s.timed_comm([&] { s.ep->all_reduce(g, ReduceOp::SUM); });  // synchronises both backends
        if (!solver_here) continue;  // one eigensolve per job
        const Tensor out = side == 0 ? s.pair_ut(s.shared_offset[ti], t) : s.pair_vt(s.shared_offset[ti], t);
        const Tensor warm = s.at(current, side == 0 ? t.ut_offset : t.vt_offset, {int64_t(k), size});
        s.top_k_symmetric(g, size, out, installed_ ? &warm : nullptr, Impl::seed_of(ti, side));
      }
      if (solver_here) ++report.jobs_computed;
    }
    // Exactly one rank of the world wrote each shared pair; the sums over ep and the
    // replicas give it to everyone.
    s.timed_comm([&] {
      for (size_t ti = 0; ti < s.targets.size(); ++ti) {
        const Tensor pair = s.at(exchange, s.shared_offset[ti], {s.pair_elements(s.targets[ti])});
        if (s.ep) s.ep->all_reduce(pair, ReduceOp::SUM);
        s.share_over_replicas(pair);
      }
    });
  }

  report.jobs_computed += s.run_expert_jobs(step, installed_);
  s.share_install_and_measure(step, m, report);
  be.synchronize();
  const double total = seconds_since(start);
  report.comm_seconds = s.comm_seconds;
  report.compute_seconds = std::max(0.0, total - s.comm_seconds);
  jobs_total_ += report.jobs_computed;
  installed_ = true;
  return report;
}

void SpectralService::start_async(int64_t step, bool with_gradients) {
  Impl& s = *impl_;
  SDMOE_ASSERT(!s.pending && installed_, "start_async needs installed bases and no pending refresh");
  SDMOE_ASSERT(sd_.spec().basis == SdmoeBasis::PER_EXPERT, "asynchronous refresh needs PER_EXPERT bases");
  s.with_gradients = with_gradients && step > 0;
  if (s.gathers) {
    // The whole experts gathered over etp are the snapshot; the training step waits for
    // the gather, reported with the refresh's communication and blocking time.
    const auto start = Clock::now();
    s.comm_seconds = 0.0;
    s.gather_whole(s.live_params, 0, s.whole_params);
    if (s.with_gradients) s.gather_whole(s.live_grads, 0, s.whole_grads);
    s.use_whole_experts();
    s.pending_gather_comm = s.comm_seconds;
    s.pending_gather_blocking = seconds_since(start);
    s.start_worker(step);
    return;
  }
  // Snapshot the expert region of the parameters and gradients: training goes on
  // changing the live ones while the worker reads these.
  const int64_t begin = s.registry.expert_begin(), count = s.live_params.numel() - begin;
  const size_t bytes = std::max<size_t>(size_t(count) * s.width(), 64);
  if (s.snapshot_params.bytes() < bytes) {
    s.snapshot_params = Buffer(s.be, bytes);
    s.snapshot_grads = Buffer(s.be, bytes);
  }
  const Tensor params_copy(s.snapshot_params.data(), s.dtype, s.be.device(), {count});
  const Tensor grads_copy(s.snapshot_grads.data(), s.dtype, s.be.device(), {count});
  s.be.copy(s.at(s.live_params, begin, {count}), params_copy);
  s.be.copy(s.at(s.live_grads, begin, {count}), grads_copy);
  s.source_params = params_copy;
  s.source_grads = grads_copy;
  s.region_base = begin;
  s.start_worker(step);
}

RefreshReport SpectralService::finish_async(int64_t step, const Tensor& m) {
  Impl& s = *impl_;
  SDMOE_ASSERT(s.pending, "finish_async without start_async");
  const auto start = Clock::now();
  s.worker.join();
  const double waited = seconds_since(start);
  s.pending = false;
  if (!s.gathers) {
    s.source_params = s.live_params;
    s.source_grads = s.live_grads;
    s.region_base = 0;
  }
  RefreshReport report;
  report.step = s.pending_step;
  report.staleness = step - s.pending_step;
  report.jobs_computed = s.pending_jobs;
  s.comm_seconds = 0.0;
  const auto apply = Clock::now();
  s.share_install_and_measure(s.pending_step, m, report);
  s.be.synchronize();
  report.comm_seconds = s.comm_seconds + s.pending_gather_comm;
  // The worker's time overlapped training; what the step waited for is the join plus the
  // install and metrics (and, with etp, the gather when the refresh started).
  report.compute_seconds = s.pending_seconds;
  report.blocking_seconds = waited + seconds_since(apply) + s.pending_gather_blocking;
  s.pending_gather_comm = s.pending_gather_blocking = 0.0;
  jobs_total_ += report.jobs_computed;
  return report;
}

bool SpectralService::async_pending() const { return impl_->pending; }

double SpectralService::largest_principal_angle(const std::vector<double>& a, const std::vector<double>& b, int k,
                                                int64_t length) {
  // sin of the largest angle = the largest singular value of R = B - (B A^T) A, the part of
  // B's rows outside A's row space. Computed from R directly, not as acos of a cosine
  // near 1, which would lose half the digits. lambda_max(R R^T) by Jacobi sweeps (k x k).
  std::vector<double> c(size_t(k) * k, 0.0), r(b), s(size_t(k) * k, 0.0);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j)
      for (int64_t l = 0; l < length; ++l) c[i * k + j] += b[i * length + l] * a[j * length + l];
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j)
      for (int64_t l = 0; l < length; ++l) r[i * length + l] -= c[i * k + j] * a[j * length + l];
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j)
      for (int64_t l = 0; l < length; ++l) s[i * k + j] += r[i * length + l] * r[j * length + l];
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int p = 0; p < k; ++p) {
      diag += s[p * k + p] * s[p * k + p];
      for (int q = p + 1; q < k; ++q) off += s[p * k + q] * s[p * k + q];
    }
    if (off <= 1e-30 * diag || off == 0.0) break;
    for (int p = 0; p < k; ++p)
      for (int q = p + 1; q < k; ++q) {
        if (s[p * k + q] == 0.0) continue;
        const double theta = (s[q * k + q] - s[p * k + p]) / (2.0 * s[p * k + q]);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double cs = 1.0 / std::sqrt(t * t + 1.0), sn = t * cs;
        for (int x = 0; x < k; ++x) {
          const double sp = s[x * k + p], sq = s[x * k + q];
          s[x * k + p] = cs * sp - sn * sq;
          s[x * k + q] = sn * sp + cs * sq;
        }
        for (int x = 0; x < k; ++x) {
          const double sp = s[p * k + x], sq = s[q * k + x];
          s[p * k + x] = cs * sp - sn * sq;
          s[q * k + x] = sn * sp + cs * sq;
        }
      }
  }
  double largest = 0.0;
  for (int i = 0; i < k; ++i) largest = std::max(largest, s[i * k + i]);
  return std::asin(std::sqrt(std::clamp(largest, 0.0, 1.0)));
}

}  // namespace sdmoe
