// The BF16 precision policy on the whole model, against the F64 model as the oracle.
//
// Tolerances: bf16 keeps 8 significant bits, so each rounding of a GEMM operand perturbs
// it by at most u = 2^-9 relative (half an ulp). A GEMM output then errs by about u times
// the size of its terms (the errors of a sum of k terms partly cancel), and a forward or
// backward pass goes through a handful of such roundings in series (norm output, q/k/v,
// probabilities, context, SwiGLU output, and in the backward the gradients staged as
// operands). So the loss should agree to within a few u (its per-token errors are of
// either sign and mostly cancel over the tokens: 4e-6 measured, bound 1e-3), and each
// gradient tensor, as a whole, to a few percent in relative L2 norm (9e-3 measured, on the
// router, whose gradient is a difference of nearly equal terms; bound 5e-2);
// single elements may err more (a small gradient made of large cancelling terms). The
// bounds below are those estimates with a margin; the FP32 model meets them with room by
// orders of magnitude (its u is 2^-24), and a BF16 model that skipped an operand copy, a
// staged gradient or the fp32 accumulation would miss them (a dropped refresh of the
// weight copy is caught exactly, below).
#include <cmath>
#include <random>

#include "model/gpt.h"
#include "tests/model/layer_support.h"

namespace sdmoe::gradtest {
namespace {

// 32 tokens per sequence.
ModelSpec mixed_spec() { return small_model_spec(32); }

void upload(const Tensor& t, const std::vector<double>& v) { test_support::upload(be(), t, v); }

struct Comparison {
  double loss_rel = 0.0, worst_grad_rel = 0.0;
  std::string worst_name;
};

Comparison compare_with_f64(const PrecisionPolicy& policy) {
  const ModelSpec spec = mixed_spec();
  const int batch = 2;
  GptModel reference(spec, be(), DType::F64, batch), model(spec, be(), policy, batch);
  reference.init_parameters(21);
  model.init_parameters(21);
  const auto tokens = random_tokens(spec, batch, 22);
  const MicroBatchStats want = reference.forward_backward(tokens.data(), 1.0);
  const MicroBatchStats got = model.forward_backward(tokens.data(), 1.0);
  Comparison c;
  c.loss_rel = std::fabs(got.loss_sum - want.loss_sum) / want.loss_sum;
  for (size_t id = 0; id < reference.registry().specs().size(); ++id) {
    const double rel = relative_l2(host(reference.grad(int(id))), host(model.grad(int(id))));
    if (rel > c.worst_grad_rel) {
      c.worst_grad_rel = rel;
      c.worst_name = reference.registry().spec(int(id)).name;
    }
  }
  return c;
}

TEST(MixedPrecision, Bf16LossAndGradientsFollowF64WithinBf16Error) {
  const Comparison c = compare_with_f64(PrecisionPolicy::of(Precision::BF16));
  EXPECT_LT(c.loss_rel, 1e-3) << "loss";
  EXPECT_LT(c.worst_grad_rel, 5e-2) << "gradient of " << c.worst_name;
  // The comparison is not empty: BF16 does differ from the oracle, by far more than FP32.
  const Comparison fp32 = compare_with_f64(PrecisionPolicy::of(Precision::FP32));
  EXPECT_LT(fp32.worst_grad_rel, 1e-4) << "FP32 gradient of " << fp32.worst_name;
  EXPECT_GT(c.worst_grad_rel, 10 * fp32.worst_grad_rel) << "BF16 ran in fp32?";
  std::printf("BF16 vs F64: loss %.2e relative, worst gradient %.2e (%s); FP32 worst gradient %.2e\n", c.loss_rel,
              c.worst_grad_rel, c.worst_name.c_str(), fp32.worst_grad_rel);
}

TEST(MixedPrecision, MasterStateStaysFp32) {
  const ModelSpec spec = mixed_spec();
  GptModel model(spec, be(), PrecisionPolicy::of(Precision::BF16), 2);
  EXPECT_EQ(model.dtype(), DType::F32);
  EXPECT_EQ(model.params().dtype, DType::F32);
  EXPECT_EQ(model.grads().dtype, DType::F32);
  EXPECT_EQ(model.precision().operand, DType::BF16);
  // The operand activations are half the size: a BF16 model keeps fewer bytes.
  GptModel fp32(spec, be(), PrecisionPolicy::of(Precision::FP32), 2);
  EXPECT_LT(model.activation_bytes(), fp32.activation_bytes());
}

TEST(MixedPrecision, WeightCopyFollowsTheMasterOnlyWhenToldTheyChanged) {
  const ModelSpec spec = mixed_spec();
  GptModel model(spec, be(), PrecisionPolicy::of(Precision::BF16), 2);
  model.init_parameters(31);
  const auto tokens = random_tokens(spec, 2, 32);
  const double before = model.forward_only(tokens.data()).loss_sum;
  // Scale every master weight of the output head: without weights_changed() the forward
  // still uses the old copy; after it, the new weights.
  int output = -1;
  for (size_t id = 0; id < model.registry().specs().size(); ++id)
    if (model.registry().spec(int(id)).role == ParamRole::OUTPUT) output = int(id);
  ASSERT_GE(output, 0);
  std::vector<double> w = host(model.param(output));
  for (double& x : w) x *= 3.0;
  upload(model.param(output), w);
  EXPECT_EQ(model.forward_only(tokens.data()).loss_sum, before) << "the forward read the fp32 master directly";
  model.weights_changed();
  const double after = model.forward_only(tokens.data()).loss_sum;
  EXPECT_GT(std::fabs(after - before), 1e-3 * before) << "weights_changed did not refresh the bf16 copy";
  // And the refreshed model agrees with a fresh BF16 model built on the new weights.
  GptModel fresh(spec, be(), PrecisionPolicy::of(Precision::BF16), 2);
  fresh.init_parameters(31);
  upload(fresh.param(output), w);
  fresh.weights_changed();
  EXPECT_EQ(fresh.forward_only(tokens.data()).loss_sum, after);
}

TEST(MixedPrecision, GradientsAccumulateInFp32OverMicroBatches) {
  // Two micro-batches accumulated with loss scale 1/2 each equal the mean of the two
  // single-micro-batch gradients up to fp32 rounding: accumulation adds in fp32, not bf16
  // (a bf16 accumulator would err by ~2^-9 relative, far above this bound).
  const ModelSpec spec = mixed_spec();
  GptModel model(spec, be(), PrecisionPolicy::of(Precision::BF16), 2);
  model.init_parameters(41);
  const auto t1 = random_tokens(spec, 2, 42), t2 = random_tokens(spec, 2, 43);
  int probe = -1;  // the first dense matrix: its gradient is a GEMM's += output
  for (size_t id = 0; id < model.registry().specs().size() && probe < 0; ++id)
    if (model.registry().spec(int(id)).role == ParamRole::DENSE) probe = int(id);
  ASSERT_GE(probe, 0);
  model.forward_backward(t1.data(), 1.0);
  const std::vector<double> g1 = host(model.grad(probe));
  model.zero_grads();
  model.forward_backward(t2.data(), 1.0);
  const std::vector<double> g2 = host(model.grad(probe));
  model.zero_grads();
  model.forward_backward(t1.data(), 0.5);
  model.forward_backward(t2.data(), 0.5);
  const std::vector<double> both = host(model.grad(probe));
  std::vector<double> mean(g1.size());
  for (size_t i = 0; i < g1.size(); ++i) mean[i] = 0.5 * (g1[i] + g2[i]);
  EXPECT_LT(relative_l2(mean, both), 1e-5);
}

}  // namespace
}  // namespace sdmoe::gradtest
