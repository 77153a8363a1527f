#include "parallel/token_dispatcher.h"

#include <algorithm>

#include "core/check.h"

namespace sdmoe {

TokenDispatcher::TokenDispatcher(std::shared_ptr<Communicator> ep_group, std::shared_ptr<Communicator> etp_group,
                                 Backend& backend, int num_experts)
    : ep_group_(std::move(ep_group)), etp_group_(std::move(etp_group)), backend_(backend), num_experts_(num_experts) {
  if (ep_group_) {
    ep_size_ = ep_group_->size();
    ep_rank_ = ep_group_->rank();
  }
  if (etp_group_) {
    etp_size_ = etp_group_->size();
    etp_rank_ = etp_group_->rank();
  }
  SDMOE_ASSERT(num_experts_ > 0 && num_experts_ % ep_size_ == 0, "{} experts cannot be split over {} ranks",
               num_experts_, ep_size_);
  local_experts_ = num_experts_ / ep_size_;
  own_.local_offsets_.assign(local_experts_ + 1, 0);
}

void TokenDispatcher::build(Routing::Permutation& perm, const std::vector<int64_t>& counts, int peers) {
  const int el = local_experts_;
  perm.rows_per_peer.assign(peers, 0);
  perm.expert_offsets.assign(el + 1, 0);
  for (int p = 0; p < peers; ++p)
    for (int j = 0; j < el; ++j) {
      perm.rows_per_peer[p] += counts[p * el + j];
      perm.expert_offsets[j + 1] += counts[p * el + j];
    }
  for (int j = 0; j < el; ++j) perm.expert_offsets[j + 1] += perm.expert_offsets[j];
  perm.rows = perm.expert_offsets[el];
  // Within one (expert, peer) block rows keep the sender's order, which is token order:
  // the layout, and so the result, is a function of the routing alone.
  std::vector<int32_t> to_em(perm.rows), to_pm(perm.rows);
  std::vector<int64_t> em_cursor(perm.expert_offsets.begin(), perm.expert_offsets.end() - 1);
  int64_t pm = 0;
  for (int p = 0; p < peers; ++p)
    for (int j = 0; j < el; ++j)
      for (int64_t r = 0; r < counts[p * el + j]; ++r, ++pm) {
        const int64_t em = em_cursor[j]++;
        to_em[em] = static_cast<int32_t>(pm);
        to_pm[pm] = static_cast<int32_t>(em);
      }
  if (perm.rows > perm.capacity || !perm.index.data()) {
    perm.capacity = std::max<int64_t>(perm.rows + perm.rows / 2, 1);
    perm.index = Buffer(backend_, size_t(2 * perm.capacity) * sizeof(int32_t));
  }
  int32_t* base = static_cast<int32_t*>(perm.index.data());
  perm.to_expert_major = Tensor(base, DType::I32, backend_.device(), {perm.rows});
  perm.to_peer_major = Tensor(base + perm.capacity, DType::I32, backend_.device(), {perm.rows});
  if (perm.rows > 0) {
    backend_.copy_from_host(to_em.data(), perm.to_expert_major);
    backend_.copy_from_host(to_pm.data(), perm.to_peer_major);
  }
}

void TokenDispatcher::exchange_counts(Routing& routing, std::span<const int64_t> rows_per_expert) {
  SDMOE_ASSERT(int64_t(rows_per_expert.size()) == num_experts_, "exchange_counts: {} counts for {} experts",
               rows_per_expert.size(), num_experts_);
  const int el = local_experts_;
  routing.sent_rows_ = 0;
  routing.send_rows_per_peer_.assign(ep_size_, 0);
  for (int e = 0; e < num_experts_; ++e) {
    routing.send_rows_per_peer_[e / el] += rows_per_expert[e];
    routing.sent_rows_ += rows_per_expert[e];
  }
  // ep stage: from[p * el + j] rows from ep peer p for local expert j.
  std::vector<int64_t> from(rows_per_expert.begin(), rows_per_expert.end());
  if (ep_size_ > 1) {
    from = ep_group_->exchange_counts(rows_per_expert);
    build(routing.ep_, from, ep_size_);
  } else {
    routing.ep_.rows_per_peer = {routing.sent_rows_};
    routing.ep_.rows = routing.sent_rows_;
    routing.ep_.expert_offsets.assign(el + 1, 0);
    for (int j = 0; j < el; ++j) routing.ep_.expert_offsets[j + 1] = routing.ep_.expert_offsets[j] + from[j];
  }
  routing.local_offsets_ = routing.ep_.expert_offsets;
  if (etp_size_ == 1) return;
  // etp stage: every etp peer's per-expert counts, to all-gather the rows.
  std::vector<int64_t> mine(el), repeated;
  for (int j = 0; j < el; ++j) mine[j] = routing.ep_.expert_offsets[j + 1] - routing.ep_.expert_offsets[j];
  for (int p = 0; p < etp_size_; ++p) repeated.insert(repeated.end(), mine.begin(), mine.end());
  build(routing.etp_, etp_group_->exchange_counts(repeated), etp_size_);
  routing.local_offsets_ = routing.etp_.expert_offsets;
}

Tensor TokenDispatcher::scratch(const Routing& routing, int slot, int64_t rows, int64_t width, DType dtype) {
  // Four slots: ep receive [R], ep expert-major [R], etp copies [etp * R], etp gathered [G].
  const int64_t r = routing.ep_.rows, g = etp_size_ > 1 ? routing.etp_.rows : 0;
  const int64_t slot_rows[4] = {r, r, etp_size_ * r, g};
  int64_t offset = 0;
  for (int i = 0; i < slot; ++i) offset += slot_rows[i];
  const int64_t total = (2 * r + etp_size_ * r + g) * width * int64_t(dtype_size(dtype));
  if (total > staging_capacity_) {
    staging_capacity_ = total + total / 2;
    staging_ = Buffer(backend_, size_t(staging_capacity_));
  }
  SDMOE_ASSERT(rows <= slot_rows[slot], "dispatcher scratch slot {}: {} rows of {}", slot, rows, slot_rows[slot]);
  char* base = static_cast<char*>(staging_.data()) + offset * width * int64_t(dtype_size(dtype));
  return Tensor(base, dtype, backend_.device(), {rows, width});
}

void TokenDispatcher::dispatch(const Routing& routing, const Tensor& sorted, const Tensor& expert_major) {
  const int64_t width = sorted.cols(), r = routing.ep_.rows, out_rows = routing.received_rows();
  SDMOE_ASSERT(sorted.rows() >= routing.sent_rows_ && expert_major.rows() >= out_rows,
               "dispatch: {} and {} rows for {} sent and {} received", sorted.rows(), expert_major.rows(), routing.sent_rows_,
               out_rows);
  SDMOE_ASSERT(sorted.dtype == expert_major.dtype && width == expert_major.cols(), "dispatch: row formats differ");
  const DType dt = sorted.dtype;
  if (local_only()) {
    if (sorted.data != expert_major.data && routing.sent_rows_ > 0)
      backend_.copy(sorted.prefix({routing.sent_rows_, width}), expert_major.prefix({routing.sent_rows_, width}));
    return;
  }
  // ep stage: rows to the ranks holding their experts, then expert-major.
  Tensor ep_out = etp_size_ > 1 ? scratch(routing, 1, r, width, dt) : expert_major.prefix({r, width});
  if (ep_size_ > 1) {
    const Tensor received = scratch(routing, 0, r, width, dt);
    std::vector<int64_t> send(ep_size_), recv(ep_size_);
    for (int p = 0; p < ep_size_; ++p) {
      send[p] = routing.send_rows_per_peer_[p] * width;
      recv[p] = routing.ep_.rows_per_peer[p] * width;
    }
    ep_group_->all_to_all(sorted, send, received, recv);
    if (r > 0) backend_.gather_rows(received, routing.ep_.to_expert_major, ep_out);
  } else if (r > 0) {
    backend_.copy(sorted.prefix({r, width}), ep_out);  // already expert-major
  }
  if (etp_size_ == 1) return;
  // etp stage: all-gather (each peer's rows to every peer), then expert-major.
  const Tensor copies = scratch(routing, 2, etp_size_ * r, width, dt), gathered = scratch(routing, 3, out_rows, width, dt);
  for (int p = 0; p < etp_size_ && r > 0; ++p) backend_.copy(ep_out, copies.slice_rows(p * r, r));
  std::vector<int64_t> send(etp_size_, r * width), recv(etp_size_);
  for (int p = 0; p < etp_size_; ++p) recv[p] = routing.etp_.rows_per_peer[p] * width;
  etp_group_->all_to_all(copies, send, gathered, recv);
  if (out_rows > 0) backend_.gather_rows(gathered, routing.etp_.to_expert_major, expert_major.prefix({out_rows, width}));
}

void TokenDispatcher::combine(const Routing& routing, const Tensor& expert_major, const Tensor& sorted) {
  const int64_t width = sorted.cols(), r = routing.ep_.rows, in_rows = routing.received_rows();
  SDMOE_ASSERT(sorted.rows() >= routing.sent_rows_ && expert_major.rows() >= in_rows,
               "combine: {} and {} rows for {} sent and {} received", sorted.rows(), expert_major.rows(), routing.sent_rows_,
               in_rows);
  SDMOE_ASSERT(sorted.dtype == expert_major.dtype && width == expert_major.cols(), "combine: row formats differ");
  const DType dt = sorted.dtype;
  if (local_only()) {
    if (sorted.data != expert_major.data && routing.sent_rows_ > 0)
      backend_.copy(expert_major.prefix({routing.sent_rows_, width}), sorted.prefix({routing.sent_rows_, width}));
    return;
  }
  Tensor ep_in = expert_major.prefix({r, width});
  if (etp_size_ > 1) {
    // etp stage back: each peer's rows to that peer, then its peers' partial sums added
    // in rank order.
    const Tensor gathered = scratch(routing, 3, in_rows, width, dt), partials = scratch(routing, 2, etp_size_ * r, width, dt);
    if (in_rows > 0) backend_.gather_rows(expert_major.prefix({in_rows, width}), routing.etp_.to_peer_major, gathered);
    std::vector<int64_t> send(etp_size_), recv(etp_size_, r * width);
    for (int p = 0; p < etp_size_; ++p) send[p] = routing.etp_.rows_per_peer[p] * width;
    etp_group_->all_to_all(gathered, send, partials, recv);
    ep_in = scratch(routing, 1, r, width, dt);
    if (r > 0) {
      backend_.copy(partials.slice_rows(0, r), ep_in);
      for (int p = 1; p < etp_size_; ++p) backend_.axpy(1.0, partials.slice_rows(p * r, r), ep_in);
    }
  }
  if (ep_size_ > 1) {
    const Tensor source_major = scratch(routing, 0, r, width, dt);
    if (r > 0) backend_.gather_rows(ep_in, routing.ep_.to_peer_major, source_major);
    std::vector<int64_t> send(ep_size_), recv(ep_size_);
    for (int p = 0; p < ep_size_; ++p) {
      send[p] = routing.ep_.rows_per_peer[p] * width;
      recv[p] = routing.send_rows_per_peer_[p] * width;
    }
    ep_group_->all_to_all(source_major, send, sorted, recv);
  } else if (r > 0) {
    backend_.copy(ep_in, sorted.prefix({r, width}));
  }
}

}  // namespace sdmoe
