#include "model/optimizer.h"

#include <algorithm>
#include <cmath>

#include "model/sdmoe.h"

namespace sdmoe {

double learning_rate(const OptimizerSpec& s, int64_t step) {
  if (step < s.warmup_steps) return s.lr * double(step + 1) / double(s.warmup_steps);
  const double span = double(std::max<int64_t>(1, s.total_steps - s.warmup_steps));
  const double progress = std::min(1.0, double(step - s.warmup_steps) / span);
  return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + std::cos(M_PI * progress));
}

AdamW::AdamW(GptModel& model, const OptimizerSpec& spec, std::vector<ElementRange> ranges,
             SpectralDecomposition* sdmoe)
    : model_(model), spec_(spec), ranges_(std::move(ranges)), sdmoe_(sdmoe) {
  const int64_t total = model.registry().total_elements();
  if (ranges_.empty()) ranges_.push_back({0, total});
  for (const ElementRange& r : ranges_) {
    SDMOE_ASSERT(0 <= r.begin && r.begin <= r.end && r.end <= total, "optimizer range [{}, {}) of {}", r.begin, r.end,
                 total);
    moment_elements_ += r.end - r.begin;
  }
  const size_t bytes = size_t(moment_elements_) * dtype_size(model.dtype());
  m_ = Buffer(model.backend(), bytes);
  v_ = Buffer(model.backend(), bytes);
  // SD-MoE projects whole expert matrices: each parameter it handles must lie inside one
  // range this optimizer owns, and it is told where that parameter's moments are.
  if (sdmoe_) {
    const ParamRegistry& reg = model.registry();
    for (size_t id = 0; id < reg.specs().size(); ++id) {
      if (!sdmoe_->handles(int(id))) continue;
      const ParamSpec& ps = reg.spec(int(id));
      int64_t base = 0;
      bool found = false;
      for (const ElementRange& r : ranges_) {
        if (r.begin <= ps.offset && ps.offset + ps.numel <= r.end) {
          sdmoe_->set_moment_offset(int(id), base + (ps.offset - r.begin));
          found = true;
          break;
        }
        base += r.end - r.begin;
      }
      SDMOE_ASSERT(found, "SD-MoE parameter {} is not whole in one optimizer range (shard experts with ZeRO-1?)",
                   ps.name);
    }
  }
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
  const Tensor params = model_.params(), grads = model_.grads(), m = first_moments(), v = second_moments();
  const size_t width = dtype_size(model_.dtype());
  auto part = [&](const Tensor& flat, int64_t begin, int64_t count) {
    return Tensor(static_cast<char*>(flat.data) + begin * width, flat.dtype, flat.device, {count});
  };
  // Each parameter's part inside each range, with that parameter's decay; padding between
  // tensors is skipped.
  int64_t moment_base = 0;
  for (const ElementRange& range : ranges_) {
    for (size_t id = 0; id < reg.specs().size(); ++id) {
      const ParamSpec& ps = reg.spec(static_cast<int>(id));
      const int64_t begin = std::max(range.begin, ps.offset), end = std::min(range.end, ps.offset + ps.numel);
      if (begin >= end) continue;
      AdamWStep s{r.lr, spec_.beta1, spec_.beta2, spec_.eps, ps.weight_decay() ? spec_.weight_decay : 0.0,
                  1.0 - std::pow(spec_.beta1, t), 1.0 - std::pow(spec_.beta2, t), r.clip_factor};
      if (sdmoe_ && sdmoe_->handles(int(id))) {
        // Whole in this range (checked at construction).
        sdmoe_->update(int(id), params, grads, m, v, s, spec_.sgd);
        continue;
      }
      const int64_t mo = moment_base + (begin - range.begin);
      const Tensor p = part(params, begin, end - begin), g = part(grads, begin, end - begin);
      if (spec_.sgd) {
        be.scale(p, 1.0 - s.lr * s.weight_decay);
        be.axpy(-s.lr * s.grad_scale, g, p);
        continue;
      }
      be.adamw_update(p, g, part(m, mo, end - begin), part(v, mo, end - begin), s);
    }
    moment_base += range.end - range.begin;
  }
  return r;
}

}  // namespace sdmoe
