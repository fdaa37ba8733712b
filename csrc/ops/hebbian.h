// The contrastive Hebbian update: its schema lives in hebbian.cpp, the device-agnostic part
// (input checks and the single GEMM) here, and the elementwise kernels in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ops/activation.h"

namespace toreq {

// The elementwise work a backend supplies.
struct HebbianKernels {
  // out = sign * act(in); in and out are (rows, n), out contiguous.
  void (*activate)(const at::Tensor& in, Activation act, double sign, const at::Tensor& out);
  // out = act(a) - act(b); all (rows, n), out contiguous.
  void (*activate_difference)(const at::Tensor& a, const at::Tensor& b, Activation act,
                              const at::Tensor& out);
};

// grad_weight (+)= -1/(beta*B) * (act(post_nudged)^T pre_act(pre_nudged)
//                                 - act(post_free)^T pre_act(pre_free)),
// grad_bias  (+)= -1/(beta*B) * sum_batch(act(post_nudged) - act(post_free)),
// with a single GEMM where the activities must be staged. accumulate=false overwrites
// grad_weight and grad_bias.
void hebbian_update_into(const at::Tensor& post_nudged, const at::Tensor& pre_nudged,
                         const at::Tensor& post_free, const at::Tensor& pre_free, double beta,
                         c10::string_view post_activation, c10::string_view pre_activation,
                         const at::Tensor& grad_weight, const std::optional<at::Tensor>& grad_bias,
                         bool accumulate, const HebbianKernels& kernels);

// The functional form: returns new (grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor> hebbian_update(
    const at::Tensor& post_nudged, const at::Tensor& pre_nudged, const at::Tensor& post_free,
    const at::Tensor& pre_free, double beta, c10::string_view post_activation,
    c10::string_view pre_activation, const HebbianKernels& kernels);

}  // namespace toreq
