"""Solvers: how a fixed point `s* = F(x, s*)` is found, separate from what `F` is.

A solver takes a *dynamics* ([`toreq.dynamics`][toreq.dynamics]: `step(x, states, net, nudge)`, and
for coupling-list networks `relax_with_op`) and returns a
[`toreq.ops.RelaxResult`][toreq.ops.iteration.RelaxResult]. All the Python solvers run the one loop
[`toreq.ops.iterate`][toreq.ops.iteration.iterate]; the compiled op is the other.

* `"iteration"` ([`Iteration`][toreq.solvers.Iteration]): damped fixed-point iteration, per-sample
  convergence and freezing; with `graph=True` it builds the autograd graph of the unrolled steps
  (BPTT).
* `"anderson"` ([`Anderson`][toreq.solvers.Anderson]): Anderson acceleration (type II, per sample,
  safeguarded: a sample whose mixed step is not finite, or that converges, takes the plain step).
* `"op"` ([`CompiledRelax`][toreq.solvers.CompiledRelax]): `torch.ops.toreq.relax`, for
  coupling-list dynamics.
* `"static"` ([`Static`][toreq.solvers.Static]): fixed shapes and masking, no data-dependent control
  flow: what `torch.export` and `torch.compile(fullgraph=True)` trace
  ([`toreq.export`][toreq.export]).
* `"auto"`: the op where the dynamics has one, else iteration.

[`PhaseSettings`][toreq.solvers.PhaseSettings] holds one phase's step cap and tolerance; a model
keeps separate settings for its free phase, its nudged phases and the adjoint.
[`register_solver`][toreq.solvers.register_solver] adds a solver by name, so that every model,
trainer and estimator can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from toreq.ops import RelaxResult, iterate
from toreq.validation import check_nonnegative_float, check_nonnegative_int, check_positive_int

__all__ = [
    "Anderson", "CompiledRelax", "Iteration", "PhaseSettings", "Solver", "Static", "get_solver",
    "register_solver", "solve_map", "solver_names",
]


@dataclass(frozen=True)
class PhaseSettings:
    """One phase's budget: at most `max_steps` updates, stopping below `tol` (0: never)."""

    max_steps: int
    tol: float

    def __post_init__(self) -> None:
        check_nonnegative_int("max_steps", self.max_steps)
        check_nonnegative_float("tol", self.tol)


class Solver:
    """Finds the fixed point of a dynamics' step. Subclasses define `solve`.

    `solve(dynamics, x, net, states, nudge, settings, what, graph)`: relax `states` under
    `dynamics.step(x, states, net, nudge)` (`nudge` None for the free phase) within
    `settings`; `what` names the phase in errors; `graph=True` asks for the autograd graph
    of the steps (only solvers that can build one accept it).
    """

    name = "solver"

    def solve(self, dynamics: Any, x: Tensor, net: Any, states: list[Tensor], nudge: Any,
              settings: PhaseSettings, *, what: str, graph: bool = False) -> RelaxResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _step_fn(dynamics: Any, x: Tensor, net: Any,
             nudge: Any) -> Callable[[list[Tensor]], list[Tensor]]:
    return lambda s: dynamics.step(x, s, net, nudge)


class Iteration(Solver):
    """Plain (damped) fixed-point iteration through
    [`toreq.ops.iterate`][toreq.ops.iteration.iterate]."""

    name = "iteration"

    def solve(self, dynamics, x, net, states, nudge, settings, *, what, graph=False):
        return iterate(_step_fn(dynamics, x, net, nudge), states, max_steps=settings.max_steps,
                       tol=settings.tol, graph=graph, what=what)


class Static(Solver):
    """[`toreq.ops.iterate`][toreq.ops.iteration.iterate] in its static mode: always `max_steps`
    steps, converged samples frozen by masking, never raising on values (traceable by
    `torch.export`)."""

    name = "static"

    def solve(self, dynamics, x, net, states, nudge, settings, *, what, graph=False):
        return iterate(_step_fn(dynamics, x, net, nudge), states, max_steps=settings.max_steps,
                       tol=settings.tol, graph=graph, static=True, what=what)


class CompiledRelax(Solver):
    """`torch.ops.toreq.relax` (C++/CUDA), for dynamics that provide `relax_with_op`.

    The op takes real states and an output nudge; a phase it cannot express (complex states,
    a clamped output, one activation per layer, memories: the dynamics' `op_expresses`) runs
    on the Python loop with the same step instead.
    """

    name = "op"

    def solve(self, dynamics, x, net, states, nudge, settings, *, what, graph=False):
        if graph:
            raise ValueError("the toreq::relax op builds no autograd graph; use "
                             "solver='iteration' for backprop through time")
        if not hasattr(dynamics, "relax_with_op"):
            raise TypeError(f"solver 'op' relaxes coupling-list dynamics; "
                            f"{type(dynamics).__name__} has no relax_with_op")
        if states[0].is_complex() or not dynamics.op_expresses(nudge, net):
            return Iteration().solve(dynamics, x, net, states, nudge, settings, what=what)
        return dynamics.relax_with_op(x, net, states, nudge, settings)


class _AndersonMixing:
    """The per-call state of Anderson acceleration (the iterates' and residuals' history)."""

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.history_s: Tensor | None = None
        self.history_r: Tensor | None = None

    def __call__(self, s: list[Tensor], plain: list[Tensor], k: int,
                 converging: Tensor) -> list[Tensor]:
        batch = s[0].shape[0]
        flat = torch.cat([t.reshape(batch, -1) for t in s], dim=1)
        r = torch.cat([p.reshape(batch, -1) for p in plain], dim=1) - flat
        if self.history_s is None:
            self.history_s = flat.new_zeros(batch, self.memory + 1, flat.shape[1])
            self.history_r = torch.zeros_like(self.history_s)
        slot = (k - 1) % (self.memory + 1)
        self.history_s[:, slot], self.history_r[:, slot] = flat, r
        if k == 1:
            return plain
        used = min(k, self.memory + 1)
        ds = flat.unsqueeze(1) - self.history_s[:, :used]  # (batch, used, n)
        dr = r.unsqueeze(1) - self.history_r[:, :used]
        gram = dr @ dr.transpose(1, 2)
        eps, tiny = torch.finfo(flat.dtype).eps, torch.finfo(flat.dtype).tiny
        ridge = eps ** 0.5 * gram.diagonal(dim1=1, dim2=2).mean(dim=1) + tiny
        eye = torch.eye(used, dtype=flat.dtype, device=flat.device)
        gamma = torch.linalg.solve(gram + ridge[:, None, None] * eye, dr @ r.unsqueeze(2))
        mixed = flat + r - ((ds + dr).transpose(1, 2) @ gamma).squeeze(2)
        # a converging sample, or one whose mixed step is not finite, takes the plain step
        ok = torch.isfinite(mixed).all(dim=1, keepdim=True) & ~converging.unsqueeze(1)
        new = torch.where(ok, mixed, flat + r)
        out, start = [], 0
        for t in s:
            n = t[0].numel()
            out.append(new[:, start:start + n].view_as(t))
            start += n
        return out


class Anderson(Solver):
    r"""Anderson acceleration (type II, per sample) of the damped iteration.

    With `r(s) = F(s) - s` (`F` the damped step) and the last `memory + 1` iterates
    `s_i` and residuals `r_i`, the coefficients

    $$
    \gamma = \mathrm{arg\,min}_\gamma \| r_k - \sum_i \gamma_i (r_k - r_i) \|_2
    $$

    (ridge-regularised normal equations) give
    `s_{k+1} = s_k + r_k - sum_i gamma_i ((s_k - s_i) + (r_k - r_i))`. States of every layer
    are concatenated per sample. Builds no graph.

    Args:
        memory: the number of past iterates mixed (`>= 1`).
    """

    name = "anderson"

    def __init__(self, memory: int = 5) -> None:
        self.memory = check_positive_int("memory", memory)

    def solve(self, dynamics, x, net, states, nudge, settings, *, what, graph=False):
        if graph:
            raise ValueError("Anderson acceleration builds no autograd graph; use "
                             "solver='iteration' for backprop through time")
        return iterate(_step_fn(dynamics, x, net, nudge), states, max_steps=settings.max_steps,
                       tol=settings.tol, accelerator=_AndersonMixing(self.memory), what=what)

    def __repr__(self) -> str:
        return f"Anderson(memory={self.memory})"


_REGISTRY: dict[str, Callable[..., Solver]] = {}


def register_solver(name: str, factory: Callable[..., Solver]) -> None:
    """Makes `factory(**options)` available as solver `name` everywhere a solver is named."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name == "auto":
        raise ValueError("'auto' is reserved (the op where the dynamics has one, else iteration)")
    _REGISTRY[name] = factory


def solver_names() -> tuple[str, ...]:
    """The registered solver names (and `"auto"`)."""
    return ("auto", *sorted(_REGISTRY))


def get_solver(solver: str | Solver, dynamics: Any = None, **options: Any) -> Solver:
    """A [`Solver`][toreq.solvers.Solver] from a name (with its options) or an instance
    (returned as is).

    `"auto"` picks `"op"` when `dynamics` has `relax_with_op`, else `"iteration"`.
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError(f"solver options {sorted(options)} apply to a solver given by name")
        return solver
    if solver == "auto":
        solver = "op" if hasattr(dynamics, "relax_with_op") else "iteration"
    if solver not in _REGISTRY:
        raise ValueError(f"solver must be one of {solver_names()} or a toreq.solvers.Solver, "
                         f"got {solver!r}")
    return _REGISTRY[solver](**options)


for _solver in (Iteration, Anderson, CompiledRelax, Static):
    register_solver(_solver.name, _solver)


class _Map:
    """A bare map `s -> fn(s)` as a dynamics, so that any solver can solve it (the adjoint)."""

    def __init__(self, fn: Callable[[list[Tensor]], list[Tensor]]) -> None:
        self.fn = fn

    def step(self, x: Any, states: list[Tensor], net: Any, nudge: Any) -> list[Tensor]:
        return self.fn(states)


def solve_map(solver: Solver, fn: Callable[[list[Tensor]], list[Tensor]], states: list[Tensor],
              settings: PhaseSettings, *, what: str) -> RelaxResult:
    """Solves `s = fn(s)` from `states` with a Python `solver` (e.g. an adjoint system)."""
    if isinstance(solver, CompiledRelax):
        solver = Iteration()  # the op relaxes networks, not arbitrary maps
    return solver.solve(_Map(fn), None, None, states, None, settings, what=what)
