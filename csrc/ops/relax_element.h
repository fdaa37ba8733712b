// The per-element arithmetic of one relaxation step, written once for every backend: the
// elementwise output nudge, the activation, the damped update, the state's change and the
// non-finite test. cpu/relax_kernel.cpp calls it from its row loop and cuda/relax_kernel.cu
// from its row kernel, so the CPU tests run the very code the GPU runs (compiled for both).
//
// Arithmetic happens in `acc_t<scalar_t>` (at::opmath_type: float for float16 and bfloat16,
// else the type itself): a reduced-precision state is widened on load, updated in float32 and
// rounded once on store, and its change is measured between the stored values in float32, so
// the convergence test sees exactly the states that are kept.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include "ops/activation.h"

namespace toreq {

// How the element update nudges the last layer, always inside its float32 arithmetic (added
// to a reduced-precision pre-activation buffer, a nudge beta * dloss/ds of 1e-3 would round
// away next to a pre-activation of 1): MSE reads the target y and uses dloss/ds = s - y;
// Gradient reads dloss/ds itself (the given gradient of loss='gradient', or the one
// output_gradient computes through the readout or the softmax). None: no nudge. The Outside
// variants subtract the nudge after the activation instead of inside its argument
// (nudge_position='outside': Ernoult et al. 2019's prototypical model).
enum class ElementNudge { None, MSE, Gradient, MSEOutside, GradientOutside };

template <ElementNudge N>
inline constexpr bool kNudgeOutside = N == ElementNudge::MSEOutside ||
                                      N == ElementNudge::GradientOutside;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// One element's nudge, beta * dloss/ds, with dloss/ds = s - y (MSE; `target` is y) or
// `target` itself (Gradient); 0 without a nudge.
template <ElementNudge N, typename acc>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc nudge_force(acc state, acc target, acc beta) {
  if constexpr (N == ElementNudge::MSE || N == ElementNudge::MSEOutside) {
    return beta * (state - target);
  } else if constexpr (N == ElementNudge::Gradient || N == ElementNudge::GradientOutside) {
    return beta * target;
  } else {
    return acc(0);
  }
}

// s <- damping * s + (1 - damping) * act(pre - f) with the nudge f inside the activation, or
// damping * s + (1 - damping) * (act(pre) - f) outside it.
template <Activation A, ElementNudge N, typename acc>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc damped_update(acc old, acc pre, acc force, acc damping) {
  acc next;
  if constexpr (N == ElementNudge::None) {
    next = activate<A>(pre);
  } else if constexpr (kNudgeOutside<N>) {
    next = activate<A>(pre) - force;
  } else {
    next = activate<A>(pre - force);
  }
  return damping * old + (acc(1) - damping) * next;
}

// |v| without a libm call (it vectorises on the host); NaN stays NaN.
template <typename acc>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc magnitude(acc v) {
  return v < acc(0) ? -v : v;
}

// The running maximum of a row's changes. A NaN never replaces it (NaN compares false), so a
// row's change stays a number; the NaN is reported through the non-finite marker instead.
template <typename acc>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc max_keep(acc running, acc candidate) {
  return candidate > running ? candidate : running;
}

// A sample has converged once its largest change in a step is below tol.
template <typename acc>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool is_converged(acc change, acc tol) {
  return change < tol;
}

// One element of one step: reads s and pre (and `target`, y or dloss/ds, where N nudges),
// stores the new state, folds |change| into `change` and adds to `poison` a value that is 0
// for a finite new state and NaN otherwise (0 * Inf = NaN), a branch-free test that
// vectorises. `target` is read only when N != ElementNudge::None.
template <Activation A, ElementNudge N, typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_element(scalar_t* s, const scalar_t* pre,
                                           const scalar_t* target, acc_t<scalar_t> beta,
                                           acc_t<scalar_t> damping, acc_t<scalar_t>& change,
                                           acc_t<scalar_t>& poison) {
  using acc = acc_t<scalar_t>;
  const acc old = static_cast<acc>(*s);
  acc y = acc(0);
  if constexpr (N != ElementNudge::None) y = static_cast<acc>(*target);
  const acc force = nudge_force<N>(old, y, beta);
  const scalar_t stored =
      static_cast<scalar_t>(damped_update<A, N>(old, static_cast<acc>(*pre), force, damping));
  const acc next = static_cast<acc>(stored);
  change = max_keep(change, magnitude(next - old));
  poison += next * acc(0);
  *s = stored;
}

// Calls f(std::integral_constant<ElementNudge, n>{}) so that a kernel is instantiated per nudge.
template <typename F>
decltype(auto) dispatch_element_nudge(ElementNudge n, F&& f) {
  switch (n) {
    case ElementNudge::MSE:
      return f(std::integral_constant<ElementNudge, ElementNudge::MSE>{});
    case ElementNudge::Gradient:
      return f(std::integral_constant<ElementNudge, ElementNudge::Gradient>{});
    case ElementNudge::MSEOutside:
      return f(std::integral_constant<ElementNudge, ElementNudge::MSEOutside>{});
    case ElementNudge::GradientOutside:
      return f(std::integral_constant<ElementNudge, ElementNudge::GradientOutside>{});
    default:
      return f(std::integral_constant<ElementNudge, ElementNudge::None>{});
  }
}

}  // namespace toreq
