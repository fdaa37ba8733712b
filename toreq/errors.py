"""toreq's error and warning types, in one place so that every layer raises the same ones.

* [`ConvergenceWarning`][toreq.errors.ConvergenceWarning]: a relaxation phase (free, nudged,
  adjoint) stopped at its step cap with samples still above the tolerance. One warning per call
  site; filter it with `warnings.filterwarnings("ignore",
  category=toreq.errors.ConvergenceWarning)`.
* [`DivergenceError`][toreq.errors.DivergenceError]: a state became NaN or Inf during a relaxation
  (every solver raises it; the message names the phase, the step and how many samples).
* [`TrainingDiverged`][toreq.errors.TrainingDiverged]: a training step produced NaN/Inf or a loss
  blow-up; the message says what to lower or enable. The parameters are left as they were before the
  step.
"""

from __future__ import annotations

__all__ = ["ConvergenceWarning", "DivergenceError", "TrainingDiverged"]


class ConvergenceWarning(UserWarning):
    """A relaxation (or adjoint solve) stopped at `max_steps` with samples above `tol`."""


class DivergenceError(RuntimeError):
    """A relaxation's state became NaN or Inf (the message says where)."""


class TrainingDiverged(RuntimeError):
    """Training produced NaN/Inf; the message says what to lower or enable."""
