"""EqProp's gradients against backprop through time, in the cases where they are exact."""

from __future__ import annotations

import pytest
import torch

from toreq.diagnostics import compare, estimator_gradients
from toreq.nn import EPMLP, LoopedMLP


def eqprop_and_bptt(model, x, y, beta, symmetric=True):
    """Per tensor (EqProp gradient, BPTT gradient), everything relaxed to convergence."""
    model.eval()  # freezes spectral normalisation's power iteration: one weight for both methods
    eqprop = estimator_gradients(model, x, y, "eqprop", beta=beta, symmetric=symmetric)
    bptt = estimator_gradients(model, x, y, "bptt")
    return {name: (eqprop[name], bptt[name]) for name in eqprop}


def relative_error(a, b):
    return compare(a, b).relative_error


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.rand(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,))


def test_symmetric_looped_layer_matches_bptt(batch):
    x, y = batch
    torch.manual_seed(2)
    model = LoopedMLP(8, 7, 3, activation="tanh", symmetric=True).double()
    for name, (ep, bp) in eqprop_and_bptt(model, x, y, beta=1e-4).items():
        assert relative_error(ep, bp) <= 1e-6, name


def test_one_sided_error_is_first_order_and_symmetric_second_order(batch):
    x, y = batch
    torch.manual_seed(1)
    model = EPMLP(8, [7], 3, loss="mse", activation="tanh").double()

    def error(beta, symmetric):
        grads = eqprop_and_bptt(model, x, y, beta=beta, symmetric=symmetric)
        return relative_error(*grads["input.weight"])

    one_sided = [error(b, False) for b in (1e-2, 1e-3)]
    symmetric = [error(b, True) for b in (1e-2, 1e-3)]
    # 10x smaller beta: ~10x smaller error one-sided (O(beta)), ~100x symmetric (O(beta^2)).
    assert 5 < one_sided[0] / one_sided[1] < 20
    assert symmetric[0] / symmetric[1] > 50
    assert symmetric[0] < one_sided[0]


def test_nonsymmetric_looped_layer_approaches_exactness_with_symmetry(batch):
    x, y = batch
    torch.manual_seed(3)
    model = LoopedMLP(8, 7, 3, activation="tanh", symmetric=False, spectral_norm=False).double()
    a = torch.randn(7, 7, dtype=torch.float64)
    sym, skew = 0.5 * (a + a.T), 0.5 * (a - a.T)
    errors = []
    for asymmetry in (1.0, 0.1, 0.01):
        w = sym + asymmetry * skew
        with torch.no_grad():
            model.recurrent.weight.copy_(w * (0.8 / torch.linalg.matrix_norm(w, ord=2)) / model.recurrent_scale)
        grads = eqprop_and_bptt(model, x, y, beta=1e-4)
        errors.append(relative_error(*grads["input.weight"]))
    assert errors[0] > 1e-2           # an approximation away from symmetry
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2
