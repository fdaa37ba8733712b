"""toreq.diagnostics: gradient checks (BPTT, implicit, finite differences, GDD), step counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from block_cells import HopfieldCell
from toreq.data import load_digits
from toreq.diagnostics import (
    compare,
    correlation,
    estimator_gradients,
    gradient_check,
    steps_vs_difficulty,
)
from toreq.nn import EPMLP, EquilibriumBlock, LoopedMLP


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 8, dtype=torch.float64, generator=gen)
    return x, torch.randint(0, 3, (6,), generator=gen)


def hybrid(asymmetry=0.0, seed=0):
    torch.manual_seed(seed)
    cell = HopfieldCell(5, 6, asymmetry=asymmetry, seed=seed)
    block = EquilibriumBlock(cell, 6, activation="tanh")
    return nn.Sequential(nn.Linear(8, 5), block, nn.Linear(6, 3)).double()


def test_tied_layered_network_meets_the_bars(batch):
    x, y = batch
    torch.manual_seed(1)
    model = EPMLP(8, [7, 6], 3, loss="mse", activation="hard_sigmoid").double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # some units saturate, some do not
    result = gradient_check(model, x, y, beta=1e-4, symmetric=True, gdd_steps=3)
    names = {"input"} | {name for name, _ in model.named_parameters()}
    assert {t.name for t in result.tensors} == names
    for t in result.tensors:
        for against in (t.bptt, t.implicit):
            assert against.cosine >= 0.99999 and against.relative_error <= 1e-4, t
            assert against.sign_agreement == 1.0, t
        assert t.entries == 3 and t.finite_difference <= 1e-4, t
    worst = result.worst("bptt")
    assert worst.relative_error == max(t.bptt.relative_error for t in result.tensors)
    assert [p.step for p in result.gdd] == [1, 2, 3]
    table = str(result)
    assert all(f"| {name} |" in table for name in names) and "GDD" in table
    assert model.training  # restored after the check's eval mode


def test_one_sided_error_is_first_order_and_symmetric_second_order():
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    model = hybrid()

    def error(beta, symmetric):
        eqprop = estimator_gradients(model, x, y, "eqprop", beta=beta, symmetric=symmetric)
        bptt = estimator_gradients(model, x, y, "bptt")
        return compare(eqprop["1.cell.weight"], bptt["1.cell.weight"]).relative_error

    one_sided = [error(b, False) for b in (1e-2, 1e-3)]
    symmetric = [error(b, True) for b in (1e-2, 1e-3)]
    assert 5 < one_sided[0] / one_sided[1] < 20  # 10x smaller beta: 10x smaller error, O(beta)
    assert symmetric[0] / symmetric[1] > 50  # and 100x, O(beta^2)
    assert symmetric[0] < one_sided[0] / 10


def test_hybrid_network_with_a_symmetric_block_is_exact(batch):
    x, y = batch
    model = hybrid()
    result = gradient_check(model, x, y, gdd_steps=4)
    assert len(result.tensors) == 8  # input, two Linear layers, the cell's three tensors
    for t in result.tensors:
        assert t.bptt.relative_error < 1e-6 and t.implicit.relative_error < 1e-6, t
        assert t.finite_difference < 1e-6, t
    # a symmetric step Jacobian: EqProp after k nudged steps is BPTT truncated at k, every k
    assert all(p.relative_error < 1e-6 for p in result.gdd), result.gdd
    assert all(b.gradient == "eqprop" and b.max_steps == 50 for b in model.modules()
               if isinstance(b, EquilibriumBlock))  # the check restores the blocks' options


def test_checks_expose_an_inexact_estimator(batch):
    x, y = batch
    result = gradient_check(hybrid(asymmetry=1.0), x, y, gdd_steps=3)
    cell = next(t for t in result.tensors if t.name == "1.cell.weight")
    assert cell.bptt.relative_error > 0.05 and cell.finite_difference > 0.01
    assert cell.bptt.cosine < 0.999
    assert result.gdd[0].relative_error < 1e-6  # one step: (I - J)^0 = (I - J^T)^0
    assert result.gdd[2].relative_error > 1e-2  # then the asymmetry shows


def test_gdd_curve_approaches_the_full_gradient(batch):
    x, y = batch
    torch.manual_seed(2)
    model = LoopedMLP(8, 7, 3, activation="tanh").double().eval()
    full = estimator_gradients(model, x, y, "bptt")["recurrent.parametrizations.weight.original"]
    errors = []
    for k in (1, 5, 40):
        eqprop = estimator_gradients(model, x, y, "eqprop", truncation=k)
        bptt = estimator_gradients(model, x, y, "bptt", truncation=k)
        name = "recurrent.parametrizations.weight.original"
        assert compare(eqprop[name], bptt[name]).relative_error < 1e-6, k
        errors.append(compare(eqprop[name], full).relative_error)
    assert errors[0] > 0.1 and errors[0] > errors[1] > errors[2] and errors[2] < 1e-2


def test_gdd_holds_per_step_for_the_synchronous_schedule_only(batch):
    x, y = batch
    curves = {}
    for schedule in ("sync", "async"):
        torch.manual_seed(1)
        model = EPMLP(8, [7, 6], 3, loss="mse", activation="tanh", schedule=schedule).double()
        curves[schedule] = gradient_check(model, x, y, beta=1e-6, symmetric=False, fd_entries=0,
                                          gdd_steps=3).gdd
    assert all(p.relative_error < 1e-4 for p in curves["sync"]), curves["sync"]  # O(beta)
    assert curves["async"][0].relative_error > 0.1  # Gauss-Seidel: no symmetric step Jacobian


def test_bad_arguments_raise(batch):
    x, y = batch
    with pytest.raises(TypeError, match="contain EquilibriumBlocks, got Linear"):
        gradient_check(nn.Linear(8, 3), x, y)
    model = LoopedMLP(8, 7, 3).double()
    with pytest.raises(ValueError, match="beta must be a finite float > 0"):
        gradient_check(model, x, y, beta=0.0)
    with pytest.raises(ValueError, match="loss_fn applies to modules with EquilibriumBlocks"):
        gradient_check(model, x, y, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="fd_entries must be an int >= 0"):
        gradient_check(model, x, y, fd_entries=-1)
    with pytest.raises(ValueError, match="method must be one of"):
        estimator_gradients(model, x, y, "adjoint")
    with pytest.raises(ValueError, match="truncation must be a positive int"):
        estimator_gradients(model, x, y, "implicit", truncation=3)


def test_correlation_matches_scipy():
    from scipy import stats  # installed with scikit-learn, a dependency of toreq
    gen = torch.Generator().manual_seed(0)
    steps = torch.randint(5, 12, (200,), generator=gen)  # many ties
    difficulty = steps.double() + 3 * torch.randn(200, generator=gen, dtype=torch.float64)
    assert correlation(steps, difficulty, "spearman") == pytest.approx(
        stats.spearmanr(steps.numpy(), difficulty.numpy()).statistic, abs=1e-12)
    assert correlation(steps, difficulty, "pearson") == pytest.approx(
        stats.pearsonr(steps.double().numpy(), difficulty.numpy()).statistic, abs=1e-12)
    assert correlation(torch.arange(10), torch.arange(10) ** 3, "spearman") == pytest.approx(1.0)
    assert math.isnan(correlation(torch.ones(10), torch.arange(10.0)))
    with pytest.raises(ValueError, match="method must be 'spearman' or 'pearson'"):
        correlation(steps, difficulty, "kendall")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_steps_vs_difficulty_for_a_model(digits):
    torch.manual_seed(0)
    model = LoopedMLP(64, 32, 10, tol=1e-5, max_steps=100).eval()  # one weight for every call
    x, y = digits.x_test[:120], digits.y_test[:120]
    result = steps_vs_difficulty(model, x, y)
    assert torch.equal(result.steps, model.last_steps) and result.steps.unique().numel() > 1
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(result.difficulty, expected)
    assert result.correlation == pytest.approx(correlation(result.steps, expected), abs=1e-9)
    assert "Spearman correlation of relaxation steps with loss" in str(result)
    margin = steps_vs_difficulty(model, x, y, measure="margin", method="pearson")
    logits = model(x)
    true = logits[torch.arange(120), y]
    others = logits.clone()
    others[torch.arange(120), y] = -math.inf
    torch.testing.assert_close(margin.difficulty, others.max(dim=1).values - true)
    with pytest.raises(ValueError, match="measure must be 'loss' or 'margin'"):
        steps_vs_difficulty(model, x, y, measure="entropy")


def test_steps_vs_difficulty_for_a_block(digits):
    torch.manual_seed(0)
    block = EquilibriumBlock(HopfieldCell(32, 32).float(), 32, activation="tanh", tol=1e-5)
    model = nn.Sequential(nn.Linear(64, 32), block, nn.Linear(32, 10))
    x, y = digits.x_test[:100], digits.y_test[:100]
    result = steps_vs_difficulty(model, x, y)
    assert torch.equal(result.steps, block.last_steps) and result.steps.shape == (100,)
    assert -1.0 <= result.correlation <= 1.0
    second = EquilibriumBlock(HopfieldCell(10, 10).float(), 10, activation="tanh")
    two = nn.Sequential(model, second)
    with pytest.raises(ValueError, match="has 2 EquilibriumBlocks; pass block="):
        steps_vs_difficulty(two, x, y)
    assert torch.equal(steps_vs_difficulty(two, x, y, block=block).steps, block.last_steps)
    with pytest.raises(ValueError, match="contain an EquilibriumBlock"):
        steps_vs_difficulty(nn.Linear(64, 10), x, y)
