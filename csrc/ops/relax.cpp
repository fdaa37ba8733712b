#include "ops/relax.h"

#include "ops/dtypes.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sub.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <ostream>
#include <utility>

namespace toreq {

TORCH_LIBRARY_FRAGMENT(toreq, m) {
  m.def(
      "relax(Tensor[] states, Tensor?[] drives, Tensor[] weights, int[] targets, int[] sources, "
      "bool[] transposed, str activation='hard_sigmoid', float damping=0., int max_steps=30, "
      "float tol=0., str schedule='sync', float beta=0., str loss='mse', Tensor? target=None, "
      "Tensor? readout_weight=None, Tensor? readout_bias=None, str nudge_position='inside') "
      "-> (Tensor[] states, Tensor steps, Tensor residual)");
}

namespace {

constexpr const char* kOp = "toreq.relax";

// An argument's name in error messages ("weights[2]", "target"), formatted only when a check
// fails: building it eagerly costs more than the whole call on small problems.
struct ArgName {
  const char* name;
  int64_t index = -1;
};

std::ostream& operator<<(std::ostream& out, const ArgName& arg) {
  out << arg.name;
  if (arg.index >= 0) out << "[" << arg.index << "]";
  return out;
}

void check_like(const at::Tensor& t, const ArgName& name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), kOp, ": ", name, " has dtype ",
              t.scalar_type(), " but states[0] has ", like.scalar_type(),
              "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == like.device(), kOp, ": ", name, " is on ", t.device(),
              " but states[0] is on ", like.device(), "; all tensors must be on one device");
}

bool all_finite(const at::Tensor& t) { return !t.defined() || at::isfinite(t).all().item<bool>(); }

}  // namespace

RelaxProblem make_relax_problem(at::TensorList states, const c10::List<std::optional<at::Tensor>>& drives,
                                at::TensorList weights, at::IntArrayRef targets,
                                at::IntArrayRef sources, const c10::List<bool>& transposed,
                                c10::string_view activation, double damping, int64_t max_steps,
                                double tol, c10::string_view schedule, double beta,
                                c10::string_view loss, const std::optional<at::Tensor>& target,
                                const std::optional<at::Tensor>& readout_weight,
                                const std::optional<at::Tensor>& readout_bias,
                                c10::string_view nudge_position) {
  RelaxProblem p;
  const size_t num_layers = states.size();
  TORCH_CHECK(num_layers > 0, kOp, ": states must hold at least one layer's state");
  const at::Tensor& first = states[0];
  TORCH_CHECK(is_supported_dtype(first.scalar_type()), kOp, ": states must be ",
              kSupportedDtypes, ", got ", first.scalar_type());
  std::vector<int64_t> widths(num_layers);
  for (size_t l = 0; l < num_layers; ++l) {
    const at::Tensor& s = states[l];
    TORCH_CHECK(s.dim() == 2, kOp, ": states[", l, "] must be 2-D (batch, units), got shape ",
                s.sizes());
    check_like(s, {"states", static_cast<int64_t>(l)}, first);
    TORCH_CHECK(s.size(0) == first.size(0), kOp, ": states[", l, "] has batch ", s.size(0),
                " but states[0] has batch ", first.size(0));
    widths[l] = s.size(1);
  }
  p.batch = first.size(0);

  TORCH_CHECK(drives.size() == 0 || drives.size() == num_layers, kOp, ": drives must be empty or "
              "hold one entry (a tensor or None) per layer: ", num_layers, " expected, got ",
              drives.size());
  p.drives.resize(num_layers);
  for (size_t l = 0; l < drives.size(); ++l) {
    const std::optional<at::Tensor> d = drives.get(l);
    if (!d.has_value() || !d->defined()) continue;
    check_like(*d, {"drives", static_cast<int64_t>(l)}, first);
    const bool per_sample = d->dim() == 2 && d->size(0) == p.batch && d->size(1) == widths[l];
    const bool shared = d->dim() == 1 && d->size(0) == widths[l];
    TORCH_CHECK(per_sample || shared, kOp, ": drives[", l, "] must have shape (", p.batch, ", ",
                widths[l], ") or (", widths[l], ",) to match states[", l, "], got ", d->sizes());
    p.drives[l] = *d;
  }

  TORCH_CHECK(targets.size() == weights.size() && sources.size() == weights.size() &&
                  transposed.size() == weights.size(),
              kOp, ": weights, targets, sources and transposed describe one coupling per entry "
              "and must have equal lengths, got ", weights.size(), ", ", targets.size(), ", ",
              sources.size(), " and ", transposed.size());
  p.incoming.resize(num_layers);
  for (size_t c = 0; c < weights.size(); ++c) {
    const at::Tensor& w = weights[c];
    const int64_t t = targets[c], s = sources[c];
    TORCH_CHECK(t >= 0 && t < static_cast<int64_t>(num_layers), kOp, ": targets[", c, "] = ", t,
                " is not a layer index in [0, ", num_layers, ")");
    TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(num_layers), kOp, ": sources[", c, "] = ", s,
                " is not a layer index in [0, ", num_layers, ")");
    check_like(w, {"weights", static_cast<int64_t>(c)}, first);
    const bool is_transposed = transposed.get(c);
    const int64_t rows = is_transposed ? widths[s] : widths[t];
    const int64_t cols = is_transposed ? widths[t] : widths[s];
    TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, kOp, ": weights[", c,
                "] couples layer ", s, " (", widths[s], " units) into layer ", t, " (", widths[t],
                " units)", is_transposed ? " through its transpose" : "",
                ", so it must have shape (", rows, ", ", cols, "), got ", w.sizes());
    p.incoming[t].push_back({is_transposed ? w : w.t(), s});
  }

  p.activation = parse_activation(activation, kOp, "activation", /*allow_identity=*/false);
  TORCH_CHECK(nudge_position == "inside" || nudge_position == "outside", kOp,
              ": nudge_position must be 'inside' or 'outside' (the activation), got '",
              std::string(nudge_position.data(), nudge_position.size()), "'");
  const bool outside = nudge_position == "outside";
  TORCH_CHECK(std::isfinite(damping) && damping >= 0.0 && damping < 1.0, kOp,
              ": damping is the weight of the old state and must lie in [0, 1), got ", damping);
  TORCH_CHECK(max_steps >= 0, kOp, ": max_steps must be >= 0, got ", max_steps);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0.0, kOp,
              ": tol must be finite and >= 0 (0 runs every step), got ", tol);
  TORCH_CHECK(std::isfinite(beta), kOp, ": beta must be finite, got ", beta);
  // beta scales the nudge in the states' dtype: it must neither overflow it nor round to 0
  // there (which would silently run a free phase).
  const auto [smallest, largest] = normal_range(first.scalar_type());
  TORCH_CHECK(beta == 0.0 || (std::abs(beta) >= smallest && std::abs(beta) <= largest), kOp,
              ": beta = ", beta, " is outside the range of ", first.scalar_type(), " ([",
              smallest, ", ", largest, "] in magnitude), so the nudge -beta * dloss/ds "
              "overflows or vanishes; choose beta inside it (or 0 for a free phase)");
  p.damping = damping;
  p.max_steps = max_steps;
  p.tol = tol;
  p.beta = beta;

  if (schedule == "sync") {
    p.groups.emplace_back();
    for (size_t l = 0; l < num_layers; ++l) p.groups.back().push_back(l);
  } else if (schedule == "async") {
    // Gauss-Seidel over the layer graph's two colours: even layers, then odd layers.
    for (int parity = 0; parity < 2; ++parity) {
      std::vector<int64_t> group;
      for (size_t l = parity; l < num_layers; l += 2) group.push_back(l);
      if (!group.empty()) p.groups.push_back(group);
    }
  } else {
    TORCH_CHECK(false, kOp, ": schedule must be 'sync' or 'async', got '",
                std::string(schedule.data(), schedule.size()), "'");
  }

  if (loss == "mse") {
    p.loss = NudgeLoss::MSE;
  } else if (loss == "cross_entropy") {
    p.loss = NudgeLoss::CrossEntropy;
  } else if (loss == "gradient") {
    p.loss = NudgeLoss::Gradient;
  } else {
    TORCH_CHECK(false, kOp, ": loss must be 'mse', 'cross_entropy' or 'gradient', got '",
                std::string(loss.data(), loss.size()), "'");
  }
  if (beta == 0.0) return p;  // free phase: the target and readout are not used

  const int64_t n_last = widths.back();
  int64_t n_out = n_last;
  if (readout_weight.has_value() && readout_weight->defined()) {
    TORCH_CHECK(p.loss != NudgeLoss::Gradient, kOp,
                ": loss='gradient' nudges the last layer with the given gradient directly, so "
                "readout_weight must be None");
    const at::Tensor& r = *readout_weight;
    check_like(r, {"readout_weight"}, first);
    TORCH_CHECK(r.dim() == 2 && r.size(1) == n_last, kOp,
                ": readout_weight must have shape (outputs, ", n_last,
                ") to read the last layer, got ", r.sizes());
    n_out = r.size(0);
    p.readout_weight = r;
    if (readout_bias.has_value() && readout_bias->defined()) {
      check_like(*readout_bias, {"readout_bias"}, first);
      TORCH_CHECK(readout_bias->dim() == 1 && readout_bias->size(0) == n_out, kOp,
                  ": readout_bias must have shape (", n_out, ",), got ", readout_bias->sizes());
      p.readout_bias = *readout_bias;
    }
  } else {
    TORCH_CHECK(!(readout_bias.has_value() && readout_bias->defined()), kOp,
                ": readout_bias was given without readout_weight");
  }
  TORCH_CHECK(target.has_value() && target->defined(), kOp,
              ": beta != 0 nudges the output, so target is required (shape (", p.batch, ", ",
              n_out, "))");
  check_like(*target, {"target"}, first);
  TORCH_CHECK(target->dim() == 2 && target->size(0) == p.batch && target->size(1) == n_out, kOp,
              ": target must have shape (", p.batch, ", ", n_out, ") ",
              p.loss == NudgeLoss::Gradient ? "(the gradient of the loss with respect to the last "
                                              "layer's state)"
                                            : "(one row of targets, or of class probabilities, "
                                              "per sample)",
              ", got ", target->sizes());
  p.target = *target;
  p.target = p.target.contiguous();  // the element update reads it by rows
  if (p.loss == NudgeLoss::MSE && !p.readout_weight.defined()) {
    p.element_nudge = outside ? ElementNudge::MSEOutside : ElementNudge::MSE;
  } else {
    p.element_nudge = outside ? ElementNudge::GradientOutside : ElementNudge::Gradient;
    p.needs_output_gradient = p.loss != NudgeLoss::Gradient;
  }
  return p;
}



RelaxProblem select_rows(const RelaxProblem& p, const at::Tensor& rows) {
  RelaxProblem selected = p;
  selected.batch = rows.size(0);
  for (at::Tensor& drive : selected.drives) {
    if (drive.defined() && drive.dim() == 2) drive = drive.index_select(0, rows);
  }
  if (selected.target.defined()) selected.target = selected.target.index_select(0, rows);
  return selected;
}

void compute_preactivation(const RelaxProblem& p, int64_t layer,
                           const std::vector<at::Tensor>& states, at::Tensor& pre) {
  const std::vector<Incoming>& in = p.incoming[layer];
  const at::Tensor& drive = p.drives[layer];
  if (in.empty()) {
    if (drive.defined()) {
      pre.copy_(drive);
    } else {
      pre.zero_();
    }
  } else {
    if (drive.defined()) {
      at::addmm_out(pre, drive, states[in[0].source], in[0].matrix);
    } else {
      at::mm_out(pre, states[in[0].source], in[0].matrix);
    }
    for (size_t c = 1; c < in.size(); ++c) pre.addmm_(states[in[c].source], in[c].matrix);
  }
}

void output_gradient(const RelaxProblem& p, const at::Tensor& s, at::Tensor& grad) {
  TORCH_INTERNAL_ASSERT(p.needs_output_gradient);
  const bool has_readout = p.readout_weight.defined();
  at::Tensor out_error;  // dloss/d(output)
  if (has_readout) {
    out_error = p.readout_bias.defined() ? at::addmm(p.readout_bias, s, p.readout_weight.t())
                                         : at::mm(s, p.readout_weight.t());
  } else {
    out_error = s;
  }
  if (p.loss == NudgeLoss::CrossEntropy) out_error = at::softmax(out_error, 1);
  if (has_readout) {
    out_error = out_error - p.target;
    at::mm_out(grad, out_error, p.readout_weight);
  } else {
    at::sub_out(grad, out_error, p.target);
  }
}

void report_nonfinite_state(const RelaxProblem& p, at::TensorList states, int64_t step,
                            int64_t rows) {
  std::string culprit;
  for (size_t l = 0; l < states.size() && culprit.empty(); ++l) {
    if (!all_finite(states[l])) culprit = c10::str(ArgName{"states", static_cast<int64_t>(l)});
    if (culprit.empty() && !all_finite(p.drives[l])) culprit = c10::str(ArgName{"drives", static_cast<int64_t>(l)});
    for (const Incoming& c : p.incoming[l]) {
      if (culprit.empty() && !all_finite(c.matrix)) culprit = "a weight coupling into layer " +
                                                              std::to_string(l);
    }
  }
  if (culprit.empty() && !all_finite(p.target)) culprit = "target";
  if (culprit.empty() && !all_finite(p.readout_weight)) culprit = "readout_weight";
  if (culprit.empty() && !all_finite(p.readout_bias)) culprit = "readout_bias";
  TORCH_CHECK(culprit.empty(), kOp, ": the state became NaN or Inf at step ", step, " in ", rows,
              " of ", p.batch, " samples because ", culprit, " holds NaN or Inf values");
  TORCH_CHECK(false, kOp, ": the state diverged (NaN or Inf) at step ", step, " in ", rows, " of ",
              p.batch, " samples although every input is finite. Lower beta or the learning "
              "rate, raise damping, or spectrally normalise the weights so the dynamics "
              "contract.");
}

namespace {

// --- the Autograd and Autocast keys, for every backend --------------------------------------
// toreq.relax runs a fixed-point iteration and records no graph through it: gradients come from
// the EqProp estimators (hebbian_update) or, for backprop through time, from relax_step. Called
// with tensors that require grad while grad mode is on, it says so instead of letting a GEMM
// with out= fail inside the kernel; under no_grad it just runs.

using RelaxSignature = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    at::TensorList, const c10::List<std::optional<at::Tensor>>&, at::TensorList, at::IntArrayRef,
    at::IntArrayRef, const c10::List<bool>&, c10::string_view, double, int64_t, double,
    c10::string_view, double, c10::string_view, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view);

const c10::TypedOperatorHandle<RelaxSignature>& relax_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("toreq::relax", "")
                                 .typed<RelaxSignature>();
  return handle;
}

bool needs_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool needs_grad(const std::optional<at::Tensor>& t) { return t.has_value() && needs_grad(*t); }

std::string first_requiring_grad(at::TensorList states,
                                 const c10::List<std::optional<at::Tensor>>& drives,
                                 at::TensorList weights, const std::optional<at::Tensor>& target,
                                 const std::optional<at::Tensor>& readout_weight,
                                 const std::optional<at::Tensor>& readout_bias) {
  for (size_t i = 0; i < states.size(); ++i) {
    if (needs_grad(states[i])) return c10::str("states[", i, "]");
  }
  for (size_t i = 0; i < drives.size(); ++i) {
    if (needs_grad(drives.get(i))) return c10::str("drives[", i, "]");
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    if (needs_grad(weights[i])) return c10::str("weights[", i, "]");
  }
  if (needs_grad(target)) return "target";
  if (needs_grad(readout_weight)) return "readout_weight";
  if (needs_grad(readout_bias)) return "readout_bias";
  return "";
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relax_autograd(
    at::TensorList states, const c10::List<std::optional<at::Tensor>>& drives,
    at::TensorList weights, at::IntArrayRef targets, at::IntArrayRef sources,
    const c10::List<bool>& transposed, c10::string_view activation, double damping,
    int64_t max_steps, double tol, c10::string_view schedule, double beta, c10::string_view loss,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& readout_weight,
    const std::optional<at::Tensor>& readout_bias, c10::string_view nudge_position) {
  if (at::GradMode::is_enabled()) {
    const std::string culprit =
        first_requiring_grad(states, drives, weights, target, readout_weight, readout_bias);
    TORCH_CHECK(culprit.empty(), kOp, ": relax builds no graph; use toreq.ops.relax or an "
                "estimator (", culprit, " requires grad: toreq.ops.relax detaches the inputs, "
                "EqProp's gradients come from toreq.ops.hebbian_update, and backprop through "
                "time unrolls toreq.ops.relax_step)");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return relax_handle().call(states, drives, weights, targets, sources, transposed, activation,
                             damping, max_steps, tol, schedule, beta, loss, target,
                             readout_weight, readout_bias, nudge_position);
}

// Under torch.autocast the relaxation runs in the autocast dtype (float16 or bfloat16): every
// floating tensor is cast to it (float64 ones are left alone, as autocast does), so a model with
// float32 parameters relaxes reduced-precision states. The outputs stay in that dtype.
template <c10::DeviceType device>
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relax_autocast(
    at::TensorList states, const c10::List<std::optional<at::Tensor>>& drives,
    at::TensorList weights, at::IntArrayRef targets, at::IntArrayRef sources,
    const c10::List<bool>& transposed, c10::string_view activation, double damping,
    int64_t max_steps, double tol, c10::string_view schedule, double beta, c10::string_view loss,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& readout_weight,
    const std::optional<at::Tensor>& readout_bias, c10::string_view nudge_position) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  c10::List<std::optional<at::Tensor>> cast_drives;
  for (size_t i = 0; i < drives.size(); ++i) {
    cast_drives.push_back(at::autocast::cached_cast(dtype, drives.get(i), device));
  }
  return relax_handle().call(
      at::autocast::cached_cast(dtype, states, device), cast_drives,
      at::autocast::cached_cast(dtype, weights, device), targets, sources, transposed,
      activation, damping, max_steps, tol, schedule, beta, loss,
      at::autocast::cached_cast(dtype, target, device),
      at::autocast::cached_cast(dtype, readout_weight, device),
      at::autocast::cached_cast(dtype, readout_bias, device), nudge_position);
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, Autograd, m) { m.impl("relax", &relax_autograd); }
TORCH_LIBRARY_IMPL(toreq, AutocastCPU, m) {
  m.impl("relax", &relax_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(toreq, AutocastCUDA, m) {
  m.impl("relax", &relax_autocast<c10::DeviceType::CUDA>);
}

}  // namespace toreq
