r"""Relaxation of layered equilibrium networks: `torch.ops.toreq.relax`.

A network is a list of layers with states `s[l]` of shape `(batch, n_l)` and a list of
couplings. One step of the dynamics computes, for every layer $l$,

$$
a_l = d_l + \sum_{c:\, \mathrm{target}(c) = l} s_{\mathrm{source}(c)} M_c^\top
      \;-\; \beta\, [l = L-1]\, \partial \ell / \partial s_{L-1},
\qquad
s_l \leftarrow \gamma\, s_l + (1 - \gamma)\, \rho(a_l),
$$

where $d_l$ is the layer's constant drive (the input projection and bias, computed once by the
caller), $M_c$ the coupling's weight (`weight` of shape `(n_target, n_source)`, or its
transpose when `transposed`: that is how tied, symmetric feedback reuses a forward weight),
$\rho$ the activation, $\gamma$ the damping (the weight kept by the *old* state; 0 is plain
fixed-point iteration), and the last term the output nudge of strength $\beta$ (signed, so
$+\beta$ and $-\beta$ give symmetric nudging; 0 is the free phase). The nudge sits inside the
activation's argument. With $\ell$ the per-sample loss:

* `loss="mse"`: $\ell = \frac{1}{2} |o - y|^2$ with $o$ the last layer's state, or
  $o = s_{L-1} R^\top + c$ through a feedforward readout $(R, c)$;
* `loss="cross_entropy"`: $\ell = \mathrm{CE}(\mathrm{softmax}(o), y)$, $o$ as above
  (Laborieux et al. 2021);
* `loss="gradient"`: `target` *is* $\partial \ell / \partial s_{L-1}$ (a constant nudge, as
  used by a block inside a larger backprop network).

The models of the literature are special cases:

* looped layer (LoopedMLP): one layer, $d_0 = U x + b$, one coupling `Coupling(W, 0, 0)`:
  $h \leftarrow \rho(U x + W h + b)$;
* layered bidirectional network (Scellier & Bengio 2017; Ernoult et al. 2019): forward
  couplings $W_l$ from layer $l$ to $l+1$ and, tied, the same weights transposed from
  $l+1$ back to $l$ (`layered_couplings(weights)`), or separate feedback weights
  (untied, vector-field EqProp: `layered_couplings(weights, feedback)`);
* a ring of layers (ToroidalMLP): the layered couplings plus one from the last layer to the
  first.

States are *activities* (post-activation values). With tied weights this is the energy model
$\Phi = \sum_l s_l^\top W_l s_{l-1} + \dots$ of Ernoult et al. (2019), whose contrastive
Hebbian update ([`hebbian_update`][toreq.ops.hebbian.hebbian_update]) is the exact gradient
as $\beta \to 0$ for every activation; for the hard sigmoid it is the same model as
$\rho(s)$-coupled formulations, since $\rho(s) = s$ on $[0, 1]$.

Schedules: `"sync"` (Jacobi) updates every layer from the previous step's states;
`"async"` (Gauss-Seidel) updates the even layers first and then the odd layers from the fresh
even ones, which for layered networks usually reaches the fixed point in fewer steps.

Convergence is tested per sample: a sample whose largest state change in a step,
$\max_l \max_j |s_l^{new} - s_l^{old}|$, falls below `tol` stops updating, and `steps[b]`
holds the number of updates it received (`tol=0` never stops early). A state that becomes NaN
or Inf raises a `RuntimeError` naming the non-finite input if there is one; a diverged state is
never returned.

Dtypes: float32, float64, float16 and bfloat16 (every input in one dtype). Float16 and bfloat16
states are updated in float32 arithmetic (GEMMs with float32 accumulation, the element update
with its nudge, the convergence test) and rounded once per step; `residual` is then float32.
Under `torch.autocast` the op relaxes in the autocast dtype (see `csrc/README.md`).

No autograd graph is built: gradients come from
[`hebbian_update`][toreq.ops.hebbian.hebbian_update] (or, for backprop through time, from
[`relax_step`][toreq.ops.relax.relax_step]). This wrapper detaches its inputs; the op itself,
`torch.ops.toreq.relax`, called with a tensor that requires grad while grad mode is on,
raises `RuntimeError: ... relax builds no graph; use toreq.ops.relax or an estimator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from toreq.ops._dispatch import has_kernel
from toreq.ops.iteration import RelaxResult, iterate

__all__ = [
    "ACTIVATIONS", "NUDGE_POSITIONS", "Coupling", "RelaxResult", "activate", "iterate_per_sample", "labels_to_rows",
    "layered_couplings", "relax", "relax_reference", "relax_step", "row_softmax",
]

ACTIVATIONS = ("hard_sigmoid", "tanh", "sigmoid", "steep_sigmoid")
r"""The activations the op's kernels implement; [`activate`][toreq.ops.relax.activate] also takes
`"identity"` (a linear layer in Python dynamics). `"steep_sigmoid"` is
$\sigma(4(x - \tfrac{1}{2}))$, the hard sigmoid's smooth counterpart (the same value and slope 1
at $\tfrac{1}{2}$): the activation of Ernoult et al. 2019 (their `sigm`) and Laborieux et al. 2021
(`my_sigmoid`)."""

NUDGE_POSITIONS = ("inside", "outside")
r"""Where the output nudge enters the step: `"inside"` the activation's argument,
$s \leftarrow \rho(a - \beta\, \partial\ell/\partial s)$ (the gradient dynamics of the total
energy, exact as $\beta \to 0$), or `"outside"` it, $s \leftarrow \rho(a) - \beta\, \partial\ell/
\partial s$ (the discrete-time prototypical model of Ernoult et al. 2019, whose nudge
$\beta (y - s)$ is added after the activation). To first order in $\beta$ the outside nudge is the
inside one with the output error divided by $\rho'(a)$: the same where the output units are
linear (identity, or the hard sigmoid away from its clamps), a differently weighted error
elsewhere."""


class Coupling(NamedTuple):
    r"""A coupling that adds $s_{source} M^\top$ to layer `target`'s pre-activation.

    `weight` ($M$) has shape `(n_target, n_source)`; with `transposed=True` it has shape
    `(n_source, n_target)` and its transpose is used, which is how tied feedback reuses the
    forward weight of the layer above.
    """

    weight: Tensor
    target: int
    source: int
    transposed: bool = False


def layered_couplings(
    weights: Sequence[Tensor], feedback: Sequence[Tensor] | None = None
) -> list[Coupling]:
    """Couplings of a layered bidirectional network.

    `weights[l]` of shape `(n_{l+1}, n_l)` carries layer `l` up to layer `l+1`. Feedback
    from `l+1` down to `l` uses `weights[l]^T` (tied, symmetric: an energy-based network)
    when `feedback` is None, or `feedback[l]` of shape `(n_l, n_{l+1})` (untied).
    """
    if feedback is not None and len(feedback) != len(weights):
        raise ValueError(
            f"feedback must hold one weight per forward weight ({len(weights)}), "
            f"got {len(feedback)}"
        )
    couplings = []
    for layer, weight in enumerate(weights):
        couplings.append(Coupling(weight, layer + 1, layer))
        if feedback is None:
            couplings.append(Coupling(weight, layer, layer + 1, transposed=True))
        else:
            couplings.append(Coupling(feedback[layer], layer, layer + 1))
    return couplings


def labels_to_rows(target: Tensor, loss: str, num_outputs: int, dtype: torch.dtype) -> Tensor:
    """Integer class labels `(batch,)` become one-hot rows; float targets pass through."""
    if target.is_floating_point() or loss == "gradient":
        return target
    if target.dim() != 1:
        raise ValueError(
            f"integer class labels in target must have shape (batch,), got {tuple(target.shape)}"
        )
    # Checked in eager mode only: reading the labels' range would break a compiled graph.
    if (not torch.compiler.is_compiling() and target.numel()
            and not (0 <= int(target.min()) and int(target.max()) < num_outputs)):
        raise ValueError(
            f"class labels in target must lie in [0, {num_outputs}) for {num_outputs} outputs, "
            f"got values in [{int(target.min())}, {int(target.max())}]"
        )
    rows = torch.zeros(target.shape[0], num_outputs, dtype=dtype, device=target.device)
    return rows.scatter_(1, target.long().unsqueeze(1), 1.0)


def relax(
    states: Sequence[Tensor],
    couplings: Sequence[Coupling],
    drives: Sequence[Tensor | None] | None = None,
    *,
    activation: str = "hard_sigmoid",
    damping: float = 0.0,
    max_steps: int = 30,
    tol: float = 0.0,
    schedule: str = "sync",
    beta: float = 0.0,
    loss: str = "mse",
    target: Tensor | None = None,
    readout_weight: Tensor | None = None,
    readout_bias: Tensor | None = None,
    nudge_position: str = "inside",
) -> RelaxResult:
    r"""Relaxes a layered network to equilibrium (free phase, `beta=0`) or nudged equilibrium.

    Args:
        states: initial state of each layer, `(batch, n_l)` (the free equilibrium, to start a
            nudged phase from it). Not modified.
        couplings: the network's couplings, [`Coupling`][toreq.ops.relax.Coupling] tuples (see
            [`layered_couplings`][toreq.ops.relax.layered_couplings]).
        drives: per layer, a constant input `(batch, n_l)` or bias `(n_l,)`, or None.
        activation: `"hard_sigmoid"` (clamp to [0, 1]), `"tanh"`, `"sigmoid"` or
            `"steep_sigmoid"` (see [`ACTIVATIONS`][toreq.ops.relax.ACTIVATIONS]).
        damping: weight of the old state in each update, in `[0, 1)`.
        max_steps: the most updates a sample receives.
        tol: a sample stops once its largest state change in a step is below `tol`. In
            float16 or bfloat16, keep it at or above the dtype's resolution near the states'
            magnitude ($2^{-10}$ and $2^{-7}$ near 1): below it a rounded state may alternate
            between two neighbouring values and never meet it.
        schedule: `"sync"` (Jacobi) or `"async"` (even layers, then odd layers).
        beta: signed nudging strength; 0 for the free phase. Otherwise its magnitude must
            lie in the states' dtype's normal range (a ValueError says so), since the nudge
            is computed in that dtype.
        loss: `"mse"`, `"cross_entropy"` or `"gradient"` (see the module docstring).
        target: with `beta != 0`, the target `(batch, n_out)` (rows of values or class
            probabilities; int64 class labels `(batch,)` are turned into one-hot rows), or for
            `loss="gradient"` the gradient of the loss with respect to the last layer.
        readout_weight: $R$ of an optional feedforward readout $o = s R^\top + c$ of the last
            layer that the loss is measured on.
        readout_bias: $c$ of that readout.
        nudge_position: `"inside"` the activation's argument (the formula above) or
            `"outside"`, $s_{L-1} \leftarrow \gamma s_{L-1} + (1 - \gamma)(\rho(a_{L-1}) - \beta\,
            \partial\ell/\partial s_{L-1})$ (see [`NUDGE_POSITIONS`][toreq.ops.relax.NUDGE_POSITIONS]).

    Returns:
        [`RelaxResult`][toreq.ops.iteration.RelaxResult] with the final states, per-sample step
            counts and residuals.
    """
    # No graph is built through the relaxation. Detached unconditionally, not only where
    # requires_grad is set: a torch.export trace must record the detach, since the exported
    # program later runs with parameters that require grad.
    states = [_no_grad(s) for s in states]
    if not states:
        raise ValueError("toreq.relax: states must hold at least one layer's state")
    readout_weight, readout_bias = _no_grad(readout_weight), _no_grad(readout_bias)
    if target is not None:
        num_outputs = states[-1].shape[1] if readout_weight is None else readout_weight.shape[0]
        target = labels_to_rows(_no_grad(target), loss, num_outputs, states[-1].dtype)
    drive_list = [_no_grad(d) for d in (drives or [])]
    if not has_kernel("relax", states[0].device.type):
        couplings = [Coupling(_no_grad(c.weight), c.target, c.source, c.transposed)
                     for c in couplings]
        return relax_reference(
            states, couplings, drive_list, activation=activation, damping=damping,
            max_steps=max_steps, tol=tol, schedule=schedule, beta=beta, loss=loss, target=target,
            readout_weight=readout_weight, readout_bias=readout_bias,
            nudge_position=nudge_position)
    new_states, steps, residual = torch.ops.toreq.relax.default(
        states, drive_list, [_no_grad(c.weight) for c in couplings],
        [c.target for c in couplings], [c.source for c in couplings],
        [c.transposed for c in couplings], activation, damping, max_steps, tol, schedule, beta,
        loss, target, readout_weight, readout_bias, nudge_position)
    return RelaxResult(list(new_states), steps, residual)


def _no_grad(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def row_softmax(x: Tensor) -> Tensor:
    """`softmax` over dim 1, also for complex rows (where torch has no kernel): softmax is
    holomorphic, and shifting by the rows' largest real part keeps it finite."""
    if not x.is_complex():
        return torch.softmax(x, dim=1)
    e = torch.exp(x - x.real.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)


def activate(name: str, x: Tensor) -> Tensor:
    r"""$\rho(x)$ for an activation's name: the op's activations and `"identity"`."""
    if name == "hard_sigmoid":
        return x.clamp(0.0, 1.0)
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "steep_sigmoid":
        return torch.sigmoid(4.0 * (x - 0.5))
    if name == "identity":
        return x
    raise ValueError(f"unknown activation '{name}'")


def relax_step(
    states: Sequence[Tensor],
    couplings: Sequence[Coupling],
    drives: Sequence[Tensor | None] | None = None,
    *,
    activation: str | Sequence[str] = "hard_sigmoid",
    damping: float = 0.0,
    schedule: str = "sync",
    beta: float = 0.0,
    loss: str = "mse",
    target: Tensor | None = None,
    readout_weight: Tensor | None = None,
    readout_bias: Tensor | None = None,
    clamp: Tensor | None = None,
    nudge_position: str = "inside",
    fields: Sequence[Callable[[Tensor], Tensor] | None] | None = None,
) -> list[Tensor]:
    r"""One step of the dynamics of [`relax`][toreq.ops.relax.relax] for every sample,
    differentiable.

    This is the map $s \leftarrow F(s)$ whose fixed point [`relax`][toreq.ops.relax.relax] finds:
    plain PyTorch, so autograd can unroll it (backprop through time, the baseline EqProp is
    compared with) and take vector-Jacobian products of it. `target` must be rows, not class
    labels.

    `clamp` (Python only, not an op argument): the last layer's state is held at these rows
    (the clamped phases of contrastive and coupled learning); every other layer sees it.
    `nudge_position`: `"inside"` or `"outside"` the activation (see
    [`NUDGE_POSITIONS`][toreq.ops.relax.NUDGE_POSITIONS]). `activation` may also be one name per
    layer (Python only; `"identity"` allowed: a linear output layer). States, weights and drives
    may be complex (holomorphic EqProp), all of one dtype.

    `fields` (Python only): one callable or None per layer, `f(s_l)` added to layer `l`'s
    pre-activation from the same states as its couplings' inputs (a state-dependent input
    beyond the bilinear couplings, e.g. a modern Hopfield interaction's retrieval,
    [`toreq.nn.hopfield`][toreq.nn.hopfield]).
    """
    if nudge_position not in NUDGE_POSITIONS:
        raise ValueError(f"nudge_position must be one of {NUDGE_POSITIONS}, got {nudge_position!r}")
    s = list(states)
    num_layers = len(s)
    if clamp is not None:
        s[-1] = clamp
    drives = list(drives or [None] * num_layers)
    if schedule == "sync":
        groups = [list(range(num_layers))]
    else:
        groups = [g for g in (list(range(0, num_layers, 2)), list(range(1, num_layers, 2))) if g]

    def preactivation(layer: int) -> Tensor:
        pre = torch.zeros_like(s[layer]) if drives[layer] is None else drives[layer].expand_as(s[layer])
        for c in couplings:
            if c.target == layer:
                pre = pre + s[c.source] @ (c.weight if c.transposed else c.weight.T)
        if fields is not None and fields[layer] is not None:
            pre = pre + fields[layer](s[layer])
        return pre

    def output_error() -> Tensor:
        """beta times d ell / d s_out at the current states."""
        if loss == "gradient":
            return beta * target
        out = s[-1]
        if readout_weight is not None:
            out = out @ readout_weight.T
            if readout_bias is not None:
                out = out + readout_bias
        if loss == "cross_entropy":
            out = row_softmax(out)
        error = out - target
        if readout_weight is not None:
            error = error @ readout_weight
        return beta * error

    last = num_layers - 1
    for group in groups:
        group = [layer for layer in group if clamp is None or layer != last]
        pres = {layer: preactivation(layer) for layer in group}
        nudge = output_error() if beta != 0.0 and last in group else None
        for layer in group:
            pre = pres[layer]
            if nudge is not None and layer == last and nudge_position == "inside":
                pre = pre - nudge
            new = activate(activation if isinstance(activation, str) else activation[layer], pre)
            if nudge is not None and layer == last and nudge_position == "outside":
                new = new - nudge
            s[layer] = damping * s[layer] + (1.0 - damping) * new
    return s


def iterate_per_sample(
    step: Callable[[list[Tensor]], list[Tensor]],
    states: Sequence[Tensor],
    *,
    max_steps: int,
    tol: float,
    what: str = "toreq.relax",
) -> RelaxResult:
    """Deprecated alias of [`toreq.ops.iterate`][toreq.ops.iteration.iterate] (removed in the next
    release)."""
    warnings.warn("toreq.ops.iterate_per_sample is deprecated; use toreq.ops.iterate (the same "
                  "loop, with damping, acceleration and a static mode)", DeprecationWarning,
                  stacklevel=2)
    return iterate(step, states, max_steps=max_steps, tol=tol, what=what)


def relax_reference(
    states: Sequence[Tensor],
    couplings: Sequence[Coupling],
    drives: Sequence[Tensor | None] | None = None,
    *,
    max_steps: int = 30,
    tol: float = 0.0,
    **dynamics,
) -> RelaxResult:
    """Pure-PyTorch reference of [`relax`][toreq.ops.relax.relax]:
    [`relax_step`][toreq.ops.relax.relax_step] repeated, in Python.

    Takes the same arguments as [`relax`][toreq.ops.relax.relax]. Used by the tests, and where no
    compiled kernel exists for the device. It expects valid arguments (the compiled op checks
    them) and `target` as rows, not labels.
    """
    return iterate(lambda s: relax_step(s, couplings, drives, **dynamics), states,
                   max_steps=max_steps, tol=tol, what="toreq.relax")


@torch.library.register_fake("toreq::relax")
def _relax_fake(states, drives, weights, targets, sources, transposed, activation="hard_sigmoid",
                damping=0.0, max_steps=30, tol=0.0, schedule="sync", beta=0.0, loss="mse",
                target=None, readout_weight=None, readout_bias=None, nudge_position="inside"):
    torch._check(len(states) > 0, lambda: "toreq.relax: states must hold at least one layer")
    batch = states[0].shape[0]
    new_states = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in states]
    steps = states[0].new_empty((batch,), dtype=torch.long)
    residual = states[0].new_empty((batch,), dtype=_residual_dtype(states[0].dtype))
    return new_states, steps, residual


def _residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """The convergence test's dtype: float32 for float16 and bfloat16 states, else theirs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
