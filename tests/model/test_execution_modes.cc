// How the model runs, apart from its maths: activation recomputation and the fused
// attention kernel. Recomputation re-runs deterministic kernels on the same inputs, so it
// must leave every gradient bitwise unchanged; the fused attention computes the same
// function as the unfused reference in another order, so in F64 it must agree to rounding
// (the unfused path is the one checked against finite differences in test_model_gradients),
// and it must keep activation memory linear in the sequence length.
#include <cmath>
#include <random>

#include "model/gpt.h"
#include "tests/model/layer_support.h"

namespace sdmoe::gradtest {
namespace {

// The sequence (70) is not a multiple of the fused kernel's 64-row tiles.
ModelSpec execution_spec() { return small_model_spec(70); }

struct Result {
  double loss = 0.0;
  std::vector<std::vector<double>> grads;
  size_t activation_bytes = 0;
};

// Two accumulated micro-batches.
Result train_step(const ModelSpec& spec, const PrecisionPolicy& policy, const ModelExecution& execution) {
  GptModel model(spec, be(), policy, 2, {}, execution);
  model.init_parameters(53);
  const auto t1 = random_tokens(spec, 2, 51), t2 = random_tokens(spec, 2, 52);
  Result r;
  r.loss = model.forward_backward(t1.data(), 0.5).loss_sum + model.forward_backward(t2.data(), 0.5).loss_sum;
  for (size_t id = 0; id < model.registry().specs().size(); ++id) r.grads.push_back(host(model.grad(int(id))));
  r.activation_bytes = model.activation_bytes();
  return r;
}

int64_t differing(const Result& a, const Result& b) {
  int64_t n = 0;
  for (size_t id = 0; id < a.grads.size(); ++id)
    for (size_t i = 0; i < a.grads[id].size(); ++i) n += a.grads[id][i] != b.grads[id][i];
  return n;
}

TEST(Recompute, EveryModeGivesBitwiseTheGradientsOfNone) {
  const ModelSpec spec = execution_spec();
  for (Precision precision : {Precision::FP32, Precision::BF16})
    for (bool fused : {false, true}) {
      const PrecisionPolicy policy = PrecisionPolicy::of(precision);
      const Result none = train_step(spec, policy, {Recompute::NONE, fused});
      size_t previous_bytes = none.activation_bytes;
      for (Recompute mode : {Recompute::SELECTIVE, Recompute::FULL}) {
        const std::string what =
            fmt::format("{}{} recompute {}", precision_name(precision), fused ? " fused" : "", int(mode));
        const Result r = train_step(spec, policy, {mode, fused});
        EXPECT_EQ(r.loss, none.loss) << what;
        EXPECT_EQ(differing(r, none), 0) << what << ": gradient elements differ";
        EXPECT_LT(r.activation_bytes, previous_bytes) << what;
        previous_bytes = r.activation_bytes;
      }
    }
}

TEST(FusedAttention, ModelAgreesWithTheUnfusedReferenceInF64) {
  const ModelSpec spec = execution_spec();
  const PrecisionPolicy f64 = PrecisionPolicy::uniform(DType::F64);
  const Result unfused = train_step(spec, f64, {Recompute::NONE, false}), fused = train_step(spec, f64, {Recompute::NONE, true});
  // Only the summation order differs (tiles, the online softmax): F64 rounding.
  EXPECT_NEAR(fused.loss, unfused.loss, 1e-11 * unfused.loss);
  for (size_t id = 0; id < unfused.grads.size(); ++id) {
    double scale = 0.0, worst = 0.0;
    for (double g : unfused.grads[id]) scale = std::max(scale, std::fabs(g));
    for (size_t i = 0; i < unfused.grads[id].size(); ++i)
      worst = std::max(worst, std::fabs(fused.grads[id][i] - unfused.grads[id][i]));
    EXPECT_LE(worst, 1e-10 * scale + 1e-300) << "gradient of parameter " << id;
  }
  EXPECT_LT(fused.activation_bytes, unfused.activation_bytes);
}

TEST(FusedAttention, Bf16ModelFollowsTheFp32Model) {
  // The fused kernel under BF16 (bf16 q, k, v; fp32 inside) against FP32 fused: the same
  // bounds as BF16 against the oracle in test_mixed_precision (loss 1e-3, gradients 5e-2
  // in relative L2).
  const ModelSpec spec = execution_spec();
  const Result fp32 = train_step(spec, PrecisionPolicy::of(Precision::FP32), {Recompute::NONE, true});
  const Result bf16 = train_step(spec, PrecisionPolicy::of(Precision::BF16), {Recompute::NONE, true});
  EXPECT_LT(std::fabs(bf16.loss - fp32.loss), 1e-3 * fp32.loss);
  for (size_t id = 0; id < fp32.grads.size(); ++id) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < fp32.grads[id].size(); ++i) {
      diff += std::pow(bf16.grads[id][i] - fp32.grads[id][i], 2);
      norm += fp32.grads[id][i] * fp32.grads[id][i];
    }
    EXPECT_LT(std::sqrt(diff / std::max(norm, 1e-300)), 5e-2) << "gradient of parameter " << id;
  }
}

TEST(FusedAttention, ActivationMemoryGrowsLinearlyInTheSequence) {
  // With a fixed micro-batch every activation is proportional to the tokens, so the bytes
  // are affine in the sequence length: doubling S twice adds the same amount twice (up to
  // the arena's 256-byte alignment per tensor). The unfused path keeps [B*H,S,S]
  // probabilities, so its second step is about twice its first.
  auto bytes = [](int64_t seq, bool fused) {
    ModelSpec spec = execution_spec();
    spec.seq_len = seq;
    return double(GptModel(spec, be(), PrecisionPolicy::of(Precision::FP32), 1, {}, {Recompute::NONE, fused})
                      .activation_bytes());
  };
  const double f1 = bytes(128, true), f2 = bytes(256, true), f4 = bytes(512, true);
  EXPECT_NEAR(f4 - f2, 2.0 * (f2 - f1), 1e-3 * (f4 - f2)) << f1 << " " << f2 << " " << f4;
  const double u1 = bytes(128, false), u2 = bytes(256, false), u4 = bytes(512, false);
  EXPECT_GT(u4 - u2, 2.2 * (u2 - u1)) << "the unfused path should grow faster than linearly";
}

// Two micro-batches in flight: both forwards, then both backwards (a pipeline stage's
// warm-up, or one micro-batch's exchange overlapped with another's compute). Each
// micro-batch computes what it computes alone, so the gradients equal those of two
// forward_backward calls in sequence. Only the order in which contributions add up can
// differ: with the backwards in forward order, every tensor receives its additions in the
// sequential order (bitwise equal) except the tied embedding, whose output-head gradient
// comes with each forward; with the backwards reversed, every tensor adds in another order
// (fp32 rounding, within 1e-5 of the tensor's largest gradient).
TEST(MicroBatchesInFlight, TwoSlotsGiveTheGradientsOfTwoSequentialMicroBatches) {
  const ModelSpec spec = execution_spec();
  for (Precision precision : {Precision::FP32, Precision::BF16})
    for (Recompute mode : {Recompute::NONE, Recompute::SELECTIVE, Recompute::FULL}) {
      const PrecisionPolicy policy = PrecisionPolicy::of(precision);
      const std::string what = fmt::format("{} recompute {}", precision_name(precision), int(mode));
      const Result sequential = train_step(spec, policy, {mode, false});
      for (bool reversed : {false, true}) {
        GptModel model(spec, be(), policy, 2, {}, {mode, false, 2});
        ASSERT_EQ(model.micro_batches_in_flight(), 2);
        model.init_parameters(53);
        const auto t1 = random_tokens(spec, 2, 51), t2 = random_tokens(spec, 2, 52);
        const double loss =
            model.forward(0, t1.data(), true, 0.5).loss_sum + model.forward(1, t2.data(), true, 0.5).loss_sum;
        model.backward(reversed ? 1 : 0, 0.5);
        model.backward(reversed ? 0 : 1, 0.5);
        EXPECT_EQ(loss, sequential.loss) << what;
        int embedding = -1;
        for (size_t id = 0; id < model.registry().specs().size(); ++id)
          if (model.registry().spec(int(id)).name == "embedding") embedding = int(id);
        ASSERT_GE(embedding, 0);
        for (size_t id = 0; id < sequential.grads.size(); ++id) {
          const std::vector<double> got = host(model.grad(int(id)));
          const std::vector<double>& want = sequential.grads[id];
          double scale = 0.0, worst = 0.0;
          int64_t differ = 0;
          for (double g : want) scale = std::max(scale, std::fabs(g));
          for (size_t i = 0; i < want.size(); ++i) {
            differ += got[i] != want[i];
            worst = std::max(worst, std::fabs(got[i] - want[i]));
          }
          const std::string name = model.registry().spec(int(id)).name;
          if (!reversed && int(id) != embedding) EXPECT_EQ(differ, 0) << what << ": " << name;
          else EXPECT_LE(worst, 1e-5 * scale) << what << (reversed ? " reversed: " : ": ") << name;
        }
        if (!reversed) EXPECT_GT(model.activation_bytes(), sequential.activation_bytes) << what;
      }
    }
}

}  // namespace
}  // namespace sdmoe::gradtest
