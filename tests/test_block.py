"""EquilibriumBlock: gradients against BPTT and implicit differentiation, constant memory,
solvers, per-sample convergence, bad input, and a hybrid network that learns."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from block_cells import HopfieldCell, NaNCell
from toreq import utils
from toreq.data import load_digits
from toreq.diagnostics import compare, estimator_gradients
from toreq.nn import ConvergenceWarning, EquilibriumBlock


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def x():
    return torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def cubic_loss(s, _):
    return s.pow(3).sum() / s.shape[0]  # a loss whose gradient differs from sample to sample


def all_three(block, x, **options):
    """{method: {tensor: gradient}} of ``cubic_loss(block(x))``, relaxed to convergence."""
    return {m: estimator_gradients(block, x, None, m, loss_fn=cubic_loss, **options)
            for m in ("eqprop", "bptt", "implicit")}


@pytest.mark.parametrize("split", [True, False], ids=["tanh-outside-cell", "linear-cell"])
def test_symmetric_cell_matches_bptt_and_implicit(x, split):
    # tanh(U x + W s + b) with the nudge inside tanh, or the linear U x + W s + b with the nudge
    # added to the update: both have a symmetric dh/ds, so EqProp is exact as beta -> 0.
    block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh" if split else None)
    grads = all_three(block, x)
    assert set(grads["eqprop"]) == {"input", "cell.weight", "cell.input.weight", "cell.input.bias"}
    for name, ep in grads["eqprop"].items():
        assert compare(grads["implicit"][name], grads["bptt"][name]).relative_error < 1e-9, name
        assert compare(ep, grads["bptt"][name]).relative_error < 1e-6, name
        assert compare(ep, grads["implicit"][name]).cosine > 1 - 1e-10, name


def test_nonsymmetric_cell_is_an_approximation_that_improves_with_symmetry(x):
    errors = []
    for asymmetry in (1.0, 0.1, 0.01):
        block = EquilibriumBlock(HopfieldCell(4, 6, asymmetry=asymmetry), 6, activation="tanh")
        grads = all_three(block, x)
        # implicit differentiation is exact for every cell; EqProp replaces (I - J^T)^-1 by
        # (I - J)^-1, whose error is first order in the skew part of W
        weight = grads["implicit"]["cell.weight"], grads["bptt"]["cell.weight"]
        assert compare(*weight).relative_error < 1e-9
        errors.append(compare(grads["eqprop"]["input"], grads["bptt"]["input"]).relative_error)
    assert errors[0] > 0.05
    assert errors[0] > 5 * errors[1] > 25 * errors[2]
    assert errors[2] < 1e-2


def test_activation_inside_the_cell_gets_the_vector_field_approximation(x):
    # The same tanh network written as one cell: the nudge is added after tanh, J = D W is not
    # symmetric, and EqProp is only an approximation (the activation argument makes it exact).
    block = EquilibriumBlock(HopfieldCell(4, 6, activation=torch.tanh), 6)
    grads = all_three(block, x)
    bptt = grads["bptt"]["cell.weight"]
    assert compare(grads["eqprop"]["cell.weight"], bptt).relative_error > 1e-3
    assert compare(grads["implicit"]["cell.weight"], bptt).relative_error < 1e-9


@pytest.mark.parametrize("options,nudging", [
    (dict(damping=0.5), dict(beta=1e-4, symmetric=True)),
    (dict(solver="anderson"), dict(beta=1e-4, symmetric=True)),
    (dict(), dict(beta=1e-6, symmetric=False)),  # O(beta) bias: a smaller beta
])
def test_damping_solver_and_one_sided_nudging_keep_the_gradient(x, options, nudging):
    block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh", **options)
    reference = estimator_gradients(block, x, None, "bptt", loss_fn=cubic_loss)
    for method in ("eqprop", "implicit"):
        grads = estimator_gradients(block, x, None, method, loss_fn=cubic_loss, **nudging)
        for name, g in grads.items():
            assert compare(g, reference[name]).relative_error < 1e-5, (method, name)


def count_saved(block, x, steps):
    """Tensors saved for backward while the block relaxes ``steps`` steps, then the backward."""
    block.max_steps = steps
    saved = []
    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = block(x)
    s.sum().backward()
    return len(saved), sum(saved)


@pytest.mark.parametrize("gradient", ["eqprop", "implicit"])
def test_no_tensor_saved_during_relaxation(x, gradient):
    block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh", tol=0.0, gradient=gradient)
    x = x.clone().requires_grad_()
    few, many = count_saved(block, x, 10), count_saved(block, x, 200)
    assert block.last_steps.eq(200).all()  # tol=0: exactly max_steps steps
    assert few == many == (2, x.numel() + 5 * 6)  # x and s*, whatever the number of steps
    assert x.grad is not None and block.cell.weight.grad is not None


def test_bptt_saves_every_step(x):
    block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh", tol=0.0, gradient="bptt")
    (few, _), (many, _) = count_saved(block, x, 10), count_saved(block, x, 100)
    assert many > 8 * few  # the control: the count does grow with the steps when a graph is kept


def test_truncated_bptt_saves_only_its_steps(x):
    block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh", tol=0.0, gradient="bptt",
                             bptt_steps=3)
    assert count_saved(block, x, 10) == count_saved(block, x, 100)


def test_anderson_reaches_the_same_fixed_point_in_fewer_steps(x):
    cell = HopfieldCell(4, 16, norm=0.98, seed=3)  # slow contraction: plain iteration crawls
    states, steps = {}, {}
    for solver in ("iteration", "anderson"):
        block = EquilibriumBlock(cell, 16, activation="tanh", solver=solver, max_steps=5000,
                                 tol=1e-10)
        with torch.no_grad():
            states[solver] = block(x)
        steps[solver] = block.last_steps
        assert block.last_converged.all()
    torch.testing.assert_close(states["anderson"], states["iteration"], rtol=0, atol=1e-8)
    assert steps["anderson"].float().mean() < 0.5 * steps["iteration"].float().mean(), steps


def test_samples_converge_independently(x):
    block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh", tol=1e-8, max_steps=500)
    with torch.no_grad():
        batch = block(x)
        batch_steps = block.last_steps.clone()
        for i in range(x.shape[0]):
            alone = block(x[i:i + 1])
            # the same updates, whoever shares the batch (up to the GEMM's rounding)
            torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-12)
            assert block.last_steps[0] == batch_steps[i]
    assert batch_steps.unique().numel() > 1
    assert (block.last_residual < 1e-8).all() and block.last_converged.all()


def test_nonconvergence_warns_and_is_recorded(x):
    block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh", max_steps=3, tol=1e-12)
    with pytest.warns(ConvergenceWarning, match="free phase left samples unconverged after "
                                                "max_steps=3"):
        block(x)
    assert not block.last_converged.any() and block.last_steps.eq(3).all()
    block.tol = 0.0  # a fixed number of steps is not a failure to converge
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(x)


def test_nonfinite_state_and_input_raise(x):
    with pytest.raises(RuntimeError, match="NaN or Inf at step 3 in 5 of 5 samples"):
        EquilibriumBlock(NaNCell(), 4)(x.float())
    with pytest.raises(RuntimeError, match="NaN or Inf at step 3 in 5 of 5 samples"):
        EquilibriumBlock(NaNCell(), 4, tol=0.0, max_steps=6)(x.float())  # every step is checked
    bad = x.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="input x contains NaN or Inf"):
        EquilibriumBlock(HopfieldCell(4, 6), 6)(bad)


@pytest.mark.parametrize("options,message", [
    (dict(max_steps=0), "max_steps must be a positive int"),
    (dict(nudged_steps=2.5), "nudged_steps must be a positive int or None"),
    (dict(tol=-1e-3), "tol must be a finite float >= 0"),
    (dict(damping=1.0), r"damping must be in \[0, 1\)"),
    (dict(beta=0.0), "beta must be a finite float > 0"),
    (dict(solver="newton"), "solver must be one of"),
    (dict(gradient="adjoint"), "gradient must be one of"),
    (dict(gradient="bptt", solver="anderson"), "use solver='iteration'"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(bptt_steps=0), "bptt_steps must be a positive int or None"),
])
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        EquilibriumBlock(HopfieldCell(4, 6), 6, **options)


class Shrinking(nn.Module):
    def forward(self, x, s):
        return s[:, 1:]


def test_bad_arguments_raise(x):
    with pytest.raises(TypeError, match="cell must be an nn.Module"):
        EquilibriumBlock(lambda x, s: s, 6)
    with pytest.raises(ValueError, match="state_shape must be a positive int"):
        EquilibriumBlock(HopfieldCell(4, 6), 0)
    block = EquilibriumBlock(HopfieldCell(4, 6), 6)
    with pytest.raises(ValueError, match=r"state must have shape \(5, 6\)"):
        block(x, torch.zeros(5, 7, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"returned shape \(5, 5\) for a state of shape \(5, 6\)"):
        EquilibriumBlock(Shrinking(), 6)(x)
    block.solver = "fixed"  # options are checked again at every call
    with pytest.raises(ValueError, match="solver must be one of"):
        block(x)


def test_repr_shows_the_options():
    block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh", beta=0.1, solver="anderson")
    text = repr(block)
    for part in ("state_shape=(6,)", "activation=tanh", "gradient='eqprop'", "solver='anderson'",
                 "beta=0.1", "symmetric=True", "(cell): HopfieldCell"):
        assert part in text, text


def test_forward_is_the_same_fixed_point_in_every_mode(x):
    outputs = []
    for gradient in ("eqprop", "implicit", "bptt"):
        block = EquilibriumBlock(HopfieldCell(4, 6), 6, activation="tanh", gradient=gradient)
        outputs.append(block(x))
    with torch.no_grad():
        outputs.append(block(x))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=1e-12)


class Cell(nn.Module):
    """The pre-activation ``x + c W s + b`` of a recurrent layer (``x`` is already ``U x``), ``W``
    symmetric (EqProp exact) at spectral norm 1 and ``c = 0.8`` (the dynamics contract)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.recurrent = utils.spectral_norm(utils.symmetric(nn.Linear(n, n)))

    def forward(self, x, s):
        return x + 0.8 * self.recurrent(s)


@pytest.mark.parametrize("truncation", [None, 2])
def test_parametrized_cell_gets_its_gradients(truncation):
    # the relaxation runs without autograd, but the cached parametrized weight that the one-step
    # graph (EqProp, implicit) or the unrolled steps (BPTT) use must carry its graph
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), EquilibriumBlock(Cell(16), 16, activation="tanh"),
                          nn.Linear(16, 3)).double().eval()
    x, y = torch.rand(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    eqprop = estimator_gradients(model, x, y, "eqprop", truncation=truncation)
    bptt = estimator_gradients(model, x, y, "bptt", truncation=truncation)
    weight = "1.cell.recurrent.parametrizations.weight.original"
    assert eqprop[weight].abs().sum() > 0
    for name, g in eqprop.items():
        assert compare(g, bptt[name]).relative_error < 1e-6, name


def test_hybrid_network_learns_digits():
    data = load_digits()
    torch.manual_seed(0)
    block = EquilibriumBlock(Cell(32), 32, activation="tanh", max_steps=30, tol=1e-4, beta=0.1)
    model = nn.Sequential(nn.Linear(64, 32), block, nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.x_train[:640], data.y_train[:640]

    def test_loss():
        with torch.no_grad():
            out = model(data.x_test)
        accuracy = (out.argmax(1) == data.y_test).float().mean()
        return float(nn.functional.cross_entropy(out, data.y_test)), float(accuracy)

    before, _ = test_loss()
    for _ in range(3):
        for i in range(0, len(x), 32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            optimizer.step()
    after, accuracy = test_loss()
    assert after < 0.4 * before and accuracy > 0.85, (before, after, accuracy)
    weight = block.cell.recurrent.parametrizations.weight.original
    assert weight.grad.abs().sum() > 0  # the block's own weight learned by EqProp
