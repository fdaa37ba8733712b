"""The one equilibrium core: every estimator on every dynamics kind, solvers, warnings, plug-ins."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from toreq import utils
from toreq.diagnostics import compare, estimator_gradients
from toreq.errors import ConvergenceWarning, DivergenceError
from toreq.estimators import (BPTT, EqProp, Estimate, Estimator, ImplicitDifferentiation,
                              apply_contrast, get_estimator, register_estimator, run_free_phase)
from toreq.nn import ConvEP, EPMLP, EquilibriumBlock, LoopedMLP
from toreq.ops import iterate
from toreq.solvers import (Anderson, Iteration, PhaseSettings, Solver, Static, get_solver,
                           register_solver, solve_map)
from toreq.train import EqPropTrainer


def _looped():
    torch.manual_seed(0)
    return LoopedMLP(5, 7, 3, activation="tanh", loss="mse").double().eval()


def _layered():
    torch.manual_seed(1)
    return EPMLP(5, [6, 4], 3, activation="sigmoid", schedule="sync").double().eval()


def _conv():
    torch.manual_seed(2)
    # sigmoid and no pooling: no clamp edge or argmax to flip between the phases
    return ConvEP((1, 4, 4), [2], 3, pool_size=1, activation="sigmoid", loss="mse").double().eval()


MODELS = {"coupling (looped)": _looped, "coupling (layered)": _layered, "primitive (conv)": _conv}


def _gradients(model, x, y, estimator: Estimator) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    saved = model.max_steps, model.tol
    model.max_steps, model.tol = 5000, 1e-14
    try:
        net = model.network(x)
        estimator.backward(model, x, y, net)
    finally:
        model.max_steps, model.tol = saved
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", MODELS)
def test_every_estimator_matches_bptt_where_exact(kind):
    model = MODELS[kind]()
    torch.manual_seed(3)
    x = torch.rand(4, 16 if kind.startswith("primitive") else 5, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    reference = _gradients(model, x, y, BPTT(steps=400))
    estimates = {
        "centered": (EqProp(1e-4, "centered"), 1e-6),
        "positive": (EqProp(1e-4, "positive"), 1e-3),
        "negative": (EqProp(1e-4, "negative"), 1e-3),
        "implicit": (ImplicitDifferentiation(), 1e-6),
        "truncated bptt": (BPTT(truncation=300), 1e-6),
    }
    for name, (estimator, bound) in estimates.items():
        assert estimator.exact_for(model), name
        got = _gradients(model, x, y, estimator)
        for tensor, want in reference.items():
            error = compare(got[tensor], want).relative_error
            assert error <= bound, (name, tensor, error)
    # the one-sided estimates are biased O(beta), in opposite directions
    positive = _gradients(model, x, y, EqProp(1e-4, "positive"))
    negative = _gradients(model, x, y, EqProp(1e-4, "negative"))
    name = next(iter(reference))
    assert compare(positive[name], reference[name]).relative_error > 1e-9
    mean = (positive[name] + negative[name]) / 2
    assert compare(mean, reference[name]).relative_error <= 1e-6


class SymmetricCell(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.recurrent = utils.spectral_norm(utils.symmetric(nn.Linear(n, n)))

    def forward(self, x, s):
        return x + 0.7 * self.recurrent(s)


def test_cell_dynamics_estimators_match_bptt():
    torch.manual_seed(4)
    block = EquilibriumBlock(SymmetricCell(6), 6, activation="tanh", beta=1e-4, tol=1e-14,
                             max_steps=5000)
    model = nn.Sequential(nn.Linear(5, 6), block, nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    bptt = estimator_gradients(model, x, y, "bptt")
    for method in ("eqprop", "implicit"):
        got = estimator_gradients(model, x, y, method)
        for name, want in bptt.items():
            assert compare(got[name], want).relative_error <= 1e-6, (method, name)


def test_lower_beta_never_truncates_the_nudged_phases():
    """With the default tolerance, the nudged phases stop at tol * |beta|: the gradient is the
    one of tol = 0 with the same caps, for every beta."""
    torch.manual_seed(5)
    model = LoopedMLP(5, 16, 3).double()  # default tol 1e-4
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    for beta in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        grads = {}
        for tol in (model.tol, 0.0):
            saved = model.tol
            model.tol = tol
            model.zero_grad(set_to_none=True)
            EqProp(beta, nudged_steps=60).backward(
                model, x, y, model.network(x), free_settings=PhaseSettings(60, 0.0))
            model.tol = saved
            grads[tol] = torch.cat([p.grad.flatten() for p in model.parameters()])
        error = compare(grads[model.tol], grads[0.0]).relative_error
        assert error <= 1e-3, (beta, error)


def test_nudged_phases_stop_relative_to_beta():
    model = _looped()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    model.tol, model.max_steps = 1e-4, 500
    estimate = EqProp(1e-3).backward(model, x, y, model.network(x))
    assert estimate.tolerances["positive"] == pytest.approx(1e-7)
    assert estimate.phases["positive"].converged(1e-7).all()


def test_nonconvergence_warns_for_every_phase_and_is_counted():
    torch.manual_seed(6)
    model = LoopedMLP(5, 16, 3, max_steps=2, tol=1e-12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = EqPropTrainer(model, optimizer, beta=0.1, nudged_steps=1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.warns(ConvergenceWarning) as record:
        metrics = trainer.step(x, y)
    phases = {str(w.message).split(": ")[1].split(" left")[0] for w in record}
    assert phases == {"the free phase", "the +beta nudged phase", "the -beta nudged phase"}
    assert metrics["unconverged"] == 1.0 and metrics["nudged_unconverged"] == 2.0
    with pytest.warns(ConvergenceWarning, match="the free phase left samples unconverged"):
        model(x)
    model.tol = 0.0  # a fixed step count is not a failure to converge
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.step(x, y)


def test_one_divergence_error_for_every_solver():
    def blow_up(s):  # NaN once the state passes 2.5, at step 3
        return [torch.where(t > 2.5, torch.full_like(t, float("nan")), t + 1.0) for t in s]

    start = [torch.ones(3, 2)]
    settings = PhaseSettings(400, 0.0)
    for solver in (Iteration(), Anderson()):
        with pytest.raises(DivergenceError, match="NaN or Inf at step"):
            solve_map(solver, blow_up, start, settings, what="test")
    # the static mode cannot raise on values: a diverged state runs on into the output
    result = solve_map(Static(), blow_up, start, settings, what="test")
    assert not torch.isfinite(result.states[0]).all()


def test_static_mode_gives_the_eager_states_and_steps():
    model = _looped()
    x = torch.randn(6, 5, dtype=torch.float64)
    net = model.network(x)
    settings = PhaseSettings(40, 1e-6)
    eager = model.solve(x, net, model.init_states(x, net), None, settings, phase="free",
                        solver=Iteration())
    static = model.solve(x, net, model.init_states(x, net), None, settings, phase="free",
                         solver=Static())
    op = model.solve(x, net, model.init_states(x, net), None, settings, phase="free")
    assert torch.equal(eager.steps, static.steps) and torch.equal(eager.steps, op.steps)
    torch.testing.assert_close(eager.states[0], static.states[0], rtol=0, atol=0)
    torch.testing.assert_close(eager.states[0], op.states[0], rtol=1e-12, atol=1e-12)


def test_anderson_solves_every_model_kind():
    for make in MODELS.values():
        model = make()
        model.solver = get_solver("anderson", memory=3)
        x = torch.rand(3, 16 if isinstance(model, ConvEP) else 5, dtype=torch.float64)
        net = model.network(x)
        settings = PhaseSettings(2000, 1e-12)
        plain = model.solve(x, net, model.init_states(x, net), None, settings, phase="free",
                            solver=Iteration())
        fast = model.solve(x, net, model.init_states(x, net), None, settings, phase="free")
        for a, b in zip(plain.states, fast.states):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


class CountingSolver(Solver):
    """A user's solver: plain iteration that counts its calls."""

    name = "counting"
    calls = 0

    def solve(self, dynamics, x, net, states, nudge, settings, *, what, graph=False):
        CountingSolver.calls += 1
        return iterate(lambda s: dynamics.step(x, s, net, nudge), states,
                       max_steps=settings.max_steps, tol=settings.tol, graph=graph, what=what)


class SignOnly(Estimator):
    """A user's estimator: centered EqProp's phases, the update's sign only."""

    name = "sign_eqprop"

    def __init__(self, beta: float = 0.1) -> None:
        self.inner = EqProp(beta)

    def exact_for(self, dynamics) -> bool:
        return False

    def backward(self, model, x, y, net, *, free=None, beta=None, free_settings=None):
        free = run_free_phase(model, x, net, free_settings or model.free_settings)
        a, b, delta, run = self.inner.phases(model, x, net, free,
                                             lambda bt: model.nudge(bt, y, x, net, free.states))
        loss, output = apply_contrast(model, x, y, net, free, a, b, delta)
        for p in model.parameters():
            if p.grad is not None:
                p.grad = p.grad.sign()
        return Estimate(loss, output, {"free": free, **run},
                        {name: model.tol for name in ("free", *run)})


def test_a_user_solver_and_estimator_plug_into_the_trainer():
    register_solver("counting", CountingSolver)
    register_estimator("sign_eqprop", SignOnly)
    torch.manual_seed(7)
    model = LoopedMLP(5, 8, 3, solver="counting")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01),
                            estimator=get_estimator("sign_eqprop", beta=0.2))
    calls = CountingSolver.calls
    trainer.step(torch.randn(6, 5), torch.randint(0, 3, (6,)))
    assert CountingSolver.calls - calls == 3  # free, +beta, -beta
    for p, q in zip(before, model.parameters()):  # every entry moved by exactly lr (sign update)
        moved = (p - q.detach()).abs()
        assert torch.allclose(moved[moved > 0], torch.tensor(0.01))


def test_unknown_names_and_settings_are_refused():
    with pytest.raises(ValueError, match="solver must be one of"):
        LoopedMLP(5, 8, 3, solver="newton")
    with pytest.raises(ValueError, match="estimator must be one of"):
        get_estimator("backprop_magic")
    with pytest.raises(TypeError, match="unexpected keyword argument 'betta'"):
        get_estimator("eqprop", betta=0.1)
    with pytest.raises(ValueError, match="nudging must be one of"):
        EqProp(0.1, nudging="both")
    with pytest.raises(ValueError, match="beta must be a finite float > 0"):
        EqProp(0.0)


def test_trainer_trains_a_network_with_blocks():
    torch.manual_seed(8)
    block = EquilibriumBlock(SymmetricCell(16), 16, activation="tanh", beta=0.1, tol=1e-5)
    model = nn.Sequential(nn.Linear(5, 16), block, nn.Linear(16, 3))
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=0.02))
    first = trainer.step(x, y)["loss"]
    for _ in range(40):
        last = trainer.step(x, y)
    assert last["loss"] < 0.6 * first and last["free_steps_mean"] > 1


def test_gradient_check_has_an_absolute_floor():
    """A fully saturated layer: both gradients are zero up to round-off and must agree."""
    from toreq.diagnostics import gradient_check

    torch.manual_seed(9)
    model = EPMLP(5, [6, 4], 3, activation="hard_sigmoid", schedule="sync").double().eval()
    with torch.no_grad():
        model.layers[0].bias.fill_(50.0)  # the second hidden layer sits at 1, its slope 0
    x, y = torch.rand(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    check = gradient_check(model, x, y, fd_entries=0, gdd_steps=0)
    saturated = {t.name: t for t in check.tensors}["layers.0.bias"]
    assert saturated.bptt.cosine == 1.0 and saturated.bptt.relative_error == 0.0
    assert check.worst().relative_error <= 1e-6
    # without the floor two round-off vectors look unrelated
    assert compare(torch.tensor([1e-18, -2e-18]), torch.tensor([-3e-18, 1e-18])).cosine < 0
    assert compare(torch.tensor([1e-18, -2e-18]), torch.tensor([-3e-18, 1e-18]), 1e-12).cosine == 1
