r"""The modern Hopfield interaction: a softmax (attention) energy term on one layer of a network.

A layer `s` (any shape, flattened per sample to `n` units) interacts with `M` stored patterns
`xi_1 .. xi_M` (the rows of a learned `M x n` matrix `Xi`) through the log-sum-exp energy of
modern Hopfield networks (Krotov & Hopfield 2016; Ramsauer et al. 2021; the `ModernHopfield`
interaction of the energy-based-learning library, Scellier et al. 2023):

$$
\Phi_{\mathrm{mem}}(s) = \tau \log \sum_{\mu=1}^{M} e^{\langle \xi_\mu, s \rangle / \tau},
\qquad
\frac{\partial \Phi_{\mathrm{mem}}}{\partial s} = \Xi^\top \mathrm{softmax}(\Xi s / \tau),
$$

added to the network's primitive function `Phi` (toreq's sign: the dynamics ascend `Phi`,
`s <- rho(dPhi/ds)`), so the layer's input gains the attention read-out of the patterns: the
retrieval step of a modern Hopfield network. `tau` is the temperature (the library's term is
`tau = 1`). Its Hessian `Xi^T (diag(p) - p p^T) Xi / tau` is symmetric, so the dynamics stay a
gradient system and EqProp stays exact as beta -> 0; the patterns' EqProp update is the
contrast of `dPhi_mem/dXi` between the phases (`p^T` times the state, per pattern), local to the
layer and its memory.

States may be complex (holomorphic EqProp): both functions are written with `exp` and `log` of
the scores shifted by their real maximum (a constant that cancels), which is the analytic
continuation of the real softmax and log-sum-exp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from toreq.validation import check_positive_float

__all__ = ["ModernHopfield", "memory_modules"]


class ModernHopfield(nn.Module):
    r"""A modern Hopfield interaction on one layer: `M` learned patterns and a log-sum-exp
    energy (see the module docstring).

    The models take it by layer (`EPMLP(..., memories={0: 256})`,
    `ConvEP(..., memories={2: 512})`); it can be built and used alone as well.

    Args:
        width: the layer's units per sample (`C * H * W` for a convolutional layer).
        num_patterns: `M`, the stored patterns.
        temperature: `tau`, > 0.
    """

    def __init__(self, width: int, num_patterns: int, temperature: float = 1.0) -> None:
        super().__init__()
        for name, value in (("width", width), ("num_patterns", num_patterns)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.temperature = check_positive_float("temperature", temperature)
        # Glorot-like scale: a state of O(1) units gives scores of O(1)
        self.patterns = nn.Parameter(torch.randn(num_patterns, width) / math.sqrt(width))

    def _scores(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`Xi` in the state's dtype, the shifted exponentials `e^{z - c}` and the shift `c`,
        for the scores `z = Xi s / tau` of each sample."""
        if state.dim() < 2 or state[0].numel() != self.patterns.shape[1]:
            raise ValueError(f"ModernHopfield expects states of {self.patterns.shape[1]} units per "
                             f"sample, got shape {tuple(state.shape)}")
        patterns = self.patterns.to(state.dtype)
        scores = state.flatten(1) @ patterns.T / self.temperature
        shift = scores.real.amax(dim=-1, keepdim=True).detach()
        return patterns, torch.exp(scores - shift), shift

    def field(self, state: Tensor) -> Tensor:
        """`dPhi_mem/ds = Xi^T softmax(Xi s / tau)`, in the state's shape."""
        patterns, exps, _ = self._scores(state)
        return ((exps / exps.sum(dim=-1, keepdim=True)) @ patterns).view_as(state)

    def energy(self, state: Tensor) -> Tensor:
        """`Phi_mem(s)` summed over the batch (a scalar)."""
        _, exps, shift = self._scores(state)
        return self.temperature * (torch.log(exps.sum(dim=-1)) + shift.squeeze(-1)).sum()

    def extra_repr(self) -> str:
        patterns, width = self.patterns.shape
        return f"width={width}, num_patterns={patterns}, temperature={self.temperature:g}"


def memory_modules(memories: Mapping[int, int] | None, shapes: Sequence[Sequence[int]],
                   temperature: float) -> nn.ModuleDict:
    """A model's modern Hopfield interactions from its `memories={layer: M}` option (or
    `(layer, M)` pairs): one
    [`ModernHopfield`][toreq.nn.hopfield.ModernHopfield] per named layer (`shapes` lists the
    model's state shapes per sample), keyed by the layer's index as a string."""
    modules = nn.ModuleDict()
    if memories is None:
        return modules
    if not isinstance(memories, Mapping):
        try:  # (layer, count) pairs: a preset's hashable form, or its JSON round trip
            memories = dict(memories)
        except (TypeError, ValueError):
            raise ValueError(f"memories must map layer indices to pattern counts, e.g. "
                             f"{{0: 256}}, got {memories!r}") from None
    for layer, count in sorted(memories.items(), key=lambda item: str(item[0])):
        if isinstance(layer, str) and layer.isdigit():
            layer = int(layer)  # a JSON object's key (a preset's model_options)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(shapes):
            raise ValueError(f"memories: layer must be an int in [0, {len(shapes)}) (the state "
                             f"layers), got {layer!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"memories: layer {layer} needs an int >= 1 of patterns, "
                             f"got {count!r}")
        modules[str(layer)] = ModernHopfield(math.prod(shapes[layer]), count, temperature)
    return modules
