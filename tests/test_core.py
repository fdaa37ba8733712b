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


def test_a_user_solver_and_estimator_plug_into_the_trainer(monkeypatch):
    import toreq.estimators
    import toreq.solvers

    # registered for this test only: the registries are restored afterwards
    monkeypatch.setattr(toreq.solvers, "_REGISTRY", dict(toreq.solvers._REGISTRY))
    monkeypatch.setattr(toreq.estimators, "_REGISTRY", dict(toreq.estimators._REGISTRY))
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
    with pytest.raises(TypeError, match="estimator 'eqprop': unknown setting\(s\) 'betta'; accepted: beta"):
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


# ---------------------------------------------------------------- the field's other estimators
def _plain_relax(model, x, net, states, clamp=None, beta=0.0, rows=None, steps=3000):
    """A hand-written relaxation of an EPMLP (sync schedule), independent of the solvers."""
    s = [t.clone() for t in states]
    weights = [layer.weight for layer in model.layers]
    for _ in range(steps):
        new = []
        for l in range(len(s)):
            pre = (net.drives[0] if l == 0 else net.drives[l].expand_as(s[l])).clone()
            if l > 0:
                pre = pre + s[l - 1] @ weights[l - 1].T
            if l + 1 < len(s):
                pre = pre + s[l + 1] @ weights[l]
            if l == len(s) - 1 and beta:
                pre = pre - beta * (s[l] - rows)
            new.append(torch.tanh(pre))
        if clamp is not None:
            new[-1] = clamp
        s = new
    return [t.detach() for t in s]


def _hebbian_reference(model, x, a, b, delta):
    """-(1/(delta B)) (dPhi/dtheta(a) - dPhi/dtheta(b)) for an EPMLP, written out."""
    batch = x.shape[0]
    grads = {"input.weight": -((a[0] - b[0]).T @ x) / (delta * batch),
             "input.bias": -(a[0] - b[0]).sum(0) / (delta * batch)}
    for l in range(len(model.layers)):
        grads[f"layers.{l}.weight"] = -(a[l + 1].T @ a[l] - b[l + 1].T @ b[l]) / (delta * batch)
        grads[f"layers.{l}.bias"] = -(a[l + 1] - b[l + 1]).sum(0) / (delta * batch)
    return grads


@pytest.mark.parametrize("rule", ["cl", "cpl positive", "cpl negative", "cpl centered"])
def test_clamping_estimators_match_a_hand_written_reference(rule):
    from toreq.estimators import ContrastiveLearning, CoupledLearning

    torch.manual_seed(10)
    model = EPMLP(5, [6], 3, activation="tanh", schedule="sync").double()
    x, y = torch.rand(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    rows = torch.nn.functional.one_hot(y, 3).double()
    model.max_steps, model.tol = 3000, 0.0
    net = model.network(x)
    with torch.no_grad():
        free = _plain_relax(model, x, net, model.init_states(x, net))
        o, eta = free[-1], 0.3
        if rule == "cl":
            estimator, a, b, delta = ContrastiveLearning(), _plain_relax(model, x, net, free, rows), free, 1.0
        else:
            nudging = rule.split()[1]
            estimator = CoupledLearning(eta, nudging)
            plus = _plain_relax(model, x, net, free, o + eta * (rows - o))
            minus = _plain_relax(model, x, net, free, o - eta * (rows - o))
            a, b, delta = {"positive": (plus, free, eta), "negative": (free, minus, eta),
                           "centered": (plus, minus, 2 * eta)}[nudging]
        want = _hebbian_reference(model, x, a, b, delta)
    model.zero_grad(set_to_none=True)
    estimator.backward(model, x, y, model.network(x))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)
    assert not estimator.exact_for(model)


def test_coupled_and_contrastive_learning_point_downhill_but_are_not_exact():
    from toreq.estimators import ContrastiveLearning, CoupledLearning

    torch.manual_seed(11)
    model = EPMLP(5, [6], 3, activation="tanh", schedule="sync").double()
    x, y = torch.rand(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    exact = torch.cat([g.flatten() for g in _gradients(model, x, y, ImplicitDifferentiation()).values()])
    for estimator in (CoupledLearning(0.05, "centered"), CoupledLearning(0.5), ContrastiveLearning()):
        got = torch.cat([g.flatten() for g in _gradients(model, x, y, estimator).values()])
        c = compare(got, exact)
        assert c.cosine > 0.9 and c.relative_error > 1e-3, (estimator, c)


def test_holomorphic_eqprop_error_falls_with_the_points():
    from toreq.estimators import HolomorphicEqProp

    torch.manual_seed(0)
    model = EPMLP(5, [6, 4], 3, activation="tanh", schedule="sync").double().eval()
    x, y = torch.rand(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    exact = torch.cat([g.flatten() for g in _gradients(model, x, y, ImplicitDifferentiation()).values()])

    def error(estimator):
        got = torch.cat([g.flatten() for g in _gradients(model, x, y, estimator).values()])
        return compare(got, exact).relative_error

    errors = [error(HolomorphicEqProp(0.1, n)) for n in (2, 4, 6, 8)]
    assert all(a > 3 * b for a, b in zip(errors, errors[1:])), errors  # about |beta|^N
    assert errors[0] == pytest.approx(error(EqProp(0.1)), rel=1e-6)  # N = 2 is centered EqProp
    assert errors[-1] < 1e-3 < error(EqProp(0.1))
    assert error(HolomorphicEqProp(0.01, 4)) < 1e-5


def test_holomorphic_eqprop_refuses_what_is_not_holomorphic():
    from toreq.estimators import HolomorphicEqProp

    x, y = torch.rand(4, 5), torch.tensor([0, 1, 2, 0])
    hard = EPMLP(5, [6], 3)  # hard sigmoid
    with pytest.raises(ValueError, match=r"holomorphic activation, one of \('tanh', 'sigmoid', "
                                         r"'identity', 'steep_sigmoid'\); got 'hard_sigmoid'"):
        HolomorphicEqProp().backward(hard, x, y, hard.network(x))
    modern = __import__("toreq.nn", fromlist=["ModernEqProp"]).ModernEqProp(5, 6, 3)
    with pytest.raises(ValueError, match="needs dynamics with an energy"):
        HolomorphicEqProp().backward(modern, x, y, modern.network(x))
    with pytest.raises(ValueError, match="points must be an int >= 2"):
        HolomorphicEqProp(0.1, 1)


def test_clamping_needs_the_output_as_the_last_layer():
    from toreq.estimators import ContrastiveLearning

    model = LoopedMLP(5, 8, 3)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="reads its output through a readout"):
        ContrastiveLearning().backward(model, x, torch.tensor([0, 1, 2, 0]), model.network(x))


@pytest.mark.parametrize("name,settings", [
    ("eqprop", {"beta": 0.2, "nudging": "negative"}), ("cl", {}), ("cpl", {"eta": 0.5}),
    ("holomorphic", {"beta": 0.2, "points": 4}), ("implicit", {}), ("bptt", {"truncation": 10}),
])
def test_every_estimator_trains_through_the_trainer(name, settings):
    torch.manual_seed(12)
    x = torch.rand(64, 5)
    y = (x[:, 0] > x[:, 1]).long()
    model = EPMLP(5, [16], 2, activation="sigmoid", schedule="sync", max_steps=40)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=0.05),
                            estimator=get_estimator(name, **settings))
    first = trainer.step(x, y)
    for _ in range(30):
        last = trainer.step(x, y)
    assert last["loss"] < first["loss"], (name, first["loss"], last["loss"])


def test_the_trainer_keeps_a_given_estimators_beta():
    torch.manual_seed(13)
    model = LoopedMLP(5, 8, 3)
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                            estimator=EqProp(0.2, "positive"))
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    assert trainer.step(x, y)["beta"] == 0.2
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    EqProp(0.2, "positive").backward(model, x, y, model.network(x),
                                     free_settings=PhaseSettings(model.max_steps, model.tol))
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    scheduled = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                              estimator=EqProp(0.2), beta_schedule=lambda step: 0.05)
    assert scheduled.step(x, y)["beta"] == 0.05


def test_the_finite_checks_stop_nan_and_inf_but_not_large_finite_gradients():
    from toreq.errors import TrainingDiverged

    torch.manual_seed(14)
    model = LoopedMLP(5, 8, 3)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = EqPropTrainer(model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (float("nan"), float("inf")):
        hook = model.readout.weight.register_hook(lambda g: torch.full_like(g, bad))
        with pytest.raises(TrainingDiverged, match="the gradient of readout.weight holds NaN or Inf"):
            trainer.step(x, y)
        hook.remove()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # a gradient whose sum overflows float32 but whose entries are finite is not divergence
    hook = model.readout.weight.register_hook(lambda g: torch.full_like(g, 3e37))
    trainer.step(x, y)
    hook.remove()
