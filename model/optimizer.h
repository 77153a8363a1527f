// AdamW with decoupled weight decay, global gradient-norm clipping and a linear-warmup,
// cosine-decay learning-rate schedule.
#pragma once
#include <cstdint>

#include "model/gpt.h"

namespace sdmoe {

class SpectralDecomposition;

struct OptimizerSpec {
  bool sgd = false;  // plain SGD (no moments): the SD-MoE trajectory check; AdamW otherwise
  double lr = 3e-4, min_lr = 3e-5;
  int64_t warmup_steps = 100, total_steps = 1000;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // 0 disables
};

// Learning rate for the 0-based step: linear from lr/warmup to lr over warmup_steps, then
// cosine down to min_lr at total_steps.
double learning_rate(const OptimizerSpec& spec, int64_t step);

struct OptimizerStepResult {
  double lr;
  double grad_norm;     // before clipping
  double clip_factor;   // multiplier applied to the gradient (1 when not clipped)
};

class AdamW {
 public:
  // Updates the whole model, or only `ranges` of its flat buffer (ZeRO-1: this rank's
  // shards); moments are kept for those elements alone.
  // With `sdmoe`, the parameters holding SD-MoE matrices are updated by it (their
  // common parts with this optimizer's moments, their unique parts with its own).
  AdamW(GptModel& model, const OptimizerSpec& spec, std::vector<ElementRange> ranges = {},
        SpectralDecomposition* sdmoe = nullptr);
  // Applies one update from the model's (already reduced) gradients. grad_norm is the
  // global gradient norm, for clipping; negative: this rank's gradients are the whole
  // model's, compute it here.
  OptimizerStepResult step(int64_t step_index, double grad_norm = -1.0);
  Tensor first_moments() const { return moments(m_); }
  Tensor second_moments() const { return moments(v_); }
  int64_t moment_elements() const { return moment_elements_; }
  // The flat-buffer ranges this optimizer updates; their moments lie one after another,
  // in this order, in first_moments() and second_moments().
  const std::vector<ElementRange>& ranges() const { return ranges_; }

 private:
  Tensor moments(const Buffer& b) const {
    return Tensor(b.data(), model_.dtype(), model_.backend().device(), {moment_elements_});
  }
  GptModel& model_;
  OptimizerSpec spec_;
  std::vector<ElementRange> ranges_;
  SpectralDecomposition* sdmoe_ = nullptr;
  int64_t moment_elements_ = 0;
  Buffer m_, v_;
};

}  // namespace sdmoe
