// Relaxation of layered equilibrium networks: the schema lives in relax.cpp, together with
// the device-agnostic parts every backend shares (input checks, the coupling GEMMs and the
// output nudge); the step loop with its fused elementwise update lives in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <vector>

#include "ops/activation.h"
#include "ops/relax_element.h"

namespace toreq {

enum class Schedule { Sync, Async };
enum class NudgeLoss { MSE, CrossEntropy, Gradient };

// One incoming coupling of a layer: pre[layer] += states[source] @ matrix.
struct Incoming {
  at::Tensor matrix;  // (n_source, n_layer), a view of the weight (transposed where needed)
  int64_t source;
};

// The validated arguments of one toreq.relax call.
struct RelaxProblem {
  int64_t batch = 0;
  std::vector<at::Tensor> drives;                // per layer; undefined where there is none
  std::vector<std::vector<Incoming>> incoming;   // per layer
  std::vector<std::vector<int64_t>> groups;      // layers updated together, in order
  Activation activation = Activation::HardSigmoid;
  double damping = 0.0;
  int64_t max_steps = 0;
  double tol = 0.0;
  double beta = 0.0;
  NudgeLoss loss = NudgeLoss::MSE;
  at::Tensor target, readout_weight, readout_bias;  // undefined when not used
  // How the element update nudges the last layer (relax_element.h); with
  // needs_output_gradient, dloss/ds is computed by output_gradient before each update.
  ElementNudge element_nudge = ElementNudge::None;
  bool needs_output_gradient = false;
};

// Checks every argument of toreq.relax and returns the problem; errors name the argument and
// what was expected.
RelaxProblem make_relax_problem(at::TensorList states, const c10::List<std::optional<at::Tensor>>& drives,
                                at::TensorList weights, at::IntArrayRef targets,
                                at::IntArrayRef sources, const c10::List<bool>& transposed,
                                c10::string_view activation, double damping, int64_t max_steps,
                                double tol, c10::string_view schedule, double beta,
                                c10::string_view loss, const std::optional<at::Tensor>& target,
                                const std::optional<at::Tensor>& readout_weight,
                                const std::optional<at::Tensor>& readout_bias,
                                c10::string_view nudge_position);

// The same problem restricted to the batch rows `rows` (int64, on the problem's device): the
// per-sample drives and the target are gathered; weights and shared drives are kept.
RelaxProblem select_rows(const RelaxProblem& problem, const at::Tensor& rows);

// pre = drive[layer] + sum of the layer's couplings from `states` (the output nudge is the
// element update's: see element_nudge).
void compute_preactivation(const RelaxProblem& problem, int64_t layer,
                           const std::vector<at::Tensor>& states, at::Tensor& pre);

// grad = dloss/ds of the last layer's state s where that needs a GEMM or a row reduction
// (problem.needs_output_gradient: through the readout, or the softmax of cross-entropy);
// grad has s's shape. The element update then adds the nudge -beta * grad.
void output_gradient(const RelaxProblem& problem, const at::Tensor& s, at::Tensor& grad);

// Raises the error for a state that became NaN or Inf at `step` in `rows` samples, naming the
// non-finite input if there is one.
[[noreturn]] void report_nonfinite_state(const RelaxProblem& problem, at::TensorList states,
                                         int64_t step, int64_t rows);

}  // namespace toreq
