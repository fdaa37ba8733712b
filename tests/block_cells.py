"""State-update cells for the EquilibriumBlock and diagnostics tests."""

from __future__ import annotations

import torch
from torch import nn


def scaled_weight(n: int, *, asymmetry: float, norm: float,
                  generator: torch.Generator) -> torch.Tensor:
    """``S + asymmetry * K`` (S symmetric, K skew, of one random matrix), spectral norm ``norm``."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    w = 0.5 * (a + a.T) + asymmetry * 0.5 * (a - a.T)
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


class HopfieldCell(nn.Module):
    """``cell(x, s) = U x + W s + b``: a pre-activation (use it with ``activation="tanh"``), or
    with ``activation`` set here the whole update ``rho(U x + W s + b)`` in one cell."""

    def __init__(self, n_in: int, n: int, *, asymmetry: float = 0.0, norm: float = 0.8,
                 seed: int = 0, activation=None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.input = nn.Linear(n_in, n).double()
        with torch.no_grad():
            weight = torch.randn(n, n_in, generator=gen, dtype=torch.float64)
            self.input.weight.copy_(weight / n_in ** 0.5)
            self.input.bias.copy_(0.1 * torch.randn(n, generator=gen, dtype=torch.float64))
        self.weight = nn.Parameter(scaled_weight(n, asymmetry=asymmetry, norm=norm, generator=gen))
        self.activation = activation

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        pre = self.input(x) + s @ self.weight.T
        return pre if self.activation is None else self.activation(pre)


class NaNCell(nn.Module):
    """Returns NaN from the third call on: a dynamics that blows up mid-relaxation."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = 0.5 * s + self.scale * x
        return out * float("nan") if self.calls >= 3 else out
