"""Equilibrium models whose step is PyTorch code: ModernEqProp and ConvEP.

Their dynamics are not the layered couplings of [`toreq.ops.relax`][toreq.ops.relax.relax] (a
normalised residual block; convolutions with max-pooling), so the Python solvers relax them
([`toreq.solvers`][toreq.solvers], `"auto"`: plain iteration), each sample stopping at its own
convergence, without an autograd graph. Gradients still come from the phases alone: vector-Jacobian
products of one step at the free fixed point (ModernEqProp, a
[`toreq.dynamics.FieldDynamics`][toreq.dynamics.FieldDynamics], `EQPROP-MATH.md` sections 3 and 5),
or the contrast of the primitive function's parameter gradients at two fixed states (ConvEP, a
[`toreq.dynamics.PrimitiveDynamics`][toreq.dynamics.PrimitiveDynamics], section 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toreq import utils
from toreq.dynamics import FieldDynamics, Nudge, PrimitiveDynamics
from toreq.nn.equilibrium import EquilibriumModel
from toreq.ops import activate

__all__ = ["ConvEP", "ModernEqProp"]


# ------------------------------------------------------------------------------- ModernEqProp
@dataclass
class ModernNetwork:
    """ModernEqProp's effective tensors for one batch (see `ModernEqProp.network`)."""

    drive: Tensor
    ffn_in_weight: Tensor
    ffn_in_bias: Tensor
    ffn_out_weight: Tensor
    readout_weight: Tensor
    readout_bias: Tensor


class ModernEqProp(FieldDynamics, EquilibriumModel):
    r"""A looped pre-norm residual block iterated to equilibrium, with a readout.

    $$
    T(h) = U x + b + c\, W_2\, \rho(W_1\, \mathrm{LN}(h) + b_1), \qquad
    h \leftarrow h + (1 - \gamma)\,
        \big(T(h) - \beta\, \partial \ell / \partial h - h\big),
    \qquad o = R h^* + r,
    $$

    with `LN(h) = (h - mean(h)) / sqrt(var(h) + eps)` (no affine parameters), `c` the
    `recurrent_scale`, `gamma` the `damping` and `beta` the nudge (0 in the free phase).
    The update is gated: each step moves the fraction `1 - gamma` of the way to `T(h)`. The
    gate sets the speed, never the equilibrium `h* = T(h*)`: at the fixed point it multiplies
    `T(h*) - h* = 0`, so a learned gate would receive no gradient there, and it is a constant.

    Contraction: `W_1` and `W_2` are spectrally normalised (`spectral_norm=True`), rho has
    slope at most 1, and the Jacobian of `LN` has norm at most `1 / sqrt(eps)`; with the
    default `eps = 1` the map `T` is Lipschitz with constant at most `c < 1`, for every
    input. (A small eps, as in transformers, lets `LN` amplify a state of small variance by up
    to `1 / sqrt(eps)` and breaks this guarantee.)

    Gradient (`gradient_regime == "approximate"`): vector-field EqProp. With
    `v = -(h^{+beta} - h^{-beta}) / (2 beta)` (one-sided: `-(h^beta - h^*) / beta`), every
    parameter and the input get `(1/B) v^T dT/dtheta` at `h^*`, the vector-Jacobian product of
    one step, and `R, r` the loss's gradient at `h^*`. As beta -> 0 this is
    `g^T (I - J)^{-T} dT/dtheta` with `J = dT/dh` (`g = d ell / d h`) where backprop's is
    `g^T (I - J)^{-1} dT/dtheta`: the two agree when `J` is symmetric, which
    `J = c W_2 diag(rho') W_1 J_LN` is not in general.

    Args:
        input_dim: size of `x`.
        hidden_dim: size of `h`.
        output_dim: size of `o`.
        ffn_dim: width of the block's inner layer (default `2 * hidden_dim`).
        activation: rho, `"tanh"` (default), `"sigmoid"` or `"hard_sigmoid"`.
        spectral_norm: normalise `W_1` and `W_2` to spectral norm 1.
        recurrent_scale: `c`, in `(0, 1)` for a guaranteed contraction.
        norm_eps: `eps` of the normalisation, > 0.
        loss: `"cross_entropy"` or `"mse"` on the readout.
        max_steps: the free relaxation's step cap.
        tol: the free relaxation's tolerance.
        damping: the free relaxation's damping `gamma`, in `[0, 1)`.
        solver: how phases are solved ([`toreq.solvers`][toreq.solvers]; `"auto"`: iteration).
    """

    gradient_regime = "approximate"

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, *,
                 ffn_dim: int | None = None, activation: str = "tanh",
                 spectral_norm: bool = True, recurrent_scale: float = 0.9, norm_eps: float = 1.0,
                 loss: str = "cross_entropy", max_steps: int = 40, tol: float = 1e-4,
                 damping: float = 0.0, solver: str = "auto") -> None:
        super().__init__(activation=activation, loss=loss, max_steps=max_steps, tol=tol,
                         damping=damping, schedule="sync", solver=solver)
        ffn_dim = 2 * hidden_dim if ffn_dim is None else ffn_dim
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim),
                            ("output_dim", output_dim), ("ffn_dim", ffn_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not recurrent_scale > 0:
            raise ValueError(f"recurrent_scale must be > 0, got {recurrent_scale}")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {norm_eps}")
        self.input = nn.Linear(input_dim, hidden_dim)
        self.ffn_in = nn.Linear(hidden_dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, hidden_dim, bias=False)  # U x + b carries the bias
        self.readout = nn.Linear(hidden_dim, output_dim)
        self.recurrent_scale, self.norm_eps = recurrent_scale, norm_eps
        if spectral_norm:
            utils.spectral_norm(self.ffn_in)
            utils.spectral_norm(self.ffn_out)

    def network(self, x: Tensor) -> ModernNetwork:
        return ModernNetwork(self.input(x), self.ffn_in.weight, self.ffn_in.bias,
                             self.recurrent_scale * self.ffn_out.weight, self.readout.weight,
                             self.readout.bias)

    def init_states(self, x: Tensor, net: ModernNetwork) -> list[Tensor]:
        return [net.drive.new_zeros(net.drive.shape)]

    def field(self, x: Tensor, states: list[Tensor], net: ModernNetwork) -> list[Tensor]:
        """`[T(h)]`, the state the update moves toward (the free fixed point solves h = T(h))."""
        (h,) = states
        normed = F.layer_norm(h, h.shape[-1:], eps=self.norm_eps)
        inner = activate(self.activation, F.linear(normed, net.ffn_in_weight, net.ffn_in_bias))
        return [net.drive + F.linear(inner, net.ffn_out_weight)]


# ------------------------------------------------------------------------------- ConvEP
@dataclass
class ConvNetwork:
    """ConvEP's effective tensors for one batch (see `ConvEP.network`)."""

    image: Tensor
    weights: list[Tensor]
    biases: list[Tensor]
    readout_weight: Tensor | None
    readout_bias: Tensor | None


class ConvEP(PrimitiveDynamics, EquilibriumModel):
    r"""The convolutional energy-based EqProp network of Laborieux et al. (2021).

    Convolutional layers `s_1 .. s_K` (each a convolution, stride 1, then `p x p`
    max-pooling `P`), then fully connected layers `s_{K+1} .. s_N`, all with tied (symmetric)
    connections; the image clamps `s_0 = x`. The primitive function is

    $$
    \Phi(x, s) = \sum_{l \le K} \langle s_l,\, P(W_l * s_{l-1} + b_l) \rangle
                + \sum_{l > K} \langle s_l,\, W_l\, s_{l-1} + b_l \rangle,
    $$

    and each layer's update is `s_l <- gamma s_l + (1 - gamma) rho(dPhi/ds_l)`, with

    $$
    \partial\Phi / \partial s_l = P(W_l * s_{l-1} + b_l)
        + W_{l+1}^\top \star \mathrm{unpool}(s_{l+1};\, \mathrm{argmax}\,
          P(W_{l+1} * s_l + b_{l+1}))
    $$

    for a convolutional layer below a convolutional one (`*` is `conv2d`, $W^T \star$ is
    `conv_transpose2d`, unpool is `max_unpool2d` at the pooling's argmax), and the flattened
    `W_{K+1}^T s_{K+1}` below the first dense layer. The output layer's update gets
    `- beta * d ell / d s_N` inside rho. With `loss="mse"` the last dense layer has
    `output_dim` units and is nudged toward the one-hot target; with `loss="cross_entropy"`
    (default) a feedforward readout `o = R s_N + r` reads the last layer (Laborieux et al.).
    The `"async"` schedule (default) updates even layers, then odd ones from them.

    Gradient (`gradient_regime == "exact"`, up to O(beta^2) with symmetric nudging): for every
    parameter theta (and the input, when it requires grad)

    $$
    g_\theta = -\frac{1}{\beta B}\Big(
        \frac{\partial \Phi}{\partial\theta}(x, s^{\beta})
        - \frac{\partial \Phi}{\partial\theta}(x, s^{\mathrm{ref}})\Big),
    $$

    `s^ref` the free or `-beta` equilibrium, taken by autograd of Phi at the two fixed states
    (one graph over Phi, none over the relaxation); the readout gets the loss's gradient at the
    free equilibrium. Exactness holds where no pooling argmax and no saturated unit of the hard
    sigmoid changes between the contrasted phases, i.e. for beta small enough.

    Args:
        input_shape: `(C, H, W)` of the image; inputs may be `(B, C, H, W)` or flattened
            `(B, C*H*W)` (as [`toreq.data`][toreq.data] stores them).
        channels: output channels of each convolutional layer (at least one layer).
        output_dim: classes.
        hidden_dims: widths of dense hidden layers after the convolutions (default none).
        kernel_size: every convolutional layer's kernel size.
        padding: every convolutional layer's zero padding (default `kernel_size // 2`).
        pool_size: every convolutional layer's max-pooling window (= stride; 1: no pooling).
        activation: rho, `"hard_sigmoid"` (default) or `"sigmoid"`; `"tanh"` only with
            `pool_size=1` (negative states make max-pooling's argmax alternate).
        loss: `"cross_entropy"` (readout) or `"mse"` (output layer).
        max_steps: the free relaxation's step cap.
        tol: the free relaxation's tolerance.
        damping: the free relaxation's damping.
        schedule: the free relaxation's schedule.
        solver: how phases are solved ([`toreq.solvers`][toreq.solvers]; `"auto"`: iteration).
    """

    gradient_regime = "exact"

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int], output_dim: int, *,
                 hidden_dims: Sequence[int] = (), kernel_size: int = 3, padding: int | None = None,
                 pool_size: int = 2, activation: str = "hard_sigmoid",
                 loss: str = "cross_entropy", max_steps: int = 60, tol: float = 1e-4,
                 damping: float = 0.0, schedule: str = "async", solver: str = "auto") -> None:
        super().__init__(activation=activation, loss=loss, max_steps=max_steps, tol=tol,
                         damping=damping, schedule=schedule, solver=solver)
        input_shape = tuple(int(n) for n in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape}")
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"channels must list at least one positive channel count, got "
                             f"{list(channels)}")
        if len(hidden_dims) > 0 and min(hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be positive, got {list(hidden_dims)}")
        if output_dim < 1:
            raise ValueError(f"output_dim must be >= 1, got {output_dim}")
        if kernel_size < 1 or pool_size < 1:
            raise ValueError(f"kernel_size and pool_size must be >= 1, got {kernel_size} and "
                             f"{pool_size}")
        if activation == "tanh" and pool_size > 1:
            # with negative states the feedback a pooling window's argmax receives can push it
            # below its neighbours, the argmax then alternates and the relaxation cycles
            raise ValueError("activation 'tanh' takes negative values, with which max-pooling's "
                             "feedback can make the relaxation cycle; use 'hard_sigmoid' or "
                             "'sigmoid', or pool_size=1")
        padding = kernel_size // 2 if padding is None else padding
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.input_shape, self.padding, self.pool_size = input_shape, padding, pool_size
        shapes: list[tuple[int, ...]] = []
        _, h, w = input_shape
        for layer, out in enumerate(channels):
            h = (h + 2 * padding - kernel_size + 1) // pool_size
            w = (w + 2 * padding - kernel_size + 1) // pool_size
            if h < 1 or w < 1:
                raise ValueError(
                    f"convolutional layer {layer} would leave no pixels: input_shape {input_shape}"
                    f" is too small for {len(channels)} layers of kernel {kernel_size}, padding "
                    f"{padding} and pooling {pool_size}")
            shapes.append((out, h, w))
        dense = list(hidden_dims) + ([output_dim] if loss == "mse" else [])
        shapes += [(n,) for n in dense]
        self.state_shapes = shapes
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size, padding=padding)
                                   for a, b in zip([input_shape[0], *channels], channels))
        self.dense = nn.ModuleList(nn.Linear(a, b)
                                   for a, b in zip([math.prod(shapes[len(channels) - 1]), *dense],
                                                   dense))
        self.readout = (nn.Linear(math.prod(shapes[-1]), output_dim)
                        if loss == "cross_entropy" else None)

    def network(self, x: Tensor) -> ConvNetwork:
        flat = math.prod(self.input_shape)
        if x.dim() == 2 and x.shape[1] == flat:
            image = x.view(x.shape[0], *self.input_shape)
        elif x.dim() == 4 and tuple(x.shape[1:]) == self.input_shape:
            image = x
        else:
            image_dims = ", ".join(map(str, self.input_shape))
            raise ValueError(f"ConvEP expects x of shape (B, {image_dims}) or (B, {flat}), got "
                             f"{tuple(x.shape)}")
        layers = [*self.convs, *self.dense]
        readout = (None, None) if self.readout is None else (self.readout.weight, self.readout.bias)
        return ConvNetwork(image, [m.weight for m in layers], [m.bias for m in layers], *readout)

    def init_states(self, x: Tensor, net: ConvNetwork) -> list[Tensor]:
        return [net.image.new_zeros(net.image.shape[0], *shape) for shape in self.state_shapes]

    def _bottom_up(self, layer: int, below: Tensor,
                   net: ConvNetwork) -> tuple[Tensor, Tensor | None]:
        """Layer `layer`'s input from below, and (convolutional) the pooling's argmax."""
        if layer >= len(self.convs):
            return F.linear(below.flatten(1), net.weights[layer], net.biases[layer]), None
        z = F.conv2d(below, net.weights[layer], net.biases[layer], padding=self.padding)
        if self.pool_size == 1:
            return z, None
        return F.max_pool2d(z, self.pool_size, return_indices=True)

    def _top_down(self, layer: int, states: list[Tensor], argmax: Tensor | None,
                  net: ConvNetwork) -> Tensor:
        """`d <s_{l+1}, P(W_{l+1} * s_l + b)> / d s_l` for `l = layer` (the tied feedback)."""
        above, weight = states[layer + 1], net.weights[layer + 1]
        if layer + 1 >= len(self.convs):
            return (above @ weight).view_as(states[layer])
        if argmax is not None:
            size = [n + 2 * self.padding - weight.shape[-1] + 1 for n in states[layer].shape[-2:]]
            above = F.max_unpool2d(above, argmax, self.pool_size, output_size=size)
        return F.conv_transpose2d(above, weight, padding=self.padding)

    def step(self, x: Tensor, states: list[Tensor], net: ConvNetwork,
             nudge: Nudge | None = None) -> list[Tensor]:
        s = list(states)
        n = len(s)
        clamp = None if nudge is None else nudge.clamp
        if clamp is not None:  # the output layer is held; every other layer sees it
            s[-1] = clamp.view_as(s[-1])
        groups = ([list(range(n))] if self.schedule == "sync"
                  else [list(range(0, n, 2)), list(range(1, n, 2))])
        if clamp is not None:
            groups = [[layer for layer in group if layer != n - 1] for group in groups]
        for group in groups:
            # bottom-up inputs (and argmaxes) from the group's starting states, each computed
            # once: layer l needs its own and, for the feedback it receives, layer l+1's argmax
            bottom_up: dict[int, tuple[Tensor, Tensor | None]] = {}

            def from_below(m: int) -> tuple[Tensor, Tensor | None]:
                if m not in bottom_up:
                    bottom_up[m] = self._bottom_up(m, net.image if m == 0 else s[m - 1], net)
                return bottom_up[m]

            pres = {}
            for layer in group:
                pre = from_below(layer)[0]
                if layer + 1 < n:
                    argmax = from_below(layer + 1)[1] if layer + 1 < len(self.convs) else None
                    pre = pre + self._top_down(layer, s, argmax, net)
                if layer == n - 1 and nudge is not None and clamp is None:
                    pre = pre - nudge.beta * self.output_error(s[layer], nudge, net)
                pres[layer] = pre
            for layer in group:
                s[layer] = torch.lerp(activate(self.activation, pres[layer]), s[layer],
                                      self.damping)
        return s

    def primitive(self, x: Tensor, states: list[Tensor], net: ConvNetwork) -> Tensor:
        """`Phi(x, s)` summed over the batch (its gradient in `s_l` is `dPhi/ds_l` above)."""
        phi = net.image.new_zeros(())
        for layer, state in enumerate(states):
            below = net.image if layer == 0 else states[layer - 1]
            phi = phi + (state * self._bottom_up(layer, below, net)[0]).sum()
        return phi
