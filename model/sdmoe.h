// SD-MoE: every selected expert matrix W [m, n] is the sum of a common part W_C and a
// unique part W_U = (I - P_U) W (I - P_V), with P_U = U U^T and P_V = V V^T the
// projectors on its top-k left and right singular subspaces (docs/sdmoe.md).
//
// Storage. The parameter buffer holds W_eff = W_C + W_U, which is what the experts' GEMMs
// use; the split is carried by the bases alone: W_U = Pi_U(W_eff), W_C = W_eff - W_U, where
// Pi_U(X) = X - U(U^T X) - (X V)V^T + U(U^T X V)V^T is computed in O(mnk) from thin
// products. Because Pi_U and I - Pi_U are complementary orthogonal projections, adding
// an update already projected into each part's subspace changes exactly that part, so
// this storage is the pair (W_C, W_U) without a second m x n copy. A refresh replaces the
// bases and leaves W_eff untouched.
//
// Bases are stored as rows: Ut [k, m] and Vt [k, n] per expert (PER_EXPERT) or per layer
// (LAYER_SHARED), whole even where expert tensor parallelism (etp) splits the matrix.
//
// Under etp each rank holds a slice of every expert matrix: rows of gate and up (split
// along the FFN dimension, m), columns of down (n). Pi_U and Pi_C are then computed from
// this rank's slice of the split side's basis, and the thin products that sum over the
// split dimension (U^T X for split rows; X V and U^T X V for split columns; k x n, m x k
// and k x k per expert) are summed over the etp group: one or two all-reduces of thin
// matrices per projection, never a gather of the expert.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/backend.h"
#include "model/model_spec.h"
#include "model/param_registry.h"
#include "parallel/communicator.h"

namespace sdmoe {

enum class SdmoeMatrix : uint8_t { GATE, UP, DOWN };
enum class SdmoeBasis : uint8_t { PER_EXPERT, LAYER_SHARED };
enum class SdmoeSolver : uint8_t { EXACT, SUBSPACE_ITERATION };
const char* sdmoe_matrix_name(SdmoeMatrix m);

struct SdmoeSpec {
  bool enabled = false;
  int rank = 8;                 // k
  int refresh_interval = 16;    // T, in steps
  SdmoeBasis basis = SdmoeBasis::PER_EXPERT;
  std::vector<SdmoeMatrix> matrices{SdmoeMatrix::GATE, SdmoeMatrix::UP, SdmoeMatrix::DOWN};
  double lr_mult_common = 1.0, lr_mult_unique = 1.0;
  SdmoeSolver solver = SdmoeSolver::EXACT;
  int subspace_iterations = 2;  // per refresh, warm-started from the previous bases
  bool async = false;           // compute the next bases while training goes on
  bool selects(SdmoeMatrix m) const;
  // Throws sdmoe::Error naming the field, given the expert matrices' shapes.
  void validate(const ModelSpec& model) const;
};

// One selected matrix type of one MoE layer: this rank's `experts` matrices [m, n] inside
// a stacked expert parameter, the first at element `first` of it, the next `stride`
// elements further.
struct SpectralTarget {
  // Which side etp splits: this rank's matrices are rows [split_first, split_first + m)
  // of m_full (ROWS: gate, up) or columns [split_first, split_first + n) of n_full (COLS:
  // down). NONE: whole matrices (m == m_full, n == n_full).
  enum class Split : uint8_t { NONE, ROWS, COLS };
  int layer = 0;
  SdmoeMatrix matrix = SdmoeMatrix::GATE;
  int param_id = -1;
  int64_t first = 0, stride = 0, experts = 0, m = 0, n = 0;
  Split split = Split::NONE;
  int64_t m_full = 0, n_full = 0, split_first = 0;
  int64_t first_expert = 0;   // global index of local expert 0
  int64_t total_experts = 0;  // experts of the layer over all ranks
  int bases = 0;              // basis pairs: experts (PER_EXPERT) or 1 (LAYER_SHARED)
  int64_t ut_offset = 0;      // elements into the bases buffer: Ut [bases, k, m_full]
  int64_t vt_offset = 0;      //                                   Vt [bases, k, n_full]
};

// The selected expert matrices of the model, in registry order, with their places in a
// bases buffer of bases_elements(targets, k) elements.
std::vector<SpectralTarget> spectral_targets(const ParamRegistry& registry, const SdmoeSpec& spec);
int64_t bases_elements(const std::vector<SpectralTarget>& targets, int k);

// The O(mnk) projection and the SD-MoE optimizer step on a backend. Scratch is sized for
// the largest target and kept between calls.
class SpectralProjector {
 public:
  static constexpr int kScratchSlots = 2;
  // scratch_slots: how many [experts, m, n] scratch tensors to keep (scratch()). etp: the
  // expert-tensor-parallel group, needed when a target is split (null: none is).
  SpectralProjector(Backend& backend, DType dtype, const std::vector<SpectralTarget>& targets, int k,
                    int scratch_slots = kScratchSlots, std::shared_ptr<Communicator> etp = nullptr);
  // out[e] = Pi_U(x[e]) for the target's experts; x[e] at x_base + e * x_stride (elements
  // of x_flat), out contiguous [experts, m, n]; out may be x itself when x is contiguous.
  void project_unique(const SpectralTarget& t, const Tensor& bases, const Tensor& x_flat, int64_t x_base,
                      int64_t x_stride, const Tensor& out);
  // A [experts, m, n] scratch tensor the caller may use between projections.
  Tensor scratch(int index, const SpectralTarget& t) const;

 private:
  int slots_;
  Backend& be_;
  DType dtype_;
  int k_;
  std::shared_ptr<Communicator> etp_;
  Buffer scratch_, thin_, local_bases_;  // local_bases_: this rank's slices of a split side's bases
  int64_t matrix_elements_ = 0;
};

// Copies this rank's slice of the split side's bases of target t (from `bases`, laid out as
// the bases buffer) to `out` [t.bases, k, m or n], contiguous.
void copy_local_bases(Backend& be, const SpectralTarget& t, int k, const Tensor& bases, const Tensor& out);

// The SD-MoE state of a model: targets, bases and the unique parts' AdamW moments (the
// common parts' moments are the optimizer's own moments of those elements).
class SpectralDecomposition {
 public:
  // etp: the expert-tensor-parallel group when experts are split over it (null: whole).
  SpectralDecomposition(Backend& backend, DType dtype, const ParamRegistry& registry, const SdmoeSpec& spec,
                        std::shared_ptr<Communicator> etp = nullptr);
  const SdmoeSpec& spec() const { return spec_; }
  const std::vector<SpectralTarget>& targets() const { return targets_; }
  Tensor bases() const;
  SpectralProjector& projector() { return projector_; }
  Backend& backend() { return be_; }
  // Whether `param_id` holds a selected matrix: the optimizer then hands the whole
  // parameter to update().
  bool handles(int param_id) const;

  // Where the optimizer keeps the moments of parameter `param_id` in its moment buffers
  // (elements); by default the parameter's own offset (moments for the whole model). An
  // optimizer that keeps moments for some ranges only (ZeRO-1) sets it.
  void set_moment_offset(int param_id, int64_t offset);
  int64_t moment_offset(int param_id) const;

  // One optimizer step of parameter `param_id` (flat params/grads; m, v the optimizer's
  // moment buffers, the common parts' moments at moment_offset). Selected matrices:
  //   G_U = Pi_U(G), G_C = G - G_U; each part's AdamW (or SGD) direction with its own
  //   moments and learning rate (lr x lr_mult_common / lr_mult_unique); then
  //   W += A_C - lr_C wd W + Pi_U(A_U - A_C + (lr_C - lr_U) wd W),
  // which is Pi_C(A_C) - lr_C wd W_C + Pi_U(A_U) - lr_U wd W_U: each part's update projected
  // into its own subspace. Other slices of the parameter get the plain update.
  // sgd: no moments, no bias correction (step.beta*, eps unused).
  void update(int param_id, const Tensor& params, const Tensor& grads, const Tensor& m, const Tensor& v,
              const AdamWStep& step, bool sgd);

  // Replaces the bases with `new_bases` (W_eff is not touched) and carries the first
  // moments over: m_C + m_U is kept and split again with the new projections. Second
  // moments stay as they are (elementwise scales, not subspace objects).
  void install_bases(const Tensor& new_bases, const Tensor& m);

  // Puts back bases saved by a checkpoint (already in bases(): the caller wrote them there)
  // and rebuilds what is derived from them. The moments are restored separately.
  void bases_restored() { load_stacked_bases(); }

  // Unique-part moments of target t, expert e: [m, n] each.
  Tensor unique_m(size_t t, int64_t e) const;
  Tensor unique_v(size_t t, int64_t e) const;
  int64_t added_elements() const { return bases_elements_ + 2 * unique_elements_; }

 private:
  Tensor flat_at(const Tensor& flat, int64_t offset, int64_t count) const;
  Tensor raw(const Buffer& b) const;
  void update_target(size_t index, const Tensor& params, const Tensor& grads, const Tensor& m, const Tensor& v,
                     const AdamWStep& step, bool sgd);
  // out[e] = beta out[e] + alpha Pi_C(x[e]) for target `index`'s experts (x[e] at x_base +
  // e x_stride, out[e] at out_base + e out_stride): Pi_C(X) = [Ut; Vt X^T]^T [Ut X (I - V V^T); Vt],
  // one GEMM of inner size 2k after four thin ones, against the installed bases.
  void add_common_part(size_t index, const Tensor& x, int64_t x_base, int64_t x_stride, double alpha,
                       const Tensor& out, int64_t out_base, int64_t out_stride, double beta);
  // Copies the installed bases into the stacked operands of add_common_part.
  void load_stacked_bases();

  Backend& be_;
  DType dtype_;
  const ParamRegistry& registry_;
  SdmoeSpec spec_;
  std::shared_ptr<Communicator> etp_;
  Buffer split_scratch_;  // split targets: thin products summed over etp, [experts, k, m or n] + [experts, k, k]
  std::vector<SpectralTarget> targets_;
  std::vector<int64_t> unique_offset_;  // per target, into unique_m_/unique_v_
  std::map<int, std::vector<ElementRange>> plain_ranges_;  // per parameter, relative to it
  std::map<int, int64_t> moment_offsets_;
  int64_t bases_elements_ = 0, unique_elements_ = 0;
  Buffer bases_, unique_m_, unique_v_;
  // Per target: L [experts, 2k, m] (rows: Ut, then Vt X^T), R [experts, 2k, n] (rows:
  // Ut X (I - V V^T), then Vt) and C [experts, k, k]; the basis rows stay between steps.
  std::vector<int64_t> stacked_offset_;
  Buffer stacked_;
  SpectralProjector projector_;
};

}  // namespace sdmoe
