"""Gradient estimators: how parameter gradients come from a dynamics' phases.

An estimator owns the phase sequence of one training step: it runs the phases through the
model's solver ([`toreq.nn.EquilibriumModel.solve`][toreq.nn.equilibrium.EquilibriumModel.solve]),
writes the gradients into `.grad` and returns an [`Estimate`][toreq.estimators.Estimate]. It
declares whether it is exact for a dynamics
([`Estimator.exact_for`][toreq.estimators.Estimator.exact_for]). The trainer,
[`toreq.nn.EquilibriumBlock`][toreq.nn.block.EquilibriumBlock]'s backward and
[`toreq.diagnostics`][toreq.diagnostics] all use these; a user-written estimator (a subclass,
registered with [`register_estimator`][toreq.estimators.register_estimator]) plugs into all of them.

* [`EqProp`][toreq.estimators.EqProp] (`"eqprop"`): the free phase, then nudged phases from it.
  `nudging`: `"positive"` contrasts `+beta` with the free phase, `"negative"` the free phase with
  `-beta` (both bias O(beta)), `"centered"` `+beta` with `-beta` (bias O(beta^2)), `"random"`
  one of the one-sided two with a sign drawn per batch (the biases cancel on average).
  For descent, with `s^a` the more positively nudged phase, `s^b` the other and
  `delta` the difference of their strengths (`beta`, or `2 beta` centered), the dynamics'
  `contrast` gives `-(1/(delta B)) (dPhi/dtheta(s^a) - dPhi/dtheta(s^b))` (energy, Hebbian)
  or `(1/B) v^T dT/dtheta` with `v = -(s^a - s^b)/delta` (vector field). Exact as
  `beta -> 0` where the dynamics' `gradient_regime` is `"exact"`. Nudged phases stop
  when a step changes the state by less than `tol * |beta|` (floored at 4 machine epsilons):
  the state moves O(beta) per step, so lowering beta never truncates them.
* [`ImplicitDifferentiation`][toreq.estimators.ImplicitDifferentiation] (`"implicit"`; recurrent
  backpropagation, Almeida-Pineda): the adjoint `a = g + J^T a` (`J = dF/ds` at `s*`, `g = dL/ds*`)
  solved by iteration with vector-Jacobian products of one step, then `a^T dF/dtheta`. Exact for
  every dynamics (where the adjoint iteration converges).
* [`BPTT`][toreq.estimators.BPTT] (`"bptt"`): backprop through the unrolled steps from rest
  (`truncation=None`), or through the last `truncation` steps taken from the free
  equilibrium (truncated BPTT). Memory grows with the steps.
"""

from __future__ import annotations


import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from toreq.dynamics import Nudge
from toreq.ops import RelaxResult
from toreq.solvers import PhaseSettings
from toreq.validation import (check_choice, check_nonnegative_float, check_positive_float,
                              check_positive_int, refuse_unknown)

__all__ = [
    "BPTT", "ContrastiveLearning", "CoupledLearning", "EqProp", "Estimate", "Estimator",
    "HolomorphicEqProp", "ImplicitDifferentiation", "apply_contrast",
    "estimator_names", "run_free_phase",
    "get_estimator", "nudged_tolerance", "register_estimator",
]


@dataclass
class Estimate:
    """What an estimator's [`Estimator.backward`][toreq.estimators.Estimator.backward] returns (the
    gradients are in `.grad`).

    `loss`: the batch's loss at the free equilibrium (detached); `output`: the prediction it
    was measured on (detached); `phases`: each phase's
    [`toreq.ops.RelaxResult`][toreq.ops.iteration.RelaxResult] by name (`"free"`, `"positive"`,
    `"negative"`, `"adjoint"`), with the tolerance it ran to in `tolerances`.
    """

    loss: Tensor
    output: Tensor
    phases: dict[str, RelaxResult] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)


def nudged_tolerance(tol: float, beta: float, dtype: torch.dtype) -> float:
    """A nudged phase's tolerance: `tol * |beta|`, floored at 4 machine epsilons (0 stays 0)."""
    if tol <= 0:
        return 0.0
    return max(tol * abs(beta), 4 * torch.finfo(dtype).eps)


def run_free_phase(model: Any, x: Tensor, net: Any, settings: PhaseSettings,
                   start: list[Tensor] | None = None) -> RelaxResult:
    """The free phase from `start` (default: the model's initial states)."""
    start = model.init_states(x, net) if start is None else start
    return model.solve(x, net, start, None, settings, phase="free")


def free_phase(model: Any, x: Tensor, net: Any, free: RelaxResult | None,
               settings: PhaseSettings | None) -> tuple[RelaxResult, PhaseSettings]:
    """An estimator's free phase: `free` when one was run already, else run with `settings`
    (default the model's `free_settings`); returns it with the settings it stands for."""
    settings = model.free_settings if settings is None else settings
    return (run_free_phase(model, x, net, settings) if free is None else free), settings


def apply_contrast(model: Any, x: Tensor, y: Tensor, net: Any, free: RelaxResult,
                   a: RelaxResult, b: RelaxResult, delta: float) -> tuple[Tensor, Tensor]:
    """Accumulates the dynamics' contrast of phases `a` and `b` (strengths `delta` apart)
    into `.grad`, with the readout's own gradient (the loss at the free equilibrium);
    returns that loss and the output, detached."""
    output = model.output([s.detach() for s in free.states], net)
    loss = model.loss(output, y)
    pairs = [(t, g) for t, g in [*model.contrast(x, net, free, a, b, delta), (loss, None)]
             if t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return loss.detach(), output.detach()


class Estimator:
    """How gradients come from phases. Subclasses define
    [`backward`][toreq.estimators.Estimator.backward] and
    [`exact_for`][toreq.estimators.Estimator.exact_for], and set `name`."""

    name = "estimator"

    def exact_for(self, dynamics: Any) -> bool:
        """Whether the estimate is the gradient (in the limit it names) for `dynamics`."""
        raise NotImplementedError

    def backward(self, model: Any, x: Tensor, y: Tensor, net: Any, *,
                 free: RelaxResult | None = None, beta: float | None = None,
                 free_settings: PhaseSettings | None = None) -> Estimate:
        """Runs the phases on the batch `(x, y)`, accumulates gradients into `.grad`.

        `free`: a free phase already run (reused); `beta`: a nudging strength overriding
        the estimator's (a schedule; ignored by estimators without one); `free_settings`: the
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
        beta: the nudging strength, `> 0`.
        nudging: `"centered"` (default), `"positive"`, `"negative"`, or `"random"`: one-sided
            with the sign drawn per batch from torch's generator (Scellier & Bengio 2017).
        nudged_steps: each nudged phase's step cap (None: the model's `nudged_steps`).
        nudged_tol: each nudged phase's tolerance (None: `tol * |beta|` from the model's
            tolerance; 0: exactly `nudged_steps` steps, as the GDD curve needs).
    """

    name = "eqprop"
    NUDGINGS = ("centered", "positive", "negative", "random")

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
        tolerance relative to `|beta|`."""
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
        """The nudged phases from `free`: `(s^a, s^b, delta, phases)` with `s^a` the more
        positively nudged, `delta` their strengths' difference, `phases` the new ones by
        name. `nudge_for(beta)` builds a phase's [`toreq.dynamics.Nudge`][toreq.dynamics.Nudge]."""
        beta = self.beta if beta is None else beta
        settings = self.nudged_phase_settings(model, beta, free.states[0].dtype)
        nudging = self.nudging
        if nudging == "random":
            nudging = "positive" if bool(torch.randint(2, ())) else "negative"
        run: dict[str, RelaxResult] = {}
        if nudging in ("centered", "positive"):
            run["positive"] = model.solve(x, net, free.states, nudge_for(beta), settings,
                                          phase="positive")
        if nudging in ("centered", "negative"):
            run["negative"] = model.solve(x, net, free.states, nudge_for(-beta), settings,
                                          phase="negative")
        a = run.get("positive", free)
        b = run.get("negative", free)
        return a, b, (2 * beta if nudging == "centered" else beta), run

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        free, free_settings = free_phase(model, x, net, free, free_settings)
        # the target rows built once for both phases (labels to rows checks their range)
        nudge = model.nudge(self.beta if beta is None else beta, y, x, net, free.states)
        a, b, delta, run = self.phases(
            model, x, net, free, lambda bt: replace(nudge, beta=bt), beta)
        loss, output = apply_contrast(model, x, y, net, free, a, b, delta)
        nudged_tol = self.nudged_phase_settings(model, beta or self.beta,
                                                free.states[0].dtype).tol
        tols = {"free": free_settings.tol, **{name: nudged_tol for name in run}}
        return Estimate(loss, output, {"free": free, **run}, tols)


class ImplicitDifferentiation(Estimator):
    """Recurrent backpropagation: the adjoint by fixed-point iteration of VJPs of one step.

    The adjoint runs within the model's `adjoint_settings` (its tolerance relative to each
    sample's gradient).
    """

    name = "implicit"

    def exact_for(self, dynamics: Any) -> bool:
        return True

    @staticmethod
    def solve_adjoint(model: Any, vjp: Callable[[Tensor], Tensor], g: Tensor,
                      settings: PhaseSettings, what: str) -> RelaxResult:
        """`a = g + J^T a` given `vjp(a) = J^T a`, per sample for `g_b / c_b` with
        `c_b = max_j |g_bj|` (so that `tol` is relative), scaled back."""
        scale = g.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
        scale = scale.view(-1, *[1] * (g.dim() - 1))
        g_hat = g / scale
        result = model.solve_map(lambda a: [g_hat + vjp(a[0])], [torch.zeros_like(g)], settings,
                                 phase="adjoint", what=what)
        return result._replace(states=[result.states[0] * scale])

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        free, free_settings = free_phase(model, x, net, free, free_settings)
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
        truncation: None unrolls `steps` steps from rest; `k` backprops through `k` steps
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


def _clamp_target(model: Any, x: Tensor, y: Tensor, net: Any, free: RelaxResult) -> Tensor:
    """Target rows for the output state, checked to be clampable: the last state must be the
    output (no feedforward readout) and the cost an output-state cost."""
    if getattr(net, "readout_weight", None) is not None:
        raise ValueError(f"clamping the output needs a model whose last layer is the output; "
                         f"{type(model).__name__} reads its output through a readout "
                         "(use loss='mse' without a readout, e.g. EPMLP(loss='mse'))")
    last = free.states[-1]
    return model.cost.rows(y, last[0].numel(), last.dtype).view_as(last)


class ContrastiveLearning(Estimator):
    """Contrastive learning (contrastive Hebbian learning; Movellan 1991).

    The free phase, then a phase from it with the output units clamped to the target `t`;
    for descent `-(1/B) (dPhi/dtheta(s^clamped) - dPhi/dtheta(s^free))` (the dynamics'
    `contrast` with `delta = 1`). Not the gradient of the loss in general
    (`exact_for` is False): it follows the difference of the two equilibria's energies.
    Needs a model whose last layer is the output (no readout).
    """

    name = "cl"

    def exact_for(self, dynamics: Any) -> bool:
        return False

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        free, free_settings = free_phase(model, x, net, free, free_settings)
        target = _clamp_target(model, x, y, net, free)
        clamped = model.solve(x, net, free.states, Nudge.clamped(target), model.nudged_settings,
                              phase="clamped")
        loss, output = apply_contrast(model, x, y, net, free, clamped, free, 1.0)
        return Estimate(loss, output, {"free": free, "clamped": clamped},
                        {"free": free_settings.tol, "clamped": model.nudged_settings.tol})


class CoupledLearning(Estimator):
    """Coupled learning (Stern et al. 2021).

    The contrasted phase clamps the output units to `o + eta (t - o)` (`o` the free
    output, `t` the target; `"negative"`: `o - eta (t - o)`; `"centered"`: both);
    for descent `-(1/(delta B)) (dPhi/dtheta(s^a) - dPhi/dtheta(s^b))` with `s^a` the more
    positively clamped phase and `delta` = `eta` (`2 eta` centered). Not exact
    (`exact_for` is False): the output state is moved toward the target rather than pushed
    by the loss's gradient, so the hidden layers respond to the output's displacement alone and
    the estimate tends, as `eta -> 0`, to a direction close to the gradient's but not equal to
    it. Needs a model whose last layer is the output.

    Args:
        eta: the clamping's step toward the target, in `(0, 1]`.
        nudging: `"positive"` (default), `"negative"` or `"centered"`.
    """

    name = "cpl"
    NUDGINGS = ("positive", "negative", "centered")

    def __init__(self, eta: float = 0.5, nudging: str = "positive") -> None:
        self.eta = check_positive_float("eta", eta)
        if self.eta > 1:
            raise ValueError(f"eta must be in (0, 1], got {eta!r}")
        self.nudging = check_choice("nudging", nudging, self.NUDGINGS)

    def settings(self) -> dict[str, Any]:
        return {"eta": self.eta, "nudging": self.nudging}

    def exact_for(self, dynamics: Any) -> bool:
        return False

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        free, free_settings = free_phase(model, x, net, free, free_settings)
        target = _clamp_target(model, x, y, net, free)
        output = free.states[-1]
        run: dict[str, RelaxResult] = {}
        for name, sign in (("positive", 1.0), ("negative", -1.0)):
            if self.nudging in (name, "centered"):
                clamp = output + sign * self.eta * (target - output)
                run[name] = model.solve(x, net, free.states, Nudge.clamped(clamp),
                                        model.nudged_settings, phase=name)
        a, b = run.get("positive", free), run.get("negative", free)
        delta = 2 * self.eta if self.nudging == "centered" else self.eta
        loss, out = apply_contrast(model, x, y, net, free, a, b, delta)
        return Estimate(loss, out, {"free": free, **run},
                        {"free": free_settings.tol, **{n: model.nudged_settings.tol for n in run}})


class HolomorphicEqProp(Estimator):
    r"""Holomorphic EqProp (Laborieux & Zenke 2022): exact gradients at finite beta.

    `N` nudged phases from the free equilibrium with complex strengths
    `beta_k = |beta| e^{2 pi i k / N}`, `k = 0 .. N-1` (complex states); the gradient is the
    first Fourier coefficient of the phases' `dPhi/dtheta`, for descent

    $$
    g_\theta = -\frac{1}{B N |\beta|}\,
    \mathrm{Re} \sum_k e^{-2\pi i k/N}\, \frac{\partial \Phi}{\partial \theta}(s^{\beta_k}),
    $$

    taken by one backward pass through `Re sum_k e^{-2 pi i k/N} Phi(theta; s^{beta_k})` at the
    detached states; a readout gets the loss's gradient at the free equilibrium. Its error
    against the gradient falls like `|beta|^N` (the Cauchy integral of `dPhi/dtheta(s^beta)`
    sampled at `N` points), where the dynamics is holomorphic in the states: a primitive
    `Phi` (tied couplings) and a holomorphic activation (`tanh`, `sigmoid`, `steep_sigmoid`,
    `identity`, one or one per layer;
    the hard sigmoid is refused). The phases run on the Python solver (the op has no complex
    kernels).

    Args:
        beta: `|beta|`, the radius of the circle of strengths, `> 0`.
        points: `N >= 2`, the strengths sampled on the circle.
        nudged_steps: each phase's step cap (None: the model's `nudged_steps`).
    """

    name = "holomorphic"
    ACTIVATIONS = ("tanh", "sigmoid", "identity", "steep_sigmoid")

    def __init__(self, beta: float = 0.1, points: int = 4,
                 nudged_steps: int | None = None) -> None:
        self.beta = check_positive_float("beta", beta)
        self.points = check_positive_int("points", points)
        if self.points < 2:
            raise ValueError(f"points must be an int >= 2, got {points!r}")
        self.nudged_steps = check_positive_int("nudged_steps", nudged_steps, allow_none=True)

    def settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "points": self.points, "nudged_steps": self.nudged_steps}

    def exact_for(self, dynamics: Any) -> bool:
        return getattr(dynamics, "gradient_regime", "approximate") == "exact"

    def check(self, model: Any) -> None:
        """Refuses dynamics that are not holomorphic, naming what is allowed."""
        if not hasattr(model, "primitive") or not self.exact_for(model):
            raise ValueError(f"holomorphic EqProp needs dynamics with an energy (a primitive "
                             f"Phi and gradient_regime 'exact'); {type(model).__name__} has "
                             "none")
        if not hasattr(model, "relax_with_op"):
            raise ValueError(f"holomorphic EqProp runs on coupling-list dynamics (tied "
                             f"networks, e.g. EPMLP, LoopedMLP); {type(model).__name__}'s step "
                             "is not holomorphic (pooling, normalisation)")
        activation = getattr(model, "activation", None)
        names = (activation,) if activation is None or isinstance(activation, str) else activation
        if any(name not in self.ACTIVATIONS for name in names):
            raise ValueError(f"holomorphic EqProp needs a holomorphic activation, one of "
                             f"{self.ACTIVATIONS}; got {activation!r}")

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        self.check(model)
        free, free_settings = free_phase(model, x, net, free, free_settings)
        real = free.states[0].dtype
        dtype = torch.complex128 if real == torch.float64 else torch.complex64
        start = [s.to(dtype) for s in free.states]
        cap = model.nudged_settings.max_steps if self.nudged_steps is None else self.nudged_steps
        settings = PhaseSettings(cap, nudged_tolerance(model.nudged_settings.tol, self.beta, real))
        surrogate = None
        run: dict[str, RelaxResult] = {}
        for k in range(self.points):
            angle = 2 * math.pi * k / self.points
            beta_k = self.beta * complex(math.cos(angle), math.sin(angle))
            phase = model.solve(x, net, start, model.nudge(beta_k, y, x, net, start), settings,
                                phase=f"holomorphic {k}")
            run[f"holomorphic {k}"] = phase
            weight = complex(math.cos(angle), -math.sin(angle))
            term = weight * model.primitive(x, [s.detach() for s in phase.states], net)
            surrogate = term if surrogate is None else surrogate + term
        scale = -1.0 / (x.shape[0] * self.points * self.beta)
        output = model.output([s.detach() for s in free.states], net)
        loss = model.loss(output, y)
        pairs = [(t, g) for t, g in ((scale * surrogate.real, None), (loss, None))
                 if t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs])
        return Estimate(loss.detach(), output.detach(), {"free": free, **run},
                        {"free": free_settings.tol, **{n: settings.tol for n in run}})


_REGISTRY: dict[str, Callable[..., Estimator]] = {}


def register_estimator(name: str, factory: Callable[..., Estimator]) -> None:
    """Makes `factory(**settings)` available as estimator `name` (trainer, CLI, presets)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def estimator_names() -> tuple[str, ...]:
    """The registered estimator names."""
    return tuple(sorted(_REGISTRY))


def get_estimator(estimator: str | Estimator, **settings: Any) -> Estimator:
    """An [`Estimator`][toreq.estimators.Estimator] from a name and its settings (unknown settings
    are refused by the estimator's constructor), or an instance (returned as is)."""
    if isinstance(estimator, Estimator):
        if settings:
            raise TypeError(f"estimator settings {sorted(settings)} apply to an estimator "
                            "given by name")
        return estimator
    if estimator not in _REGISTRY:
        raise ValueError(f"estimator must be one of {estimator_names()} or a "
                         f"toreq.estimators.Estimator, got {estimator!r}")
    factory = _REGISTRY[estimator]
    parameters = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        refuse_unknown(f"estimator {estimator!r}", settings, parameters)
    return factory(**settings)


for _estimator in (EqProp, ImplicitDifferentiation, BPTT, ContrastiveLearning, CoupledLearning,
                   HolomorphicEqProp):
    register_estimator(_estimator.name, _estimator)
