// CUDA kernels of toreq.hebbian_update: the elementwise activations that feed its GEMM. The
// checks, the GEMM (cuBLAS through ATen) and the bias sum are shared with the CPU backend in
// ops/hebbian.cpp; this file only supplies the HebbianKernels and registers the CUDA key.
//
// float32, float64, float16 and bfloat16 are dispatched (hebbian_update_into rejects the rest);
// reduced-precision activities are activated in float32 and rounded once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
// The c10 headers rather than ATen/cuda/CUDAContext.h: at::cuda::getCurrentCUDAStream is
// c10::cuda::getCurrentCUDAStream, and CUDAContext.h would also pull in the cuBLAS, cuSPARSE
// and cuSOLVER headers, which this file does not use (and a bare toolkit may not ship).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/hebbian.h"

namespace toreq {
namespace {

constexpr int kThreads = 256;
// Enough blocks of kThreads to fill the largest current GPUs several times over; the kernels
// are grid-stride loops, so bigger tensors reuse these threads instead of launching more.
constexpr int64_t kMaxBlocks = 4096;

int64_t num_blocks(int64_t numel) {
  return std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks);
}

// out[r, c] = sign * act(in[r, c]). `in` is read through its strides, so the transposed or
// sliced activities the trainers pass need no contiguous copy; `out` is contiguous (the rows
// of a freshly allocated GEMM operand).
template <typename scalar_t, Activation A>
__global__ void activate_kernel(const scalar_t* __restrict__ in, int64_t in_row_stride,
                                int64_t in_col_stride, scalar_t* __restrict__ out, int64_t rows,
                                int64_t n, scalar_t sign) {
  const int64_t numel = rows * n;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const int64_t r = i / n, c = i - r * n;
    using acc = at::opmath_type<scalar_t>;
    out[i] = static_cast<scalar_t>(static_cast<acc>(sign) *
                                   activate<A>(static_cast<acc>(in[r * in_row_stride +
                                                                   c * in_col_stride])));
  }
}

// out[r, c] = act(a[r, c]) - act(b[r, c]), a and b read through their strides.
template <typename scalar_t, Activation A>
__global__ void activate_difference_kernel(const scalar_t* __restrict__ a, int64_t a_row_stride,
                                           int64_t a_col_stride, const scalar_t* __restrict__ b,
                                           int64_t b_row_stride, int64_t b_col_stride,
                                           scalar_t* __restrict__ out, int64_t rows, int64_t n) {
  const int64_t numel = rows * n;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const int64_t r = i / n, c = i - r * n;
    using acc = at::opmath_type<scalar_t>;
    out[i] = static_cast<scalar_t>(activate<A>(static_cast<acc>(a[r * a_row_stride + c * a_col_stride])) -
                                   activate<A>(static_cast<acc>(b[r * b_row_stride + c * b_col_stride])));
  }
}

void activate_cuda(const at::Tensor& in, Activation act, double sign, const at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.sizes() == in.sizes());
  const int64_t rows = in.size(0), n = in.size(1);
  if (rows * n == 0) return;  // a launch with zero blocks is an error
  // HebbianKernels is a plain interface that any caller may use: guard the device here too,
  // so the launch and the stream always belong to the tensors' device.
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(),
                                  "toreq_hebbian_activate_cuda", [&] {
    dispatch_activation(act, [&](auto a) {
      activate_kernel<scalar_t, decltype(a)::value><<<num_blocks(rows * n), kThreads, 0, stream>>>(
          in.const_data_ptr<scalar_t>(), in.stride(0), in.stride(1), out.data_ptr<scalar_t>(),
          rows, n, static_cast<scalar_t>(sign));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void activate_difference_cuda(const at::Tensor& a, const at::Tensor& b, Activation act,
                              const at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.sizes() == a.sizes() &&
                        b.sizes() == a.sizes());
  const int64_t rows = a.size(0), n = a.size(1);
  if (rows * n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(),
                                  "toreq_hebbian_activate_difference_cuda", [&] {
    dispatch_activation(act, [&](auto f) {
      activate_difference_kernel<scalar_t, decltype(f)::value>
          <<<num_blocks(rows * n), kThreads, 0, stream>>>(
              a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1),
              b.const_data_ptr<scalar_t>(), b.stride(0), b.stride(1), out.data_ptr<scalar_t>(),
              rows, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

constexpr HebbianKernels kCudaKernels{activate_cuda, activate_difference_cuda};

// The device to make current for the whole op: post_nudged's, when it is a CUDA tensor. The
// dispatcher picks this kernel when *any* argument is on CUDA; if post_nudged is not, the
// shared checks reject the call (mixed devices) before anything runs, and a CUDAGuard on a
// CPU device would only replace that clear message with an obscure one.
std::optional<c10::Device> cuda_device_of(const at::Tensor& t) {
  if (t.defined() && t.is_cuda()) return t.device();
  return std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> hebbian_update_cuda(
    const at::Tensor& post_nudged, const at::Tensor& pre_nudged, const at::Tensor& post_free,
    const at::Tensor& pre_free, double beta, c10::string_view post_activation,
    c10::string_view pre_activation) {
  // The ATen calls inside (allocations, addmm, sum) run on the current device's current stream,
  // so the current device must be the inputs' one, not whatever the caller left current.
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(post_nudged));
  return hebbian_update(post_nudged, pre_nudged, post_free, pre_free, beta, post_activation,
                        pre_activation, kCudaKernels);
}

void hebbian_update_inplace_cuda(const at::Tensor& post_nudged, const at::Tensor& pre_nudged,
                                 const at::Tensor& post_free, const at::Tensor& pre_free,
                                 double beta, c10::string_view post_activation,
                                 c10::string_view pre_activation, const at::Tensor& grad_weight,
                                 const std::optional<at::Tensor>& grad_bias) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(post_nudged));
  hebbian_update_into(post_nudged, pre_nudged, post_free, pre_free, beta, post_activation,
                      pre_activation, grad_weight, grad_bias, /*accumulate=*/true, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, CUDA, m) {
  m.impl("hebbian_update", &hebbian_update_cuda);
  m.impl("hebbian_update_", &hebbian_update_inplace_cuda);
}

}  // namespace toreq
