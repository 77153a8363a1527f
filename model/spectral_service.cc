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

// Mean over ordered pairs i != j of |A_i A_j^T|_F^2 / k, for E row bases A_e [k, L]
// stored at base + e * stride (host, float).
double mean_overlap(const std::vector<double>& host, int64_t base, int64_t stride, int64_t experts, int k,
                    int64_t length) {
  if (experts < 2) return std::numeric_limits<double>::quiet_NaN();
  double total = 0.0;
  for (int64_t i = 0; i < experts; ++i)
    for (int64_t j = 0; j < experts; ++j) {
      if (i == j) continue;
      const double* a = &host[base + i * stride];
      const double* b = &host[base + j * stride];
      double f = 0.0;
      for (int p = 0; p < k; ++p)
        for (int q = 0; q < k; ++q) {
          double dot = 0.0;
          for (int64_t l = 0; l < length; ++l) dot += a[p * length + l] * b[q * length + l];
          f += dot * dot;
        }
      total += f / k;
    }
  return total / double(experts * (experts - 1));
}

}  // namespace

struct SpectralService::Impl {
  SpectralDecomposition& sd;
  Backend& be;    // the training backend: collectives, install, metrics
  Backend& work;  // where the solvers run (its own stream on a GPU in async mode)
  Backend& ops() { return work; }
  DType dtype;
  int k;
  const ParamRegistry& registry;
  std::vector<int> router_ids;
  std::shared_ptr<Communicator> replicas, ep;
  const std::vector<SpectralTarget>& targets;
  SpectralProjector projector;  // the service's own thin products, on `work` (no matrix scratch)
  // What the solvers read: the live flat buffers (region_base 0) or, in async mode,
  // snapshots of the expert region (region_base = its first element).
  Tensor live_params, live_grads;
  Tensor source_params, source_grads;
  int64_t region_base = 0;
  Buffer snapshot_params, snapshot_grads;
  std::thread worker;
  bool pending = false;
  int64_t pending_step = 0, pending_jobs = 0;
  double pending_seconds = 0.0;

  // Exchange layout, per target: [shared pair (LAYER_SHARED) | per expert: full, tail, grad
  // pairs], each pair Ut [k, m] then Vt [k, n].
  std::vector<int64_t> shared_offset, expert_offset;
  int64_t exchange_elements = 0, expert_area_elements = 0;
  Buffer exchange, staging, gathered;
  // Solver scratch.
  Buffer gram, eig_w, eig_vecs, tmp, small, small_tmp;

  double comm_seconds = 0.0;

  Impl(SpectralDecomposition& sd_in, Backend& work_in, const ParamRegistry& reg, Tensor p, Tensor g,
       std::vector<int> routers, std::shared_ptr<Communicator> rep, std::shared_ptr<Communicator> ep_in)
      : sd(sd_in),
        be(sd_in.backend()),
        work(work_in),
        dtype(p.dtype),
        k(sd_in.spec().rank),
        registry(reg),
        router_ids(std::move(routers)),
        replicas(std::move(rep)),
        ep(std::move(ep_in)),
        targets(sd_in.targets()),
        projector(work_in, p.dtype, sd_in.targets(), sd_in.spec().rank, 0),
        live_params(p),
        live_grads(g),
        source_params(p),
        source_grads(g) {
    int64_t largest_mn = 1, largest_side = 1;
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
    alloc(staging, bases_elements(targets, k));
    const int ep_size = ep ? ep->size() : 1;
    alloc(gathered, exchange_elements * ep_size);
    alloc(gram, largest_side * largest_side);
    alloc(eig_w, largest_side);
    alloc(eig_vecs, largest_side * largest_side);
    alloc(tmp, std::max(largest_mn, k * largest_side));
    alloc(small, k * k);
    alloc(small_tmp, k * largest_side);
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
  void from_host(const std::vector<double>& in, const Tensor& x, Backend& via) const {
    if (x.dtype == DType::F64) {
      via.copy_from_host(in.data(), x);
    } else {
      const std::vector<float> f(in.begin(), in.end());
      via.copy_from_host(f.data(), x);
    }
  }
  static uint64_t seed_of(size_t target, int side) { return 0x2545f4914f6cdd1dULL + 7919 * target + side; }
  int replica_rank() const { return replicas ? replicas->rank() : 0; }
  int replica_count() const { return replicas ? replicas->size() : 1; }

  void timed_comm(const std::function<void()>& fn) {
    work.synchronize();
    be.synchronize();
    const auto start = Clock::now();
    fn();
    be.synchronize();
    comm_seconds += seconds_since(start);
  }

  // Rows of y [k, L] made orthonormal: CholeskyQR twice (y <- L^{-1} y with G = y y^T = L L^T).
  void orthonormalize_rows(const Tensor& y, int64_t length) {
    const Tensor g = at(whole(small), 0, {k, k}), out = at(whole(small_tmp), 0, {k, length});
    for (int pass = 0; pass < 2; ++pass) {
      ops().gemm(false, true, k, k, length, 1.0, y, y, 0.0, g);
      std::vector<double> a = to_host(g, ops());
      double trace = 0.0;
      for (int i = 0; i < k; ++i) trace += a[i * k + i];
      // A rank-deficient y (a zero gradient) stays finite; the ridge is below the dtype's
      // rounding, so orthonormal rows stay orthonormal to that rounding.
      const double ridge = std::max(trace, 1e-300) * (dtype == DType::F64 ? 1e-26 : 1e-12);
      for (int i = 0; i < k; ++i) a[i * k + i] += ridge;
      // Cholesky, lower.
      std::vector<double> l(size_t(k) * k, 0.0);
      for (int i = 0; i < k; ++i)
        for (int j = 0; j <= i; ++j) {
          double s = a[i * k + j];
          for (int p = 0; p < j; ++p) s -= l[i * k + p] * l[j * k + p];
          l[i * k + j] = i == j ? std::sqrt(std::max(s, 1e-300)) : s / l[j * k + j];
        }
      // inv = L^{-1}, lower triangular.
      std::vector<double> inv(size_t(k) * k, 0.0);
      for (int c = 0; c < k; ++c)
        for (int i = c; i < k; ++i) {
          double s = i == c ? 1.0 : 0.0;
          for (int p = c; p < i; ++p) s -= l[i * k + p] * inv[p * k + c];
          inv[i * k + c] = s / l[i * k + i];
        }
      from_host(inv, g, ops());
      ops().gemm(false, false, k, length, k, 1.0, g, y, 0.0, out);
      ops().copy(out, y);
    }
  }

  // Top-k singular subspaces of x [m, n]: rows of ut [k, m] and vt [k, n]. warm_vt: the
  // previous right basis (subspace iteration), or null for a seeded random start.
  // metric: a basis for the metrics only (tails, gradients), always by subspace iteration
  // from a seeded start: the overlap statistics need no exact basis, and an exact SVD per
  // metric would triple the cost of a refresh.
  void top_k(const Tensor& x, int64_t m, int64_t n, const Tensor& ut, const Tensor& vt, const Tensor* warm_vt,
             uint64_t seed, bool metric = false) {
    if (sd.spec().solver == SdmoeSolver::EXACT && !metric) {
      // syevd of the Gram matrix of the smaller side (its top-k eigenvectors are the
      // top-k singular vectors of that side), then the other side's basis as the
      // orthonormalised image: span(W V_k) = span(U_k).
      const bool right = n <= m;
      const int64_t side = right ? n : m, other = right ? m : n;
      const Tensor g = at(whole(gram), 0, {side, side});
      if (right) ops().gemm(true, false, n, n, m, 1.0, x, x, 0.0, g);   // W^T W
      else ops().gemm(false, true, m, m, n, 1.0, x, x, 0.0, g);         // W W^T
      const Tensor w = at(whole(eig_w), 0, {side}), vecs = at(whole(eig_vecs), 0, {side, side});
      ops().symmetric_eigen(g, w, vecs);  // ascending: the last k rows
      const Tensor top = right ? vt : ut, image = right ? ut : vt;
      ops().copy(at(vecs, (side - k) * side, {int64_t(k) * side}), at(top, 0, {int64_t(k) * side}));
      if (right) ops().gemm(false, true, k, m, n, 1.0, vt, x, 0.0, ut);  // Vt W^T
      else ops().gemm(false, false, k, n, m, 1.0, ut, x, 0.0, vt);       // Ut W
      orthonormalize_rows(image, other);
      return;
    }
    int rounds = sd.spec().subspace_iterations;
    if (warm_vt) {
      ops().copy(*warm_vt, vt);
    } else {
      ops().init_normal(vt, seed, 0x5bd1e995, 1.0, 0);
      orthonormalize_rows(vt, n);
      rounds = 3 * rounds + 2;  // a cold start needs more rounds
    }
    for (int i = 0; i < rounds; ++i) {
      ops().gemm(false, true, k, m, n, 1.0, vt, x, 0.0, ut);  // ut = vt x^T
      orthonormalize_rows(ut, m);
      ops().gemm(false, false, k, n, m, 1.0, ut, x, 0.0, vt);  // vt = ut x
      orthonormalize_rows(vt, n);
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
      orthonormalize_rows(out, size);
      rounds = 3 * rounds + 2;
    }
    const Tensor y = at(whole(tmp), 0, {int64_t(k), size});
    for (int i = 0; i < rounds; ++i) {
      ops().gemm(false, false, k, size, size, 1.0, out, g, 0.0, y);
      ops().copy(y, out);
      orthonormalize_rows(out, size);
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
    return registry.spec(t.param_id).offset + t.first + e * t.stride - region_base;
  }
  // Phase 2 of a refresh (no communication): the jobs of this rank's replica rank.
  int64_t run_expert_jobs(int64_t step, bool installed);
  void share_install_and_measure(int64_t step, const Tensor& m, RefreshReport& report);
};

int64_t SpectralService::Impl::run_expert_jobs(int64_t step, bool installed) {
  // The expert's top-k (its new bases in PER_EXPERT mode), the top-k of its tail under
  // the new bases, and of its last gradient.
  const bool shared = sd.spec().basis == SdmoeBasis::LAYER_SHARED;
  const Tensor exchange = whole(this->exchange);
  const Tensor current = sd.bases();
  int64_t jobs = 0;
  int64_t job = 0;
  for (size_t ti = 0; ti < targets.size(); ++ti) {
    const SpectralTarget& t = targets[ti];
    for (int64_t e = 0; e < t.experts; ++e, ++job) {
      if (job % replica_count() != replica_rank()) continue;
      ++jobs;
      const uint64_t seed = 0x9e3779b97f4a7c15ULL ^ (uint64_t(ti) << 32) ^ uint64_t(t.first_expert + e);
      const Tensor w = at(source_params, matrix_offset(t, e), {t.m, t.n});
      const int64_t full = expert_pair(ti, e, 0), tail = expert_pair(ti, e, 1), grad = expert_pair(ti, e, 2);
      // Warm start from the installed bases, once there are any.
      const Tensor warm = at(current, t.vt_offset + (t.bases > 1 ? e * k * t.n : 0), {int64_t(k), t.n});
      top_k(w, t.m, t.n, pair_ut(full, t), pair_vt(full, t), installed ? &warm : nullptr, seed);
      // The tail W - (common part) under the new bases: the expert's own (PER_EXPERT) or
      // the layer's (LAYER_SHARED).
      SpectralTarget one = t;
      one.experts = 1;
      one.bases = 1;
      one.ut_offset = shared ? shared_offset[ti] : full;
      one.vt_offset = one.ut_offset + k * t.m;
      const Tensor tail_matrix = at(whole(tmp), 0, {t.m, t.n});
      projector.project_unique(one, exchange, source_params, matrix_offset(t, e), 0, tail_matrix);
      top_k(tail_matrix, t.m, t.n, pair_ut(tail, t), pair_vt(tail, t), nullptr, seed + 1, true);
      if (step > 0) {
        const Tensor g = at(source_grads, matrix_offset(t, e), {t.m, t.n});
        top_k(g, t.m, t.n, pair_ut(grad, t), pair_vt(grad, t), nullptr, seed + 2, true);
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
    if (s.replicas)
      for (size_t ti = 0; ti < s.targets.size(); ++ti) {
        const SpectralTarget& t = s.targets[ti];
        s.replicas->all_reduce(s.at(exchange, s.expert_offset[ti], {t.experts * 3 * s.pair_elements(t)}), ReduceOp::SUM);
      }
  });

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
    for (int64_t e = 0; e < t.experts; ++e) {
      const int64_t full = s.expert_pair(ti, e, 0);
      be.copy(s.at(exchange, full, {int64_t(k) * t.m}), s.at(staging, t.ut_offset + e * k * t.m, {int64_t(k) * t.m}));
      be.copy(s.at(exchange, full + k * t.m, {int64_t(k) * t.n}),
              s.at(staging, t.vt_offset + e * k * t.n, {int64_t(k) * t.n}));
    }
  }
  sd.install_bases(s.at(staging, 0, {bases_elements(s.targets, k)}), m);

  // Metrics over all experts of each layer: gather the per-expert pairs over ep.
  const int ep_size = s.ep ? s.ep->size() : 1;
  for (size_t ti = 0; ti < s.targets.size(); ++ti) {
    const SpectralTarget& t = s.targets[ti];
    const int64_t area = t.experts * 3 * s.pair_elements(t);
    const Tensor local = s.at(exchange, s.expert_offset[ti], {area});
    const Tensor all = s.at(s.whole(s.gathered), 0, {area * ep_size});
    if (s.ep) s.timed_comm([&] { s.ep->all_gather(local, all); });
    else be.copy(local, all);
    const std::vector<double> host = s.to_host(all, s.be);
    const int64_t experts = t.experts * ep_size, pair = s.pair_elements(t), stride = 3 * pair;
    SpectralMetrics mt;
    mt.layer = t.layer;
    mt.matrix = t.matrix;
    mt.overlap_left = mean_overlap(host, 0, stride, experts, k, t.m);
    mt.overlap_right = mean_overlap(host, k * t.m, stride, experts, k, t.n);
    mt.tail_overlap_left = mean_overlap(host, pair, stride, experts, k, t.m);
    mt.tail_overlap_right = mean_overlap(host, pair + k * t.m, stride, experts, k, t.n);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    mt.grad_overlap_left = step > 0 ? mean_overlap(host, 2 * pair, stride, experts, k, t.m) : nan;
    mt.grad_overlap_right = step > 0 ? mean_overlap(host, 2 * pair + k * t.m, stride, experts, k, t.n) : nan;
    mt.router_alignment = nan;
    const int router = t.layer < int(s.router_ids.size()) ? s.router_ids[t.layer] : -1;
    if (router >= 0 && t.matrix != SdmoeMatrix::DOWN) {
      const ParamSpec& rs = s.registry.spec(router);
      const std::vector<double> r = s.to_host(s.at(s.live_params, rs.offset, {rs.numel}), s.be);
      double sum = 0.0;
      for (int64_t e = 0; e < experts; ++e) {
        const double* row = &r[e * t.n];
        double norm = 0.0;
        for (int64_t l = 0; l < t.n; ++l) norm += double(row[l]) * row[l];
        const double* vt = &host[e * stride + k * t.m];
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

SpectralService::SpectralService(SpectralDecomposition& sd, const ParamRegistry& registry, Tensor params,
                                 Tensor grads, std::vector<int> router_ids, std::shared_ptr<Communicator> replicas,
                                 std::shared_ptr<Communicator> ep, Backend* worker_backend)
    : impl_(std::make_unique<Impl>(sd, worker_backend ? *worker_backend : sd.backend(), registry, params, grads,
                                   std::move(router_ids), std::move(replicas), std::move(ep))),
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
  s.comm_seconds = 0.0;
  be.synchronize();
  const auto start = Clock::now();
  const Tensor exchange = s.whole(s.exchange);
  if (s.exchange_elements > 0) be.fill(s.at(exchange, 0, {s.exchange_elements}), 0.0);
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
        if (s.replicas) s.replicas->all_reduce(pair, ReduceOp::SUM);
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

void SpectralService::start_async(int64_t step) {
  Impl& s = *impl_;
  SDMOE_ASSERT(!s.pending && installed_, "start_async needs installed bases and no pending refresh");
  SDMOE_ASSERT(sd_.spec().basis == SdmoeBasis::PER_EXPERT, "asynchronous refresh needs PER_EXPERT bases");
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
  if (s.exchange_elements > 0) s.be.fill(s.at(s.whole(s.exchange), 0, {s.exchange_elements}), 0.0);
  s.be.synchronize();
  s.source_params = params_copy;
  s.source_grads = grads_copy;
  s.region_base = begin;
  s.pending = true;
  s.pending_step = step;
  s.worker = std::thread([&s, step] {
    s.work.bind_to_current_thread();  // its GPU (a new thread starts on device 0), its threads
    const auto start = Clock::now();
    s.pending_jobs = s.run_expert_jobs(step, true);
    s.pending_seconds = seconds_since(start);
  });
}

RefreshReport SpectralService::finish_async(int64_t step, const Tensor& m) {
  Impl& s = *impl_;
  SDMOE_ASSERT(s.pending, "finish_async without start_async");
  const auto start = Clock::now();
  s.worker.join();
  const double waited = seconds_since(start);
  s.pending = false;
  s.source_params = s.live_params;
  s.source_grads = s.live_grads;
  s.region_base = 0;
  RefreshReport report;
  report.step = s.pending_step;
  report.staleness = step - s.pending_step;
  report.jobs_computed = s.pending_jobs;
  s.comm_seconds = 0.0;
  const auto apply = Clock::now();
  s.share_install_and_measure(s.pending_step, m, report);
  s.be.synchronize();
  report.comm_seconds = s.comm_seconds;
  // The worker's time overlapped training; what the step waited for is the join plus the
  // install and metrics.
  report.compute_seconds = s.pending_seconds;
  report.blocking_seconds = waited + seconds_since(apply);
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
