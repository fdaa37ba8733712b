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
  // The output nudge when it is elementwise (mse without readout, or a given gradient): the
  // kernels fuse it into the element update (relax_element.h), and add_output_nudge skips it.
  ElementNudge element_nudge = ElementNudge::None;
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
                                const std::optional<at::Tensor>& readout_bias);

// The same problem restricted to the batch rows `rows` (int64, on the problem's device): the
// per-sample drives and the target are gathered; weights and shared drives are kept.
RelaxProblem select_rows(const RelaxProblem& problem, const at::Tensor& rows);

// pre = drive[layer] + sum of the layer's couplings from `states`, plus the output nudge
// -beta * dloss/ds when `layer` is the last layer and beta != 0.
void compute_preactivation(const RelaxProblem& problem, int64_t layer,
                           const std::vector<at::Tensor>& states, at::Tensor& pre);

// pre += the output nudge -beta * dloss/ds when `layer` is the last layer and beta != 0 (the
// last part of compute_preactivation, for kernels that compute the couplings themselves),
// unless the nudge is elementwise: then the kernel's element update adds it.
void add_output_nudge(const RelaxProblem& problem, int64_t layer,
                      const std::vector<at::Tensor>& states, at::Tensor& pre);

// Raises the error for a state that became NaN or Inf at `step` in `rows` samples, naming the
// non-finite input if there is one.
[[noreturn]] void report_nonfinite_state(const RelaxProblem& problem, at::TensorList states,
                                         int64_t step, int64_t rows);

}  // namespace toreq
