r"""The one Python fixed-point loop: per-sample, damped, with an optional accelerator.

Every relaxation written in PyTorch runs through [`iterate`][toreq.ops.iteration.iterate]: the
reference of the `toreq::relax` op, the solvers of [`toreq.solvers`][toreq.solvers] (plain
iteration, Anderson acceleration, the static mode that `torch.export` and
`torch.compile(fullgraph=True)` trace), backprop through time (`graph=True`), the adjoint of
implicit differentiation and [`toreq.nn.EquilibriumBlock`][toreq.nn.block.EquilibriumBlock]. The
compiled op is the only other loop.

One step, for a list of states `s` (each `(batch, ...)`) and a map `F` (which applies
its own damping, as the op does):

$$
\tilde s = F(s), \qquad
\delta_b = \max_l \max_j |\tilde s_{l,bj} - s_{l,bj}|;
$$

an accelerator (Anderson) may replace $\tilde s$ by a better estimate, the convergence test
still measures the plain step `delta`. A sample whose
`delta_b < tol` takes that step and then keeps its state (`steps[b]` counts its updates,
`residual[b]` is its last `delta_b`); `tol = 0` never stops early. Samples never
interact, so freezing them gives each sample the result of its own iteration.

Policy on NaN and Inf (eager mode): every step checks the new states of the samples still
relaxing and raises [`toreq.errors.DivergenceError`][toreq.errors.DivergenceError] naming the phase
(`what`), the step and the count. The static mode cannot raise on values (that is data-dependent
control flow): it always runs `max_steps` steps, lets a non-finite state run on into the output, and
is what exported programs compute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from toreq.errors import DivergenceError

__all__ = ["Accelerator", "RelaxResult", "iterate"]


class RelaxResult(NamedTuple):
    """The outcome of a relaxation, from every solver and the op.

    `states`: the final states, one `(batch, ...)` tensor per layer (new tensors);
    `steps`: int64 `(batch,)`, the number of updates each sample received;
    `residual`: `(batch,)`, each sample's largest state change in its last update
    (`inf` when no step ran), float32 for float16 and bfloat16 states and real for complex
    ones. A sample converged where `residual < tol` (see
    [`converged`][toreq.ops.iteration.RelaxResult.converged]; `tol = 0` never claims convergence).
    """

    states: list[Tensor]
    steps: Tensor
    residual: Tensor

    def converged(self, tol: float) -> Tensor:
        """Bool `(batch,)`: which samples stopped below `tol` (all False for `tol <= 0`)."""
        if tol <= 0:
            return torch.zeros_like(self.steps, dtype=torch.bool)
        return self.residual < tol


class Accelerator(Protocol):
    """Replaces the plain damped step by a better estimate of the fixed point (Anderson).

    Called once per step with the current states `s`, the plain damped step `plain`, the
    step number `k` (from 1) and the bool `(batch,)` of the samples that converge at this
    step (they must take the plain step); returns the new states.
    """

    def __call__(self, s: list[Tensor], plain: list[Tensor], k: int,
                 converging: Tensor) -> list[Tensor]: ...


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """`(batch,)` values shaped to broadcast against `like` of shape `(batch, ...)`."""
    return values.view(-1, *[1] * (like.dim() - 1))


def _change(old: Tensor, new: Tensor, graph: bool, real: torch.dtype) -> Tensor:
    """`(batch,)` max-abs change of one layer in the dtype `real`, outside any graph."""
    delta = (new - old).detach() if graph else new - old
    change = delta.flatten(1).abs().amax(dim=1)
    return change if change.dtype == real else change.to(real)


def _diverged(what: str, step: int, bad: int, batch: int) -> None:
    raise DivergenceError(
        f"{what}: the state became NaN or Inf at step {step} in {bad} of {batch} samples; lower "
        "the learning rate, add damping, or make the dynamics contract (e.g. spectral "
        "normalisation of the recurrent weight)")


def iterate(
    step: Callable[[list[Tensor]], Sequence[Tensor]],
    states: Sequence[Tensor],
    *,
    max_steps: int,
    tol: float,
    accelerator: Accelerator | None = None,
    graph: bool = False,
    static: bool = False,
    what: str = "relaxation",
) -> RelaxResult:
    """Iterates `s <- step(s)` per sample (see the module docstring).

    Args:
        step: the map `F` (damping included), taking and returning a list of
            `(batch, ...)` states.
        states: the initial states (not modified).
        max_steps: the most updates a sample receives (0: none).
        tol: a sample stops once its step changes it by less than `tol` (max-abs); 0 never.
        accelerator: e.g. [`toreq.solvers.Anderson`][toreq.solvers.Anderson]'s mixing; None for
            plain iteration.
        graph: build an autograd graph through the steps (backprop through time); otherwise
            the loop runs under `torch.no_grad`.
        static: fixed shapes and no data-dependent Python control flow (always `max_steps`
            steps, no early exit, no raise): the form that `torch.export` and
            `torch.compile(fullgraph=True)` trace.
        what: the phase's name in error messages.
    """
    # no_grad only where grad mode is on: entering it inside a traced program (export runs
    # under no_grad already) costs torch.export a grad-mode region to track
    with (torch.no_grad() if not graph and torch.is_grad_enabled() else nullcontext()):
        s = [t if graph else t.detach() for t in states]
        like = s[0]
        batch = like.shape[0]
        active = torch.ones(batch, dtype=torch.bool, device=like.device)
        steps = torch.zeros(batch, dtype=torch.long, device=like.device)
        # the changes are real for complex states (holomorphic EqProp) and float32 for float16
        # and bfloat16 states, as the op returns them
        real = (torch.float32 if like.dtype in (torch.float16, torch.bfloat16)
                else like.real.dtype)
        residual = torch.full((batch,), float("inf"), dtype=real, device=like.device)
        everyone = True  # every sample still relaxing: no masking needed
        # With tol = 0 no sample stops: nothing to mask and no early exit. The loop then only
        # tests finiteness before the last step (eager mode), keeps the first step at which each
        # sample became non-finite on the device and syncs once, at the end (the same error,
        # without a host round trip per step); the static mode does no bookkeeping at all until
        # the last step's change.
        fixed = tol <= 0
        first_bad = torch.zeros(batch, dtype=torch.long, device=like.device)
        change = residual
        for k in range(1, max_steps + 1):
            out = list(step(s))
            if k == 1:  # a step that keeps the shapes once keeps them (checked once: traced too)
                if len(out) != len(s):
                    raise ValueError(f"{what}: the step returned {len(out)} states for {len(s)}")
                for layer, (o, t) in enumerate(zip(out, s)):
                    if o.shape != t.shape:
                        raise ValueError(
                            f"{what}: the step returned shape {tuple(o.shape)} for a state of "
                            f"shape {tuple(t.shape)} (layer {layer}); the step must keep every "
                            "shape")
            plain = out
            if fixed and k < max_steps and accelerator is None:
                if not static:
                    # one pass of row sums (NaN and Inf propagate through them; accumulated in
                    # float32, so a large finite half-precision state does not overflow)
                    # instead of the change's three
                    sums = sum((p.detach() if graph else p).flatten(1).sum(dim=1, dtype=real)
                               for p in plain if p.shape[1:].numel() > 0)
                    if isinstance(sums, Tensor):
                        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(sums),
                                                torch.full_like(first_bad, k), first_bad)
                s = plain
                continue
            # a layer of width 0 has nothing to compare; no detach or cast where none is needed
            # (each would be one more node per layer and step in a traced program)
            deltas = [_change(t, p, graph, real) for t, p in zip(s, plain)
                      if t.shape[1:].numel() > 0]
            change = (deltas[0] if len(deltas) == 1 else torch.stack(deltas).amax(dim=0)
                      if deltas else torch.zeros(batch, dtype=real, device=like.device))
            converging = change < tol
            new = plain if accelerator is None else accelerator(s, plain, k, converging)
            if fixed:
                if not static:
                    # NaN compares false with everything: a non-finite state has a non-finite
                    # change
                    first_bad = torch.where((first_bad == 0) & ~torch.isfinite(change),
                                            torch.full_like(first_bad, k), first_bad)
                s = new
                continue
            if not static:
                # one reduction and one host sync per step serve both tests
                bad, relaxing = torch.stack([(~torch.isfinite(change) & active).sum(),
                                             (active & ~converging).sum()]).tolist()
                if bad:
                    _diverged(what, k, bad, batch)
            if static or not everyone:
                s = [torch.where(_per_sample(active, t), n, t) for t, n in zip(s, new)]
            else:
                s = new
            residual = torch.where(active, change, residual)
            steps = steps + active.long()  # active only ever turns off: the count is its last k
            active = active & ~converging
            if not static:
                everyone = relaxing == batch
                if relaxing == 0:
                    break
        if fixed and max_steps > 0:
            if not static:
                bad = first_bad > 0
                if bool(bad.any()):
                    at = int(first_bad[bad].min())
                    _diverged(what, at, int((first_bad == at).sum()), batch)
            residual, steps = change, torch.full_like(steps, max_steps)
        return RelaxResult(s, steps, residual)
