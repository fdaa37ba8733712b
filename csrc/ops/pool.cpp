#include "ops/pool.h"

#include "ops/dtypes.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace toreq {

TORCH_LIBRARY_FRAGMENT(toreq, m) {
  m.def("max_pool2d(Tensor input, int size) -> (Tensor values, Tensor indices)");
}

std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& input, int64_t size,
                                              MaxPoolKernel kernel) {
  constexpr const char* kOp = "toreq.max_pool2d";
  TORCH_CHECK(input.dim() == 4, kOp, ": input must be 4-D (batch, channels, height, width), "
              "got shape ", input.sizes());
  TORCH_CHECK(is_supported_dtype(input.scalar_type()), kOp, ": input must be ",
              kSupportedDtypes, ", got ", input.scalar_type());
  TORCH_CHECK(size >= 1, kOp, ": size must be >= 1, got ", size);
  TORCH_CHECK(input.size(2) >= size && input.size(3) >= size, kOp, ": the input's height and "
              "width (", input.size(2), ", ", input.size(3), ") must be at least size = ", size,
              " (a whole window)");
  const at::Tensor src = input.contiguous();
  const int64_t rows = src.size(2) / size, cols = src.size(3) / size;
  at::Tensor values = at::empty({src.size(0), src.size(1), rows, cols}, src.options());
  at::Tensor indices = at::empty({src.size(0), src.size(1), rows, cols},
                                 src.options().dtype(at::kLong));
  if (values.numel() > 0) kernel(src, size, values, indices);
  return {values, indices};
}

}  // namespace toreq
