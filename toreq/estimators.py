"""Gradient estimators: how parameter gradients come from a dynamics' phases.

An estimator owns the phase sequence of one training step: it runs the phases through the
model's solver (:meth:`toreq.nn.EquilibriumModel.solve`), writes the gradients into ``.grad``
and returns an :class:`Estimate`. It declares whether it is exact for a dynamics
(:meth:`Estimator.exact_for`). The trainer, :class:`toreq.nn.EquilibriumBlock`'s backward and
:mod:`toreq.diagnostics` all use these; a user-written estimator (a subclass, registered with
:func:`register_estimator`) plugs into all of them.

* :class:`EqProp` (``"eqprop"``): the free phase, then nudged phases from it. ``nudging``:
  ``"positive"`` contrasts ``+beta`` with the free phase, ``"negative"`` the free phase with
  ``-beta`` (both bias O(beta)), ``"centered"`` ``+beta`` with ``-beta`` (bias O(beta^2)).
  For descent, with ``s^a`` the more positively nudged phase, ``s^b`` the other and
  ``delta`` the difference of their strengths (``beta``, or ``2 beta`` centered), the dynamics'
  ``contrast`` gives ``-(1/(delta B)) (dPhi/dtheta(s^a) - dPhi/dtheta(s^b))`` (energy, Hebbian)
  or ``(1/B) v^T dT/dtheta`` with ``v = -(s^a - s^b)/delta`` (vector field). Exact as
  ``beta -> 0`` where the dynamics' ``gradient_regime`` is ``"exact"``. Nudged phases stop
  when a step changes the state by less than ``tol * |beta|`` (floored at 4 machine epsilons):
  the state moves O(beta) per step, so lowering beta never truncates them.
* :class:`ImplicitDifferentiation` (``"implicit"``; recurrent backpropagation, Almeida-Pineda):
  the adjoint ``a = g + J^T a`` (``J = dF/ds`` at ``s*``, ``g = dL/ds*``) solved by iteration with
  vector-Jacobian products of one step, then ``a^T dF/dtheta``. Exact for every dynamics (where
  the adjoint iteration converges).
* :class:`BPTT` (``"bptt"``): backprop through the unrolled steps from rest
  (``truncation=None``), or through the last ``truncation`` steps taken from the free
  equilibrium (truncated BPTT). Memory grows with the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from toreq.dynamics import Nudge
from toreq.ops import RelaxResult
from toreq.solvers import PhaseSettings
from toreq.validation import (check_choice, check_nonnegative_float, check_positive_float,
                              check_positive_int)

__all__ = [
    "BPTT", "EqProp", "Estimate", "Estimator", "ImplicitDifferentiation", "apply_contrast",
    "estimator_names", "run_free_phase",
    "get_estimator", "nudged_tolerance", "register_estimator",
]


@dataclass
class Estimate:
    """What an estimator's :meth:`Estimator.backward` returns (the gradients are in ``.grad``).

    ``loss``: the batch's loss at the free equilibrium (detached); ``output``: the prediction it
    was measured on (detached); ``phases``: each phase's :class:`toreq.ops.RelaxResult` by name
    (``"free"``, ``"positive"``, ``"negative"``, ``"adjoint"``), with the tolerance it ran to in
    ``tolerances``.
    """

    loss: Tensor
    output: Tensor
    phases: dict[str, RelaxResult] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)


def nudged_tolerance(tol: float, beta: float, dtype: torch.dtype) -> float:
    """A nudged phase's tolerance: ``tol * |beta|``, floored at 4 machine epsilons (0 stays 0)."""
    if tol <= 0:
        return 0.0
    return max(tol * abs(beta), 4 * torch.finfo(dtype).eps)


def run_free_phase(model: Any, x: Tensor, net: Any, settings: PhaseSettings) -> RelaxResult:
    """The free phase from the model's initial states."""
    return model.solve(x, net, model.init_states(x, net), None, settings, phase="free")


def apply_contrast(model: Any, x: Tensor, y: Tensor, net: Any, free: RelaxResult,
                   a: RelaxResult, b: RelaxResult, delta: float) -> tuple[Tensor, Tensor]:
    """Accumulates the dynamics' contrast of phases ``a`` and ``b`` (strengths ``delta`` apart)
    into ``.grad``, with the readout's own gradient (the loss at the free equilibrium);
    returns that loss and the output, detached."""
    output = model.output([s.detach() for s in free.states], net)
    loss = model.loss(output, y)
    pairs = [(t, g) for t, g in [*model.contrast(x, net, free, a, b, delta), (loss, None)]
             if t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return loss.detach(), output.detach()


class Estimator:
    """How gradients come from phases. Subclasses define :meth:`backward` and
    :meth:`exact_for`, and set ``name``."""

    name = "estimator"

    def exact_for(self, dynamics: Any) -> bool:
        """Whether the estimate is the gradient (in the limit it names) for ``dynamics``."""
        raise NotImplementedError

    def backward(self, model: Any, x: Tensor, y: Tensor, net: Any, *,
                 free: RelaxResult | None = None, beta: float | None = None,
                 free_settings: PhaseSettings | None = None) -> Estimate:
        """Runs the phases on the batch ``(x, y)``, accumulates gradients into ``.grad``.

        ``free``: a free phase already run (reused); ``beta``: a nudging strength overriding
        the estimator's (a schedule; ignored by estimators without one); ``free_settings``: the
        free phase's budget (default the model's).
        """
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The estimator's settings (recorded in checkpoints and results)."""
        return {}

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({body})"


class EqProp(Estimator):
    """Equilibrium propagation (see the module docstring for the rule and its signs).

    Args:
        beta: the nudging strength, ``> 0``.
        nudging: ``"centered"`` (default), ``"positive"`` or ``"negative"``.
        nudged_steps: each nudged phase's step cap (None: the model's ``nudged_steps``).
        nudged_tol: each nudged phase's tolerance (None: ``tol * |beta|`` from the model's
            tolerance; 0: exactly ``nudged_steps`` steps, as the GDD curve needs).
    """

    name = "eqprop"
    NUDGINGS = ("centered", "positive", "negative")

    def __init__(self, beta: float = 0.5, nudging: str = "centered",
                 nudged_steps: int | None = None, nudged_tol: float | None = None) -> None:
        self.beta = check_positive_float("beta", beta)
        self.nudging = check_choice("nudging", nudging, self.NUDGINGS)
        self.nudged_steps = check_positive_int("nudged_steps", nudged_steps, allow_none=True)
        self.nudged_tol = (None if nudged_tol is None
                           else check_nonnegative_float("nudged_tol", nudged_tol))

    def settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "nudging": self.nudging, "nudged_steps": self.nudged_steps,
                "nudged_tol": self.nudged_tol}

    def nudged_phase_settings(self, model: Any, beta: float, dtype: torch.dtype) -> PhaseSettings:
        """The nudged phases' budget: this estimator's caps, else the model's, with the
        tolerance relative to ``|beta|``."""
        base = model.nudged_settings
        cap = base.max_steps if self.nudged_steps is None else self.nudged_steps
        tol = (nudged_tolerance(base.tol, beta, dtype) if self.nudged_tol is None
               else self.nudged_tol)
        return PhaseSettings(cap, tol)

    def exact_for(self, dynamics: Any) -> bool:
        return getattr(dynamics, "gradient_regime", "approximate") == "exact"

    def phases(self, model: Any, x: Tensor, net: Any, free: RelaxResult,
               nudge_for: Callable[[float], Nudge], beta: float | None = None
               ) -> tuple[RelaxResult, RelaxResult, float, dict[str, RelaxResult]]:
        """The nudged phases from ``free``: ``(s^a, s^b, delta, phases)`` with ``s^a`` the more
        positively nudged, ``delta`` their strengths' difference, ``phases`` the new ones by
        name. ``nudge_for(beta)`` builds a phase's :class:`toreq.dynamics.Nudge`."""
        beta = self.beta if beta is None else beta
        settings = self.nudged_phase_settings(model, beta, free.states[0].dtype)
        run: dict[str, RelaxResult] = {}
        if self.nudging in ("centered", "positive"):
            run["positive"] = model.solve(x, net, free.states, nudge_for(beta), settings,
                                          phase="positive")
        if self.nudging in ("centered", "negative"):
            run["negative"] = model.solve(x, net, free.states, nudge_for(-beta), settings,
                                          phase="negative")
        a = run.get("positive", free)
        b = run.get("negative", free)
        return a, b, (2 * beta if self.nudging == "centered" else beta), run

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        free_settings = model.free_settings if free_settings is None else free_settings
        if free is None:
            free = run_free_phase(model, x, net, free_settings)
        a, b, delta, run = self.phases(
            model, x, net, free, lambda bt: model.nudge(bt, y, x, net, free.states), beta)
        loss, output = apply_contrast(model, x, y, net, free, a, b, delta)
        nudged_tol = self.nudged_phase_settings(model, beta or self.beta,
                                                free.states[0].dtype).tol
        tols = {"free": free_settings.tol, **{name: nudged_tol for name in run}}
        return Estimate(loss, output, {"free": free, **run}, tols)


class ImplicitDifferentiation(Estimator):
    """Recurrent backpropagation: the adjoint by fixed-point iteration of VJPs of one step.

    The adjoint runs within the model's ``adjoint_settings`` (its tolerance relative to each
    sample's gradient).
    """

    name = "implicit"

    def exact_for(self, dynamics: Any) -> bool:
        return True

    @staticmethod
    def solve_adjoint(model: Any, vjp: Callable[[Tensor], Tensor], g: Tensor,
                      settings: PhaseSettings, what: str) -> RelaxResult:
        """``a = g + J^T a`` given ``vjp(a) = J^T a``, per sample for ``g_b / c_b`` with
        ``c_b = max_j |g_bj|`` (so that ``tol`` is relative), scaled back."""
        scale = g.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
        scale = scale.view(-1, *[1] * (g.dim() - 1))
        g_hat = g / scale
        result = model.solve_map(lambda a: [g_hat + vjp(a[0])], [torch.zeros_like(g)], settings,
                                 phase="adjoint", what=what)
        return result._replace(states=[result.states[0] * scale])

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        free_settings = model.free_settings if free_settings is None else free_settings
        if free is None:
            free = run_free_phase(model, x, net, free_settings)
        s = [t.detach().requires_grad_() for t in free.states]
        loss = model.loss(model.output(s, net), y)
        g = torch.autograd.grad(loss, s, retain_graph=True, allow_unused=True)
        step = model.step(x, s, net)
        sizes = [t[0].numel() for t in s]

        def split(flat: Tensor) -> list[Tensor]:
            return [part.reshape(t.shape) for part, t in zip(flat.split(sizes, dim=1), s)]

        def join(parts) -> Tensor:  # a layer the step does not read gets a zero gradient
            return torch.cat([(torch.zeros_like(t) if p is None else p).flatten(1)
                              for p, t in zip(parts, s)], dim=1)

        def vjp(a: Tensor) -> Tensor:
            with torch.enable_grad():
                return join(torch.autograd.grad(step, s, split(a), retain_graph=True,
                                                allow_unused=True))

        adjoint = self.solve_adjoint(model, vjp, join(g), model.adjoint_settings,
                                     f"{type(model).__name__} adjoint")
        torch.autograd.backward([*step, loss], [*split(adjoint.states[0]), None])
        output = model.output([t.detach() for t in free.states], net)
        return Estimate(loss.detach(), output.detach(), {"free": free, "adjoint": adjoint},
                        {"free": free_settings.tol, "adjoint": model.adjoint_settings.tol})


class BPTT(Estimator):
    """Backprop through time over the same dynamics.

    Args:
        truncation: None unrolls ``steps`` steps from rest; ``k`` backprops through ``k`` steps
            taken from the free equilibrium (truncated BPTT; the free phase runs first).
        steps: the unrolled steps from rest (None: the free phase's step cap).
    """

    name = "bptt"

    def __init__(self, truncation: int | None = None, steps: int | None = None) -> None:
        self.truncation = check_positive_int("truncation", truncation, allow_none=True)
        self.steps = check_positive_int("steps", steps, allow_none=True)

    def settings(self) -> dict[str, Any]:
        return {"truncation": self.truncation, "steps": self.steps}

    def exact_for(self, dynamics: Any) -> bool:
        return True

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        free_settings = model.free_settings if free_settings is None else free_settings
        phases: dict[str, RelaxResult] = {}
        if self.truncation is None:
            steps = free_settings.max_steps if self.steps is None else self.steps
            start = model.init_states(x, net)
            unrolled = model.solve(x, net, start, None, PhaseSettings(steps, 0.0), phase="bptt",
                                   graph=True)
        else:
            if free is None:
                free = run_free_phase(model, x, net, free_settings)
            phases["free"] = free
            unrolled = model.solve(x, net, [s.detach() for s in free.states], None,
                                   PhaseSettings(self.truncation, 0.0), phase="bptt",
                                   graph=True)
        output = model.output(unrolled.states, net)
        loss = model.loss(output, y)
        loss.backward()
        if "free" not in phases:
            phases["free"] = unrolled._replace(states=[s.detach() for s in unrolled.states])
        return Estimate(loss.detach(), output.detach(), phases,
                        {"free": free_settings.tol if self.truncation else 0.0})


_REGISTRY: dict[str, Callable[..., Estimator]] = {}


def register_estimator(name: str, factory: Callable[..., Estimator]) -> None:
    """Makes ``factory(**settings)`` available as estimator ``name`` (trainer, CLI, presets)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def estimator_names() -> tuple[str, ...]:
    """The registered estimator names."""
    return tuple(sorted(_REGISTRY))


def get_estimator(estimator: str | Estimator, **settings: Any) -> Estimator:
    """An :class:`Estimator` from a name and its settings (unknown settings are refused by the
    estimator's constructor), or an instance (returned as is)."""
    if isinstance(estimator, Estimator):
        if settings:
            raise TypeError(f"estimator settings {sorted(settings)} apply to an estimator "
                            "given by name")
        return estimator
    if estimator not in _REGISTRY:
        raise ValueError(f"estimator must be one of {estimator_names()} or a "
                         f"toreq.estimators.Estimator, got {estimator!r}")
    return _REGISTRY[estimator](**settings)


for _estimator in (EqProp, ImplicitDifferentiation, BPTT):
    register_estimator(_estimator.name, _estimator)
