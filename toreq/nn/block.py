r"""EqProp as a layer: [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] turns a state-update
module into a layer.

A *cell* is any `nn.Module` with `cell(x, s) -> tensor of the state's shape`. The block's
output is the fixed point `s*` of the (damped) dynamics

$$
s \leftarrow \gamma s + (1 - \gamma) f(x, s), \qquad
f(x, s) = \rho(\mathrm{cell}(x, s)) \ \text{(with an activation; else cell(x, s))},
$$

found without an autograd graph. Its backward pass, given `g = dL/ds*` from the layers above
(already averaged over the batch by autograd), is one of three estimators of
`dL/dtheta = a^T df/dtheta` with the adjoint `a = (I - J^T)^{-1} g`, `J = df/ds` at `s*`:

* `"eqprop"`: a nudged phase from `s*` with the constant nudge `-beta * g` (see below),
  and `v = -(s^{+beta} - s^{-beta}) / (2 beta)` (symmetric) or `v = -(s^{beta} - s*) / beta`
  (one-sided); the gradients are vector-Jacobian products of *one* step at `s*` with `v`.
  No graph over the relaxation; memory does not depend on the number of steps.
* `"implicit"`: implicit differentiation, `a = g + J^T a` solved by iteration with
  vector-Jacobian products of one step at `s*`; also constant memory.
* `"bptt"`: backprop through the unrolled relaxation (memory grows with the steps), or with
  `bptt_steps=k` through `k` extra steps taken from the relaxed state (truncated BPTT).

Where the nudge goes (`EQPROP-MATH.md` sections 4 and 5). Linearising the nudged fixed point:

* with `activation` given, the cell is the pre-activation `h(x, s)` and the nudge goes
  inside the activation: `s <- rho(h(x, s) - beta g)`. Then `v = D (I - J^T)^{-1} g` with
  `D = diag(rho'(h))` whenever `dh/ds` is symmetric (`h = U x + W s + b` with `W = W^T`,
  for which `J = D W`), and `v^T dh/dtheta = a^T df/dtheta`: the gradients are the VJPs of
  the cell (the pre-activation) with `v`, exact as `beta -> 0`;
* without `activation`, the cell is the whole update and the nudge is added to it:
  `s <- f(x, s) - beta g`. Then `v = (I - J)^{-1} g`, equal to `a` exactly when `J` is
  symmetric (a linear cell with a symmetric weight; a gradient step `s - eta dE/ds` on an
  energy). The gradients are the VJPs of the cell with `v`.

Otherwise (a non-symmetric `W`, or `rho(W s + ...)` written as one cell) EqProp is the
vector-field approximation of Scellier et al.: `v` replaces `(I - J^T)^{-1}` by
`(I - J)^{-1}`, close when `J` is nearly symmetric. `gradient="implicit"` is exact for
every cell and `gradient="bptt"` is the reference both are compared with
([`toreq.diagnostics.gradient_check`][toreq.diagnostics.gradient_check]).

The nudge is scaled per sample: sample `b` gets `-beta * g_b / c_b` with
`c_b = max_j |g_bj|` and `v_b` is multiplied back by `c_b`. The estimate is the one of
`beta' = beta / c_b` (exactly as `beta -> 0`), but `beta` becomes the size of the state's
response, independent of batch size and loss scale, and the nudged phases can stop once a step
changes the state by less than `beta * tol` (floored at 4 float eps): the nudged response has
the free phase's relative accuracy.

Convergence is per sample: a sample whose largest state change in a step falls below `tol`
stops updating. After each forward the block keeps `last_steps` (int64, per sample),
`last_residual` (the last change) and `last_converged` (`last_residual < tol`); a free
phase (or adjoint solve) that leaves samples unconverged with `tol > 0` also emits a
[`ConvergenceWarning`][toreq.errors.ConvergenceWarning]. `tol=0` runs exactly `max_steps` steps and
never claims convergence. A state that becomes NaN or Inf raises `RuntimeError`.

Parametrized weights of the cell (`torch.nn.utils.parametrize`: `toreq.utils.symmetric`,
`toreq.utils.spectral_norm`) are computed once per forward and once per backward
(`parametrize.cached()`), so every step of a phase sees one weight. A stateful
parametrization advances once in each: spectral normalisation in training mode runs one power
iteration in the forward and one in the backward, so the phases see weights that differ by that
iteration's change (negligible once it has converged; none in eval mode).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from toreq.dynamics import CellDynamics, Nudge
from toreq.errors import ConvergenceWarning
from toreq.estimators import BPTT, EqProp, Estimator, ImplicitDifferentiation
from toreq.nn.equilibrium import warn_unconverged
from toreq.ops import RelaxResult, activate
from toreq.ops.relax import ACTIVATIONS
from toreq.solvers import PhaseSettings, Solver, get_solver, solve_map
from toreq.validation import (check_choice, check_fraction, check_positive_float,
                              check_positive_int)

__all__ = ["ConvergenceWarning", "EquilibriumBlock"]

GRADIENTS = ("eqprop", "bptt", "implicit")
SOLVERS = ("iteration", "anderson")


def _sample_scale(g: Tensor) -> Tensor:
    """`c_b = max_j |g_bj|` per sample (at least the dtype's tiny), shaped like `g`."""
    c = g.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
    return c.view(-1, *[1] * (g.dim() - 1))


class EquilibriumBlock(nn.Module):
    """A layer whose output is the fixed point of `s <- f(x, s)`; backward by EqProp.

    See the module docstring for the equations, where the nudge goes and when each estimator is
    exact. The cell must treat samples independently (no batch statistics) and its parameters
    (`cell.parameters()`) and the input `x` get gradients; the initial state does not (the
    fixed point does not depend on it).

    Args:
        cell: `nn.Module` with `cell(x, s)` returning a tensor of the state's shape: the
            pre-activation when `activation` is given, else the new state.
        state_shape: the state of one sample (an int or a tuple); the state is
            `(batch, *state_shape)`, zeros unless `forward` gets one.
        activation: `"tanh"`, `"sigmoid"`, `"hard_sigmoid"`, a callable, or None.
        max_steps: the most steps of the free phase (and of the nudged phases unless
            `nudged_steps`; and of the adjoint solve).
        tol: a sample stops once a step changes its state by less than `tol` (max-abs).
        damping: `gamma` in `[0, 1)`, the weight of the old state in each update.
        beta: the nudge's relative size (`> 0`), for `gradient="eqprop"`.
        symmetric: contrast `+beta` and `-beta` phases (bias O(beta^2)), else `+beta` and
            the free state (O(beta)).
        nudged_steps: the most steps of each nudged phase (default `max_steps`).
        solver: `"iteration"` or `"anderson"` (Anderson acceleration, `anderson_memory`
            past iterates), for the free and nudged phases and the adjoint.
        gradient: `"eqprop"`, `"implicit"` or `"bptt"`.
        bptt_steps: with `gradient="bptt"`, backprop only through this many steps taken from
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
            check_choice("activation", activation, ACTIVATIONS)
            self.activation_name = activation
            activation = functools.partial(activate, activation)
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
        check_positive_int("max_steps", self.max_steps)
        check_positive_int("nudged_steps", self.nudged_steps, allow_none=True)
        check_positive_int("anderson_memory", self.anderson_memory)
        check_positive_int("bptt_steps", self.bptt_steps, allow_none=True)
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0 and self.tol < float("inf")):
            raise ValueError(f"tol must be a finite float >= 0, got {self.tol!r}")
        check_fraction("damping", self.damping)
        check_positive_float("beta", self.beta)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("gradient", self.gradient, GRADIENTS)
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

    # ------------------------------------------------------------------ the parts
    @property
    def dynamics(self) -> CellDynamics:
        """The block's dynamics: its cell, activation and damping."""
        return CellDynamics(self.cell, self.activation, self.damping)

    @property
    def estimator(self) -> Estimator:
        """The estimator named by `gradient` with the block's settings."""
        if self.gradient == "eqprop":
            return EqProp(self.beta, "centered" if self.symmetric else "positive",
                          self.nudged_steps)
        if self.gradient == "implicit":
            return ImplicitDifferentiation()
        return BPTT(truncation=self.bptt_steps)

    def _solver(self) -> Solver:
        return get_solver(self.solver, **({"memory": self.anderson_memory}
                                          if self.solver == "anderson" else {}))

    @property
    def free_settings(self) -> PhaseSettings:
        return PhaseSettings(self.max_steps, self.tol)

    @property
    def nudged_settings(self) -> PhaseSettings:
        return PhaseSettings(self.nudged_steps or self.max_steps, self.tol)

    adjoint_settings = free_settings

    def solve(self, x: Tensor, net: None, states: list[Tensor], nudge: Nudge | None,
              settings: PhaseSettings, *, phase: str, graph: bool = False) -> RelaxResult:
        """One phase of the block's dynamics (the estimators' interface, as on a model)."""
        result = self._solver().solve(self.dynamics, x, None, states, nudge, settings,
                                      what=f"EquilibriumBlock {phase} phase", graph=graph)
        if phase != "free":  # the free phase warns once the block has recorded it
            warn_unconverged("EquilibriumBlock", phase, result, settings)
        return result

    def solve_map(self, fn: Callable[[list[Tensor]], list[Tensor]], states: list[Tensor],
                  settings: PhaseSettings, *, phase: str, what: str) -> RelaxResult:
        result = solve_map(self._solver(), fn, states, settings, what=what)
        warn_unconverged("EquilibriumBlock", phase, result, settings)
        return result

    def _remember(self, free: RelaxResult) -> None:
        self.last_steps, self.last_residual = free.steps, free.residual
        self.last_converged = free.converged(self.tol)
        warn_unconverged("EquilibriumBlock", "free", free, self.free_settings, stacklevel=4)

    def eqprop_vector(self, x: Tensor, s_star: Tensor, g: Tensor) -> Tensor:
        """`v` from the nudged phase(s) at `s*` driven by `g = dL/ds*` (no graph).

        `v = -c (s^{+beta} - s^{-beta}) / (2 beta)` or `-c (s^{beta} - s*) / beta` with the
        nudge `beta g / c` per sample (`c = max |g_b|`, see the module docstring).
        """
        with torch.no_grad():
            scale = _sample_scale(g)
            free = RelaxResult([s_star], torch.zeros(s_star.shape[0], dtype=torch.long),
                               torch.zeros(s_star.shape[0], dtype=s_star.dtype))
            estimator = self.estimator
            a, b, delta, run = estimator.phases(self, x, None, free,
                                                lambda beta: Nudge(beta, g / scale))
            self.last_backward_steps = run.get("positive", run.get("negative")).steps
            return (b.states[0] - a.states[0]) * (scale / delta)

    @contextmanager
    def _weights_once(self, graph: bool) -> Iterator[None]:
        """`parametrize.cached()`, the cell's parametrized tensors computed first (with autograd
        on when `graph`): every step sees one weight, and a step that builds a graph finds a
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
        """The fixed point `s*` of shape `(batch, *state_shape)` for input `x`.

        `state`: an initial state (default zeros); it is detached.
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
            if not need_graph or self.gradient != "bptt":
                if need_graph:
                    return _EquilibriumFunction.apply(self, x, s0, *params)
                free = self.solve(x, None, [s0], None, self.free_settings, phase="free")
                self._remember(free)
                return free.states[0]
            # BPTT: through the whole relaxation, or through bptt_steps steps from where the
            # relaxation without a graph arrived (truncated)
            if self.bptt_steps is None:
                free = self.solve(x, None, [s0], None, self.free_settings, phase="free",
                                  graph=True)
                self._remember(free)
                return free.states[0]
            free = self.solve(x, None, [s0], None, self.free_settings, phase="free")
            self._remember(free)
            return self.solve(x, None, [free.states[0]], None,
                              PhaseSettings(self.bptt_steps, 0.0), phase="bptt",
                              graph=True).states[0]


class _EquilibriumFunction(torch.autograd.Function):
    """Forward: the free phase (no graph; saves only `x` and `s*`). Backward: `v` (EqProp)
    or `a` (implicit), then the VJP of one step at `s*`."""

    @staticmethod
    def forward(ctx, block: EquilibriumBlock, x: Tensor, s0: Tensor, *params: Tensor) -> Tensor:
        free = block.solve(x, None, [s0], None, block.free_settings, phase="free")
        block._remember(free)
        ctx.block = block
        ctx.save_for_backward(x, free.states[0])
        return free.states[0]

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
            adjoint = ImplicitDifferentiation.solve_adjoint(
                block, lambda a: torch.autograd.grad(out, s, a, retain_graph=True)[0], g,
                block.adjoint_settings, "EquilibriumBlock adjoint")
            block.last_backward_steps = adjoint.steps
            # dL/dtheta = a^T df/dtheta at s*
            target, vector = out, adjoint.states[0]
        else:
            # dL/dtheta = v^T d cell/dtheta (v is the pre-activation adjoint with an activation)
            target, vector = pre, block.eqprop_vector(x, s_star, g)
        wanted = ([xg] if need_x else []) + [p for p, n in zip(params, need_params) if n]
        grads = (list(torch.autograd.grad(target, wanted, vector, allow_unused=True))
                 if wanted else [])
        grad_x = grads.pop(0) if need_x else None
        grad_params = [grads.pop(0) if n else None for n in need_params]
        return (None, grad_x, None, *grad_params)
