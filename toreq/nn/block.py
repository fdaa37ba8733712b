"""EqProp as a layer: :class:`EquilibriumBlock` turns a state-update module into a layer.

A *cell* is any ``nn.Module`` with ``cell(x, s) -> tensor of the state's shape``. The block's
output is the fixed point ``s*`` of the (damped) dynamics

.. math::  s \\leftarrow \\gamma s + (1 - \\gamma) f(x, s), \\qquad
           f(x, s) = \\rho(\\mathrm{cell}(x, s)) \\ \\text{(with an activation; else cell(x, s))},

found without an autograd graph. Its backward pass, given ``g = dL/ds*`` from the layers above
(already averaged over the batch by autograd), is one of three estimators of
``dL/dtheta = a^T df/dtheta`` with the adjoint ``a = (I - J^T)^{-1} g``, ``J = df/ds`` at ``s*``:

* ``"eqprop"``: a nudged phase from ``s*`` with the constant nudge ``-beta * g`` (see below),
  and ``v = -(s^{+beta} - s^{-beta}) / (2 beta)`` (symmetric) or ``v = -(s^{beta} - s*) / beta``
  (one-sided); the gradients are vector-Jacobian products of *one* step at ``s*`` with ``v``.
  No graph over the relaxation; memory does not depend on the number of steps.
* ``"implicit"``: implicit differentiation, ``a = g + J^T a`` solved by iteration with
  vector-Jacobian products of one step at ``s*``; also constant memory.
* ``"bptt"``: backprop through the unrolled relaxation (memory grows with the steps), or with
  ``bptt_steps=k`` through ``k`` extra steps taken from the relaxed state (truncated BPTT).

Where the nudge goes (``EQPROP-MATH.md`` sections 4 and 5). Linearising the nudged fixed point:

* with ``activation`` given, the cell is the pre-activation ``h(x, s)`` and the nudge goes
  inside the activation: ``s <- rho(h(x, s) - beta g)``. Then ``v = D (I - J^T)^{-1} g`` with
  ``D = diag(rho'(h))`` whenever ``dh/ds`` is symmetric (``h = U x + W s + b`` with ``W = W^T``,
  for which ``J = D W``), and ``v^T dh/dtheta = a^T df/dtheta``: the gradients are the VJPs of
  the cell (the pre-activation) with ``v``, exact as ``beta -> 0``;
* without ``activation``, the cell is the whole update and the nudge is added to it:
  ``s <- f(x, s) - beta g``. Then ``v = (I - J)^{-1} g``, equal to ``a`` exactly when ``J`` is
  symmetric (a linear cell with a symmetric weight; a gradient step ``s - eta dE/ds`` on an
  energy). The gradients are the VJPs of the cell with ``v``.

Otherwise (a non-symmetric ``W``, or ``rho(W s + ...)`` written as one cell) EqProp is the
vector-field approximation of Scellier et al.: ``v`` replaces ``(I - J^T)^{-1}`` by
``(I - J)^{-1}``, close when ``J`` is nearly symmetric. ``gradient="implicit"`` is exact for
every cell and ``gradient="bptt"`` is the reference both are compared with
(:func:`toreq.diagnostics.gradient_check`).

The nudge is scaled per sample: sample ``b`` gets ``-beta * g_b / c_b`` with
``c_b = max_j |g_bj|`` and ``v_b`` is multiplied back by ``c_b``. The estimate is the one of
``beta' = beta / c_b`` (exactly as ``beta -> 0``), but ``beta`` becomes the size of the state's
response, independent of batch size and loss scale, and the nudged phases can stop once a step
changes the state by less than ``beta * tol`` (floored at 4 float eps): the nudged response has
the free phase's relative accuracy.

Convergence is per sample: a sample whose largest state change in a step falls below ``tol``
stops updating. After each forward the block keeps ``last_steps`` (int64, per sample),
``last_residual`` (the last change) and ``last_converged`` (``last_residual < tol``); a free
phase (or adjoint solve) that leaves samples unconverged with ``tol > 0`` also emits a
:class:`ConvergenceWarning`. ``tol=0`` runs exactly ``max_steps`` steps and never claims
convergence. A state that becomes NaN or Inf raises ``RuntimeError``.

Parametrized weights of the cell (``torch.nn.utils.parametrize``: ``toreq.utils.symmetric``,
``toreq.utils.spectral_norm``) are computed once per forward and once per backward
(``parametrize.cached()``), so every step of a phase sees one weight. A stateful
parametrization advances once in each: spectral normalisation in training mode runs one power
iteration in the forward and one in the backward, so the phases see weights that differ by that
iteration's change (negligible once it has converged; none in eval mode).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from toreq.errors import ConvergenceWarning
from toreq.ops.relax import ACTIVATIONS, _activate

__all__ = [
    "ConvergenceWarning", "EquilibriumBlock", "FixedPoint", "solve_adjoint", "solve_fixed_point",
]

GRADIENTS = ("eqprop", "bptt", "implicit")
SOLVERS = ("iteration", "anderson")


class FixedPoint(NamedTuple):
    """The outcome of :func:`solve_fixed_point`.

    ``state``: the final state; ``steps``: int64 ``(batch,)``, the evaluations of the map each
    sample received; ``residual``: ``(batch,)``, each sample's largest state change in its last
    step (for Anderson, that of a plain damped step). A sample converged where ``residual < tol``.
    """

    state: Tensor
    steps: Tensor
    residual: Tensor


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``(batch,)`` values shaped to broadcast against ``like`` of shape ``(batch, ...)``."""
    return values.view(-1, *[1] * (like.dim() - 1))


def _check_step(s: Tensor, change: Tensor, active: Tensor, still: Tensor, step: int,
                what: str) -> int:
    """Raises on a non-finite active sample; returns ``still.sum()`` (one host sync for both)."""
    bad, count = torch.stack([(~torch.isfinite(change) & active).sum(), still.sum()]).tolist()
    if bad:
        raise RuntimeError(
            f"{what}: the state was NaN or Inf after step {step} in {bad} of {s.shape[0]} "
            "samples; lower the learning rate, add damping, or make the cell contract (e.g. "
            "spectral normalisation of its recurrent weight)")
    return count


def solve_fixed_point(step: Callable[[Tensor], Tensor], s0: Tensor, *, max_steps: int,
                      tol: float, damping: float = 0.0, solver: str = "iteration",
                      memory: int = 5, what: str = "fixed point") -> FixedPoint:
    """Solves ``s = step(s)`` per sample from ``s0`` of shape ``(batch, ...)``.

    ``"iteration"``: ``s <- damping * s + (1 - damping) * step(s)``. It builds an autograd graph
    exactly when grad mode is on and ``step`` or ``s0`` needs one (backprop through time).

    ``"anderson"`` (Anderson acceleration, type II, per sample, no graph): with the residual
    ``r(s) = step(s) - s``, the mixing ``m = 1 - damping`` and the last ``memory + 1`` iterates
    ``s_i`` and residuals ``r_i``, the coefficients

    .. math::  \\gamma = \\arg\\min_\\gamma \\| r_k - \\sum_i \\gamma_i (r_k - r_i) \\|_2

    (ridge-regularised normal equations) give
    ``s_{k+1} = s_k + m r_k - sum_i gamma_i ((s_k - s_i) + m (r_k - r_i))``; a sample whose
    Anderson step is not finite takes the plain damped step instead.

    A sample stops once a plain step would change it by less than ``tol`` (it takes that step);
    ``tol=0`` runs ``max_steps`` steps (the iteration then tests only its last step: NaN and Inf
    persist through the common activations' updates). Non-finite states raise ``RuntimeError``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "anderson" and torch.is_grad_enabled():
        with torch.no_grad():  # the mixing is not a map to differentiate through
            return solve_fixed_point(step, s0, max_steps=max_steps, tol=tol, damping=damping,
                                     solver=solver, memory=memory, what=what)
    batch = s0.shape[0]
    steps = torch.zeros(batch, dtype=torch.long, device=s0.device)
    residual = torch.full((batch,), math.inf, dtype=s0.dtype, device=s0.device)
    active = torch.ones(batch, dtype=torch.bool, device=s0.device)
    everyone = True
    s = s0
    if solver == "anderson":
        flat = s0.reshape(batch, -1)
        history_s = flat.new_zeros(batch, memory + 1, flat.shape[1])
        history_r = torch.zeros_like(history_s)
        eps, tiny = torch.finfo(s0.dtype).eps, torch.finfo(s0.dtype).tiny
    for k in range(1, max_steps + 1):
        out = step(s)
        if out.shape != s.shape:
            raise ValueError(f"{what}: the update returned shape {tuple(out.shape)} for a state "
                             f"of shape {tuple(s.shape)}; the cell must return the state's shape")
        if solver == "iteration":
            new = out if damping == 0.0 else damping * s + (1.0 - damping) * out
            if tol == 0 and k < max_steps:  # a fixed step count: test only the last step
                s = new
                continue
            change = (new - s).detach().flatten(1).abs().amax(dim=1)
        else:
            flat, r = s.reshape(batch, -1), (out - s).reshape(batch, -1)
            change = (1.0 - damping) * r.abs().amax(dim=1)
            plain = flat + (1.0 - damping) * r
            slot = (k - 1) % (memory + 1)
            history_s[:, slot], history_r[:, slot] = flat, r
            new = plain
            if k > 1:
                used = min(k, memory + 1)
                ds = flat.unsqueeze(1) - history_s[:, :used]  # (batch, used, n)
                dr = r.unsqueeze(1) - history_r[:, :used]
                gram = dr @ dr.transpose(1, 2)
                ridge = eps ** 0.5 * gram.diagonal(dim1=1, dim2=2).mean(dim=1) + tiny
                eye = torch.eye(used, dtype=s0.dtype, device=s0.device)
                gamma = torch.linalg.solve(gram + ridge[:, None, None] * eye, dr @ r.unsqueeze(2))
                mixed = plain - ((ds + (1.0 - damping) * dr).transpose(1, 2) @ gamma).squeeze(2)
                ok = torch.isfinite(mixed).all(dim=1, keepdim=True)
                if tol > 0:
                    ok = ok & ~(change < tol).unsqueeze(1)  # a converging sample steps plainly
                new = torch.where(ok, mixed, plain)
            new = new.view_as(s)
        still = active & ~(change < tol) if tol > 0 else active
        count = _check_step(s, change, active, still, k, what)
        s = new if everyone else torch.where(_per_sample(active, s), new, s)
        residual = torch.where(active, change, residual)
        steps = torch.where(active, k, steps)
        active, everyone = still, count == batch
        if count == 0:
            break
    return FixedPoint(s, steps, residual)


def _sample_scale(g: Tensor) -> Tensor:
    """``c_b = max_j |g_bj|`` per sample (at least the dtype's tiny), shaped like ``g``."""
    c = g.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
    return _per_sample(c, g)


def solve_adjoint(vjp: Callable[[Tensor], Tensor], g: Tensor, *, max_steps: int, tol: float,
                  damping: float = 0.0, solver: str = "iteration",
                  memory: int = 5) -> FixedPoint:
    """Solves ``(I - J^T) a = g``, i.e. ``a = g + J^T a``, given ``vjp(a) = J^T a``.

    Each sample is solved for ``g_b / c_b`` with ``c_b = max_j |g_bj|`` and scaled back, so that
    ``tol`` is relative to the sample's gradient. Converges where the dynamics contract (the
    spectrum of ``J^T`` is that of ``J``).
    """
    scale = _sample_scale(g)
    g_hat = g / scale
    result = solve_fixed_point(lambda a: g_hat + vjp(a), torch.zeros_like(g), max_steps=max_steps,
                               tol=tol, damping=damping, solver=solver, memory=memory,
                               what="EquilibriumBlock adjoint")
    return result._replace(state=result.state * scale)


class EquilibriumBlock(nn.Module):
    """A layer whose output is the fixed point of ``s <- f(x, s)``; backward by EqProp.

    See the module docstring for the equations, where the nudge goes and when each estimator is
    exact. The cell must treat samples independently (no batch statistics) and its parameters
    (``cell.parameters()``) and the input ``x`` get gradients; the initial state does not (the
    fixed point does not depend on it).

    Args:
        cell: ``nn.Module`` with ``cell(x, s)`` returning a tensor of the state's shape: the
            pre-activation when ``activation`` is given, else the new state.
        state_shape: the state of one sample (an int or a tuple); the state is
            ``(batch, *state_shape)``, zeros unless ``forward`` gets one.
        activation: ``"tanh"``, ``"sigmoid"``, ``"hard_sigmoid"``, a callable, or None.
        max_steps: the most steps of the free phase (and of the nudged phases unless
            ``nudged_steps``; and of the adjoint solve).
        tol: a sample stops once a step changes its state by less than ``tol`` (max-abs).
        damping: ``gamma`` in ``[0, 1)``, the weight of the old state in each update.
        beta: the nudge's relative size (``> 0``), for ``gradient="eqprop"``.
        symmetric: contrast ``+beta`` and ``-beta`` phases (bias O(beta^2)), else ``+beta`` and
            the free state (O(beta)).
        nudged_steps: the most steps of each nudged phase (default ``max_steps``).
        solver: ``"iteration"`` or ``"anderson"`` (Anderson acceleration, ``anderson_memory``
            past iterates), for the free and nudged phases and the adjoint.
        gradient: ``"eqprop"``, ``"implicit"`` or ``"bptt"``.
        bptt_steps: with ``gradient="bptt"``, backprop only through this many steps taken from
            the state the relaxation reached without a graph (None: through all of it).
    """

    def __init__(self, cell: nn.Module, state_shape: int | Sequence[int], *,
                 activation: str | Callable[[Tensor], Tensor] | None = None,
                 max_steps: int = 50, tol: float = 1e-4, damping: float = 0.0,
                 beta: float = 0.05, symmetric: bool = True, nudged_steps: int | None = None,
                 solver: str = "iteration", anderson_memory: int = 5, gradient: str = "eqprop",
                 bptt_steps: int | None = None) -> None:
        super().__init__()
        if not isinstance(cell, nn.Module):
            raise TypeError(f"cell must be an nn.Module computing cell(x, s), got "
                            f"{type(cell).__name__}")
        shape = (state_shape,) if isinstance(state_shape, int) else tuple(state_shape)
        if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"state_shape must be a positive int or a tuple of them, got "
                             f"{state_shape!r}")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {ACTIVATIONS}, a callable or None, "
                                 f"got {activation!r}")
            self.activation_name = activation
            activation = functools.partial(_activate, activation)
        elif activation is not None:
            if not callable(activation):
                raise TypeError(f"activation must be a name, a callable or None, got "
                                f"{activation!r}")
            self.activation_name = getattr(activation, "__name__", type(activation).__name__)
        else:
            self.activation_name = None
        self.cell, self.state_shape, self.activation = cell, shape, activation
        self.max_steps, self.tol, self.damping = max_steps, tol, damping
        self.beta, self.symmetric, self.nudged_steps = beta, symmetric, nudged_steps
        self.solver, self.anderson_memory = solver, anderson_memory
        self.gradient, self.bptt_steps = gradient, bptt_steps
        self.last_steps: Tensor | None = None
        self.last_residual: Tensor | None = None
        self.last_converged: Tensor | None = None
        self.last_backward_steps: Tensor | None = None
        self._validate()

    def _validate(self) -> None:
        """Checks the options (at construction and at every forward: they may be reassigned)."""
        def positive_int(name: str, value: object, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                expected = "a positive int or None" if allow_none else "a positive int"
                raise ValueError(f"{name} must be {expected}, got {value!r}")

        positive_int("max_steps", self.max_steps)
        positive_int("nudged_steps", self.nudged_steps, allow_none=True)
        positive_int("anderson_memory", self.anderson_memory)
        positive_int("bptt_steps", self.bptt_steps, allow_none=True)
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite float >= 0, got {self.tol!r}")
        if not (isinstance(self.damping, (int, float)) and 0.0 <= self.damping < 1.0):
            raise ValueError(f"damping must be in [0, 1), got {self.damping!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite float > 0, got {self.beta!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.gradient == "bptt" and self.solver != "iteration":
            raise ValueError("gradient='bptt' backprops through the plain iteration: use "
                             f"solver='iteration' with it, not {self.solver!r}")

    def extra_repr(self) -> str:
        parts = [f"state_shape={self.state_shape}", f"activation={self.activation_name}",
                 f"gradient={self.gradient!r}", f"solver={self.solver!r}",
                 f"max_steps={self.max_steps}", f"tol={self.tol:g}", f"damping={self.damping:g}"]
        if self.gradient == "eqprop":
            parts += [f"beta={self.beta:g}", f"symmetric={self.symmetric}"]
            if self.nudged_steps is not None:
                parts.append(f"nudged_steps={self.nudged_steps}")
        if self.gradient == "bptt" and self.bptt_steps is not None:
            parts.append(f"bptt_steps={self.bptt_steps}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ dynamics
    def _map(self, x: Tensor, nudge: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """``s -> f(x, s)``, with ``nudge`` (``beta * g``) subtracted inside the activation or,
        without one, from the update."""
        def step(s: Tensor) -> Tensor:
            out = self.cell(x, s)
            if nudge is not None:
                out = out - nudge
            return out if self.activation is None else self.activation(out)
        return step

    def _relax(self, x: Tensor, s0: Tensor, nudge: Tensor | None = None,
               max_steps: int | None = None, tol: float | None = None,
               solver: str | None = None, what: str = "EquilibriumBlock free phase") -> FixedPoint:
        return solve_fixed_point(
            self._map(x, nudge), s0, max_steps=self.max_steps if max_steps is None else max_steps,
            tol=self.tol if tol is None else tol, damping=self.damping,
            solver=self.solver if solver is None else solver, memory=self.anderson_memory,
            what=what)

    def _warn_unconverged(self, result: FixedPoint, what: str) -> None:
        # no per-call numbers in the text: Python then shows it once per block setting, not at
        # every step (which samples: last_converged; by how much: last_residual)
        if self.tol > 0 and bool((result.residual >= self.tol).any()):
            warnings.warn(
                f"EquilibriumBlock: {what} left samples unconverged after max_steps="
                f"{self.max_steps} (residual >= tol={self.tol:g}; see last_converged and "
                "last_residual); raise max_steps, add damping, use solver='anderson', or make "
                "the cell contract more strongly", ConvergenceWarning)

    def _remember(self, free: FixedPoint) -> None:
        self.last_steps, self.last_residual = free.steps, free.residual
        self.last_converged = free.residual < self.tol
        self._warn_unconverged(free, "the free phase")

    def eqprop_vector(self, x: Tensor, s_star: Tensor, g: Tensor) -> Tensor:
        """``v`` from the nudged phase(s) at ``s*`` driven by ``g = dL/ds*`` (no graph).

        ``v = -c (s^{+beta} - s^{-beta}) / (2 beta)`` or ``-c (s^{beta} - s*) / beta`` with the
        nudge ``beta g / c`` per sample (``c = max |g_b|``, see the module docstring).
        """
        with torch.no_grad():
            scale = _sample_scale(g)
            nudge = self.beta * g / scale
            eps = torch.finfo(s_star.dtype).eps
            tol = max(self.beta * self.tol, 4 * eps) if self.tol > 0 else 0.0
            steps = self.nudged_steps or self.max_steps
            what = "EquilibriumBlock nudged phase"
            plus = self._relax(x, s_star, nudge, steps, tol, what=what)
            self.last_backward_steps = plus.steps
            if self.symmetric:
                minus = self._relax(x, s_star, -nudge, steps, tol, what=what)
                return (minus.state - plus.state) * (scale / (2 * self.beta))
            return (s_star - plus.state) * (scale / self.beta)

    @contextmanager
    def _weights_once(self, graph: bool) -> Iterator[None]:
        """``parametrize.cached()``, the cell's parametrized tensors computed first (with autograd
        on when ``graph``): every step sees one weight, and a step that builds a graph finds a
        cached weight that carries one (the relaxation itself runs without autograd)."""
        with parametrize.cached():
            with torch.set_grad_enabled(graph):
                for module in self.cell.modules():
                    if parametrize.is_parametrized(module):
                        for name in module.parametrizations:
                            getattr(module, name)
            yield

    # ------------------------------------------------------------------ forward
    def initial_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], *self.state_shape)

    def forward(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """The fixed point ``s*`` of shape ``(batch, *state_shape)`` for input ``x``.

        ``state``: an initial state (default zeros); it is detached.
        """
        self._validate()
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise TypeError("x must be a tensor whose first dimension is the batch")
        if not bool(torch.isfinite(x.detach()).all()):
            raise ValueError("EquilibriumBlock: the input x contains NaN or Inf")
        s0 = self.initial_state(x) if state is None else state.detach()
        if s0.shape != (x.shape[0], *self.state_shape):
            raise ValueError(f"state must have shape {(x.shape[0], *self.state_shape)} "
                             f"(batch, *state_shape), got {tuple(s0.shape)}")
        params = tuple(p for p in self.cell.parameters() if p.requires_grad)
        need_graph = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        with self._weights_once(need_graph):
            if not need_graph:
                with torch.no_grad():
                    free = self._relax(x, s0)
                self._remember(free)
                return free.state
            if self.gradient == "bptt":
                if self.bptt_steps is None:
                    free = self._relax(x, s0)
                    self._remember(free)
                    return free.state
                with torch.no_grad():
                    free = self._relax(x, s0)
                self._remember(free)
                return self._relax(x, free.state, max_steps=self.bptt_steps, tol=0.0).state
            return _EquilibriumFunction.apply(self, x, s0, *params)


class _EquilibriumFunction(torch.autograd.Function):
    """Forward: the free phase (no graph; saves only ``x`` and ``s*``). Backward: ``v`` (EqProp)
    or ``a`` (implicit), then the VJP of one step at ``s*``."""

    @staticmethod
    def forward(ctx, block: EquilibriumBlock, x: Tensor, s0: Tensor, *params: Tensor) -> Tensor:
        free = block._relax(x, s0)
        block._remember(free)
        ctx.block = block
        ctx.save_for_backward(x, free.state)
        return free.state

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        with ctx.block._weights_once(True):  # one weight for the nudged phases and the step
            return _EquilibriumFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: Tensor):
        block: EquilibriumBlock = ctx.block
        x, s_star = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[1], ctx.needs_input_grad[3:]
        params = [p for p in block.cell.parameters() if p.requires_grad]
        implicit = block.gradient == "implicit"
        with torch.enable_grad():
            xg = x.detach().requires_grad_(need_x)
            s = s_star.detach().requires_grad_(implicit)
            pre = block.cell(xg, s)
            out = pre if block.activation is None else block.activation(pre)
        if implicit:
            adjoint = solve_adjoint(
                lambda a: torch.autograd.grad(out, s, a, retain_graph=True)[0], g,
                max_steps=block.max_steps, tol=block.tol, damping=block.damping,
                solver=block.solver, memory=block.anderson_memory)
            block.last_backward_steps = adjoint.steps
            block._warn_unconverged(adjoint, "the adjoint solve")
            # dL/dtheta = a^T df/dtheta at s*
            target, vector = out, adjoint.state
        else:
            # dL/dtheta = v^T d cell/dtheta (v is the pre-activation adjoint with an activation)
            target, vector = pre, block.eqprop_vector(x, s_star, g)
        wanted = ([xg] if need_x else []) + [p for p, n in zip(params, need_params) if n]
        grads = (list(torch.autograd.grad(target, wanted, vector, allow_unused=True))
                 if wanted else [])
        grad_x = grads.pop(0) if need_x else None
        grad_params = [grads.pop(0) if n else None for n in need_params]
        return (None, grad_x, None, *grad_params)
