#include "ops/hebbian.h"

#include "ops/dtypes.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <utility>

namespace toreq {

TORCH_LIBRARY_FRAGMENT(toreq, m) {
  m.def(
      "hebbian_update(Tensor post_nudged, Tensor pre_nudged, Tensor post_free, Tensor pre_free, "
      "float beta, str post_activation='identity', str pre_activation='identity') "
      "-> (Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "hebbian_update_(Tensor post_nudged, Tensor pre_nudged, Tensor post_free, Tensor pre_free, "
      "float beta, str post_activation, str pre_activation, Tensor(a!) grad_weight, "
      "Tensor(b!)? grad_bias) -> ()");
}

namespace {

constexpr const char* kOp = "toreq.hebbian_update";

void check_phase_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2, kOp, ": ", name, " must be 2-D (batch, features), got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), kOp, ": ", name, " has dtype ",
              t.scalar_type(), " but post_nudged has ", like.scalar_type(),
              "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == like.device(), kOp, ": ", name, " is on ", t.device(),
              " but post_nudged is on ", like.device(), "; all inputs must be on one device");
}

bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.is_same(b) || (a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() &&
                          a.strides() == b.strides());
}

}  // namespace

void hebbian_update_into(const at::Tensor& post_nudged, const at::Tensor& pre_nudged,
                         const at::Tensor& post_free, const at::Tensor& pre_free, double beta,
                         c10::string_view post_activation, c10::string_view pre_activation,
                         const at::Tensor& grad_weight, const std::optional<at::Tensor>& grad_bias,
                         bool accumulate, const HebbianKernels& kernels) {
  TORCH_CHECK(post_nudged.dim() == 2, kOp,
              ": post_nudged must be 2-D (batch, features), got shape ", post_nudged.sizes());
  const auto dtype = post_nudged.scalar_type();
  TORCH_CHECK(is_supported_dtype(dtype), kOp, ": inputs must be ", kSupportedDtypes, ", got ",
              dtype);
  check_phase_tensor(pre_nudged, "pre_nudged", post_nudged);
  check_phase_tensor(post_free, "post_free", post_nudged);
  check_phase_tensor(pre_free, "pre_free", post_nudged);
  const int64_t batch = post_nudged.size(0);
  const int64_t n_post = post_nudged.size(1);
  const int64_t n_pre = pre_nudged.size(1);
  TORCH_CHECK(batch > 0, kOp, ": the batch is empty (post_nudged has shape ",
              post_nudged.sizes(), "); the update averages over the batch");
  TORCH_CHECK(post_free.sizes() == post_nudged.sizes(), kOp, ": post_free has shape ",
              post_free.sizes(), " but post_nudged has ", post_nudged.sizes(),
              "; both phases must have the same shape");
  TORCH_CHECK(pre_nudged.size(0) == batch, kOp, ": pre_nudged has batch ", pre_nudged.size(0),
              " but post_nudged has batch ", batch);
  TORCH_CHECK(pre_free.sizes() == pre_nudged.sizes(), kOp, ": pre_free has shape ",
              pre_free.sizes(), " but pre_nudged has ", pre_nudged.sizes(),
              "; both phases must have the same shape");
  TORCH_CHECK(std::isfinite(beta) && beta != 0.0, kOp,
              ": beta must be finite and non-zero (it divides the update), got ", beta);
  TORCH_CHECK(grad_weight.sizes() == at::IntArrayRef({n_post, n_pre}), kOp,
              ": grad_weight must have shape (", n_post, ", ", n_pre, ") = (post features, pre "
              "features), got ", grad_weight.sizes());
  TORCH_CHECK(grad_weight.scalar_type() == dtype && grad_weight.device() == post_nudged.device(),
              kOp, ": grad_weight must be ", dtype, " on ", post_nudged.device(), ", got ",
              grad_weight.scalar_type(), " on ", grad_weight.device());
  if (grad_bias.has_value()) {
    TORCH_CHECK(grad_bias->sizes() == at::IntArrayRef({n_post}), kOp,
                ": grad_bias must have shape (", n_post, ",), got ", grad_bias->sizes());
    TORCH_CHECK(grad_bias->scalar_type() == dtype && grad_bias->device() == post_nudged.device(),
                kOp, ": grad_bias must be ", dtype, " on ", post_nudged.device(), ", got ",
                grad_bias->scalar_type(), " on ", grad_bias->device());
  }
  const Activation post_act = parse_activation(post_activation, kOp, "post_activation", true);
  const Activation pre_act = parse_activation(pre_activation, kOp, "pre_activation", true);

  const double scale = -1.0 / (beta * static_cast<double>(batch));
  const double largest = normal_range(dtype).second;
  TORCH_CHECK(std::isfinite(scale) && std::abs(scale) <= largest, kOp, ": beta = ", beta,
              " is so small that the update's scale 1 / (beta * batch) = 1 / (", beta, " * ",
              batch, ") overflows ", dtype, "; use a larger beta");
  at::Tensor& out = const_cast<at::Tensor&>(grad_weight);
  const auto options = post_nudged.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor post_sum;  // sum over the batch of act(post_nudged) - act(post_free)
  if (same_tensor(pre_nudged, pre_free)) {
    // Vector-field form (one pre-synaptic activity for both phases): one GEMM over B rows.
    at::Tensor difference = at::empty({batch, n_post}, options);
    kernels.activate_difference(post_nudged, post_free, post_act, difference);
    at::Tensor pre = pre_nudged;
    if (pre_act != Activation::Identity) {
      pre = at::empty({batch, n_pre}, options);
      kernels.activate(pre_nudged, pre_act, 1.0, pre);
    }
    at::addmm_out(out, grad_weight, difference.t(), pre, accumulate ? 1.0 : 0.0, scale);
    post_sum = at::sum(difference, {0});
  } else if (post_act == Activation::Identity && pre_act == Activation::Identity) {
    // Activities used as they are: two GEMMs into the same output, nothing staged.
    at::addmm_out(out, grad_weight, post_nudged.t(), pre_nudged, accumulate ? 1.0 : 0.0, scale);
    out.addmm_(post_free.t(), pre_free, 1.0, -scale);
    post_sum = at::sum(post_nudged, {0}).sub_(at::sum(post_free, {0}));
  } else {
    // Both products in one GEMM over 2B rows: [a(post_n); -a(post_f)]^T [a(pre_n); a(pre_f)].
    at::Tensor lhs = at::empty({2 * batch, n_post}, options);
    at::Tensor rhs = at::empty({2 * batch, n_pre}, options);
    kernels.activate(post_nudged, post_act, 1.0, lhs.narrow(0, 0, batch));
    kernels.activate(post_free, post_act, -1.0, lhs.narrow(0, batch, batch));
    kernels.activate(pre_nudged, pre_act, 1.0, rhs.narrow(0, 0, batch));
    kernels.activate(pre_free, pre_act, 1.0, rhs.narrow(0, batch, batch));
    at::addmm_out(out, grad_weight, lhs.t(), rhs, accumulate ? 1.0 : 0.0, scale);
    post_sum = at::sum(lhs, {0});
  }
  if (grad_bias.has_value()) {
    post_sum.mul_(scale);
    if (accumulate) {
      grad_bias->add_(post_sum);
    } else {
      grad_bias->copy_(post_sum);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> hebbian_update(
    const at::Tensor& post_nudged, const at::Tensor& pre_nudged, const at::Tensor& post_free,
    const at::Tensor& pre_free, double beta, c10::string_view post_activation,
    c10::string_view pre_activation, const HebbianKernels& kernels) {
  TORCH_CHECK(post_nudged.dim() == 2 && pre_nudged.dim() == 2, kOp,
              ": post_nudged and pre_nudged must be 2-D (batch, features), got shapes ",
              post_nudged.sizes(), " and ", pre_nudged.sizes());
  at::Tensor grad_weight = at::empty({post_nudged.size(1), pre_nudged.size(1)},
                                     post_nudged.options());
  at::Tensor grad_bias = at::empty({post_nudged.size(1)}, post_nudged.options());
  hebbian_update_into(post_nudged, pre_nudged, post_free, pre_free, beta, post_activation,
                      pre_activation, grad_weight, grad_bias, /*accumulate=*/false, kernels);
  return {grad_weight, grad_bias};
}

namespace {

// --- the Autograd and Autocast keys, for every backend --------------------------------------
// The Hebbian update *is* a gradient (EqProp's estimate); it records no graph of its own.
// Called with inputs that require grad while grad mode is on, it says so (a clear error instead
// of a GEMM with out= failing inside the kernel); under no_grad it just runs.

using HebbianSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
    c10::string_view, c10::string_view);
using HebbianInplaceSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, double, c10::string_view,
                                     c10::string_view, const at::Tensor&,
                                     const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<HebbianSignature>& hebbian_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("toreq::hebbian_update", "")
                                 .typed<HebbianSignature>();
  return handle;
}

const c10::TypedOperatorHandle<HebbianInplaceSignature>& hebbian_inplace_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("toreq::hebbian_update_", "")
                                 .typed<HebbianInplaceSignature>();
  return handle;
}

void reject_graph(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [name, t] : args) {
    TORCH_CHECK(!(t->defined() && t->requires_grad()), op,
                ": hebbian_update builds no graph; use toreq.ops.hebbian_update or an "
                "estimator (", name, " requires grad: toreq.ops.hebbian_update detaches its "
                "inputs, and its result is already the gradient to put into .grad)");
  }
}

std::tuple<at::Tensor, at::Tensor> hebbian_update_autograd(
    const at::Tensor& post_nudged, const at::Tensor& pre_nudged, const at::Tensor& post_free,
    const at::Tensor& pre_free, double beta, c10::string_view post_activation,
    c10::string_view pre_activation) {
  reject_graph(kOp, {{"post_nudged", &post_nudged}, {"pre_nudged", &pre_nudged},
                     {"post_free", &post_free}, {"pre_free", &pre_free}});
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return hebbian_handle().call(post_nudged, pre_nudged, post_free, pre_free, beta,
                               post_activation, pre_activation);
}

void hebbian_update_inplace_autograd(const at::Tensor& post_nudged, const at::Tensor& pre_nudged,
                                     const at::Tensor& post_free, const at::Tensor& pre_free,
                                     double beta, c10::string_view post_activation,
                                     c10::string_view pre_activation,
                                     const at::Tensor& grad_weight,
                                     const std::optional<at::Tensor>& grad_bias) {
  const at::Tensor no_bias;
  reject_graph("toreq.hebbian_update_",
               {{"post_nudged", &post_nudged}, {"pre_nudged", &pre_nudged},
                {"post_free", &post_free}, {"pre_free", &pre_free},
                {"grad_weight", &grad_weight},
                {"grad_bias", grad_bias.has_value() ? &*grad_bias : &no_bias}});
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  hebbian_inplace_handle().call(post_nudged, pre_nudged, post_free, pre_free, beta,
                                post_activation, pre_activation, grad_weight, grad_bias);
}

// The four activities cast to `dtype` for autocast, pre_free kept identical to pre_nudged when
// it was (the single-GEMM form looks for that identity).
std::array<at::Tensor, 4> cast_activities(at::ScalarType dtype, c10::DeviceType device,
                                          const at::Tensor& post_nudged,
                                          const at::Tensor& pre_nudged,
                                          const at::Tensor& post_free,
                                          const at::Tensor& pre_free) {
  at::Tensor pre_n = at::autocast::cached_cast(dtype, pre_nudged, device);
  at::Tensor pre_f = same_tensor(pre_nudged, pre_free)
                         ? pre_n
                         : at::autocast::cached_cast(dtype, pre_free, device);
  return {at::autocast::cached_cast(dtype, post_nudged, device), pre_n,
          at::autocast::cached_cast(dtype, post_free, device), pre_f};
}

// Under torch.autocast the update is computed in float32 from the reduced-precision activities
// (it is a gradient, for float32 parameters: autocast's float32 class of ops), and the in-place
// form in grad_weight's dtype.
template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> hebbian_update_autocast(
    const at::Tensor& post_nudged, const at::Tensor& pre_nudged, const at::Tensor& post_free,
    const at::Tensor& pre_free, double beta, c10::string_view post_activation,
    c10::string_view pre_activation) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto a = cast_activities(at::kFloat, device, post_nudged, pre_nudged, post_free, pre_free);
  return hebbian_handle().call(a[0], a[1], a[2], a[3], beta, post_activation, pre_activation);
}

template <c10::DeviceType device>
void hebbian_update_inplace_autocast(const at::Tensor& post_nudged, const at::Tensor& pre_nudged,
                                     const at::Tensor& post_free, const at::Tensor& pre_free,
                                     double beta, c10::string_view post_activation,
                                     c10::string_view pre_activation,
                                     const at::Tensor& grad_weight,
                                     const std::optional<at::Tensor>& grad_bias) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto a = cast_activities(grad_weight.scalar_type(), device, post_nudged, pre_nudged,
                                 post_free, pre_free);
  hebbian_inplace_handle().call(a[0], a[1], a[2], a[3], beta, post_activation, pre_activation,
                                grad_weight, grad_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, Autograd, m) {
  m.impl("hebbian_update", &hebbian_update_autograd);
  m.impl("hebbian_update_", &hebbian_update_inplace_autograd);
}
TORCH_LIBRARY_IMPL(toreq, AutocastCPU, m) {
  m.impl("hebbian_update", &hebbian_update_autocast<c10::DeviceType::CPU>);
  m.impl("hebbian_update_", &hebbian_update_inplace_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(toreq, AutocastCUDA, m) {
  m.impl("hebbian_update", &hebbian_update_autocast<c10::DeviceType::CUDA>);
  m.impl("hebbian_update_", &hebbian_update_inplace_autocast<c10::DeviceType::CUDA>);
}

}  // namespace toreq
