#include "parallel/token_dispatcher.h"

#include "core/check.h"

namespace sdmoe {

TokenDispatcher::TokenDispatcher(std::shared_ptr<Communicator> ep_group, Backend& backend, int num_experts)
    : group_(std::move(ep_group)), backend_(backend), num_experts_(num_experts) {
  if (group_) {
    ep_size_ = group_->size();
    ep_rank_ = group_->rank();
  }
  SDMOE_ASSERT(num_experts_ > 0 && num_experts_ % ep_size_ == 0, "{} experts cannot be split over {} ranks",
               num_experts_, ep_size_);
  local_experts_ = num_experts_ / ep_size_;
  local_offsets_.assign(local_experts_ + 1, 0);
}

void TokenDispatcher::exchange_counts(std::span<const int64_t> rows_per_expert) {
  SDMOE_ASSERT(int64_t(rows_per_expert.size()) == num_experts_, "exchange_counts: {} counts for {} experts",
               rows_per_expert.size(), num_experts_);
  const int el = local_experts_, ep = ep_size_;
  sent_rows_ = 0;
  send_rows_per_peer_.assign(ep, 0);
  for (int e = 0; e < num_experts_; ++e) {
    send_rows_per_peer_[e / el] += rows_per_expert[e];
    sent_rows_ += rows_per_expert[e];
  }
  if (local_only()) {
    received_rows_ = sent_rows_;
    recv_rows_per_peer_ = send_rows_per_peer_;
    for (int j = 0; j < el; ++j) local_offsets_[j + 1] = local_offsets_[j] + rows_per_expert[j];
    return;
  }
  // from[p * el + j]: rows peer p sends to this rank's local expert j.
  const std::vector<int64_t> from = group_->exchange_counts(rows_per_expert);
  recv_rows_per_peer_.assign(ep, 0);
  for (int p = 0; p < ep; ++p)
    for (int j = 0; j < el; ++j) recv_rows_per_peer_[p] += from[p * el + j];
  local_offsets_.assign(el + 1, 0);
  for (int j = 0; j < el; ++j) {
    int64_t rows = 0;
    for (int p = 0; p < ep; ++p) rows += from[p * el + j];
    local_offsets_[j + 1] = local_offsets_[j] + rows;
  }
  received_rows_ = local_offsets_[el];

  // The permutation between the received (source-major) order and the expert-major one.
  // Within one (expert, source) block the rows keep the sender's order, which is token
  // order: the layout, and so the result, is a function of the routing alone.
  std::vector<int32_t> to_em(received_rows_), to_sm(received_rows_);
  std::vector<int64_t> sm_start(ep * el), em_cursor(local_offsets_.begin(), local_offsets_.end() - 1);
  int64_t cursor = 0;
  for (int p = 0; p < ep; ++p)
    for (int j = 0; j < el; ++j) {
      sm_start[p * el + j] = cursor;
      cursor += from[p * el + j];
    }
  for (int j = 0; j < el; ++j)
    for (int p = 0; p < ep; ++p)
      for (int64_t r = 0; r < from[p * el + j]; ++r) {
        const int64_t em = em_cursor[j]++, sm = sm_start[p * el + j] + r;
        to_em[em] = static_cast<int32_t>(sm);
        to_sm[sm] = static_cast<int32_t>(em);
      }
  if (received_rows_ > index_capacity_) {
    index_capacity_ = received_rows_ + received_rows_ / 2;
    index_buffer_ = Buffer(backend_, size_t(2 * index_capacity_) * sizeof(int32_t));
  }
  int32_t* base = static_cast<int32_t*>(index_buffer_.data());
  to_expert_major_ = Tensor(base, DType::I32, backend_.device(), {received_rows_});
  to_source_major_ = Tensor(base + index_capacity_, DType::I32, backend_.device(), {received_rows_});
  if (received_rows_ > 0) {
    backend_.copy_from_host(to_em.data(), to_expert_major_);
    backend_.copy_from_host(to_sm.data(), to_source_major_);
  }
}

void TokenDispatcher::ensure_staging(int64_t bytes) {
  if (bytes <= staging_capacity_) return;
  staging_capacity_ = bytes + bytes / 2;
  staging_ = Buffer(backend_, size_t(staging_capacity_));
}

void TokenDispatcher::dispatch(const Tensor& sorted, const Tensor& expert_major) {
  SDMOE_ASSERT(sorted.rows() >= sent_rows_ && expert_major.rows() >= received_rows_,
               "dispatch: {} and {} rows for {} sent and {} received", sorted.rows(), expert_major.rows(), sent_rows_,
               received_rows_);
  SDMOE_ASSERT(sorted.dtype == expert_major.dtype && sorted.cols() == expert_major.cols(),
               "dispatch: row formats differ");
  const int64_t width = sorted.cols();
  if (local_only()) {
    if (sorted.data != expert_major.data && sent_rows_ > 0)
      backend_.copy(sorted.prefix({sent_rows_, width}), expert_major.prefix({sent_rows_, width}));
    return;
  }
  ensure_staging(received_rows_ * width * int64_t(dtype_size(sorted.dtype)));
  const Tensor received(staging_.data(), sorted.dtype, backend_.device(), {received_rows_, width});
  std::vector<int64_t> send(ep_size_), recv(ep_size_);
  for (int p = 0; p < ep_size_; ++p) {
    send[p] = send_rows_per_peer_[p] * width;
    recv[p] = recv_rows_per_peer_[p] * width;
  }
  group_->all_to_all(sorted, send, received, recv);
  if (received_rows_ > 0) backend_.gather_rows(received, to_expert_major_, expert_major.prefix({received_rows_, width}));
}

void TokenDispatcher::combine(const Tensor& expert_major, const Tensor& sorted) {
  SDMOE_ASSERT(sorted.rows() >= sent_rows_ && expert_major.rows() >= received_rows_,
               "combine: {} and {} rows for {} sent and {} received", sorted.rows(), expert_major.rows(), sent_rows_,
               received_rows_);
  SDMOE_ASSERT(sorted.dtype == expert_major.dtype && sorted.cols() == expert_major.cols(),
               "combine: row formats differ");
  const int64_t width = sorted.cols();
  if (local_only()) {
    if (sorted.data != expert_major.data && sent_rows_ > 0)
      backend_.copy(expert_major.prefix({sent_rows_, width}), sorted.prefix({sent_rows_, width}));
    return;
  }
  ensure_staging(received_rows_ * width * int64_t(dtype_size(sorted.dtype)));
  const Tensor source_major(staging_.data(), sorted.dtype, backend_.device(), {received_rows_, width});
  if (received_rows_ > 0) backend_.gather_rows(expert_major.prefix({received_rows_, width}), to_source_major_, source_major);
  std::vector<int64_t> send(ep_size_), recv(ep_size_);
  for (int p = 0; p < ep_size_; ++p) {
    send[p] = recv_rows_per_peer_[p] * width;
    recv[p] = send_rows_per_peer_[p] * width;
  }
  group_->all_to_all(source_major, send, sorted, recv);
}

}  // namespace sdmoe
