"""toreq's layered equilibrium models (their equations are in each class's docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from toreq import utils
from toreq.dynamics import CouplingDynamics, Network
from toreq.nn.equilibrium import EquilibriumModel
from toreq.nn.hopfield import memory_modules
from toreq.ops import Coupling, activate
from toreq.ops.relax import ACTIVATIONS, NUDGE_POSITIONS
from toreq.validation import check_choice, check_layer_sizes

__all__ = ["EPMLP", "FeedforwardMLP", "LoopedMLP", "SteepSigmoid", "ToroidalMLP"]


class LoopedMLP(CouplingDynamics, EquilibriumModel):
    r"""One recurrent hidden layer iterated to equilibrium, with a readout.

    $$
    h \leftarrow \gamma h + (1-\gamma)\,\rho(U x + c\, W h + b), \qquad o = R h^* + r
    $$

    $W$ is spectrally normalised (`spectral_norm=True`) and scaled by `recurrent_scale`
    ($c$ above) so that the map contracts; with `symmetric=True` (default)
    $W = (A + A^\top)/2$ and EqProp's vector-field gradient is exact (up to $O(\beta^2)$ with
    symmetric nudging); without it, it is an approximation whose quality falls as $W$ departs
    from symmetry.

    Args:
        input_dim: size of $x$.
        hidden_dim: size of $h$.
        output_dim: size of $o$.
        activation: the hidden activation $\rho$.
        symmetric: parametrize $W$ symmetric.
        spectral_norm: normalise $W$ to spectral norm 1 before scaling.
        recurrent_scale: the spectral norm the recurrent weight is scaled to.
        loss: `"cross_entropy"` or `"mse"` on the readout.
        max_steps: the free relaxation's step cap.
        tol: the free relaxation's tolerance.
        damping: the free relaxation's damping $\gamma$.
        solver: how phases are solved ([`toreq.solvers`][toreq.solvers]; `"auto"`: the C++ op).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, *,
                 activation: str = "tanh", symmetric: bool = True, spectral_norm: bool = True,
                 recurrent_scale: float = 0.9, loss: str = "cross_entropy", max_steps: int = 30,
                 tol: float = 1e-4, damping: float = 0.0, solver: str = "auto") -> None:
        super().__init__(activation=activation, loss=loss, max_steps=max_steps, tol=tol,
                         damping=damping, schedule="sync", solver=solver)
        check_layer_sizes("LoopedMLP", input_dim=input_dim, hidden_dim=hidden_dim,
                          output_dim=output_dim)
        self.input = nn.Linear(input_dim, hidden_dim)
        self.recurrent = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.readout = nn.Linear(hidden_dim, output_dim)
        self.symmetric, self.recurrent_scale = symmetric, recurrent_scale
        if symmetric:
            utils.symmetric(self.recurrent)
        if spectral_norm:
            utils.spectral_norm(self.recurrent)

    @property
    def gradient_regime(self) -> str:
        r"""`"exact"` where EqProp's gradient equals backprop's as $\beta \to 0$, else
        `"approximate"`."""
        return "exact" if self.symmetric else "approximate"

    def network(self, x: Tensor) -> Network:
        w = self.recurrent_scale * self.recurrent.weight
        return Network([Coupling(w, 0, 0)], [self.input(x)], self.readout.weight,
                       self.readout.bias, [self.recurrent.in_features])


class ToroidalMLP(CouplingDynamics, EquilibriumModel):
    r"""A ring of hidden layers relaxed jointly, the last feeding back into the first.

    $$
    h_0 \leftarrow \rho(U x + c\, W_{K-1 \to 0} h_{K-1} + b_0), \qquad
    h_k \leftarrow \rho(c\, W_{k-1 \to k} h_{k-1} + b_k), \qquad o = R h_{K-1}^* + r
    $$

    Every ring weight is spectrally normalised and scaled by `recurrent_scale`. The couplings
    are one-directional, so EqProp here is the vector-field approximation (`"approximate"`).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, *, num_layers: int = 3,
                 activation: str = "tanh", spectral_norm: bool = True,
                 recurrent_scale: float = 0.9, loss: str = "cross_entropy", max_steps: int = 40,
                 tol: float = 1e-4, damping: float = 0.0, solver: str = "auto") -> None:
        super().__init__(activation=activation, loss=loss, max_steps=max_steps, tol=tol,
                         damping=damping, schedule="sync", solver=solver)
        check_layer_sizes("ToroidalMLP", input_dim=input_dim, hidden_dim=hidden_dim,
                          output_dim=output_dim)
        if num_layers < 2:
            raise ValueError(f"a ring needs num_layers >= 2, got {num_layers}")
        self.input = nn.Linear(input_dim, hidden_dim)
        self.ring = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim, bias=k > 0)
                                  for k in range(num_layers))
        self.readout = nn.Linear(hidden_dim, output_dim)
        self.recurrent_scale = recurrent_scale
        if spectral_norm:
            for layer in self.ring:
                utils.spectral_norm(layer)

    gradient_regime = "approximate"

    def network(self, x: Tensor) -> Network:
        k = len(self.ring)
        couplings = [Coupling(self.recurrent_scale * layer.weight, (i + 1) % k, i)
                     for i, layer in enumerate(self.ring)]
        drives = [self.input(x)] + [layer.bias for layer in self.ring[1:]]
        return Network(couplings, drives, self.readout.weight, self.readout.bias,
                       [self.input.out_features] * k)


class EPMLP(CouplingDynamics, EquilibriumModel):
    r"""The canonical layered energy-based network (Scellier & Bengio 2017; Ernoult et al. 2019).

    Hidden layers $s_1, \dots, s_L$ with tied, symmetric connections; the input clamps
    $s_0 = x$:

    $$
    s_l \leftarrow \rho(W_l s_{l-1} + W_{l+1}^\top s_{l+1} + b_l),
    $$

    the energy's primitive being $\Phi = \sum_l s_l^\top W_l s_{l-1} + b_l^\top s_l$. With
    `loss="mse"` (default) the last layer is the output layer (`output_dim` units) and is
    nudged toward the one-hot target; with `loss="cross_entropy"` a feedforward readout reads
    the last hidden layer (Laborieux et al. 2021). EqProp's contrastive Hebbian update is exact
    here as $\beta \to 0$ (`"exact"`). The `"async"` schedule (even, then odd layers) is the
    default: it needs far fewer steps than the synchronous one.

    `activation` is one name for every layer, or one per layer (hidden layers first, then the
    output layer with `loss="mse"`), `"identity"` allowed: the deep Hopfield networks of Scellier
    et al. 2023 have a linear output layer, `("hard_sigmoid", "identity")`. A per-layer list runs
    on the Python loop (the op takes one activation).

    `nudge_position="outside"` adds the nudge after the activation,
    $s_{out} \leftarrow \rho(a_{out}) + \beta (y - s_{out})$: the discrete-time prototypical
    model of Ernoult et al. 2019 (with `schedule="sync"`, `activation="steep_sigmoid"`). Its
    EqProp update is the gradient of the loss with the output error divided by
    $\rho'(a_{out})$ ([`NUDGE_POSITIONS`][toreq.ops.relax.NUDGE_POSITIONS]): exact for the hard
    sigmoid away from its clamps, `"approximate"` for the smooth activations.

    Inputs of any per-sample shape (`(B, C, H, W)` images, say) are flattened to
    `input_dim` features.

    `memories={layer: M, ...}` gives layer `layer` (0-based over the layers above the input, the
    output layer included) a modern Hopfield interaction with `M` learned patterns
    ([`ModernHopfield`][toreq.nn.hopfield.ModernHopfield], temperature `memory_temperature`):
    its attention read-out joins the layer's input and its energy joins `Phi`, so EqProp stays
    exact. A network with memories runs on the Python loop.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], output_dim: int, *,
                 activation: str | Sequence[str] = "hard_sigmoid", loss: str = "mse",
                 max_steps: int = 40, tol: float = 1e-4, damping: float = 0.0,
                 schedule: str = "async", nudge_position: str = "inside",
                 memories: Mapping[int, int] | None = None, memory_temperature: float = 1.0,
                 solver: str = "auto") -> None:
        per_layer = not isinstance(activation, str)
        super().__init__(activation="hard_sigmoid" if per_layer else activation, loss=loss,
                         max_steps=max_steps, tol=tol, damping=damping, schedule=schedule,
                         solver=solver)
        check_layer_sizes("EPMLP", input_dim=input_dim, hidden_dims=list(hidden_dims),
                          output_dim=output_dim)
        self.nudge_position = check_choice("nudge_position", nudge_position, NUDGE_POSITIONS)
        widths = list(hidden_dims) + ([output_dim] if loss == "mse" else [])
        if per_layer:
            names = tuple(check_choice("activation", a, (*ACTIVATIONS, "identity"))
                          for a in activation)
            if len(names) != len(widths):
                raise ValueError(f"activation must be one name or one per layer ({len(widths)}: "
                                 f"the hidden layers and, with loss='mse', the output layer), "
                                 f"got {len(names)}")
            self.activation = names[0] if len(set(names)) == 1 else names
        self.input = nn.Linear(input_dim, widths[0])
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.readout = nn.Linear(widths[-1], output_dim) if loss == "cross_entropy" else None
        self.widths = widths
        self.memories = memory_modules(memories, [(n,) for n in widths], memory_temperature)

    @property
    def gradient_regime(self) -> str:
        r"""`"exact"` (as $\beta \to 0$) unless the nudge sits outside a smooth activation."""
        output = self.activation if isinstance(self.activation, str) else self.activation[-1]
        smooth = output not in ("hard_sigmoid", "identity")
        return "approximate" if self.nudge_position == "outside" and smooth else "exact"

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        """The parameters of each weight layer, input side first (the input projection, each
        coupling, the readout): what per-layer learning rates apply to."""
        layers = [self.input, *self.layers] + ([self.readout] if self.readout is not None else [])
        return [list(layer.parameters()) for layer in layers]

    def network(self, x: Tensor) -> Network:
        # images or any per-sample shape: the input layer sees them flattened
        rows = x.flatten(1) if x.dim() > 2 else x
        if rows.shape[-1] != self.input.in_features:
            raise ValueError(f"EPMLP expects x with {self.input.in_features} features per sample "
                             f"(of any shape, flattened), got shape {tuple(x.shape)}")
        x = rows
        couplings = []
        for i, layer in enumerate(self.layers):
            couplings += [Coupling(layer.weight, i + 1, i),
                          Coupling(layer.weight, i, i + 1, transposed=True)]
        drives = [self.input(x)] + [layer.bias for layer in self.layers]
        readout = (None, None) if self.readout is None else (self.readout.weight, self.readout.bias)
        return Network(couplings, drives, *readout, list(self.widths),
                       [(int(layer), memory) for layer, memory in self.memories.items()])


class SteepSigmoid(nn.Module):
    r"""$\sigma(4(x - \tfrac{1}{2}))$ as a module (the feedforward baseline's
    `"steep_sigmoid"`)."""

    def forward(self, x: Tensor) -> Tensor:
        return activate("steep_sigmoid", x)


class FeedforwardMLP(nn.Module):
    """A plain feedforward MLP: the backprop baseline of matched size."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], output_dim: int, *,
                 activation: str = "tanh") -> None:
        super().__init__()
        check_layer_sizes("FeedforwardMLP", input_dim=input_dim, hidden_dims=list(hidden_dims),
                          output_dim=output_dim)
        acts = {"tanh": nn.Tanh, "hard_sigmoid": lambda: nn.Hardtanh(0.0, 1.0),
                "sigmoid": nn.Sigmoid, "steep_sigmoid": SteepSigmoid, "relu": nn.ReLU}
        layers: list[nn.Module] = []
        for a, b in zip([input_dim, *hidden_dims], hidden_dims):
            layers += [nn.Linear(a, b), acts[activation]()]
        layers.append(nn.Linear(([input_dim, *hidden_dims])[-1], output_dim))
        self.net = nn.Sequential(*layers)

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        """The parameters of each linear layer, input side first."""
        return [list(m.parameters()) for m in self.net if isinstance(m, nn.Linear)]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
