#include "model/sdmoe.h"

#include <algorithm>
#include <cstdio>

#include "core/check.h"

namespace sdmoe {

const char* sdmoe_matrix_name(SdmoeMatrix m) {
  switch (m) {
    case SdmoeMatrix::GATE: return "gate";
    case SdmoeMatrix::UP: return "up";
    case SdmoeMatrix::DOWN: return "down";
  }
  return "?";
}

bool SdmoeSpec::selects(SdmoeMatrix m) const { return std::find(matrices.begin(), matrices.end(), m) != matrices.end(); }

void SdmoeSpec::validate(const ModelSpec& model) const {
  if (!enabled) return;
  if (model.moe_layer_count() == 0) fail("sdmoe.enabled needs MoE layers (model.moe.num_experts > 0)");
  if (matrices.empty()) fail("sdmoe.matrices is empty");
  if (refresh_interval <= 0) fail("sdmoe.refresh_interval must be positive");
  if (subspace_iterations <= 0) fail("sdmoe.subspace_iterations must be positive");
  if (async && basis != SdmoeBasis::PER_EXPERT) fail("sdmoe.async needs basis: PER_EXPERT");
  if (lr_mult_common < 0 || lr_mult_unique < 0) fail("sdmoe.lr_mult_common and lr_mult_unique must be >= 0");
  const int64_t smallest = std::min<int64_t>(model.dim, model.moe.expert_ffn_dim);
  if (rank <= 0 || rank >= smallest)
    fail("sdmoe.rank ({}) must be in [1, {}): below the smaller side of an expert matrix ({} x {})", rank, smallest,
         model.moe.expert_ffn_dim, model.dim);
}

namespace {

// "layers.<l>.moe.experts.<what>" -> l, or -1.
int layer_of(const std::string& name) {
  int layer = -1;
  if (std::sscanf(name.c_str(), "layers.%d.", &layer) != 1) return -1;
  return layer;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

std::vector<SpectralTarget> spectral_targets(const ParamRegistry& registry, const SdmoeSpec& spec) {
  std::vector<SpectralTarget> out;
  for (size_t id = 0; id < registry.specs().size(); ++id) {
    const ParamSpec& p = registry.spec(int(id));
    if (p.role != ParamRole::EXPERT) continue;
    const int layer = layer_of(p.name);
    SDMOE_ASSERT(layer >= 0, "expert parameter {} has no layer in its name", p.name);
    // Axis 2 is the FFN dimension in both stacks; etp splits it.
    const int64_t f_full = p.logical_shape[2], f_first = p.part_first[2];
    auto add = [&](SdmoeMatrix which, int64_t first, int64_t stride, int64_t m, int64_t n) {
      if (!spec.selects(which)) return;
      SpectralTarget t;
      t.layer = layer;
      t.matrix = which;
      t.param_id = int(id);
      t.first = first;
      t.stride = stride;
      t.experts = p.shape[0];
      t.first_expert = p.part_first[0];
      t.total_experts = p.logical_shape[0];
      t.m = m;
      t.n = n;
      t.m_full = m;
      t.n_full = n;
      if (p.shape[2] != f_full) {
        const bool rows = which != SdmoeMatrix::DOWN;  // gate and up: F is m; down: F is n
        t.split = rows ? SpectralTarget::Split::ROWS : SpectralTarget::Split::COLS;
        (rows ? t.m_full : t.n_full) = f_full;
        t.split_first = f_first;
      }
      t.bases = spec.basis == SdmoeBasis::PER_EXPERT ? int(t.experts) : 1;
      out.push_back(t);
    };
    if (ends_with(p.name, ".gate_up")) {
      // [E, 2, F, D]: per expert the gate rows, then the up rows.
      SDMOE_ASSERT(p.shape.size() == 4 && p.shape[1] == 2, "{}: expected [E, 2, F, D]", p.name);
      const int64_t f = p.shape[2], d = p.shape[3];
      add(SdmoeMatrix::GATE, 0, 2 * f * d, f, d);
      add(SdmoeMatrix::UP, f * d, 2 * f * d, f, d);
    } else if (ends_with(p.name, ".down")) {
      SDMOE_ASSERT(p.shape.size() == 3, "{}: expected [E, D, F]", p.name);
      add(SdmoeMatrix::DOWN, 0, p.shape[1] * p.shape[2], p.shape[1], p.shape[2]);
    }
  }
  return out;
}

int64_t bases_elements(const std::vector<SpectralTarget>& targets, int k) {
  int64_t total = 0;
  for (const SpectralTarget& t : targets) total += int64_t(t.bases) * k * (t.m_full + t.n_full);
  return total;
}

void copy_local_bases(Backend& be, const SpectralTarget& t, int k, const Tensor& bases, const Tensor& out) {
  const bool rows = t.split == SpectralTarget::Split::ROWS;
  SDMOE_ASSERT(t.split != SpectralTarget::Split::NONE, "copy_local_bases: target is not split");
  const int64_t full = rows ? t.m_full : t.n_full, local = rows ? t.m : t.n, offset = rows ? t.ut_offset : t.vt_offset;
  const size_t width = dtype_size(bases.dtype);
  auto at = [&](const Tensor& flat, int64_t element, int64_t count) {
    return Tensor(static_cast<char*>(flat.data) + element * int64_t(width), bases.dtype, bases.device, {count});
  };
  const int64_t count = int64_t(t.bases) * k;
  be.copy_rows(at(bases, offset + t.split_first, (count - 1) * full + local), full, at(out, 0, count * local), local,
               count, local);
}

// ---- projection ----------------------------------------------------------------------

namespace {

// A whole buffer as a flat tensor of `dtype`.
Tensor whole(const Buffer& b, DType dtype, Device device) {
  return Tensor(b.data(), dtype, device, {int64_t(b.bytes() / dtype_size(dtype))});
}

}  // namespace

SpectralProjector::SpectralProjector(Backend& backend, DType dtype, const std::vector<SpectralTarget>& targets, int k,
                                     int scratch_slots, std::shared_ptr<Communicator> etp)
    : slots_(scratch_slots), be_(backend), dtype_(dtype), k_(k), etp_(std::move(etp)) {
  int64_t thin = 0, local = 0;
  for (const SpectralTarget& t : targets) {
    matrix_elements_ = std::max(matrix_elements_, t.experts * t.m * t.n);
    thin = std::max(thin, t.experts * k * (t.n + t.m + k));
    if (t.split != SpectralTarget::Split::NONE) {
      SDMOE_ASSERT(etp_, "SD-MoE target of layer {} is split over etp but no etp group was given", t.layer);
      local = std::max(local, int64_t(t.bases) * k * (t.split == SpectralTarget::Split::ROWS ? t.m : t.n));
    }
  }
  const size_t width = dtype_size(dtype);
  if (matrix_elements_ > 0 && slots_ > 0) scratch_ = Buffer(backend, size_t(slots_ * matrix_elements_) * width);
  if (thin > 0) thin_ = Buffer(backend, size_t(thin) * width);
  if (local > 0) local_bases_ = Buffer(backend, size_t(local) * width);
}

Tensor SpectralProjector::scratch(int index, const SpectralTarget& t) const {
  SDMOE_ASSERT(index >= 0 && index < slots_, "scratch slot {} of {}", index, slots_);
  return Tensor(static_cast<char*>(scratch_.data()) + index * matrix_elements_ * int64_t(dtype_size(dtype_)), dtype_,
                be_.device(), {t.experts, t.m, t.n});
}

void SpectralProjector::project_unique(const SpectralTarget& t, const Tensor& bases, const Tensor& x_flat,
                                       int64_t x_base, int64_t x_stride, const Tensor& out) {
  const int64_t k = k_, m = t.m, n = t.n, e = t.experts;
  if (e == 0) return;
  const size_t width = dtype_size(dtype_);
  auto raw = [&](const Buffer& b) { return whole(b, dtype_, be_.device()); };
  auto at = [&](const Tensor& flat, int64_t offset, int64_t count) {
    return Tensor(static_cast<char*>(flat.data) + offset * int64_t(width), dtype_, be_.device(), {count});
  };
  // Per expert or shared by all of them: a zero stride repeats one basis.
  const int64_t ut_stride = t.bases > 1 ? k * m : 0, vt_stride = t.bases > 1 ? k * n : 0;
  const int64_t ut_count = (t.bases - 1) * ut_stride + k * m, vt_count = (t.bases - 1) * vt_stride + k * n;
  // The split side's basis: this rank's slice of it (rows of Ut or of Vt's columns).
  const bool split_rows = t.split == SpectralTarget::Split::ROWS, split_cols = t.split == SpectralTarget::Split::COLS;
  if (split_rows || split_cols) copy_local_bases(be_, t, int(k), bases, raw(local_bases_));
  const Tensor ut = split_rows ? at(raw(local_bases_), 0, ut_count) : at(bases, t.ut_offset, ut_count);
  const Tensor vt = split_cols ? at(raw(local_bases_), 0, vt_count) : at(bases, t.vt_offset, vt_count);
  const Tensor x = at(x_flat, x_base, (e - 1) * x_stride + m * n);
  const Tensor a = at(raw(thin_), 0, e * k * n);
  const Tensor b = at(raw(thin_), e * k * n, e * m * k);
  const Tensor c = at(raw(thin_), e * k * (n + m), e * k * k);
  // a = Ut X [k,n]; b = X Vt^T [m,k]; c = a Vt^T [k,k]; a -= c Vt; out = X - Ut^T a - b Vt.
  // Split rows: a sums over them. Split columns: b and c do (adjacent: one all-reduce).
  be_.gemm(false, false, k, n, m, 1.0, ut, x, 0.0, a, {e, ut_stride, x_stride, k * n});
  if (split_rows) etp_->all_reduce(a, ReduceOp::SUM);
  be_.gemm(false, true, m, k, n, 1.0, x, vt, 0.0, b, {e, x_stride, vt_stride, m * k});
  be_.gemm(false, true, k, k, n, 1.0, a, vt, 0.0, c, {e, k * n, vt_stride, k * k});
  if (split_cols) etp_->all_reduce(at(raw(thin_), e * k * n, e * k * (m + k)), ReduceOp::SUM);
  be_.gemm(false, false, k, n, k, -1.0, c, vt, 1.0, a, {e, k * k, vt_stride, k * n});
  // In place when out is x (contiguous): a and b are formed before out is written.
  if (out.data != x.data)
    for (int64_t i = 0; i < e; ++i) be_.copy(at(x, i * x_stride, m * n), at(out, i * m * n, m * n));
  be_.gemm(true, false, m, n, k, -1.0, ut, a, 1.0, out, {e, ut_stride, k * n, m * n});
  be_.gemm(false, false, m, n, k, -1.0, b, vt, 1.0, out, {e, m * k, vt_stride, m * n});
}

// ---- decomposition state ---------------------------------------------------------------

namespace {

std::vector<SpectralTarget> with_offsets(std::vector<SpectralTarget> targets, int k) {
  int64_t offset = 0;
  for (SpectralTarget& t : targets) {
    t.ut_offset = offset;
    offset += int64_t(t.bases) * k * t.m_full;
    t.vt_offset = offset;
    offset += int64_t(t.bases) * k * t.n_full;
  }
  return targets;
}

}  // namespace

SpectralDecomposition::SpectralDecomposition(Backend& backend, DType dtype, const ParamRegistry& registry,
                                             const SdmoeSpec& spec, std::shared_ptr<Communicator> etp)
    : be_(backend),
      dtype_(dtype),
      registry_(registry),
      spec_(spec),
      etp_(etp),
      targets_(with_offsets(spectral_targets(registry, spec), spec.rank)),
      projector_(backend, dtype, targets_, spec.rank, SpectralProjector::kScratchSlots, etp) {
  bases_elements_ = bases_elements(targets_, spec_.rank);
  for (const SpectralTarget& t : targets_) {
    unique_offset_.push_back(unique_elements_);
    unique_elements_ += t.experts * t.m * t.n;
  }
  // Per decomposed parameter, the element ranges no selected matrix covers.
  for (const SpectralTarget& t : targets_) {
    if (plain_ranges_.count(t.param_id)) continue;
    const ParamSpec& ps = registry.spec(t.param_id);
    // The covered intervals (first + e * stride, m * n), sorted; the gaps are plain.
    std::vector<ElementRange> covered;
    for (const SpectralTarget& u : targets_)
      if (u.param_id == t.param_id)
        for (int64_t e = 0; e < u.experts; ++e) covered.push_back({u.first + e * u.stride, u.first + e * u.stride + u.m * u.n});
    std::sort(covered.begin(), covered.end(), [](const ElementRange& a, const ElementRange& b) { return a.begin < b.begin; });
    std::vector<ElementRange>& ranges = plain_ranges_[t.param_id];
    int64_t at = 0;
    for (const ElementRange& c : covered) {
      if (c.begin > at) ranges.push_back({at, c.begin});
      at = std::max(at, c.end);
    }
    if (at < ps.numel) ranges.push_back({at, ps.numel});
  }
  const size_t width = dtype_size(dtype);
  bases_ = Buffer(backend, std::max<size_t>(size_t(bases_elements_) * width, 64));
  unique_m_ = Buffer(backend, std::max<size_t>(size_t(unique_elements_) * width, 64));
  unique_v_ = Buffer(backend, std::max<size_t>(size_t(unique_elements_) * width, 64));
  be_.fill(bases(), 0.0);
  int64_t stacked_elements = 0;
  for (const SpectralTarget& t : targets_) {
    stacked_offset_.push_back(stacked_elements);
    stacked_elements += t.experts * (2 * spec_.rank * (t.m + t.n) + int64_t(spec_.rank) * spec_.rank);
  }
  stacked_ = Buffer(backend, std::max<size_t>(size_t(stacked_elements) * width, 64));
  int64_t split_elements = 0;
  for (const SpectralTarget& t : targets_)
    if (t.split != SpectralTarget::Split::NONE)
      split_elements = std::max(split_elements, t.experts * spec_.rank * (std::max(t.m, t.n) + spec_.rank));
  if (split_elements > 0) split_scratch_ = Buffer(backend, size_t(split_elements) * width);
  if (stacked_elements > 0) be_.fill(flat_at(raw(stacked_), 0, stacked_elements), 0.0);
  if (unique_elements_ > 0) {
    be_.fill(flat_at(raw(unique_m_), 0, unique_elements_), 0.0);
    be_.fill(flat_at(raw(unique_v_), 0, unique_elements_), 0.0);
  }
}

void SpectralDecomposition::set_moment_offset(int param_id, int64_t offset) { moment_offsets_[param_id] = offset; }

int64_t SpectralDecomposition::moment_offset(int param_id) const {
  const auto it = moment_offsets_.find(param_id);
  return it != moment_offsets_.end() ? it->second : registry_.spec(param_id).offset;
}

Tensor SpectralDecomposition::raw(const Buffer& b) const { return whole(b, dtype_, be_.device()); }

Tensor SpectralDecomposition::flat_at(const Tensor& flat, int64_t offset, int64_t count) const {
  return Tensor(static_cast<char*>(flat.data) + offset * int64_t(dtype_size(dtype_)), dtype_, be_.device(), {count});
}

Tensor SpectralDecomposition::bases() const {
  return Tensor(bases_.data(), dtype_, be_.device(), {bases_elements_});
}

Tensor SpectralDecomposition::unique_m(size_t t, int64_t e) const {
  const SpectralTarget& tg = targets_.at(t);
  return flat_at(raw(unique_m_), unique_offset_[t] + e * tg.m * tg.n, tg.m * tg.n);
}

Tensor SpectralDecomposition::unique_v(size_t t, int64_t e) const {
  const SpectralTarget& tg = targets_.at(t);
  return flat_at(raw(unique_v_), unique_offset_[t] + e * tg.m * tg.n, tg.m * tg.n);
}

bool SpectralDecomposition::handles(int param_id) const {
  return std::any_of(targets_.begin(), targets_.end(), [&](const SpectralTarget& t) { return t.param_id == param_id; });
}

void SpectralDecomposition::update(int param_id, const Tensor& params, const Tensor& grads, const Tensor& m,
                                   const Tensor& v, const AdamWStep& step, bool sgd) {
  for (size_t i = 0; i < targets_.size(); ++i)
    if (targets_[i].param_id == param_id) update_target(i, params, grads, m, v, step, sgd);
  // Slices of the parameter that no selected matrix covers get the plain update.
  const ParamSpec& ps = registry_.spec(param_id);
  for (const ElementRange& r : plain_ranges_.at(param_id)) {
    const int64_t at = ps.offset + r.begin, count = r.end - r.begin;
    const Tensor p = flat_at(params, at, count), g = flat_at(grads, at, count);
    if (sgd) {
      be_.scale(p, 1.0 - step.lr * step.weight_decay);
      be_.axpy(-step.lr * step.grad_scale, g, p);
    } else {
      const int64_t mo = moment_offset(param_id) + r.begin;
      be_.adamw_update(p, g, flat_at(m, mo, count), flat_at(v, mo, count), step);
    }
  }
}

void SpectralDecomposition::update_target(size_t index, const Tensor& params, const Tensor& grads, const Tensor& m,
                                          const Tensor& v, const AdamWStep& step, bool sgd) {
  const SpectralTarget& t = targets_[index];
  const int64_t mn = t.m * t.n, base = registry_.spec(t.param_id).offset + t.first;
  const double lr_c = step.lr * spec_.lr_mult_common, lr_u = step.lr * spec_.lr_mult_unique, wd = step.weight_decay;
  const Tensor g_common = projector_.scratch(0, t), diff = projector_.scratch(1, t);
  const int64_t span = (t.experts - 1) * t.stride + mn, moment_base = moment_offset(t.param_id) + t.first;
  // G_C = Pi_C(G); one fused pass over the stack: both parts' directions and moments, W
  // moved by the common direction plus the difference D, and D itself; then W -= Pi_C(D),
  // which leaves Pi_C(A_C) - lr_C wd W_C + Pi_U(A_U) - lr_U wd W_U (Backend::sdmoe_part_step).
  add_common_part(index, grads, base, t.stride, 1.0, g_common, 0, mn, 0.0);
  const SdmoePartStep part{step, lr_c, lr_u, (lr_c - lr_u) * wd, lr_c * wd, sgd};
  be_.sdmoe_part_step(flat_at(params, base, span), flat_at(grads, base, span), flat_at(m, moment_base, span),
                      flat_at(v, moment_base, span), g_common, flat_at(raw(unique_m_), unique_offset_[index], t.experts * mn),
                      flat_at(raw(unique_v_), unique_offset_[index], t.experts * mn), diff,
                      MatrixStack{t.experts, mn, t.stride}, part);
  add_common_part(index, diff, 0, mn, -1.0, params, base, t.stride, 1.0);
}

void SpectralDecomposition::add_common_part(size_t index, const Tensor& x, int64_t x_base, int64_t x_stride,
                                            double alpha, const Tensor& out, int64_t out_base, int64_t out_stride,
                                            double beta) {
  const SpectralTarget& t = targets_[index];
  const int64_t k = spec_.rank, m = t.m, n = t.n, e = t.experts;
  if (e == 0) return;
  const bool split_rows = t.split == SpectralTarget::Split::ROWS, split_cols = t.split == SpectralTarget::Split::COLS;
  const int64_t l_at = stacked_offset_[index], r_at = l_at + e * 2 * k * m, c_at = r_at + e * 2 * k * n;
  const Tensor l = flat_at(raw(stacked_), l_at, e * 2 * k * m), r = flat_at(raw(stacked_), r_at, e * 2 * k * n);
  const Tensor l_low = flat_at(raw(stacked_), l_at + k * m, e * 2 * k * m - k * m);  // rows k..2k of L
  const Tensor r_top = flat_at(raw(stacked_), r_at, e * 2 * k * n);                  // rows 0..k of R
  const Tensor xs = flat_at(x, x_base, (e - 1) * x_stride + m * n);
  // The bases as operands: whole from bases(), or, on the split side, this rank's slices
  // (the stacked copies: L's rows 0..k hold Ut, R's rows k..2k hold Vt).
  const int64_t ut_stride = split_rows ? 2 * k * m : t.bases > 1 ? k * m : 0;
  const int64_t vt_stride = split_cols ? 2 * k * n : t.bases > 1 ? k * n : 0;
  const Tensor ut = split_rows ? l : flat_at(bases(), t.ut_offset, (t.bases - 1) * ut_stride + k * m);
  const Tensor vt = split_cols ? flat_at(r, k * n, e * 2 * k * n - k * n)
                               : flat_at(bases(), t.vt_offset, (t.bases - 1) * vt_stride + k * n);
  // Split rows: Ut X sums over them; split columns: Vt X^T and Ut X V do. Those products
  // are formed contiguously in split_scratch_, summed over etp, and put in L and R.
  const Tensor scratch = split_rows || split_cols ? raw(split_scratch_) : Tensor();
  if (split_rows) {
    const Tensor sum = flat_at(scratch, 0, e * k * n);
    be_.gemm(false, false, k, n, m, 1.0, ut, xs, 0.0, sum, {e, ut_stride, x_stride, k * n});  // Ut X
    etp_->all_reduce(sum, ReduceOp::SUM);
    be_.copy_rows(sum, k * n, r_top, 2 * k * n, e, k * n);
  } else {
    be_.gemm(false, false, k, n, m, 1.0, ut, xs, 0.0, r_top, {e, ut_stride, x_stride, 2 * k * n});  // Ut X
  }
  const Tensor vx = split_cols ? flat_at(scratch, 0, e * k * m) : l_low;
  const Tensor c = split_cols ? flat_at(scratch, e * k * m, e * k * k) : flat_at(raw(stacked_), c_at, e * k * k);
  be_.gemm(false, true, k, m, n, 1.0, vt, xs, 0.0, vx, {e, vt_stride, x_stride, split_cols ? k * m : 2 * k * m});  // Vt X^T
  be_.gemm(false, true, k, k, n, 1.0, r_top, vt, 0.0, c, {e, 2 * k * n, vt_stride, k * k});  // Ut X V
  if (split_cols) {
    etp_->all_reduce(flat_at(scratch, 0, e * k * (m + k)), ReduceOp::SUM);
    be_.copy_rows(vx, k * m, l_low, 2 * k * m, e, k * m);
  }
  be_.gemm(false, false, k, n, k, -1.0, c, vt, 1.0, r_top, {e, k * k, vt_stride, 2 * k * n});  // Ut X (I - V V^T)
  be_.gemm(true, false, m, n, 2 * k, alpha, l, r, beta, flat_at(out, out_base, (e - 1) * out_stride + m * n),
           {e, 2 * k * m, 2 * k * n, out_stride});
}

void SpectralDecomposition::load_stacked_bases() {
  const int64_t k = spec_.rank;
  for (size_t i = 0; i < targets_.size(); ++i) {
    const SpectralTarget& t = targets_[i];
    const int64_t l_at = stacked_offset_[i], r_at = l_at + t.experts * 2 * k * t.m;
    // A split side's rows are this rank's slices: row j of basis b starts at element
    // j * full + split_first of it.
    const bool split_rows = t.split == SpectralTarget::Split::ROWS, split_cols = t.split == SpectralTarget::Split::COLS;
    // k rows of `length` from a basis of rows `full` long, starting at column `first`.
    auto copy_rows = [&](int64_t from, int64_t full, int64_t first, int64_t length, int64_t to) {
      if (full == length) return be_.copy(flat_at(bases(), from, k * length), flat_at(raw(stacked_), to, k * length));
      be_.copy_rows(flat_at(bases(), from + first, (k - 1) * full + length), full, flat_at(raw(stacked_), to, k * length),
                    length, k, length);
    };
    for (int64_t e = 0; e < t.experts; ++e) {
      const int64_t b = t.bases > 1 ? e : 0;
      copy_rows(t.ut_offset + b * k * t.m_full, t.m_full, split_rows ? t.split_first : 0, t.m, l_at + e * 2 * k * t.m);
      copy_rows(t.vt_offset + b * k * t.n_full, t.n_full, split_cols ? t.split_first : 0, t.n,
                r_at + e * 2 * k * t.n + k * t.n);
    }
  }
}

void SpectralDecomposition::install_bases(const Tensor& new_bases, const Tensor& m) {
  SDMOE_ASSERT(new_bases.numel() == bases_elements_, "install_bases: {} elements for {}", new_bases.numel(),
               bases_elements_);
  // The first moments' sums, with the old bases still in place.
  for (size_t i = 0; i < targets_.size(); ++i) {
    const SpectralTarget& t = targets_[i];
    const int64_t mn = t.m * t.n, base = registry_.spec(t.param_id).offset + t.first;
    const Tensor total = projector_.scratch(0, t);
    for (int64_t e = 0; e < t.experts; ++e) {
      const Tensor sum = flat_at(total, e * mn, mn);
      be_.copy(flat_at(m, moment_offset(t.param_id) + t.first + e * t.stride, mn), sum);
      be_.axpy(1.0, unique_m(i, e), sum);
      // Parked in the unique moments until the new bases are in.
      be_.copy(sum, unique_m(i, e));
    }
  }
  be_.copy(new_bases, bases());
  load_stacked_bases();
  for (size_t i = 0; i < targets_.size(); ++i) {
    const SpectralTarget& t = targets_[i];
    const int64_t mn = t.m * t.n, base = registry_.spec(t.param_id).offset + t.first;
    const Tensor sums = flat_at(raw(unique_m_), unique_offset_[i], t.experts * mn);
    const Tensor unique = projector_.scratch(1, t);
    projector_.project_unique(t, bases(), sums, 0, mn, unique);
    for (int64_t e = 0; e < t.experts; ++e) {
      const Tensor mc = flat_at(m, moment_offset(t.param_id) + t.first + e * t.stride, mn);
      be_.copy(unique_m(i, e), mc);
      be_.axpy(-1.0, flat_at(unique, e * mn, mn), mc);
      be_.copy(flat_at(unique, e * mn, mn), unique_m(i, e));
    }
  }
}

}  // namespace sdmoe
