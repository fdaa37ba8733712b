// CPU kernel of toreq.relax: the step loop in C++, the couplings as BLAS GEMMs into reused
// buffers, and the elementwise nudge, activation, damping, masking and convergence test fused
// in one pass through the element code shared with the CUDA kernel (relax_element.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>

#include "ops/cpu/coupling_loops.h"
#include "ops/cpu/parallel_rows.h"
#include "ops/relax.h"
#include "ops/relax_element.h"

namespace toreq {
namespace {

// One row of the state update, every element by the shared update_element (relax_element.h):
// the elementwise nudge (last layer only), the activation, the damping, the change and the
// non-finite marker. Returns the row's largest |change| and sets *nonfinite where a new state
// is NaN or Inf. The reductions run in kLanes independent accumulators so that the compiler
// can vectorise the loop without reordering floating-point operations.
template <Activation A, ElementNudge N, typename scalar_t>
TOREQ_ALWAYS_INLINE acc_t<scalar_t> update_row_body(scalar_t* s, const scalar_t* pre,
                                                    const scalar_t* target, int64_t n,
                                                    acc_t<scalar_t> damping,
                                                    acc_t<scalar_t> beta, bool* nonfinite) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t kLanes = 16;
  constexpr bool kReadsTarget = N != ElementNudge::None;
  acc change[kLanes] = {};
  acc poison[kLanes] = {};  // stays 0 unless a new state is NaN or Inf
  const int64_t full = n - n % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      update_element<A, N>(s + j + k, pre + j + k, kReadsTarget ? target + j + k : nullptr, beta,
                           damping, change[k], poison[k]);
    }
  }
  for (int64_t j = full; j < n; ++j) {
    update_element<A, N>(s + j, pre + j, kReadsTarget ? target + j : nullptr, beta, damping,
                         change[0], poison[0]);
  }
  acc row_max = 0, row_poison = 0;
  for (int64_t k = 0; k < kLanes; ++k) {
    row_max = max_keep(row_max, change[k]);
    row_poison += poison[k];
  }
  if (row_poison != acc(0)) *nonfinite = true;
  return row_max;
}

template <Activation A, typename scalar_t>
TOREQ_ALWAYS_INLINE acc_t<scalar_t> update_row_nudge(scalar_t* s, const scalar_t* pre,
                                                     const scalar_t* target, int64_t n,
                                                     ElementNudge nudge, acc_t<scalar_t> damping,
                                                     acc_t<scalar_t> beta, bool* nonfinite) {
  switch (nudge) {
    case ElementNudge::MSE:
      return update_row_body<A, ElementNudge::MSE>(s, pre, target, n, damping, beta, nonfinite);
    case ElementNudge::Gradient:
      return update_row_body<A, ElementNudge::Gradient>(s, pre, target, n, damping, beta,
                                                        nonfinite);
    default:
      return update_row_body<A, ElementNudge::None>(s, pre, target, n, damping, beta, nonfinite);
  }
}

// The activation and nudge are picked per row here, inside the vector clones, rather than by
// dispatch_activation outside them: target_clones cannot apply to templates, and the switch
// costs nothing next to a row's work.
template <typename scalar_t>
TOREQ_ALWAYS_INLINE acc_t<scalar_t> update_row_any(scalar_t* s, const scalar_t* pre,
                                                   const scalar_t* target, int64_t n,
                                                   Activation a, ElementNudge nudge,
                                                   acc_t<scalar_t> damping, acc_t<scalar_t> beta,
                                                   bool* nonfinite) {
  switch (a) {
    case Activation::HardSigmoid:
      return update_row_nudge<Activation::HardSigmoid>(s, pre, target, n, nudge, damping, beta,
                                                       nonfinite);
    case Activation::Tanh:
      return update_row_nudge<Activation::Tanh>(s, pre, target, n, nudge, damping, beta,
                                                nonfinite);
    case Activation::Sigmoid:
      return update_row_nudge<Activation::Sigmoid>(s, pre, target, n, nudge, damping, beta,
                                                   nonfinite);
    case Activation::SteepSigmoid:
      return update_row_nudge<Activation::SteepSigmoid>(s, pre, target, n, nudge, damping, beta,
                                                        nonfinite);
    default:
      return update_row_nudge<Activation::Identity>(s, pre, target, n, nudge, damping, beta,
                                                    nonfinite);
  }
}

TOREQ_VECTOR_CLONES float update_row(float* s, const float* pre, const float* target, int64_t n,
                                     Activation a, ElementNudge nudge, float damping, float beta,
                                     bool* nonfinite) {
  return update_row_any(s, pre, target, n, a, nudge, damping, beta, nonfinite);
}
TOREQ_VECTOR_CLONES double update_row(double* s, const double* pre, const double* target,
                                      int64_t n, Activation a, ElementNudge nudge, double damping,
                                      double beta, bool* nonfinite) {
  return update_row_any(s, pre, target, n, a, nudge, damping, beta, nonfinite);
}
TOREQ_VECTOR_CLONES float update_row(c10::Half* s, const c10::Half* pre, const c10::Half* target,
                                     int64_t n, Activation a, ElementNudge nudge, float damping,
                                     float beta, bool* nonfinite) {
  return update_row_any(s, pre, target, n, a, nudge, damping, beta, nonfinite);
}
TOREQ_VECTOR_CLONES float update_row(c10::BFloat16* s, const c10::BFloat16* pre,
                                     const c10::BFloat16* target, int64_t n, Activation a,
                                     ElementNudge nudge, float damping, float beta,
                                     bool* nonfinite) {
  return update_row_any(s, pre, target, n, a, nudge, damping, beta, nonfinite);
}

// The rows of a layer nudged outside the activation (nudge_position='outside'): outside the
// vector clones above, because instantiating those nudges inside them grows the clones past what
// the compiler keeps vectorised (measured: tanh without a nudge ran 2.8x slower). Only nudged
// phases of such models take this path, vectorised for the baseline ISA.
template <typename scalar_t>
acc_t<scalar_t> update_row_outside(scalar_t* s, const scalar_t* pre, const scalar_t* target,
                                   int64_t n, Activation a, ElementNudge nudge,
                                   acc_t<scalar_t> damping, acc_t<scalar_t> beta,
                                   bool* nonfinite) {
  return dispatch_activation(a, [&](auto activation) {
    constexpr Activation A = decltype(activation)::value;
    return nudge == ElementNudge::MSEOutside
               ? update_row_body<A, ElementNudge::MSEOutside>(s, pre, target, n, damping, beta,
                                                              nonfinite)
               : update_row_body<A, ElementNudge::GradientOutside>(s, pre, target, n, damping,
                                                                   beta, nonfinite);
  });
}

// The state update of one layer on the rows still active; row_change[r] becomes
// max(row_change[r], the row's largest |change|) and row_nonfinite[r] is set where a new state
// is NaN or Inf. `target` (rows of `n`) is read where `nudge` is elementwise.
template <typename scalar_t>
void update_layer(scalar_t* s, const scalar_t* pre, const scalar_t* target, int64_t batch,
                  int64_t n, Activation activation, ElementNudge nudge, acc_t<scalar_t> damping,
                  acc_t<scalar_t> beta, const uint8_t* active, acc_t<scalar_t>* row_change,
                  uint8_t* row_nonfinite) {
  parallel_rows(batch, n, [&](int64_t r) {
    if (!active[r]) return;
    bool nonfinite = false;
    const scalar_t* row_target = nudge == ElementNudge::None ? nullptr : target + r * n;
    const bool outside =
        nudge == ElementNudge::MSEOutside || nudge == ElementNudge::GradientOutside;
    const acc_t<scalar_t> change =
        outside ? update_row_outside(s + r * n, pre + r * n, row_target, n, activation, nudge,
                                     damping, beta, &nonfinite)
                : update_row(s + r * n, pre + r * n, row_target, n, activation, nudge, damping,
                             beta, &nonfinite);
    row_change[r] = max_keep(row_change[r], change);
    if (nonfinite) row_nonfinite[r] = 1;
  });
}

// pre = drive + the layer's couplings, for the `rows` working rows: the couplings that
// coupling_loops takes (one row, or a narrow side) by its loops, the others by the shared GEMMs.
template <typename scalar_t>
void compute_preactivation_cpu(const RelaxProblem& p, int64_t layer, int64_t rows,
                               const std::vector<at::Tensor>& states, at::Tensor& pre) {
  const std::vector<Incoming>& in = p.incoming[layer];
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    if (std::any_of(in.begin(), in.end(),
                    [&](const Incoming& c) { return uses_coupling_loops(c.matrix, rows); })) {
      const at::Tensor& drive = p.drives[layer];
      scalar_t* out = pre.data_ptr<scalar_t>();
      const int64_t n_out = pre.size(1);
      // The drive is read in place when it is a bias or one row (init_ld 0) or holds a row per
      // sample; otherwise copied first. An ATen copy_ costs about as much as a row's update at
      // batch 1, once per layer and step.
      const scalar_t* init = nullptr;
      int64_t init_ld = 0;
      if (drive.defined()) {
        if (drive.is_contiguous() && drive.scalar_type() == pre.scalar_type() &&
            (drive.numel() == n_out || drive.numel() == rows * n_out)) {
          init = drive.const_data_ptr<scalar_t>();
          init_ld = drive.numel() == n_out ? 0 : n_out;
        } else {
          pre.copy_(drive);
          init = out;
          init_ld = n_out;
        }
      }
      bool first = true;
      for (const Incoming& c : in) {
        const at::Tensor& source = states[c.source];
        if (uses_coupling_loops(c.matrix, rows)) {
          coupling_loops(c.matrix, source.const_data_ptr<scalar_t>(), rows, out,
                         first ? init : out, first ? init_ld : n_out);
        } else if (first && init != nullptr && init != out) {
          at::addmm_out(pre, drive, source, c.matrix);
        } else if (first && init == nullptr) {
          at::mm_out(pre, source, c.matrix);
        } else {
          pre.addmm_(source, c.matrix);
        }
        first = false;
      }
      return;
    }
  }
  compute_preactivation(p, layer, states, pre);
}

// output_gradient for the working rows, by loops when the readout's classes are narrow (its
// two products take coupling_loops): the logits go into `error` (rows of n_out, at least
// `rows` of them), become the softmax's (cross-entropy) minus the target there, and are read
// back through the readout into grad. Otherwise the shared ATen version, which allocates
// its intermediates at every step.
template <typename scalar_t>
void output_gradient_cpu(const RelaxProblem& p, const at::Tensor& readout_t, int64_t rows,
                         const at::Tensor& s, at::Tensor& grad, scalar_t* error) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    const at::Tensor& bias = p.readout_bias;
    if (p.readout_weight.defined() && uses_coupling_loops(readout_t, rows) &&
        uses_coupling_loops(p.readout_weight, rows) && (!bias.defined() || bias.is_contiguous())) {
      const int64_t n_out = p.readout_weight.size(0);
      coupling_loops(readout_t, s.const_data_ptr<scalar_t>(), rows, error,
                     bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, 0);
      const scalar_t* target = p.target.const_data_ptr<scalar_t>();
      const bool softmax = p.loss == NudgeLoss::CrossEntropy;
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* e = error + r * n_out;
        const scalar_t* t = target + r * n_out;
        if (softmax) {  // as at::softmax: exp(l - max) / sum
          const scalar_t top = *std::max_element(e, e + n_out);
          scalar_t sum = 0;
          for (int64_t k = 0; k < n_out; ++k) sum += (e[k] = host_math::exp(e[k] - top));
          for (int64_t k = 0; k < n_out; ++k) e[k] = e[k] / sum - t[k];
        } else {
          for (int64_t k = 0; k < n_out; ++k) e[k] -= t[k];
        }
      }
      coupling_loops(p.readout_weight, static_cast<const scalar_t*>(error), rows,
                     grad.data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), 0);
      return;
    }
  }
  output_gradient(p, s, grad);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relax_cpu(
    at::TensorList states, const c10::List<std::optional<at::Tensor>>& drives,
    at::TensorList weights, at::IntArrayRef targets, at::IntArrayRef sources,
    const c10::List<bool>& transposed, c10::string_view activation, double damping,
    int64_t max_steps, double tol, c10::string_view schedule, double beta, c10::string_view loss,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& readout_weight,
    const std::optional<at::Tensor>& readout_bias, c10::string_view nudge_position) {
  const RelaxProblem p = make_relax_problem(states, drives, weights, targets, sources, transposed,
                                            activation, damping, max_steps, tol, schedule, beta,
                                            loss, target, readout_weight, readout_bias,
                                            nudge_position);
  const int64_t batch = p.batch;
  // out holds the full batch; s, pre and `work` hold the rows still relaxing. Once at most half
  // of them are, the converged rows are written back to out and dropped, so that the GEMMs of
  // later steps run over the active rows only (samples never interact, so the result is the
  // same). Until the first such compaction s aliases out and rows is undefined.
  std::vector<at::Tensor> out, s, pre;
  for (const at::Tensor& init : states) {
    out.push_back(init.clone(at::MemoryFormat::Contiguous));
    pre.push_back(at::empty_like(out.back(), at::MemoryFormat::Contiguous));
  }
  s = out;
  // dloss/ds of the last layer's working rows, where output_gradient computes it
  at::Tensor output_grad, readout_t, readout_error;
  if (p.needs_output_gradient) output_grad = at::empty_like(s.back());
  if (p.needs_output_gradient && p.readout_weight.defined()) {
    readout_t = p.readout_weight.t();
    readout_error = at::empty({batch, p.readout_weight.size(0)}, p.readout_weight.options());
  }
  RelaxProblem work = p;
  at::Tensor rows;                       // int64: the batch index of each working row
  std::vector<int64_t> sample(batch);    // the same, on the host
  std::iota(sample.begin(), sample.end(), 0);
  // filled in the loop below rather than by ATen fills: each ATen call costs about as much as a
  // step's elementwise work at batch 1
  at::Tensor steps = at::empty({batch}, out[0].options().dtype(at::kLong));
  // in the dtype the convergence test runs in: float32 for float16 and bfloat16 states
  at::Tensor residual =
      at::empty({batch}, out[0].options().dtype(at::toOpMathType(out[0].scalar_type())));
  const int64_t last = static_cast<int64_t>(s.size()) - 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[0].scalar_type(),
                                  "toreq_relax_cpu", [&] {
    using acc = acc_t<scalar_t>;
    std::vector<uint8_t> active(batch, 1), row_nonfinite(batch, 0);
    std::vector<acc> row_change(batch);
    int64_t* steps_ptr = steps.data_ptr<int64_t>();
    acc* residual_ptr = residual.data_ptr<acc>();
    std::fill(steps_ptr, steps_ptr + batch, int64_t(0));
    std::fill(residual_ptr, residual_ptr + batch, std::numeric_limits<acc>::infinity());
    const auto tol_s = static_cast<acc>(p.tol);
    const auto damping_s = static_cast<acc>(p.damping);
    const auto beta_s = static_cast<acc>(p.beta);
    int64_t num_active = batch, step = 0;
    while (step < p.max_steps && num_active > 0) {
      ++step;
      const int64_t working = work.batch;
      std::fill(row_change.begin(), row_change.end(), acc(0));
      for (const std::vector<int64_t>& group : p.groups) {
        for (int64_t l : group) compute_preactivation_cpu<scalar_t>(work, l, working, s, pre[l]);
        for (int64_t l : group) {
          const ElementNudge nudge = l == last ? p.element_nudge : ElementNudge::None;
          const scalar_t* target = nullptr;  // y (MSE) or dloss/ds (Gradient), by rows
          if (nudge != ElementNudge::None) {
            if (p.needs_output_gradient) {
              output_gradient_cpu<scalar_t>(
                  work, readout_t, working, s[l], output_grad,
                  readout_error.defined() ? readout_error.data_ptr<scalar_t>() : nullptr);
            }
            target = (p.needs_output_gradient ? output_grad : work.target)
                         .const_data_ptr<scalar_t>();
          }
          update_layer<scalar_t>(s[l].data_ptr<scalar_t>(), pre[l].const_data_ptr<scalar_t>(),
                                 target, working, s[l].size(1), p.activation, nudge, damping_s,
                                 beta_s, active.data(), row_change.data(), row_nonfinite.data());
        }
      }
      int64_t nonfinite = 0;
      for (int64_t r = 0; r < working; ++r) {
        if (!active[r]) continue;
        nonfinite += row_nonfinite[r];
        residual_ptr[sample[r]] = row_change[r];
        steps_ptr[sample[r]] = step;
        if (is_converged(row_change[r], tol_s)) {
          active[r] = 0;
          --num_active;
        }
      }
      if (nonfinite > 0) report_nonfinite_state(p, states, step, nonfinite);
      if (num_active == 0 || num_active * 2 > working || step == p.max_steps) continue;

      at::Tensor keep = at::empty({num_active}, out[0].options().dtype(at::kLong));
      int64_t* keep_ptr = keep.data_ptr<int64_t>();
      std::vector<int64_t> kept_sample;
      for (int64_t r = 0; r < working; ++r) {
        if (!active[r]) continue;
        keep_ptr[kept_sample.size()] = r;
        kept_sample.push_back(sample[r]);
      }
      if (rows.defined()) {
        for (size_t l = 0; l < s.size(); ++l) out[l].index_copy_(0, rows, s[l]);
      }
      rows = at::empty({num_active}, keep.options());
      std::copy(kept_sample.begin(), kept_sample.end(), rows.data_ptr<int64_t>());
      for (size_t l = 0; l < s.size(); ++l) {
        s[l] = s[l].index_select(0, keep);
        pre[l] = at::empty_like(s[l]);
      }
      if (p.needs_output_gradient) output_grad = at::empty_like(s.back());
      work = select_rows(p, rows);
      sample = std::move(kept_sample);
      std::fill(active.begin(), active.begin() + num_active, uint8_t(1));
    }
  });
  if (rows.defined()) {
    for (size_t l = 0; l < s.size(); ++l) out[l].index_copy_(0, rows, s[l]);
  }
  return {out, steps, residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, CPU, m) { m.impl("relax", &relax_cpu); }

}  // namespace toreq
