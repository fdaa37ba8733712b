"""The base of toreq's layered equilibrium models: relaxation, prediction and EqProp gradients."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toreq.validation import check_batched_input, check_positive_int
from toreq.ops import Coupling, RelaxResult, hebbian_update, relax, relax_step

__all__ = ["EquilibriumModel", "Network"]


@dataclass
class Network:
    """The effective tensors of a model for one batch, as :func:`toreq.ops.relax` takes them.

    They stay attached to the parameters' autograd graph only through parametrizations
    (spectral normalisation, symmetry) and input projections, never through relaxation, so
    EqProp's gradients reach the parameters with one cheap ``torch.autograd.backward``.
    Build it once per training step: every phase must see the same weights.
    """

    couplings: list[Coupling]
    drives: list[Tensor | None]
    readout_weight: Tensor | None = None
    readout_bias: Tensor | None = None
    widths: list[int] = field(default_factory=list)


class EquilibriumModel(nn.Module):
    """A network whose prediction is the fixed point of ``s <- F(x, s)`` (see ``toreq.ops.relax``).

    Subclasses define :meth:`network`; this class relaxes it, reads the prediction out, and turns
    two phases into gradients (:meth:`eqprop_backward`). After each call the free equilibrium is
    in ``last_states``, the per-sample step counts in ``last_steps`` and the residuals in
    ``last_residual``.

    Args:
        activation: ``"hard_sigmoid"``, ``"tanh"`` or ``"sigmoid"``.
        loss: ``"cross_entropy"`` (through a readout) or ``"mse"`` (``1/2 |o - onehot(y)|^2``).
        max_steps: the free phase's step cap (see ``toreq.ops.relax``).
        tol: the free phase's tolerance.
        damping: the free phase's damping.
        schedule: the free phase's schedule, ``"sync"`` or ``"async"``.
    """

    def __init__(self, *, activation: str, loss: str, max_steps: int, tol: float,
                 damping: float, schedule: str) -> None:
        super().__init__()
        check_positive_int("max_steps", max_steps)
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
        self.activation, self.loss_name = activation, loss
        self.max_steps, self.tol, self.damping, self.schedule = max_steps, tol, damping, schedule
        self.last_states: list[Tensor] | None = None
        self.last_steps: Tensor | None = None
        self.last_residual: Tensor | None = None

    # ---------------------------------------------------------------- what subclasses define
    def network(self, x: Tensor) -> Network:
        """The couplings, drives and readout for input ``x`` of shape ``(batch, features)``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- dynamics
    def init_states(self, x: Tensor, net: Network) -> list[Tensor]:
        return [x.new_zeros(x.shape[0], n) for n in net.widths]

    def relax(self, x: Tensor, net: Network | None = None, *, states: list[Tensor] | None = None,
              beta: float = 0.0, target: Tensor | None = None, max_steps: int | None = None,
              tol: float | None = None) -> RelaxResult:
        """One phase: free (``beta=0``, from rest unless ``states`` is given) or nudged."""
        net = self.network(x) if net is None else net
        return relax(
            self.init_states(x, net) if states is None else states, net.couplings, net.drives,
            activation=self.activation, damping=self.damping,
            max_steps=self.max_steps if max_steps is None else max_steps,
            tol=self.tol if tol is None else tol, schedule=self.schedule, beta=beta,
            loss=self.loss_name, target=target, readout_weight=net.readout_weight,
            readout_bias=net.readout_bias,
        )

    def step(self, x: Tensor, states: list[Tensor], net: Network) -> list[Tensor]:
        """One free step ``s <- F(x, s)``, differentiable: what BPTT unrolls and
        :func:`toreq.utils.lipschitz` linearises."""
        return relax_step(states, net.couplings, net.drives, activation=self.activation,
                          damping=self.damping, schedule=self.schedule)

    def unrolled(self, x: Tensor, steps: int, net: Network | None = None) -> list[Tensor]:
        """The free dynamics unrolled for ``steps`` steps *with* an autograd graph (for BPTT)."""
        net = self.network(x) if net is None else net
        states = self.init_states(x, net)
        for _ in range(steps):
            states = self.step(x, states, net)
        return states

    def output(self, states: list[Tensor], net: Network) -> Tensor:
        """The prediction read from equilibrium states: logits, or the output layer's state."""
        if net.readout_weight is None:
            return states[-1]
        return F.linear(states[-1], net.readout_weight, net.readout_bias)

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        """The batch mean of the per-sample loss that the nudge descends."""
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(output, y)
        target = F.one_hot(y, output.shape[1]).to(output.dtype) if not y.is_floating_point() else y
        return 0.5 * (output - target).pow(2).sum(dim=1).mean()

    def forward(self, x: Tensor) -> Tensor:
        """The free-phase prediction for ``x``."""
        check_batched_input(type(self).__name__, x)
        net = self.network(x)
        free = self.relax(x, net)
        self._remember(free)
        return self.output(free.states, net)

    def _remember(self, free: RelaxResult) -> None:
        self.last_states, self.last_steps, self.last_residual = free.states, free.steps, free.residual

    # ---------------------------------------------------------------- EqProp
    def eqprop_backward(self, x: Tensor, y: Tensor, net: Network, free: RelaxResult,
                        nudged: RelaxResult, reference: RelaxResult, beta: float) -> Tensor:
        """Accumulates EqProp's gradients into every parameter's ``.grad``; returns the loss.

        ``nudged`` and ``reference`` are the two phases contrasted (``+beta`` and the free phase,
        or ``+beta`` and ``-beta``), ``beta`` the difference of their nudging strengths. A weight
        used in both directions (tied) gets the contrastive Hebbian update of the energy model
        (both directions' contributions); every other coupling and every drive gets the
        vector-field update with ``v = -(s^nudged - s^reference) / beta`` and the free state as
        pre-synaptic activity. The readout is feedforward: its gradient is the loss's, at the
        free equilibrium. No graph of the relaxation exists or is needed.
        """
        batch = x.shape[0]
        tied = {id(c.weight) for c in net.couplings if c.transposed}
        tensors, grads = [], []
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
            tensors.append(c.weight)
            grads.append(grad)
        for layer, drive in enumerate(net.drives):
            if drive is not None and drive.requires_grad:
                v = (reference.states[layer] - nudged.states[layer]) / (beta * batch)
                tensors.append(drive)
                grads.append(v if drive.dim() == 2 else v.sum(dim=0))
        free_states = [s.detach() for s in free.states]
        loss = self.loss(self.output(free_states, net), y)
        if loss.requires_grad:  # the readout's own gradient
            tensors.append(loss)
            grads.append(None)
        torch.autograd.backward(tensors, grads)
        return loss.detach()
