// CPU kernels of toreq.hebbian_update: the elementwise activations that feed its GEMM.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops/cpu/parallel_rows.h"
#include "ops/hebbian.h"

namespace toreq {
namespace {

void activate_cpu(const at::Tensor& in, Activation act, double sign, const at::Tensor& out) {
  const at::Tensor src = in.contiguous();
  const int64_t rows = src.size(0), n = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "toreq_hebbian_activate", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* x = src.const_data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    const auto s = static_cast<acc>(sign);
    dispatch_activation(act, [&](auto a) {
      parallel_rows(rows, n, [&](int64_t r) {
        for (int64_t j = r * n; j < (r + 1) * n; ++j) {
          y[j] = static_cast<scalar_t>(s * activate<decltype(a)::value>(static_cast<acc>(x[j])));
        }
      });
    });
  });
}

void activate_difference_cpu(const at::Tensor& a_in, const at::Tensor& b_in, Activation act,
                             const at::Tensor& out) {
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = a.size(0), n = a.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(),
                                  "toreq_hebbian_activate_difference", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto f) {
      constexpr Activation A = decltype(f)::value;
      parallel_rows(rows, n, [&](int64_t r) {
        for (int64_t j = r * n; j < (r + 1) * n; ++j) {
          y[j] = static_cast<scalar_t>(activate<A>(static_cast<acc>(pa[j])) -
                                       activate<A>(static_cast<acc>(pb[j])));
        }
      });
    });
  });
}

constexpr HebbianKernels kCpuKernels{activate_cpu, activate_difference_cpu};

std::tuple<at::Tensor, at::Tensor> hebbian_update_cpu(
    const at::Tensor& post_nudged, const at::Tensor& pre_nudged, const at::Tensor& post_free,
    const at::Tensor& pre_free, double beta, c10::string_view post_activation,
    c10::string_view pre_activation) {
  return hebbian_update(post_nudged, pre_nudged, post_free, pre_free, beta, post_activation,
                        pre_activation, kCpuKernels);
}

void hebbian_update_inplace_cpu(const at::Tensor& post_nudged, const at::Tensor& pre_nudged,
                                const at::Tensor& post_free, const at::Tensor& pre_free,
                                double beta, c10::string_view post_activation,
                                c10::string_view pre_activation, const at::Tensor& grad_weight,
                                const std::optional<at::Tensor>& grad_bias) {
  hebbian_update_into(post_nudged, pre_nudged, post_free, pre_free, beta, post_activation,
                      pre_activation, grad_weight, grad_bias, /*accumulate=*/true, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, CPU, m) {
  m.impl("hebbian_update", &hebbian_update_cpu);
  m.impl("hebbian_update_", &hebbian_update_inplace_cpu);
}

}  // namespace toreq
