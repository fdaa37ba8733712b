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

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toreq import utils
from toreq.dynamics import FieldDynamics, Nudge, PrimitiveDynamics
from toreq.nn.equilibrium import EquilibriumModel
from toreq.nn.hopfield import memory_modules
from toreq.ops import activate
from toreq.ops.pool import max_pool2d
from toreq.ops.relax import ACTIVATIONS
from toreq.validation import check_choice, check_positive_float

__all__ = ["POOLINGS", "ConvEP", "ModernEqProp"]


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
POOLINGS = ("max", "avg", "soft")
"""The poolings of [`ConvEP`][toreq.nn.stepped.ConvEP]'s convolutional layers."""


def _windows(z: Tensor, size: int) -> Tensor:
    """`z` of shape `(B, C, H, W)` as its pooling windows, `(B, C, H // p, W // p, p * p)`; the
    rows and columns past the last whole window are dropped, as `max_pool2d` drops them."""
    b, c, h, w = z.shape
    rows, cols = h // size, w // size
    z = z[..., :rows * size, :cols * size].reshape(b, c, rows, size, cols, size)
    return z.transpose(3, 4).reshape(b, c, rows, cols, size * size)


def _unwindows(windows: Tensor, size: int, shape: Sequence[int]) -> Tensor:
    """The transpose of `_windows`: windows `(B, C, H', W', p * p)` back to `(B, C, *shape)`,
    zero where no window reaches."""
    b, c, rows, cols, _ = windows.shape
    z = windows.reshape(b, c, rows, cols, size, size).transpose(3, 4)
    z = z.reshape(b, c, rows * size, cols * size)
    return F.pad(z, (0, shape[1] - cols * size, 0, shape[0] - rows * size))


def _conv_transpose(above: Tensor, weight: Tensor, stride: int, padding: int,
                    shape: Sequence[int]) -> Tensor:
    """`conv2d(., weight, stride, padding)` transposed, onto the spatial `shape` of its input:
    the rows and columns a strided convolution never read get zeros (`output_padding`)."""
    extra = [n - ((m - 1) * stride - 2 * padding + weight.shape[-1])
             for n, m in zip(shape, above.shape[-2:])]
    return F.conv_transpose2d(above, weight, stride=stride, padding=padding,
                              output_padding=tuple(extra))


def _pool(kind: str, size: int, temperature: float, z: Tensor) -> tuple[Tensor, Tensor | None]:
    """`P(z)` for a pooling of `POOLINGS` over `size x size` windows, and what its transposed
    Jacobian needs (max: the argmax; soft: the windows' softmax)."""
    if size == 1:
        return z, None
    if kind == "max":
        return max_pool2d(z, size)
    if kind == "avg":
        return F.avg_pool2d(z, size), None
    scaled = _windows(z, size) / temperature
    value = temperature * (torch.logsumexp(scaled, dim=-1) - math.log(size * size))
    return value, torch.softmax(scaled, dim=-1)


def _avg_pool_transpose(above: Tensor, size: int, shape: Sequence[int]) -> Tensor:
    """`A^T u` for `A = avg_pool2d(., size)` on maps of spatial shape `shape`: each pooled value
    spread over its window, divided by `size^2`."""
    spread = above.unsqueeze(-1).expand(*above.shape, size * size) / (size * size)
    return _unwindows(spread, size, shape)


_PLAIN = (Tensor, nn.Parameter)  # not a tracer's or a subclass's tensors


@dataclass
class ConvNetwork:
    """ConvEP's effective tensors for one batch (see `ConvEP.network`)."""

    image: Tensor
    weights: list[Tensor]
    biases: list[Tensor]
    readout_weight: Tensor | None
    readout_bias: Tensor | None
    skip_weights: list[Tensor] = field(default_factory=list)
    # layer -> (the tensors `ConvEP._bottom_up` read, their versions, its result): see
    # `ConvEP._bottom_up_reused`
    reused: dict[int, tuple] = field(default_factory=dict, repr=False, compare=False)


class ConvEP(PrimitiveDynamics, EquilibriumModel):
    r"""Convolutional Hopfield networks: the convolutional EqProp network of Laborieux et al.
    (2021) and its variants (average and soft pooling, identity skip interactions).

    Convolutional layers `s_1 .. s_K` (each a convolution of stride `stride_l`, then `p x p`
    pooling `P_l` of stride `p`), then fully connected layers `s_{K+1} .. s_N`, all with tied
    (symmetric) connections; the image clamps `s_0 = x`. The primitive function is

    $$
    \Phi(x, s) = \sum_{l \le K} \langle s_l,\, P_l(W_l * s_{l-1} + b_l) \rangle
                + \sum_{l > K} \langle s_l,\, W_l\, s_{l-1} + b_l \rangle
                + \sum_{(i, j) \in \mathrm{skips}} \langle s_j,\, S_{ij}\, s_i \rangle
                + \sum_{(i, j) \in \mathrm{conv\_skips}} \langle s_j,\, K_{ij} * s_i \rangle,
    $$

    and each layer's update is `s_l <- gamma s_l + (1 - gamma) rho(dPhi/ds_l)`, with

    $$
    \frac{\partial\Phi}{\partial s_l} = P_l(z_l)
        + W_{l+1}^\top \star \big(J_{P_{l+1}}(z_{l+1})^\top s_{l+1}\big)
        + \sum_{(i, l)} S_{il}\, s_i + \sum_{(l, j)} S_{lj}^\top s_j,
    \qquad z_l = W_l * s_{l-1} + b_l,
    $$

    for a convolutional layer below a convolutional one (`*` is `conv2d`, $W^\top \star$ is
    `conv_transpose2d`, $J_P(z)^\top$ the pooling's transposed Jacobian), and the flattened
    `W_{K+1}^T s_{K+1}` below the first dense layer. The poolings (`pooling`, one for all
    convolutional layers or one per layer), over each `p x p` window `w` of `z`:

    * `"max"`: $P(z)_w = \max_{u \in w} z_u$; $J_P^\top$ puts `s_{l+1}` at the window's argmax
      (`max_unpool2d`). Piecewise linear: exact where no argmax changes between phases.
    * `"avg"`: $P(z)_w = \frac{1}{p^2} \sum_{u \in w} z_u$ (`avg_pool2d`); $J_P^\top$ spreads
      each value over its window divided by `p^2` (`avg_pool2d` transposed). Linear.
    * `"soft"`: the smooth maximum
      $P(z)_w = \tau \log \frac{1}{p^2} \sum_{u \in w} e^{z_u / \tau}$, `tau` the
      `pool_temperature`; it lies between the average and the maximum of the window (the
      average as tau -> infinity, the maximum as tau -> 0) and its gradient is the window's
      softmax, so $J_P^\top s$ puts `softmax(z_w / tau)_u s_w` at each pixel `u` of window `w`.
      Smooth: no argmax to flip between phases (with a smooth rho, EqProp is exact for every
      input). (A definition of our own, chosen for having a primitive with this gradient; not
      checked against the energy-based-learning library's soft pooling.)

    Rows and columns past the last whole window are dropped, as `max_pool2d` drops them. The
    feedback terms are written out (the functions above), not taken by autograd of Phi in each
    step: the solvers and exported programs run the step without an autograd graph, and the
    written-out form is cheaper; the tests check the step against `rho(dPhi/ds)` by autograd.

    Skips (Hopfield-ResNet, Vinayak & Srinivasan 2025): `skips=((i, j), ...)` adds an identity
    interaction (no weights) between convolutional layers `i < j` (indices of the states as
    `state_shapes` and `last_states` list them, 0-based; in the formulas `s_i` is state `i`).
    `S_{ij}` average-pools `s_i` by `k = H_i / H_j` (which must be a whole number, equal to
    `W_i / W_j`) and appends `C_j - C_i` zero channels (`C_i <= C_j`): `s_i`'s channels face
    the first `C_i` channels of `s_j`. The term is bilinear in the two states, so its
    gradient gives `s_j` the input `S_{ij} s_i` and `s_i` the input `S_{ij}^T s_j` (`s_j`'s
    first `C_i` channels, each pixel spread over `k x k` pixels divided by `k^2`): the
    dynamics stays a gradient system and EqProp stays exact.

    Learned skips (Hopfield-ResNet13's shortcut convolutions): `conv_skips=((i, j), ...)` adds
    `<s_j, K_ij * s_i>`, `K_ij` a learned 1 x 1 convolution without bias of stride
    `k = H_i / H_j` (a whole number, equal to `W_i / W_j`) from `C_i` to `C_j` channels, between
    convolutional layers `i < j`, `i = -1` naming the image (then the term only drives `s_j`).
    `s_j` receives `K_ij * s_i` and `s_i` the transposed convolution of `s_j`: tied, exact.

    The output layer's update gets `- beta * d ell / d s_N` inside rho. With `loss="mse"` the
    last dense layer has `output_dim` units and is nudged toward the one-hot target; with
    `loss="cross_entropy"` (default) a feedforward readout `o = R s_N + r` reads the last layer
    (Laborieux et al.). The `"async"` schedule (default) updates even layers, then odd ones from
    them (a skip between layers of the same parity couples two layers updated together; the
    fixed points are the same).
    [`ConvEP.laborieux2021_cifar10`][toreq.nn.stepped.ConvEP.laborieux2021_cifar10] builds the
    paper's CIFAR-10 network.

    Gradient (`gradient_regime == "exact"`, up to O(beta^2) with symmetric nudging): for every
    parameter theta (and the input, when it requires grad)

    $$
    g_\theta = -\frac{1}{\beta B}\Big(
        \frac{\partial \Phi}{\partial\theta}(x, s^{\beta})
        - \frac{\partial \Phi}{\partial\theta}(x, s^{\mathrm{ref}})\Big),
    $$

    `s^ref` the free or `-beta` equilibrium, taken by autograd of Phi at the two fixed states
    (one graph over Phi, none over the relaxation); the readout gets the loss's gradient at the
    free equilibrium. Exactness holds where no max-pooling argmax and no saturated unit of the
    hard sigmoid changes between the contrasted phases, i.e. for beta small enough.

    Args:
        input_shape: `(C, H, W)` of the image; inputs may be `(B, C, H, W)` or flattened
            `(B, C*H*W)` (as [`toreq.data`][toreq.data] stores them).
        channels: output channels of each convolutional layer (at least one layer).
        output_dim: classes.
        hidden_dims: widths of dense hidden layers after the convolutions (default none).
        kernel_size: every convolutional layer's kernel size.
        padding: zero padding, one for every convolutional layer or one per layer (default
            `kernel_size // 2`).
        pool_size: every convolutional layer's pooling window (= stride; 1: no pooling).
        stride: the convolutions' stride, one for every convolutional layer or one per layer
            (default 1; Hopfield-ResNet13 downsamples by stride 2, without pooling).
        pooling: `"max"` (default), `"avg"` or `"soft"` (see above), one for every
            convolutional layer or one per layer.
        pool_temperature: `tau` of soft pooling, > 0.
        skips: identity interactions `(i, j)` between convolutional layers `i < j` (see above).
        conv_skips: learned 1 x 1 convolutional interactions `(i, j)`, `i = -1` the image (see
            above).
        memories: `{layer: M}`: a modern Hopfield interaction with `M` learned patterns on
            state `layer` (any layer, convolutional or dense;
            [`ModernHopfield`][toreq.nn.hopfield.ModernHopfield]): `Xi^T softmax(Xi s / tau)`
            joins the layer's input and its log-sum-exp energy joins Phi (EqProp stays exact).
        memory_temperature: `tau` of the memories, > 0.
        activation: rho, `"hard_sigmoid"` (default) or `"sigmoid"`; `"tanh"` only where no
            layer max-pools (negative states make max-pooling's argmax alternate). One name
            for every layer, or one per state layer (`"identity"` allowed: a linear output
            layer, as in Scellier et al. 2023's networks with `loss="mse"`).
        loss: `"cross_entropy"` (readout) or `"mse"` (output layer).
        max_steps: the free relaxation's step cap.
        tol: the free relaxation's tolerance.
        damping: the free relaxation's damping.
        schedule: the free relaxation's schedule.
        solver: how phases are solved ([`toreq.solvers`][toreq.solvers]; `"auto"`: iteration).
    """

    gradient_regime = "exact"

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int], output_dim: int, *,
                 hidden_dims: Sequence[int] = (), kernel_size: int = 3,
                 padding: int | Sequence[int] | None = None, pool_size: int = 2,
                 stride: int | Sequence[int] = 1,
                 pooling: str | Sequence[str] = "max", pool_temperature: float = 1.0,
                 skips: Sequence[tuple[int, int]] = (),
                 conv_skips: Sequence[tuple[int, int]] = (),
                 activation: str | Sequence[str] = "hard_sigmoid",
                 memories: Mapping[int, int] | None = None, memory_temperature: float = 1.0,
                 loss: str = "cross_entropy", max_steps: int = 60, tol: float = 1e-4,
                 damping: float = 0.0, schedule: str = "async", solver: str = "auto") -> None:
        per_layer = not isinstance(activation, str)
        super().__init__(activation="hard_sigmoid" if per_layer else activation, loss=loss,
                         max_steps=max_steps, tol=tol, damping=damping, schedule=schedule,
                         solver=solver)
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
        self.poolings = self._per_layer("pooling", pooling, len(channels))
        for kind in self.poolings:
            check_choice("pooling", kind, POOLINGS)
        self.pool_temperature = check_positive_float("pool_temperature", pool_temperature)
        names = ((activation,) if not per_layer else
                 tuple(check_choice("activation", a, (*ACTIVATIONS, "identity"))
                       for a in activation))
        if "tanh" in names and pool_size > 1 and "max" in self.poolings:
            # with negative states the feedback a pooling window's argmax receives can push it
            # below its neighbours, the argmax then alternates and the relaxation cycles
            raise ValueError("activation 'tanh' takes negative values, with which max-pooling's "
                             "feedback can make the relaxation cycle; use 'hard_sigmoid' or "
                             "'sigmoid', pooling 'avg' or 'soft', or pool_size=1")
        self.paddings = self._per_layer("padding", kernel_size // 2 if padding is None else padding,
                                        len(channels))
        if not all(isinstance(p, int) and p >= 0 for p in self.paddings):
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.strides = self._per_layer("stride", stride, len(channels))
        if not all(isinstance(n, int) and n >= 1 for n in self.strides):
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.input_shape, self.pool_size = input_shape, pool_size
        shapes: list[tuple[int, ...]] = []
        _, h, w = input_shape
        for layer, (out, pad, step) in enumerate(zip(channels, self.paddings, self.strides)):
            h = ((h + 2 * pad - kernel_size) // step + 1) // pool_size
            w = ((w + 2 * pad - kernel_size) // step + 1) // pool_size
            if h < 1 or w < 1:
                raise ValueError(
                    f"convolutional layer {layer} would leave no pixels: input_shape {input_shape}"
                    f" is too small for {len(channels)} layers of kernel {kernel_size}, padding "
                    f"{padding} and pooling {pool_size}")
            shapes.append((out, h, w))
        self.skips = self._checked_pairs("skips", skips, shapes, image=False)
        self.conv_skips = self._checked_pairs("conv_skips", conv_skips, [input_shape, *shapes],
                                              image=True)
        dense = list(hidden_dims) + ([output_dim] if loss == "mse" else [])
        shapes += [(n,) for n in dense]
        self.state_shapes = shapes
        if per_layer:
            if len(names) != len(shapes):
                raise ValueError(f"activation must be one name or one per state layer "
                                 f"({len(shapes)}: the convolutional layers, the dense ones and, "
                                 f"with loss='mse', the output layer), got {len(names)}")
            self.activation = names[0] if len(set(names)) == 1 else names
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size, stride=step, padding=pad)
                                   for a, b, pad, step in zip([input_shape[0], *channels],
                                                              channels, self.paddings,
                                                              self.strides))
        self.skip_convs = nn.ModuleList(
            nn.Conv2d(input_shape[0] if i < 0 else shapes[i][0], shapes[j][0], 1,
                      stride=self._skip_stride(i, j), bias=False)
            for i, j in self.conv_skips)
        self.dense = nn.ModuleList(nn.Linear(a, b)
                                   for a, b in zip([math.prod(shapes[len(channels) - 1]), *dense],
                                                   dense))
        self.readout = (nn.Linear(math.prod(shapes[-1]), output_dim)
                        if loss == "cross_entropy" else None)
        self.memories = memory_modules(memories, shapes, memory_temperature)

    @classmethod
    def laborieux2021_cifar10(cls, **options: Any) -> ConvEP:
        """The CIFAR-10 network of Laborieux et al. (2021), as their code's command line builds it
        (`--channels 128 256 512 512 --kernels 3 3 3 3 --pools mmmm --strides 1 1 1 1
        --paddings 1 1 1 0 --fc 10`, cross-entropy through a linear readout):

        `(3, 32, 32)` -> four convolutional layers of 128, 256, 512 and 512 channels, kernel 3,
        padding 1, 1, 1, 0, each followed by 2 x 2 max pooling (states 128 x 16 x 16,
        256 x 8 x 8, 512 x 4 x 4, 512 x 1 x 1) -> a linear readout to 10 classes with
        cross-entropy; all layers updated together (`schedule="sync"`, as their code updates
        every layer from one gradient of Phi), 250 free steps (their `T1`).

        Their activation `my_hard_sig` is `clamp(u / 2, 0, 1)`, the hard sigmoid
        (`"hard_sigmoid"`, `clamp(u, 0, 1)`, used here) of Phi halved: the same networks with
        weights, biases and beta scaled by 1/2 (max pooling commutes with the scaling). Their
        nudged phases (`T2` = 30 steps, symmetric nudging at beta = 0.5) and SGD schedule are
        the trainer's settings, not the model's (the preset `laborieux2021-cifar10` holds
        them).

        Args:
            options: any keyword argument of [`ConvEP`][toreq.nn.stepped.ConvEP], overriding
                these settings (e.g. `max_steps`, `activation`).
        """
        settings: dict[str, Any] = {
            "kernel_size": 3, "padding": (1, 1, 1, 0), "pool_size": 2, "pooling": "max",
            "activation": "hard_sigmoid", "loss": "cross_entropy", "schedule": "sync",
            "max_steps": 250}
        settings.update(options)
        return cls((3, 32, 32), (128, 256, 512, 512), 10, **settings)

    @classmethod
    def hopfield_resnet13(cls, **options: Any) -> ConvEP:
        """Hopfield-ResNet13 (Vinayak & Srinivasan 2025), as its code builds it
        (`ConvHopfieldResEnergy32` of BrainSeek-Lab/Scaling-Equilibrium-Propagation-to-Deeper-
        Neural-Network-Architectures):

        `(3, 32, 32)` -> four blocks of two 3 x 3 convolutional layers (padding 1; the first of
        stride 1, the second of stride 2; no pooling) of 128, 128, 256, 256, 512, 512, 512 and
        512 channels (states 32, 16, 16, 8, 8, 4, 4 and 2 pixels wide), each block's input
        coupled to its output by a learned 1 x 1 convolution of stride 2 (`conv_skips`
        `(-1, 1), (1, 3), (3, 5), (5, 7)`, the first from the image) -> a dense linear output
        layer of 10 units with squared error; hard-sigmoid hidden layers, asynchronous updates,
        120 free steps. Nine biases (one per state layer), thirteen weights.

        The paper's activation, a clipped ReLU (`clamp(x, 0, c)` with a ceiling per layer), is
        not offered: the hard sigmoid is its `c = 1` case.

        Args:
            options: any keyword argument of [`ConvEP`][toreq.nn.stepped.ConvEP], overriding
                these settings.
        """
        settings: dict[str, Any] = {
            "kernel_size": 3, "padding": 1, "pool_size": 1, "stride": (1, 2) * 4,
            "conv_skips": ((-1, 1), (1, 3), (3, 5), (5, 7)),
            "activation": ("hard_sigmoid",) * 8 + ("identity",), "loss": "mse",
            "schedule": "async", "max_steps": 120}
        settings.update(options)
        return cls((3, 32, 32), (128, 128, 256, 256, 512, 512, 512, 512), 10, **settings)

    @staticmethod
    def _per_layer(name: str, value: Any, layers: int) -> tuple[Any, ...]:
        """`value` for each of `layers` convolutional layers: one given for all, or one each."""
        if isinstance(value, (str, int)):
            return (value,) * layers
        values = tuple(value)
        if len(values) != layers:
            raise ValueError(f"{name} must be one value or one per convolutional layer "
                             f"({layers}), got {list(values)}")
        return values

    @staticmethod
    def _checked_pairs(name: str, skips: Sequence[tuple[int, int]],
                       shapes: list[tuple[int, ...]], *,
                       image: bool) -> tuple[tuple[int, int], ...]:
        """`skips` (the option `name`) as `(i, j)` pairs `i < j` of convolutional layers whose
        pixel grids divide (`H_i / H_j = W_i / W_j` a whole number), `shapes` the convolutional
        layers' shapes. The identity skips (`image=False`) also need `C_i <= C_j`; the learned
        ones (`image=True`) may start at `i = -1`, the image, whose shape leads `shapes`."""
        checked: list[tuple[int, int]] = []
        lowest, first = (-1, 1) if image else (0, 0)  # state i is shapes[i + first]
        for skip in skips:
            pair = tuple(skip) if isinstance(skip, (tuple, list)) else (skip,)
            if len(pair) != 2 or not all(isinstance(n, int) for n in pair):
                raise ValueError(f"{name} must be pairs (i, j) of layer indices, got {skip!r}")
            i, j = pair
            if i == j:
                raise ValueError(f"{name}: a skip couples two different layers, got ({i}, {j}) "
                                 "(a layer to itself)")
            if not lowest <= i < j < len(shapes) - first:
                what = "-1: the image; then the convolutional layers" if image else \
                    "the convolutional layers"
                raise ValueError(f"{name} must be pairs (i, j) with {lowest} <= i < j < "
                                 f"{len(shapes) - first} ({what}), got ({i}, {j})")
            if (i, j) in checked:
                raise ValueError(f"{name}: ({i}, {j}) is given twice")
            (c_i, h_i, w_i), (c_j, h_j, w_j) = shapes[i + first], shapes[j + first]
            if h_i % h_j or w_i % w_j or h_i // h_j != w_i // w_j or (c_i > c_j and not image):
                how = ("reach", "a strided 1 x 1 convolution", "") if image else \
                    ("be coupled to", "an identity", " and C_i <= C_j")
                raise ValueError(
                    f"{name}: layer {i} {shapes[i + first]} cannot {how[0]} layer {j} "
                    f"{shapes[j + first]} by {how[1]}: needs H_i / H_j = W_i / W_j a whole "
                    f"number{how[2]}")
            checked.append((i, j))
        return tuple(checked)

    def _skip_stride(self, i: int, j: int) -> int:
        """The stride of the learned skip `(i, j)` (`i = -1`: the image)."""
        height = self.input_shape[1] if i < 0 else self.state_shapes[i][1]
        return height // self.state_shapes[j][1]

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
        return ConvNetwork(image, [m.weight for m in layers], [m.bias for m in layers], *readout,
                           [m.weight for m in self.skip_convs])

    def init_states(self, x: Tensor, net: ConvNetwork) -> list[Tensor]:
        return [net.image.new_zeros(net.image.shape[0], *shape) for shape in self.state_shapes]

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        """The parameters of each weight layer, input side first (the convolutions, the dense
        layers, the readout), then the learned skips' weights in `conv_skips`' order: what
        per-layer learning rates and initialisation gains apply to."""
        layers = [*self.convs, *self.dense] + ([self.readout] if self.readout is not None else [])
        return [list(layer.parameters()) for layer in [*layers, *self.skip_convs]]

    def _pool(self, layer: int, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return _pool(self.poolings[layer], self.pool_size, self.pool_temperature, z)

    def _pool_transpose(self, layer: int, above: Tensor, cache: Tensor | None,
                        shape: Sequence[int]) -> Tensor:
        """`J_{P_l}(z)^T above`, `z` of spatial shape `shape` and `cache` from `_pool`."""
        size = self.pool_size
        if size == 1:
            return above
        kind = self.poolings[layer]
        if kind == "max":
            return F.max_unpool2d(above, cache, size, output_size=shape)
        if kind == "avg":
            return _avg_pool_transpose(above, size, shape)
        return _unwindows(cache * above.unsqueeze(-1), size, shape)

    def _skip_factor(self, i: int, j: int) -> int:
        return self.state_shapes[i][1] // self.state_shapes[j][1]

    def _skip_forward(self, i: int, j: int, state: Tensor) -> Tensor:
        """`S_{ij} s_i`: `s_i` average-pooled to `s_j`'s pixels, with zero channels appended."""
        pooled = F.avg_pool2d(state, self._skip_factor(i, j))
        return F.pad(pooled, (0, 0, 0, 0, 0, self.state_shapes[j][0] - state.shape[1]))

    def _skip_transpose(self, i: int, j: int, state: Tensor) -> Tensor:
        """`S_{ij}^T s_j`: the first `C_i` channels of `s_j`, average pooling transposed."""
        channels, *shape = self.state_shapes[i]
        return _avg_pool_transpose(state[:, :channels], self._skip_factor(i, j), shape)

    def _bottom_up(self, layer: int, below: Tensor,
                   net: ConvNetwork) -> tuple[Tensor, Tensor | None]:
        """Layer `layer`'s input from below, and (convolutional) what the pooling's transposed
        Jacobian needs."""
        if layer >= len(self.convs):
            return F.linear(below.flatten(1), net.weights[layer], net.biases[layer]), None
        z = F.conv2d(below, net.weights[layer], net.biases[layer], stride=self.strides[layer],
                     padding=self.paddings[layer])
        return self._pool(layer, z)

    def _bottom_up_reused(self, layer: int, below: Tensor,
                          net: ConvNetwork) -> tuple[Tensor, Tensor | None]:
        """`_bottom_up`, reused while what it reads is unchanged.

        Within a relaxation the image's convolution is the same at every step, and with the
        asynchronous schedule the second group's `W_l * s_{l-1}` (layer `l` odd) is what the
        next step's first group reads again, for the pooling of layer `l - 1`'s feedback: a
        third of a two-layer network's convolutions. A result is reused only for the same
        `below`, weight and bias tensors at the same versions (an in-place change invalidates
        it), its own unmodified, and never under autograd, a `torch.func` transform or a tracer
        (plain tensors only).
        """
        weight, bias = net.weights[layer], net.biases[layer]
        read = (below, weight, bias)
        if (torch.is_grad_enabled() or torch._C._functorch.is_functorch_wrapped_tensor(below)
                or any(type(t) not in _PLAIN for t in read if t is not None)):
            return self._bottom_up(layer, below, net)
        versions = tuple(None if t is None else t._version for t in read)
        kept = net.reused.get(layer)
        if (kept is not None and all(a is b for a, b in zip(kept[0], read))
                and kept[1] == versions and kept[3] == tuple(t._version for t in kept[2]
                                                              if t is not None)):
            return kept[2]
        result = self._bottom_up(layer, below, net)
        net.reused[layer] = (read, versions, result,
                             tuple(t._version for t in result if t is not None))
        return result

    def _top_down(self, layer: int, states: list[Tensor], cache: Tensor | None,
                  net: ConvNetwork) -> Tensor:
        """`d <s_{l+1}, P(W_{l+1} * s_l + b)> / d s_l` for `l = layer` (the tied feedback)."""
        above, weight = states[layer + 1], net.weights[layer + 1]
        if layer + 1 >= len(self.convs):
            return (above @ weight).view_as(states[layer])
        padding, stride = self.paddings[layer + 1], self.strides[layer + 1]
        shape = [(n + 2 * padding - weight.shape[-1]) // stride + 1
                 for n in states[layer].shape[-2:]]
        above = self._pool_transpose(layer + 1, above, cache, shape)
        return _conv_transpose(above, weight, stride, padding, states[layer].shape[-2:])

    def _learned_skip_forward(self, i: int, j: int, weight: Tensor, states: list[Tensor],
                              net: ConvNetwork) -> Tensor:
        """`K_ij * s_i` (`i = -1`: the image)."""
        below = net.image if i < 0 else states[i]
        return F.conv2d(below, weight, stride=self._skip_stride(i, j))

    def _learned_skips(self, layer: int, states: list[Tensor], net: ConvNetwork) -> Tensor | None:
        """Layer `layer`'s input from the learned skips that reach it or leave it."""
        total = None
        for (i, j), weight in zip(self.conv_skips, net.skip_weights):
            if layer == j:
                term = self._learned_skip_forward(i, j, weight, states, net)
            elif layer == i:
                term = _conv_transpose(states[j], weight, self._skip_stride(i, j), 0,
                                       states[i].shape[-2:])
            else:
                continue
            total = term if total is None else total + term
        return total

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
            # bottom-up inputs (and pooling caches) from the group's starting states, each
            # computed once: layer l needs its own and, for its feedback, layer l+1's cache
            bottom_up: dict[int, tuple[Tensor, Tensor | None]] = {}

            def from_below(m: int) -> tuple[Tensor, Tensor | None]:
                if m not in bottom_up:
                    bottom_up[m] = self._bottom_up_reused(m, net.image if m == 0 else s[m - 1],
                                                          net)
                return bottom_up[m]

            pres = {}
            for layer in group:
                pre = from_below(layer)[0]
                if layer + 1 < n:
                    cache = from_below(layer + 1)[1] if layer + 1 < len(self.convs) else None
                    pre = pre + self._top_down(layer, s, cache, net)
                for i, j in self.skips:
                    if layer == j:
                        pre = pre + self._skip_forward(i, j, s[i])
                    elif layer == i:
                        pre = pre + self._skip_transpose(i, j, s[j])
                learned = self._learned_skips(layer, s, net)
                if learned is not None:
                    pre = pre + learned
                if str(layer) in self.memories:
                    pre = pre + self.memories[str(layer)].field(s[layer])
                if layer == n - 1 and nudge is not None and clamp is None:
                    pre = pre - nudge.beta * self.output_error(s[layer], nudge, net)
                pres[layer] = pre
            for layer in group:
                rho = (self.activation if isinstance(self.activation, str)
                       else self.activation[layer])
                s[layer] = torch.lerp(activate(rho, pres[layer]), s[layer], self.damping)
        return s

    def primitive(self, x: Tensor, states: list[Tensor], net: ConvNetwork) -> Tensor:
        """`Phi(x, s)` summed over the batch (its gradient in `s_l` is `dPhi/ds_l` above)."""
        phi = net.image.new_zeros(())
        for layer, state in enumerate(states):
            below = net.image if layer == 0 else states[layer - 1]
            phi = phi + (state * self._bottom_up(layer, below, net)[0]).sum()
        for i, j in self.skips:
            phi = phi + (states[j] * self._skip_forward(i, j, states[i])).sum()
        for (i, j), weight in zip(self.conv_skips, net.skip_weights):
            phi = phi + (states[j] * self._learned_skip_forward(i, j, weight, states, net)).sum()
        for layer, memory in self.memories.items():
            phi = phi + memory.energy(states[int(layer)])
        return phi


class FeedforwardCNN(nn.Module):
    """The feedforward twin of a [`ConvEP`][toreq.nn.stepped.ConvEP]: the backprop baseline of
    the same architecture.

    The same convolutions (kernel, padding, stride), poolings, activations, dense layers and
    readout, copied with their current weights, run once from the image up without feedback:
    `s_l = rho_l(P_l(W_l * s_{l-1} + b_l))`, then the dense layers and the readout (with
    `loss="mse"`, the output layer's state is the output). Skips and memories couple layers
    both ways and have no feedforward counterpart, so a network with them is refused.
    """

    def __init__(self, like: ConvEP) -> None:
        super().__init__()
        if like.skips or like.conv_skips or len(like.memories):
            raise ValueError("FeedforwardCNN copies convolutions, poolings and dense layers; "
                             "the ConvEP given has skips, learned skips or memories, which "
                             "have no feedforward counterpart")
        self.input_shape = like.input_shape
        self.pool_size, self.poolings = like.pool_size, like.poolings
        self.pool_temperature = like.pool_temperature
        layers = len(like.state_shapes)
        self.activations = ((like.activation,) * layers if isinstance(like.activation, str)
                            else tuple(like.activation))
        self.convs, self.dense = copy.deepcopy(like.convs), copy.deepcopy(like.dense)
        self.readout = copy.deepcopy(like.readout)

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        """The parameters of each weight layer in [`ConvEP.layer_parameters`][toreq.nn.stepped.ConvEP.layer_parameters]'s
        order (the convolutions, the dense layers, the readout)."""
        layers = [*self.convs, *self.dense] + ([self.readout] if self.readout is not None else [])
        return [list(layer.parameters()) for layer in layers]

    def forward(self, x: Tensor) -> Tensor:
        s = x.reshape(x.shape[0], *self.input_shape)
        for layer, conv in enumerate(self.convs):
            pooled, _ = _pool(self.poolings[layer], self.pool_size, self.pool_temperature,
                              conv(s))
            s = activate(self.activations[layer], pooled)
        for layer, dense in enumerate(self.dense, start=len(self.convs)):
            s = activate(self.activations[layer], dense(s.flatten(1)))
        return s.flatten(1) if self.readout is None else self.readout(s.flatten(1))
