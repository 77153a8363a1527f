// The parts of the backend interface shared by every implementation.
#include "core/backend.h"

#include "core/check.h"

namespace sdmoe {

void Backend::check_copy_rows(const Tensor& src, int64_t src_stride, const Tensor& dst, int64_t dst_stride,
                              int64_t rows, int64_t row_elements) {
  SDMOE_ASSERT(src.dtype == dst.dtype, "copy_rows: dtypes differ");
  SDMOE_ASSERT((rows - 1) * src_stride + row_elements <= src.numel() &&
                   (rows - 1) * dst_stride + row_elements <= dst.numel(),
               "copy_rows: {} rows of {} (strides {}, {}) exceed {} / {} elements", rows, row_elements, src_stride,
               dst_stride, src.numel(), dst.numel());
}

}  // namespace sdmoe

namespace sdmoe {

void Backend::attention_forward(const Tensor&, const Tensor&, const Tensor&, double, const Tensor&, const Tensor&) {
  fail("fused attention is not implemented on the {} backend", name());
}

void Backend::attention_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, double, const Tensor&, const Tensor&, const Tensor&) {
  fail("fused attention is not implemented on the {} backend", name());
}

}  // namespace sdmoe
