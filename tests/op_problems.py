"""Random relaxation problems shared by the op tests of every backend."""

from __future__ import annotations

import torch

from toreq.ops import Coupling, layered_couplings
from toreq.ops.relax import labels_to_rows


def scaled(rows: int, cols: int, dtype: torch.dtype, norm: float = 0.5) -> torch.Tensor:
    """A random matrix with spectral norm `norm`, so the dynamics contract."""
    w = torch.randn(rows, cols, dtype=dtype)
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


WIDTHS = {"looped": [9], "tied": [7, 6, 5], "untied": [7, 6, 5], "ring": [7, 6, 5],
          # Rows longer than one CUDA block (256 threads) and widths that are not warp multiples.
          "wide": [300, 257, 33],
          # A wide coupling beside narrow ones (10 units: the CPU kernel's loops), tied and not.
          "narrow": [300, 40, 10], "narrow_untied": [300, 40, 10]}


def make_problem(kind: str, batch: int, dtype: torch.dtype, *, readout: bool = False,
                 loss: str = "mse", seed: int = 0) -> dict:
    """A random network of the given kind on the CPU, as keyword arguments of relax()."""
    torch.manual_seed(seed)
    widths = WIDTHS[kind]
    if kind == "looped":
        couplings = [Coupling(scaled(9, 9, dtype), 0, 0)]
    else:
        weights = [scaled(widths[1], widths[0], dtype), scaled(widths[2], widths[1], dtype)]
        feedback = (None if kind in ("tied", "wide", "narrow")
                    else [scaled(widths[0], widths[1], dtype), scaled(widths[1], widths[2], dtype)])
        couplings = layered_couplings(weights, feedback)
        if kind == "ring":
            couplings.append(Coupling(scaled(widths[0], widths[2], dtype, 0.3), 0, 2))
    states = [torch.rand(batch, n, dtype=dtype) for n in widths]
    drives = [torch.randn(batch, widths[0], dtype=dtype)] + [
        torch.randn(n, dtype=dtype) * 0.1 for n in widths[1:]]
    n_out = 4 if readout else widths[-1]
    problem = dict(states=states, couplings=couplings, drives=drives, loss=loss)
    if readout:
        problem["readout_weight"] = torch.randn(n_out, widths[-1], dtype=dtype) * 0.5
        problem["readout_bias"] = torch.randn(n_out, dtype=dtype) * 0.1
    if loss == "gradient":
        problem["target"] = torch.randn(batch, widths[-1], dtype=dtype)
    else:
        problem["target"] = labels_to_rows(torch.randint(0, n_out, (batch,)), loss, n_out, dtype)
    return problem
