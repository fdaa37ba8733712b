#include "ops/relax.h"

#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/softmax.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <ostream>

namespace toreq {

TORCH_LIBRARY_FRAGMENT(toreq, m) {
  m.def(
      "relax(Tensor[] states, Tensor?[] drives, Tensor[] weights, int[] targets, int[] sources, "
      "bool[] transposed, str activation='hard_sigmoid', float damping=0., int max_steps=30, "
      "float tol=0., str schedule='sync', float beta=0., str loss='mse', Tensor? target=None, "
      "Tensor? readout_weight=None, Tensor? readout_bias=None) "
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
                                const std::optional<at::Tensor>& readout_bias) {
  RelaxProblem p;
  const size_t num_layers = states.size();
  TORCH_CHECK(num_layers > 0, kOp, ": states must hold at least one layer's state");
  const at::Tensor& first = states[0];
  TORCH_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble, kOp,
              ": states must be float32 or float64, got ", first.scalar_type());
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
  TORCH_CHECK(std::isfinite(damping) && damping >= 0.0 && damping < 1.0, kOp,
              ": damping is the weight of the old state and must lie in [0, 1), got ", damping);
  TORCH_CHECK(max_steps >= 0, kOp, ": max_steps must be >= 0, got ", max_steps);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0.0, kOp,
              ": tol must be finite and >= 0 (0 runs every step), got ", tol);
  TORCH_CHECK(std::isfinite(beta), kOp, ": beta must be finite, got ", beta);
  // beta scales the nudge in the states' dtype: it must neither overflow it nor round to 0
  // there (which would silently run a free phase).
  const bool is_float = first.scalar_type() == at::kFloat;
  const double largest = is_float ? std::numeric_limits<float>::max()
                                  : std::numeric_limits<double>::max();
  const double smallest = is_float ? std::numeric_limits<float>::min()
                                   : std::numeric_limits<double>::min();
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
  add_output_nudge(p, layer, states, pre);
}

void add_output_nudge(const RelaxProblem& p, int64_t layer, const std::vector<at::Tensor>& states,
                      at::Tensor& pre) {
  if (p.beta == 0.0 || layer != static_cast<int64_t>(p.incoming.size()) - 1) return;

  // The nudge -beta * dloss/ds of the last layer's state s, added inside the activation.
  const at::Tensor& s = states[layer];
  const bool has_readout = p.readout_weight.defined();
  if (p.loss == NudgeLoss::Gradient) {
    pre.add_(p.target, -p.beta);
    return;
  }
  at::Tensor out_error;  // dloss/d(output)
  if (has_readout) {
    out_error = p.readout_bias.defined() ? at::addmm(p.readout_bias, s, p.readout_weight.t())
                                         : at::mm(s, p.readout_weight.t());
  } else {
    out_error = s.clone();
  }
  if (p.loss == NudgeLoss::CrossEntropy) out_error = at::softmax(out_error, 1);
  out_error.sub_(p.target);
  if (has_readout) {
    pre.addmm_(out_error, p.readout_weight, 1.0, -p.beta);
  } else {
    pre.add_(out_error, -p.beta);
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

}  // namespace toreq
