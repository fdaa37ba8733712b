"""Models and trainers: learning on real data, no graph over relaxation, checkpoints, divergence."""

from __future__ import annotations

import pytest
import torch

from toreq.data import load_digits
from toreq.estimators import get_estimator
from toreq.nn import EPMLP, FeedforwardMLP, LoopedMLP, ToroidalMLP
from toreq.train import (
    BackpropTrainer,
    BPTTTrainer,
    EqPropTrainer,
    TrainingDiverged,
    evaluate,
    fit,
    load_checkpoint,
    save_checkpoint,
)
from toreq.utils import lipschitz


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def make(name, data, seed=0):
    torch.manual_seed(seed)
    d, c = data.input_dim, data.num_classes
    return {"looped": lambda: LoopedMLP(d, 64, c),
            "toroidal": lambda: ToroidalMLP(d, 48, c, num_layers=2),
            "ep": lambda: EPMLP(d, [64], c)}[name]()


@pytest.mark.parametrize("name", ["looped", "toroidal", "ep"])
def test_models_expose_states_and_steps(name, digits):
    model = make(name, digits)
    out = model(digits.x_test[:5])
    assert out.shape == (5, 10)
    assert len(model.last_states) >= 1 and model.last_states[0].shape[0] == 5
    assert model.last_steps.shape == (5,) and model.last_steps.dtype == torch.long
    assert (model.last_steps >= 1).all() and (model.last_steps <= model.max_steps).all()


@pytest.mark.parametrize("name,bar", [("looped", 0.93), ("ep", 0.90), ("toroidal", 0.85)])
def test_eqprop_learns_digits(name, bar, digits):
    model = make(name, digits)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=2e-3), beta=0.5)
    history = fit(trainer, digits.x_train, digits.y_train, digits.x_test, digits.y_test,
                  epochs=4, batch_size=32, progress=False)
    assert history[-1]["test_accuracy"] >= bar, history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_baselines_learn_digits(digits):
    torch.manual_seed(0)
    mlp = FeedforwardMLP(64, [64], 10)
    history = fit(BackpropTrainer(mlp, torch.optim.Adam(mlp.parameters(), lr=2e-3)),
                  digits.x_train, digits.y_train, digits.x_test, digits.y_test, epochs=3,
                  batch_size=32, progress=False)
    assert history[-1]["test_accuracy"] >= 0.9
    model = make("looped", digits)
    history = fit(BPTTTrainer(model, torch.optim.Adam(model.parameters(), lr=2e-3), steps=15),
                  digits.x_train, digits.y_train, digits.x_test, digits.y_test, epochs=3,
                  batch_size=32, progress=False)
    assert history[-1]["test_accuracy"] >= 0.9


def _saved_tensors_in_step(free_steps, digits):
    model = make("looped", digits)
    model.tol = 0.0  # run every step
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01),
                            free_steps=free_steps, nudged_steps=free_steps)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        trainer.step(digits.x_train[:16], digits.y_train[:16])
    return sum(saved)


def test_eqprop_step_keeps_no_graph_over_relaxation(digits):
    # Only the input projection, readout and weight parametrizations save tensors for backward;
    # nothing scales with the number of relaxation steps.
    assert _saved_tensors_in_step(5, digits) == _saved_tensors_in_step(50, digits)


def test_eqprop_gradients_go_into_grad(digits):
    model = make("ep", digits)
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0))
    metrics = trainer.step(digits.x_train[:8], digits.y_train[:8])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())
    assert set(metrics) >= {"loss", "accuracy", "free_steps_mean", "free_steps_max"}


def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path, digits):
    x, y = digits.x_train[:256], digits.y_train[:256]

    def trainer():
        model = make("looped", digits, seed=3)
        return EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-3))

    full = fit(trainer(), x, y, epochs=4, batch_size=32, seed=7, progress=False)
    ckpt = tmp_path / "run.pt"
    fit(trainer(), x, y, epochs=2, batch_size=32, seed=7, progress=False, checkpoint=ckpt)
    resumed = fit(trainer(), x, y, epochs=4, batch_size=32, seed=7, progress=False,
                  checkpoint=ckpt, resume=True)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]


@pytest.mark.parametrize("name,settings", [
    ("eqprop", {"beta": 0.2, "nudging": "centered"}), ("eqprop", {"beta": 0.2, "nudging": "random"}),
    ("cl", {}), ("cpl", {"eta": 0.5, "nudging": "centered"}),
    ("holomorphic", {"beta": 0.2, "points": 4}), ("implicit", {}), ("bptt", {"truncation": 5}),
])
def test_every_estimator_resumes_exactly(tmp_path, digits, name, settings, one_thread):
    """A run stopped after one epoch and resumed from its checkpoint reproduces the
    uninterrupted run, losses and weights, bit for bit (random nudging's draws included)."""
    x, y = digits.x_train[:96], digits.y_train[:96]

    def trainer():
        torch.manual_seed(5)
        model = EPMLP(digits.input_dim, [12], digits.num_classes, activation="sigmoid",
                      schedule="sync", max_steps=20)
        return EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2),
                             estimator=get_estimator(name, **settings))

    uninterrupted = trainer()
    full = fit(uninterrupted, x, y, epochs=2, batch_size=32, seed=7, progress=False)
    ckpt = tmp_path / "run.pt"
    fit(trainer(), x, y, epochs=1, batch_size=32, seed=7, progress=False, checkpoint=ckpt)
    resumed_trainer = trainer()
    resumed = fit(resumed_trainer, x, y, epochs=2, batch_size=32, seed=7, progress=False,
                  checkpoint=ckpt, resume=True)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full], name
    for a, b in zip(resumed_trainer.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(a, b), name


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, digits, monkeypatch):
    model = make("looped", digits)
    tr = EqPropTrainer(model, torch.optim.Adam(model.parameters()))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, tr, 1, [{"epoch": 1}])
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, tr, 2, [])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path, digits):
    model = make("looped", digits)
    tr = EqPropTrainer(model, torch.optim.Adam(model.parameters()))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, tr, 1, [])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        load_checkpoint(path, tr)


def test_checkpoint_of_another_model_or_missing_gets_a_clear_error(tmp_path, digits):
    looped = make("looped", digits)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, EqPropTrainer(looped, torch.optim.Adam(looped.parameters())), 1, [])
    ep = make("ep", digits)
    with pytest.raises(RuntimeError, match=r"holds a LoopedMLP, 1 epoch\(s\).*does not fit this "
                                           r"EPMLP: 2 weight\(s\) missing \(e.g. 'layers.0.weight'\)"):
        load_checkpoint(path, EqPropTrainer(ep, torch.optim.Adam(ep.parameters())))
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt",
                        EqPropTrainer(ep, torch.optim.Adam(ep.parameters())))


def test_divergence_is_reported_with_advice(digits):
    model = make("looped", digits)
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=1e30), beta=0.5)
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        for i in range(0, 320, 32):
            trainer.step(digits.x_train[i:i + 32], digits.y_train[i:i + 32])


def _steps_until_diverged(trainer, digits, steps=20):
    """Runs steps until TrainingDiverged; returns it and whether the failing step kept the
    parameters (it must not apply a diverged update)."""
    params = list(trainer.model.parameters())
    for i in range(0, 32 * steps, 32):
        before = [p.detach().clone() for p in params]
        try:
            trainer.step(digits.x_train[i:i + 32], digits.y_train[i:i + 32])
        except TrainingDiverged as error:
            return error, all(torch.equal(b, p) for b, p in zip(before, params))
    raise AssertionError(f"no TrainingDiverged in {steps} steps")


def test_exploding_loss_is_divergence_before_it_reaches_inf(digits):
    # lr = 1000 never makes a NaN or Inf: the loss climbs to ~1e4 and training goes on uselessly.
    model = make("looped", digits)
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=1e3), beta=0.5)
    error, kept = _steps_until_diverged(trainer, digits)
    assert "max_loss_ratio = 1000" in str(error)
    assert "lower the learning rate (now 1000.0)" in str(error)
    assert kept
    model = make("looped", digits)  # without the check the same run goes on, still finite
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=1e3), beta=0.5,
                            max_loss_ratio=None)
    losses = [trainer.step(digits.x_train[i:i + 32], digits.y_train[i:i + 32])["loss"]
              for i in range(0, 128, 32)]
    assert max(losses) > 1e3 * losses[0] and max(losses) < float("inf")


def test_optimizer_overflow_is_divergence(digits):
    # Adam's step size lr / (1 - beta1^t) does not fit float32: torch raises a bare RuntimeError.
    model = make("ep", digits)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=1e38))
    error, _ = _steps_until_diverged(trainer, digits)
    assert "optimizer step overflowed" in str(error) and "lower the learning rate" in str(error)


def test_non_finite_gradient_stops_before_the_update(digits):
    model = make("looped", digits)
    model.readout.weight.register_hook(lambda grad: grad * float("nan"))
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    error, kept = _steps_until_diverged(trainer, digits, steps=1)
    assert "the gradient of readout.weight holds NaN or Inf" in str(error) and kept


def test_huge_beta_is_divergence(digits):
    # Up to float32's range a huge beta only saturates the nudged phase; beyond it the nudge
    # cannot be represented (torch used to raise "value cannot be converted to type float").
    model = make("ep", digits)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters()), beta=1e39)
    error, kept = _steps_until_diverged(trainer, digits, steps=1)
    assert "beta = 1e+39 overflows torch.float32" in str(error) and "lower beta" in str(error)
    model = make("ep", digits)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters()),
                            beta_schedule=lambda step: 0.5 * 1e20 ** step)
    error, kept = _steps_until_diverged(trainer, digits, steps=5)
    assert trainer.steps_done == 2 and "lower the betas of beta_schedule" in str(error) and kept


def test_spectral_norm_keeps_looped_model_contracting(digits):
    model = make("looped", digits)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=5e-3))
    fit(trainer, digits.x_train[:512], digits.y_train[:512], epochs=2, progress=False)
    model.eval()
    assert lipschitz(model, digits.x_test[:32]) < 1.0
    assert evaluate(model, digits.x_test, digits.y_test)["steps_mean"] < model.max_steps


def test_deterministic_runs_are_identical(digits):
    def run():
        torch.manual_seed(3)
        model = LoopedMLP(64, 32, 10)
        trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=2e-3), beta=0.2)
        history = fit(trainer, digits.x_train[:256], digits.y_train[:256], epochs=2,
                      batch_size=32, seed=5, progress=False, deterministic=True)
        return [h["train_loss"] for h in history], [p.detach().clone() for p in model.parameters()]

    assert not torch.are_deterministic_algorithms_enabled()
    (losses_a, params_a), (losses_b, params_b) = run(), run()
    assert not torch.are_deterministic_algorithms_enabled()  # restored after fit
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_persistent_states_cut_the_free_steps_and_resume_exactly(tmp_path, digits, one_thread):
    """Each sample's free phase starts from its own last equilibrium (Scellier & Bengio's
    persistent particles): on the digits, after the first epoch, far fewer steps reach the
    tolerance; a resumed run restores the stored states and reproduces the uninterrupted run."""
    def trainer():
        torch.manual_seed(0)
        model = EPMLP(digits.input_dim, [64], digits.num_classes, max_steps=100,
                      schedule="sync", damping=0.5)
        return EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.02), beta=0.5)

    x, y = digits.x_train[:512], digits.y_train[:512]
    plain = fit(trainer(), x, y, epochs=4, batch_size=32, seed=1, progress=False)
    persistent = fit(trainer(), x, y, epochs=4, batch_size=32, seed=1, progress=False,
                     persistent=True)
    assert persistent[0]["train_free_steps_mean"] == plain[0]["train_free_steps_mean"]
    assert persistent[-1]["train_free_steps_mean"] < 0.8 * plain[-1]["train_free_steps_mean"]
    ckpt = tmp_path / "run.pt"
    fit(trainer(), x, y, epochs=2, batch_size=32, seed=1, progress=False, checkpoint=ckpt,
        persistent=True)
    resumed = fit(trainer(), x, y, epochs=4, batch_size=32, seed=1, progress=False,
                  checkpoint=ckpt, resume=True, persistent=True)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in persistent]
    with pytest.raises(ValueError, match="persistent=True needs an EqPropTrainer"):
        model = FeedforwardMLP(digits.input_dim, [8], digits.num_classes)
        fit(BackpropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1)), x, y,
            epochs=1, progress=False, persistent=True)
