// AdamW with decoupled weight decay, global gradient-norm clipping and a linear-warmup,
// cosine-decay learning-rate schedule.
#pragma once
#include <cstdint>

#include "model/gpt.h"

namespace sdmoe {

struct OptimizerSpec {
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
  AdamW(GptModel& model, const OptimizerSpec& spec);
  // Applies one update from the model's (already reduced) gradients. grad_norm is the
  // global gradient norm, for clipping; negative: this rank's gradients are the whole
  // model's, compute it here.
  OptimizerStepResult step(int64_t step_index, double grad_norm = -1.0);
  Tensor first_moments() const { return model_.registry().flat(m_, model_.dtype(), model_.backend().device()); }
  Tensor second_moments() const { return model_.registry().flat(v_, model_.dtype(), model_.backend().device()); }

 private:
  GptModel& model_;
  OptimizerSpec spec_;
  Buffer m_, v_;
};

}  // namespace sdmoe
