// CUDA kernel of toreq.max_pool2d: one thread per output element (grid-stride), the same
// window rule as the CPU kernel (a larger value, or any NaN, takes the window; the first in
// row-major order on ties). The checks and allocation are shared (ops/pool.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/pool.h"

namespace toreq {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride loops reuse these threads for more work

template <typename scalar_t>
__global__ void max_pool_kernel(const scalar_t* __restrict__ in, int64_t height, int64_t width,
                                int64_t size, scalar_t* __restrict__ out,
                                int64_t* __restrict__ index, int64_t rows, int64_t cols,
                                int64_t numel) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < numel;
       o += stride) {
    const int64_t plane = o / (rows * cols), within = o - plane * rows * cols;
    const int64_t top = (within / cols) * size, left = (within % cols) * size;
    const scalar_t* p = in + plane * height * width;
    int64_t best = top * width + left;
    acc best_value = -INFINITY;
    for (int64_t i = top; i < top + size; ++i) {
      for (int64_t j = left; j < left + size; ++j) {
        const acc v = static_cast<acc>(p[i * width + j]);
        if (v > best_value || isnan(v)) {
          best_value = v;
          best = i * width + j;
        }
      }
    }
    out[o] = static_cast<scalar_t>(best_value);
    index[o] = best;
  }
}

void max_pool_cuda_kernel(const at::Tensor& input, int64_t size, const at::Tensor& values,
                          const at::Tensor& indices) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t numel = values.numel();
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "toreq_max_pool2d_cuda", [&] {
    max_pool_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), input.size(2), input.size(3), size,
        values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), values.size(2),
        values.size(3), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input, int64_t size) {
  // the allocations in the shared part go to the current device: make it the input's
  const c10::cuda::CUDAGuard guard(input.device());
  return max_pool2d(input, size, max_pool_cuda_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, CUDA, m) { m.impl("max_pool2d", &max_pool2d_cuda); }

}  // namespace toreq
