// The whole model on the CUDA backend in each precision and attention mode, against the F64
// model on the CPU as the oracle: one forward and backward of a small model with every
// layer kind (dense and MoE layers, a shared expert, untied embeddings).
//
// The bounds are those of tests/model/test_mixed_precision.cc, which derives them: BF16
// within 1e-3 relative on the loss and 5e-2 relative L2 on every gradient tensor (a few
// bf16 roundings in series); FP32 within 1e-4 on every gradient (fp32 roundings only).
// The CUDA path must meet the same bounds as the CPU one: its bf16 kernels round the same
// operands at the same places. A BF16 run that stayed in fp32 is caught by requiring BF16
// to differ from the oracle by far more than FP32 does. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "model/gpt.h"
#include "tests/model/layer_support.h"

namespace sdmoe::gradtest {
namespace {

struct Comparison {
  double loss_rel = 0.0, worst_grad_rel = 0.0;
  std::string worst_name;
};

Comparison gpu_against_f64(const PrecisionPolicy& policy, bool fused_attention) {
  const ModelSpec spec = small_model_spec(96);  // more than one 64-row attention tile
  const int batch = 2;
  const std::unique_ptr<Backend> gpu = make_cuda_backend(0);  // outlives the model below
  GptModel reference(spec, be(), DType::F64, batch);
  GptModel model(spec, *gpu, policy, batch, {}, ModelExecution{Recompute::NONE, fused_attention});
  reference.init_parameters(31);
  model.init_parameters(31);
  const auto tokens = random_tokens(spec, batch, 32);
  const MicroBatchStats want = reference.forward_backward(tokens.data(), 1.0);
  const MicroBatchStats got = model.forward_backward(tokens.data(), 1.0);
  Comparison c;
  c.loss_rel = std::fabs(got.loss_sum - want.loss_sum) / want.loss_sum;
  for (size_t id = 0; id < reference.registry().specs().size(); ++id) {
    const double rel = relative_l2(host(reference.grad(int(id))),
                                   test_support::download(*gpu, model.grad(int(id))));
    if (rel > c.worst_grad_rel) {
      c.worst_grad_rel = rel;
      c.worst_name = reference.registry().spec(int(id)).name;
    }
  }
  return c;
}

void expect_bf16_follows_f64(bool fused_attention) {
  const Comparison bf16 = gpu_against_f64(PrecisionPolicy::of(Precision::BF16), fused_attention);
  const Comparison fp32 = gpu_against_f64(PrecisionPolicy::of(Precision::FP32), false);
  EXPECT_LT(bf16.loss_rel, 1e-3) << "loss";
  EXPECT_LT(bf16.worst_grad_rel, 5e-2) << "gradient of " << bf16.worst_name;
  EXPECT_LT(fp32.worst_grad_rel, 1e-4) << "FP32 gradient of " << fp32.worst_name;
  EXPECT_GT(bf16.worst_grad_rel, 10 * fp32.worst_grad_rel) << "BF16 ran in fp32?";
  std::printf("CUDA BF16%s vs F64: loss %.2e relative, worst gradient %.2e (%s); CUDA FP32 worst gradient %.2e\n",
              fused_attention ? " fused" : "", bf16.loss_rel, bf16.worst_grad_rel, bf16.worst_name.c_str(),
              fp32.worst_grad_rel);
}

TEST(CudaModel, Bf16FollowsF64) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  expect_bf16_follows_f64(false);
}

TEST(CudaModel, Bf16FusedAttentionFollowsF64) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  expect_bf16_follows_f64(true);
}

TEST(CudaModel, Fp32FusedAttentionFollowsF64) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Comparison c = gpu_against_f64(PrecisionPolicy::of(Precision::FP32), true);
  EXPECT_LT(c.loss_rel, 1e-5) << "loss";
  EXPECT_LT(c.worst_grad_rel, 1e-4) << "gradient of " << c.worst_name;
}

}  // namespace
}  // namespace sdmoe::gradtest
