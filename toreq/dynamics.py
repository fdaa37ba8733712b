"""Dynamics: what an equilibrium network is, apart from how it is solved or trained.

A dynamics defines, for an input `x`:

* `network(x)`: the batch's effective tensors (parametrized weights, input projections),
  built once per training step so that every phase sees the same weights;
* `init_states(x, net)`: the states a free phase starts from;
* `step(x, states, net, nudge)`: one step `s <- F(x, s)` (damping included), differentiable,
  with the output nudge `-beta * d ell / d s_out` when `nudge` is given;
* `output(states, net)`: the prediction read from the states;
* `cost`: a [`Cost`][toreq.dynamics.Cost] (the loss, its gradient, label handling, in one place);
* `contrast(x, net, free, nudged, reference, beta)`: EqProp's parameter update from two phases,
  as `(tensor, gradient)` pairs for `torch.autograd.backward`;
* `gradient_regime`: `"exact"` where that update is the gradient as `beta -> 0`
  (an energy, or a symmetric Jacobian), else `"approximate"` (vector-field EqProp).

The kinds:

* [`CouplingDynamics`][toreq.dynamics.CouplingDynamics]: coupling lists (looped, layered
  tied/untied, ring) relaxed by the C++ op; the contrast is the Hebbian op (fast path);
* [`PrimitiveDynamics`][toreq.dynamics.PrimitiveDynamics]: dynamics defined by a primitive function
  `Phi` (the convolutional network); the contrast is `-(dPhi/dtheta(s^a) - dPhi/dtheta(s^b)) /
  beta`;
* [`FieldDynamics`][toreq.dynamics.FieldDynamics]: a state update `s <- rho(T(x, s))` (or `T` alone)
  written in PyTorch, a user's cell included; the contrast is the vector-Jacobian product of `T` at
  the free state with `v = -(s^a - s^b) / beta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from toreq.ops import Coupling, RelaxResult, activate, hebbian_update, labels_to_rows, relax
from toreq.ops.relax import relax_step, row_softmax
from toreq.validation import check_choice

__all__ = [
    "COSTS", "CellDynamics", "Cost", "CouplingDynamics", "CrossEntropy", "Dynamics", "FieldDynamics",
    "MeanSquaredError", "Network", "Nudge", "OutputGradient", "PrimitiveDynamics", "default_loss",
    "get_cost",
]

Pairs = list[tuple[Tensor, Tensor | None]]


# ------------------------------------------------------------------------------------ costs
class Cost:
    """A per-sample loss `ell(o, t)` of the output `o` and target rows `t`.

    `rows` turns labels into target rows (once per phase sequence); `loss` is the batch mean
    of `ell`; `error` is `d ell_b / d o_b` per sample, the direction of the nudge.
    """

    name = "cost"

    def rows(self, y: Tensor, num_outputs: int, dtype: torch.dtype) -> Tensor:
        return labels_to_rows(y, self.name, num_outputs, dtype)

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def error(self, output: Tensor, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MeanSquaredError(Cost):
    """`ell = 1/2 |o - t|^2` (`t` one-hot for class labels)."""

    name = "mse"

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        rows = self.rows(y, output.shape[1], output.dtype)
        return 0.5 * (output - rows).pow(2).flatten(1).sum(dim=1).mean()

    def error(self, output: Tensor, rows: Tensor) -> Tensor:
        return output - rows


class CrossEntropy(Cost):
    """`ell = -sum_j t_j log softmax(o)_j` (`t` one-hot for class labels)."""

    name = "cross_entropy"

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        if not y.is_floating_point():
            return F.cross_entropy(output, y)
        return -(y * torch.log_softmax(output, dim=1)).sum(dim=1).mean()

    def error(self, output: Tensor, rows: Tensor) -> Tensor:
        return row_softmax(output) - rows


class OutputGradient(Cost):
    """The target *is* `d ell / d o`: a constant nudge (a block inside a larger network);
    `loss` is the linear `mean_b <g_b, o_b>` whose gradient that is."""

    name = "gradient"

    def rows(self, y: Tensor, num_outputs: int, dtype: torch.dtype) -> Tensor:
        return y

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        return (output * y).flatten(1).sum(dim=1).mean()

    def error(self, output: Tensor, rows: Tensor) -> Tensor:
        return rows


COSTS: dict[str, Cost] = {c.name: c for c in (MeanSquaredError(), CrossEntropy(), OutputGradient())}
"""The costs by name (`"mse"`, `"cross_entropy"`, `"gradient"`)."""


def default_loss(output: Tensor, y: Tensor) -> Tensor:
    """The loss of a module that has no cost of its own (a network with blocks): cross-entropy
    for integer labels, else `1/2 |o - y|^2`, averaged over the batch."""
    return (COSTS["mse"] if y.is_floating_point() else COSTS["cross_entropy"]).loss(output, y)


def get_cost(name: str) -> Cost:
    """The [`Cost`][toreq.dynamics.Cost] called `name` (`"mse"`, `"cross_entropy"` or
    `"gradient"`)."""
    return COSTS[check_choice("loss", name, COSTS)]


@dataclass(frozen=True)
class Nudge:
    """What a phase does to the output: a nudge of strength `beta` (signed, or complex for
    holomorphic EqProp) toward `rows` (target rows, or the output gradient for
    [`OutputGradient`][toreq.dynamics.OutputGradient]), or, with `clamp`, the output state held at
    those rows (contrastive and coupled learning; `beta` is then 0)."""

    beta: complex
    rows: Tensor
    clamp: Tensor | None = None

    @classmethod
    def clamped(cls, rows: Tensor) -> Nudge:
        """The output state clamped to `rows`."""
        return cls(0.0, rows, rows)


# ------------------------------------------------------------------------------------ base
class Dynamics:
    """The interface every dynamics implements (see the module docstring).

    Subclasses set `cost` (a [`Cost`][toreq.dynamics.Cost]) and `gradient_regime`, and define
    `network`, `init_states`, `step` and `contrast`.
    """

    cost: Cost
    gradient_regime: str = "approximate"

    def network(self, x: Tensor) -> Any:
        raise NotImplementedError

    def init_states(self, x: Tensor, net: Any) -> list[Tensor]:
        raise NotImplementedError

    def step(self, x: Tensor, states: list[Tensor], net: Any,
             nudge: Nudge | None = None) -> list[Tensor]:
        raise NotImplementedError

    def output(self, states: list[Tensor], net: Any) -> Tensor:
        """The prediction: the last state, or `R s_out + r` through a feedforward readout."""
        last = states[-1]
        readout = getattr(net, "readout_weight", None)
        if readout is None:
            return last
        return F.linear(last.flatten(1), readout, getattr(net, "readout_bias", None))

    def num_outputs(self, x: Tensor, net: Any, states: list[Tensor]) -> int:
        readout = getattr(net, "readout_weight", None)
        return states[-1][0].numel() if readout is None else readout.shape[0]

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        """The batch mean of the per-sample loss that the nudge descends."""
        return self.cost.loss(output, y)

    def nudge(self, beta: float, y: Tensor, x: Tensor, net: Any, states: list[Tensor]) -> Nudge:
        """The nudge toward `y` (labels become target rows here, once)."""
        return Nudge(beta, self.cost.rows(y, self.num_outputs(x, net, states), states[-1].dtype))

    def output_error(self, last: Tensor, nudge: Nudge, net: Any) -> Tensor:
        """`d ell_b / d s_out` per sample, through the readout when there is one."""
        error = self.cost.error(self.output([last], net), nudge.rows)
        readout = getattr(net, "readout_weight", None)
        if readout is not None and self.cost.name != "gradient":
            error = error @ readout
        return error.view_as(last)

    def contrast(self, x: Tensor, net: Any, free: RelaxResult, nudged: RelaxResult,
                 reference: RelaxResult, beta: float) -> Pairs:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ couplings
@dataclass
class Network:
    """The effective tensors of a coupling-list model for one batch, as
    [`toreq.ops.relax`][toreq.ops.relax.relax] takes them.

    They stay attached to the parameters' autograd graph only through parametrizations
    (spectral normalisation, symmetry) and input projections, never through relaxation, so
    EqProp's gradients reach the parameters with one cheap `torch.autograd.backward`.

    `memories`: `(layer, interaction)` pairs, each an energy term of one layer beyond the
    bilinear couplings, with `field(s)` (its gradient in the state) and `energy(s)` (summed
    over the batch), e.g. [`toreq.nn.hopfield.ModernHopfield`][toreq.nn.hopfield.ModernHopfield].
    A network with memories runs on the Python loop (the op has no such term).
    """

    couplings: list[Coupling]
    drives: list[Tensor | None]
    readout_weight: Tensor | None = None
    readout_bias: Tensor | None = None
    widths: list[int] = field(default_factory=list)
    memories: list[tuple[int, Any]] = field(default_factory=list)

    def fields(self) -> list[Any] | None:
        """Each layer's memory field (None for a layer without one), or None without memories:
        `relax_step`'s `fields`."""
        if not self.memories:
            return None
        fields: list[Any] = [None] * len(self.widths)
        for layer, memory in self.memories:
            fields[layer] = memory.field
        return fields

    def to(self, dtype: torch.dtype) -> Network:
        """The same network with every tensor cast to `dtype` (e.g. complex, for the complex
        phases of holomorphic EqProp; the casts keep the autograd graph)."""
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return Network([c._replace(weight=cast(c.weight)) for c in self.couplings],
                       [cast(d) for d in self.drives], cast(self.readout_weight),
                       cast(self.readout_bias), list(self.widths), list(self.memories))


class CouplingDynamics(Dynamics):
    """Layered or looped networks given as couplings ([`Network`][toreq.dynamics.Network]), the op's
    dynamics.

    Needs `activation`, `damping` and `schedule` attributes; `network(x)` returns a
    [`Network`][toreq.dynamics.Network]. The op relaxes them (`relax_with_op`);
    `step` is the same step in PyTorch ([`toreq.ops.relax_step`][toreq.ops.relax.relax_step]).
    `nudge_position` says where the output nudge enters
    ([`NUDGE_POSITIONS`][toreq.ops.relax.NUDGE_POSITIONS]). `activation` is one name, or one per
    layer (the op takes one for every layer: per-layer activations run on the Python loop).
    """

    activation: str | tuple[str, ...]
    damping: float
    schedule: str
    nudge_position: str = "inside"

    def init_states(self, x: Tensor, net: Network) -> list[Tensor]:
        return [x.new_zeros(x.shape[0], n) for n in net.widths]

    def step(self, x: Tensor, states: list[Tensor], net: Network,
             nudge: Nudge | None = None) -> list[Tensor]:
        if states[0].dtype != (net.couplings[0].weight.dtype if net.couplings else states[0].dtype):
            net = net.to(states[0].dtype)  # complex states: one dtype for every tensor
        return relax_step(
            states, net.couplings, net.drives, activation=self.activation, damping=self.damping,
            schedule=self.schedule, beta=0.0 if nudge is None else nudge.beta,
            loss=self.cost.name, target=None if nudge is None else nudge.rows,
            readout_weight=net.readout_weight, readout_bias=net.readout_bias,
            clamp=None if nudge is None else nudge.clamp, nudge_position=self.nudge_position,
            fields=net.fields())

    def op_expresses(self, nudge: Nudge | None, net: Network | None = None) -> bool:
        """Whether `torch.ops.toreq.relax` can run a phase with `nudge` on `net`: one activation
        for every layer, not a clamped output, no memories."""
        return (isinstance(self.activation, str) and (nudge is None or nudge.clamp is None)
                and (net is None or not net.memories))

    def primitive(self, x: Tensor, states: list[Tensor], net: Network) -> Tensor:
        """`Phi(x, s)` summed over the batch, for networks with an energy (tied couplings, or
        a symmetric self-coupling): `sum_c <s_target, M_c s_source>` over the forward
        couplings (`1/2` of it for a self-coupling) plus `sum_l <d_l, s_l>`; its gradient in
        `s_l` is the pre-activation of `step`. States may be complex: every tensor is
        cast to their dtype, differentiably."""
        dtype = states[0].dtype
        phi = states[0].new_zeros(())
        for c in net.couplings:
            if c.transposed:
                continue  # the same weight's forward coupling carries the term
            term = (states[c.target] * (states[c.source] @ c.weight.to(dtype).T)).sum()
            phi = phi + (0.5 * term if c.target == c.source else term)
        for layer, drive in enumerate(net.drives):
            if drive is not None:
                phi = phi + (states[layer] * drive.to(dtype)).sum()
        for layer, memory in net.memories:
            phi = phi + memory.energy(states[layer])
        return phi

    def relax_with_op(self, x: Tensor, net: Network, states: list[Tensor], nudge: Nudge | None,
                      settings: Any) -> RelaxResult:
        """The phase through `torch.ops.toreq.relax`."""
        return relax(
            states, net.couplings, net.drives, activation=self.activation, damping=self.damping,
            max_steps=settings.max_steps, tol=settings.tol, schedule=self.schedule,
            beta=0.0 if nudge is None else nudge.beta, loss=self.cost.name,
            target=None if nudge is None else nudge.rows, readout_weight=net.readout_weight,
            readout_bias=net.readout_bias, nudge_position=self.nudge_position)

    def contrast(self, x: Tensor, net: Network, free: RelaxResult, nudged: RelaxResult,
                 reference: RelaxResult, beta: float) -> Pairs:
        """A tied weight (used in both directions) gets the contrastive Hebbian update of the
        energy model (`EQPROP-MATH.md` section 2); every other coupling and every drive the
        vector-field update with `v = -(s^nudged - s^reference) / beta` and the free state as
        pre-synaptic activity (section 3)."""
        batch = x.shape[0]
        tied = {id(c.weight) for c in net.couplings if c.transposed}
        pairs: Pairs = []
        for c in net.couplings:
            if c.transposed:
                continue  # the forward coupling of the same weight carries both directions
            post_n, post_r = nudged.states[c.target], reference.states[c.target]
            if id(c.weight) in tied:
                grad, _ = hebbian_update(post_n, nudged.states[c.source], post_r,
                                         reference.states[c.source], beta)
            else:
                pre = free.states[c.source]
                grad, _ = hebbian_update(post_n, pre, post_r, pre, beta)
            pairs.append((c.weight, grad))
        for layer, drive in enumerate(net.drives):
            if drive is not None and drive.requires_grad:
                v = (reference.states[layer] - nudged.states[layer]) / (beta * batch)
                pairs.append((drive, v if drive.dim() == 2 else v.sum(dim=0)))
        for layer, memory in net.memories:
            # an energy term: the contrast of its parameter gradients (section 2), by autograd
            # of the term alone at the two detached states
            difference = (memory.energy(nudged.states[layer].detach())
                          - memory.energy(reference.states[layer].detach()))
            pairs.append((difference, torch.full_like(difference, -1.0 / (beta * batch))))
        return pairs


# ------------------------------------------------------------------------------------ primitive
class PrimitiveDynamics(Dynamics):
    """Dynamics whose step is `rho(dPhi/ds)`: subclasses define `primitive(x, states, net)`,
    `Phi` summed over the batch. `gradient_regime` is `"exact"`."""

    gradient_regime = "exact"

    def primitive(self, x: Tensor, states: list[Tensor], net: Any) -> Tensor:
        raise NotImplementedError

    def contrast(self, x: Tensor, net: Any, free: RelaxResult, nudged: RelaxResult,
                 reference: RelaxResult, beta: float) -> Pairs:
        """`-(1 / (beta B)) d(Phi(s^nudged) - Phi(s^reference)) / dtheta` (section 2), one
        graph over two evaluations of `Phi` at the detached states."""
        def detached(result: RelaxResult) -> list[Tensor]:
            return [t.detach() for t in result.states]

        difference = (self.primitive(x, detached(nudged), net)
                      - self.primitive(x, detached(reference), net))
        return [(difference, torch.full_like(difference, -1.0 / (beta * x.shape[0])))]


# ------------------------------------------------------------------------------------ field
class FieldDynamics(Dynamics):
    """Dynamics `s <- gamma s + (1 - gamma) rho(T(x, s) - beta g)`: subclasses define
    `field(x, states, net)` (`T`, one tensor per state) and set `state_activation` (rho:
    a name, a callable, or None for `s <- T - beta g`) and `damping`.

    The contrast is vector-field EqProp: `(1/B) v^T dT/dtheta` at the free state with
    `v = -(s^nudged - s^reference) / beta`; exact (`gradient_regime = "exact"`, set by the
    subclass) when `dT/ds` is symmetric (`EQPROP-MATH.md` sections 3-5).
    """

    state_activation: Any = None
    damping: float = 0.0

    def field(self, x: Tensor, states: list[Tensor], net: Any) -> list[Tensor]:
        raise NotImplementedError

    def rho(self, pre: Tensor) -> Tensor:
        if self.state_activation is None:
            return pre
        if isinstance(self.state_activation, str):
            return activate(self.state_activation, pre)
        return self.state_activation(pre)

    def step(self, x: Tensor, states: list[Tensor], net: Any,
             nudge: Nudge | None = None) -> list[Tensor]:
        clamp = None if nudge is None else nudge.clamp
        if clamp is not None:
            states = [*states[:-1], clamp]
        pres = self.field(x, states, net)
        if nudge is not None and clamp is None:
            pres = list(pres)
            pres[-1] = pres[-1] - nudge.beta * self.output_error(states[-1], nudge, net)
        new = [self.rho(p) for p in pres]
        if self.damping != 0.0:
            new = [torch.lerp(n, s, self.damping) for n, s in zip(new, states)]
        if clamp is not None:
            new[-1] = clamp
        return new

    def contrast(self, x: Tensor, net: Any, free: RelaxResult, nudged: RelaxResult,
                 reference: RelaxResult, beta: float) -> Pairs:
        free_states = [t.detach() for t in free.states]
        pres = self.field(x, free_states, net)
        return [(pre, (r - n) / (beta * x.shape[0]))
                for pre, r, n in zip(pres, reference.states, nudged.states)]


class CellDynamics(FieldDynamics):
    """A user's cell as dynamics: `s <- gamma s + (1 - gamma) rho(cell(x, s) - beta g)`.

    `cell(x, s)` returns the pre-activation when `activation` is given (the nudge then goes
    inside it), else the new state (the nudge is added to it). Its contrast is the
    vector-Jacobian product of the cell at `s*` (what
    [`toreq.nn.EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] uses). The cost is
    [`OutputGradient`][toreq.dynamics.OutputGradient]: the block receives `dL/ds*` from above.

    Args:
        cell: a callable `cell(x, s)`.
        activation: rho: a name of [`toreq.ops.ACTIVATIONS`][toreq.ops.relax.ACTIVATIONS], a
            callable, or None.
        damping: `gamma` in `[0, 1)`.
    """

    cost = OutputGradient()

    def __init__(self, cell: Any, activation: Any = None, damping: float = 0.0) -> None:
        self.cell, self.state_activation, self.damping = cell, activation, damping

    def field(self, x: Tensor, states: list[Tensor], net: Any) -> list[Tensor]:
        return [self.cell(x, states[0])]
