#include "model/optimizer.h"

#include <cmath>

namespace sdmoe {

double learning_rate(const OptimizerSpec& s, int64_t step) {
  if (step < s.warmup_steps) return s.lr * double(step + 1) / double(s.warmup_steps);
  const double span = double(std::max<int64_t>(1, s.total_steps - s.warmup_steps));
  const double progress = std::min(1.0, double(step - s.warmup_steps) / span);
  return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + std::cos(M_PI * progress));
}

AdamW::AdamW(GptModel& model, const OptimizerSpec& spec) : model_(model), spec_(spec) {
  const size_t bytes = model.registry().total_elements() * dtype_size(model.dtype());
  m_ = Buffer(model.backend(), bytes);
  v_ = Buffer(model.backend(), bytes);
  model.backend().fill(first_moments(), 0.0);
  model.backend().fill(second_moments(), 0.0);
}

OptimizerStepResult AdamW::step(int64_t step_index, double grad_norm) {
  Backend& be = model_.backend();
  OptimizerStepResult r;
  r.lr = learning_rate(spec_, step_index);
  r.grad_norm = grad_norm >= 0.0 ? grad_norm : std::sqrt(be.sum_squares(model_.grads()));
  r.clip_factor = (spec_.grad_clip > 0 && r.grad_norm > spec_.grad_clip) ? spec_.grad_clip / r.grad_norm : 1.0;
  const double t = double(step_index + 1);
  const ParamRegistry& reg = model_.registry();
  for (size_t id = 0; id < reg.specs().size(); ++id) {
    const int i = static_cast<int>(id);
    AdamWStep s{r.lr, spec_.beta1, spec_.beta2, spec_.eps, reg.spec(i).weight_decay() ? spec_.weight_decay : 0.0,
                1.0 - std::pow(spec_.beta1, t), 1.0 - std::pow(spec_.beta2, t), r.clip_factor};
    be.adamw_update(model_.param(i), model_.grad(i), reg.view(m_, i, model_.dtype(), be.device()),
                    reg.view(v_, i, model_.dtype(), be.device()), s);
  }
  return r;
}

}  // namespace sdmoe
