"""The base of toreq's equilibrium models: a dynamics, a solver and a gradient estimator.

An [`EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel] is an `nn.Module` that *is* a
dynamics (a subclass also derives from one of
[`toreq.dynamics.CouplingDynamics`][toreq.dynamics.CouplingDynamics],
[`PrimitiveDynamics`][toreq.dynamics.PrimitiveDynamics] or
[`FieldDynamics`][toreq.dynamics.FieldDynamics]), *has* a solver
([`toreq.solvers`][toreq.solvers], `"auto"`: the C++ op for coupling lists, else iteration) and
is trained by an estimator ([`toreq.estimators`][toreq.estimators], chosen by the trainer).
Every phase goes through [`solve`][toreq.nn.equilibrium.EquilibriumModel.solve], which also
reports non-convergence.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from toreq.dynamics import Cost, Network, Nudge, get_cost
from toreq.errors import ConvergenceWarning
from toreq.estimators import apply_contrast
from toreq.ops import RelaxResult
from toreq.ops.relax import ACTIVATIONS
from toreq.solvers import Iteration, PhaseSettings, Solver, get_solver, solve_map
from toreq.validation import (check_batched_input, check_choice, check_fraction,
                              check_nonnegative_float, check_positive_int)

__all__ = ["EquilibriumModel", "Network", "warn_unconverged"]

PHASE_NAMES = {"free": "the free phase", "positive": "the +beta nudged phase",
               "negative": "the -beta nudged phase", "adjoint": "the adjoint solve"}


def warn_unconverged(owner: str, phase: str, result: RelaxResult, settings: PhaseSettings,
                     stacklevel: int = 3) -> None:
    """One [`toreq.errors.ConvergenceWarning`][toreq.errors.ConvergenceWarning] when a phase left
    samples above its tolerance (`tol > 0`). The text has no per-call numbers, so Python shows
    it once per call site; which samples and by how much are in the result's `residual`."""
    if torch.compiler.is_compiling():  # a traced program cannot test values
        return
    # `converged(tol)` is `residual < tol`: one comparison and one reduction, no negation
    if settings.tol > 0 and not bool((result.residual < settings.tol).all()):
        warnings.warn(
            f"{owner}: {PHASE_NAMES.get(phase, phase)} left samples unconverged after "
            f"max_steps={settings.max_steps} (residual >= tol={settings.tol:g}); raise the step "
            "cap, add damping, use solver='anderson', or make the dynamics contract more "
            "strongly", ConvergenceWarning, stacklevel=stacklevel)


class EquilibriumModel(nn.Module):
    r"""A network whose prediction is the fixed point of $s \leftarrow F(x, s)$.

    Subclasses derive from a dynamics kind first
    (`class M(CouplingDynamics, EquilibriumModel)`) and define its methods (at least
    `network`). After each forward the
    free equilibrium is in `last_states`, the per-sample step counts in `last_steps` and the
    residuals in `last_residual`.

    Args:
        activation: the activation of the dynamics (`"hard_sigmoid"`, `"tanh"`,
            `"sigmoid"`).
        loss: `"cross_entropy"` (through a readout) or `"mse"`
            ($\frac{1}{2} |o - \mathrm{onehot}(y)|^2$).
        max_steps: the free phase's step cap.
        tol: the free phase's tolerance (the nudged phases use `tol * |beta|`).
        damping: the weight the old state keeps in each update, in `[0, 1)`.
        schedule: `"sync"` or `"async"`.
        solver: a solver name of [`toreq.solvers.solver_names`][toreq.solvers.solver_names] or a
            [`toreq.solvers.Solver`][toreq.solvers.Solver]; `"auto"` uses the C++ op where it
            applies.
        nudged_steps: the nudged phases' step cap (None: `max_steps`); an estimator's own
            setting takes precedence.
    """

    def __init__(self, *, activation: str, loss: str, max_steps: int, tol: float,
                 damping: float, schedule: str, solver: str | Solver = "auto",
                 nudged_steps: int | None = None) -> None:
        super().__init__()
        self.cost: Cost = get_cost(check_choice("loss", loss, ("cross_entropy", "mse")))
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.max_steps = check_positive_int("max_steps", max_steps)
        self.tol = check_nonnegative_float("tol", tol)
        self.damping = check_fraction("damping", damping)
        self.schedule = check_choice("schedule", schedule, ("sync", "async"))
        self.nudged_steps = check_positive_int("nudged_steps", nudged_steps, allow_none=True)
        self.solver = get_solver(solver, self)
        self.last_states: list[Tensor] | None = None
        self.last_steps: Tensor | None = None
        self.last_residual: Tensor | None = None

    @property
    def loss_name(self) -> str:
        """The cost's name (`"cross_entropy"` or `"mse"`); assigning it changes the cost."""
        return self.cost.name

    @loss_name.setter
    def loss_name(self, name: str) -> None:
        self.cost = get_cost(check_choice("loss", name, ("cross_entropy", "mse")))

    # ------------------------------------------------------------------ phase settings
    @property
    def free_settings(self) -> PhaseSettings:
        return PhaseSettings(self.max_steps, self.tol)

    @property
    def nudged_settings(self) -> PhaseSettings:
        return PhaseSettings(self.nudged_steps or self.max_steps, self.tol)

    @property
    def adjoint_settings(self) -> PhaseSettings:
        return PhaseSettings(self.max_steps, self.tol)

    # ------------------------------------------------------------------ solving
    def solve(self, x: Tensor, net: Any, states: list[Tensor], nudge: Nudge | None,
              settings: PhaseSettings, *, phase: str, graph: bool = False,
              solver: Solver | None = None) -> RelaxResult:
        """One phase from `states` with the model's solver (or `solver`); `graph=True`
        unrolls it with an autograd graph (plain iteration). Warns once per call site when a
        phase with `tol > 0` leaves samples unconverged."""
        if graph:
            solver = Iteration()
        result = (solver or self.solver).solve(self, x, net, states, nudge, settings,
                                               what=f"{type(self).__name__} {phase} phase",
                                               graph=graph)
        warn_unconverged(type(self).__name__, phase, result, settings)
        return result

    def solve_map(self, fn: Callable[[list[Tensor]], list[Tensor]], states: list[Tensor],
                  settings: PhaseSettings, *, phase: str, what: str) -> RelaxResult:
        """Solves `s = fn(s)` with the model's (Python) solver: the adjoint system."""
        result = solve_map(self.solver, fn, states, settings, what=what)
        warn_unconverged(type(self).__name__, phase, result, settings)
        return result

    def relax(self, x: Tensor, net: Any = None, *, states: list[Tensor] | None = None,
              beta: float = 0.0, target: Tensor | None = None, max_steps: int | None = None,
              tol: float | None = None) -> RelaxResult:
        """One phase: free (`beta=0`, from rest unless `states` is given) or nudged toward
        `target` (labels or rows), with the free phase's settings unless overridden."""
        if beta != 0.0 and target is None:
            raise ValueError("a nudged phase (beta != 0) needs a target")
        net = self.network(x) if net is None else net
        start = self.init_states(x, net) if states is None else states
        nudge = None if beta == 0.0 else self.nudge(beta, target, x, net, start)
        settings = PhaseSettings(self.max_steps if max_steps is None else max_steps,
                                 self.tol if tol is None else tol)
        return self.solve(x, net, start, nudge, settings,
                          phase="free" if nudge is None else ("positive" if beta > 0
                                                              else "negative"))

    def unrolled(self, x: Tensor, steps: int, net: Any = None) -> list[Tensor]:
        """The free dynamics unrolled for `steps` steps *with* an autograd graph (for BPTT)."""
        net = self.network(x) if net is None else net
        return self.solve(x, net, self.init_states(x, net), None, PhaseSettings(steps, 0.0),
                          phase="free", graph=True).states

    def forward(self, x: Tensor) -> Tensor:
        """The free-phase prediction for `x`."""
        check_batched_input(type(self).__name__, x)
        net = self.network(x)
        free = self.solve(x, net, self.init_states(x, net), None, self.free_settings,
                          phase="free")
        self.remember(free)
        return self.output(free.states, net)

    def remember(self, free: RelaxResult) -> None:
        """Keeps a free phase's states, step counts and residuals in `last_*`."""
        self.last_states, self.last_steps, self.last_residual = free.states, free.steps, free.residual

    # ------------------------------------------------------------------ EqProp
    def eqprop_backward(self, x: Tensor, y: Tensor, net: Any, free: RelaxResult,
                        nudged: RelaxResult, reference: RelaxResult, beta: float) -> Tensor:
        """Accumulates EqProp's gradients from two given phases into `.grad`; returns the loss.

        `nudged` and `reference` are the two phases contrasted (`+beta` and the free phase,
        or `+beta` and `-beta`), `beta` the difference of their nudging strengths; the
        dynamics' `contrast` gives the update, the readout gets the loss's gradient at the free
        equilibrium. [`toreq.estimators.EqProp`][toreq.estimators.EqProp] runs the phases and
        calls the same.
        """
        return apply_contrast(self, x, y, net, free, nudged, reference, beta)[0]
