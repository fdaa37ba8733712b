"""Parametrizations that keep equilibrium dynamics well-behaved, and a contraction estimate."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _torch_spectral_norm

__all__ = ["Symmetric", "lipschitz", "spectral_norm", "symmetric"]


class Symmetric(nn.Module):
    r"""$W = (A + A^\top) / 2$: a symmetric recurrent weight makes vector-field EqProp exact."""

    def forward(self, a: Tensor) -> Tensor:
        return 0.5 * (a + a.T)

    def right_inverse(self, w: Tensor) -> Tensor:
        return 0.5 * (w + w.T)


def symmetric(module: nn.Module, name: str = "weight") -> nn.Module:
    """Parametrizes `module.<name>` (square) as a symmetric matrix; returns the module."""
    weight = getattr(module, name)
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"symmetric() needs a square matrix, got shape {tuple(weight.shape)}")
    parametrize.register_parametrization(module, name, Symmetric())
    return module


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1) -> nn.Module:
    """Parametrizes `module.<name>` to spectral norm 1 (`torch.nn.utils.parametrizations`).

    With activations of slope at most 1 (hard sigmoid, tanh; sigmoid's is 1/4) and a spectral
    norm below 1 for the recurrent weights, the dynamics is a contraction: the fixed point
    exists, is unique, and relaxation finds it. Training without it can destroy the contraction
    (the earlier prototype saw a Lipschitz constant grow from 0.74 to 20.75).
    """
    return _torch_spectral_norm(module, name=name, n_power_iterations=n_power_iterations)


def lipschitz(model, x: Tensor, iterations: int = 30) -> float:
    r"""An estimate of the contraction constant of a model's dynamics at its free equilibrium.

    Returns the largest, over the batch `x`, spectral norm of the Jacobian `dF/ds` of one
    relaxation step (`model.step`, all layers' states together) at the free fixed point,
    found by power iteration on $J^\top J$ with forward- and reverse-mode products. Below 1 the
    dynamics contract near the equilibrium. Works for every
    [`EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel], whatever the shapes of its states
    (convolutional states included).
    """
    with torch.no_grad():
        net = model.network(x)
        states = model.relax(x, net).states

    def step(*s: Tensor) -> tuple[Tensor, ...]:
        return tuple(model.step(x, list(s), net))

    def per_sample_norm(vs) -> Tensor:
        return torch.sqrt(sum(v.pow(2).flatten(1).sum(dim=1) for v in vs)).clamp_min(1e-30)

    vs = [torch.randn_like(s) for s in states]
    sigma = torch.zeros(x.shape[0], dtype=x.dtype)
    for _ in range(iterations):
        norm = per_sample_norm(vs)
        vs = [v / norm.view(-1, *[1] * (v.dim() - 1)) for v in vs]
        _, jv = torch.func.jvp(step, tuple(states), tuple(vs))
        sigma = per_sample_norm(jv).detach()
        _, vjp = torch.func.vjp(step, *states)
        # a model's net may hold parameters themselves (biases): cut their graph every round
        vs = [v.detach() for v in vjp(tuple(jv))]
    return float(sigma.max())
