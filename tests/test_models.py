"""ModernEqProp and ConvEP: shapes, EqProp on digits, gradients against BPTT, lipschitz, errors."""

from __future__ import annotations

import pytest
import torch

from toreq.cli import main
from toreq.presets import build_model
from toreq.data import load_digits
from toreq.diagnostics import compare, estimator_gradients
from toreq.nn import ConvEP, ModernEqProp
from toreq.ops import activate
from toreq.train import EqPropTrainer, TrainingDiverged, fit
from toreq.utils import lipschitz


@pytest.fixture(scope="module")
def digits():
    return load_digits()


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name, data, seed=0, **options):
    torch.manual_seed(seed)
    if name == "modern":
        return ModernEqProp(data.input_dim, 32, data.num_classes, **options)
    return ConvEP(data.image_shape, [4, 8], data.num_classes, **options)


@pytest.mark.parametrize("name,shapes", [("modern", [(5, 32)]),
                                         ("conv", [(5, 4, 4, 4), (5, 8, 2, 2)])])
def test_forward_exposes_states_and_steps(name, shapes, digits):
    model = make(name, digits)
    out = model(digits.x_test[:5])
    assert out.shape == (5, 10)
    assert [tuple(s.shape) for s in model.last_states] == shapes
    assert model.last_steps.shape == (5,) and model.last_steps.dtype == torch.long
    assert (model.last_steps >= 1).all() and (model.last_steps <= model.max_steps).all()
    stopped_early = model.last_steps < model.max_steps
    assert (model.last_residual[stopped_early] < model.tol).all()
    assert torch.equal(out, model.output(model.last_states, model.network(digits.x_test[:5])))


def test_conv_ep_reads_flat_rows_as_images(digits):
    model = make("conv", digits)
    x = digits.x_test[:4]
    assert torch.equal(model(x), model(x.view(4, *digits.image_shape)))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 1, 8, 8\) or \(B, 64\)"):
        model(x[:, :63])


@pytest.mark.parametrize("name", ["modern", "conv"])
def test_each_sample_relaxes_as_if_alone(name, digits):
    model = make(name, digits).double().eval()  # eval: one spectral normalisation for all calls
    x = digits.x_test[:6].double()
    batch = model.relax(x)
    for b in range(6):
        alone = model.relax(x[b:b + 1])
        assert int(alone.steps) == int(batch.steps[b])
        for s_alone, s_batch in zip(alone.states, batch.states):
            torch.testing.assert_close(s_alone[0], s_batch[b], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,epochs,bar", [("modern", 3, 0.88), ("conv", 2, 0.65)])
def test_eqprop_learns_digits(name, epochs, bar, digits):
    torch.manual_seed(0)
    if name == "modern":
        model, lr = ModernEqProp(digits.input_dim, 64, digits.num_classes), 2e-3
    else:
        model, lr = ConvEP(digits.image_shape, [8, 16], digits.num_classes, max_steps=40), 5e-3
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=lr), beta=0.5)
    history = fit(trainer, digits.x_train, digits.y_train, digits.x_test, digits.y_test,
                  epochs=epochs, batch_size=32, progress=False)
    assert history[-1]["test_accuracy"] >= bar, history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def _saved_tensors_in_step(model, steps, data):
    model.tol = 0.0  # run every step
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), free_steps=steps,
                            nudged_steps=steps)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        trainer.step(data.x_train[:16], data.y_train[:16])
    return sum(saved)


@pytest.mark.parametrize("name", ["modern", "conv"])
def test_eqprop_step_keeps_no_graph_over_relaxation(name, digits):
    model = make(name, digits)
    assert _saved_tensors_in_step(model, 3, digits) == _saved_tensors_in_step(model, 30, digits)


def test_conv_ep_update_is_the_activation_of_the_primitive_gradient(digits):
    # s_l <- rho(dPhi/ds_l): checks the tied feedback (unpooling, transposed convolution, the
    # dense-to-conv reshape) against autograd of Phi
    torch.manual_seed(0)
    model = ConvEP((1, 8, 8), [3, 5], 4, hidden_dims=[6], loss="mse", schedule="sync").double()
    x = torch.rand(3, 64, dtype=torch.float64)
    net = model.network(x)
    states = [torch.rand_like(s).requires_grad_() for s in model.init_states(x, net)]
    grads = torch.autograd.grad(model.primitive(x, states, net), states)
    for new, grad in zip(model.step(x, states, net), grads):
        torch.testing.assert_close(new, activate("hard_sigmoid", grad), rtol=1e-12, atol=1e-12)


# With float64, phases relaxed to 1e-14 and symmetric nudging at beta = 1e-4, the tied energy
# model's update is exact up to O(beta^2) wherever no unit crosses a kink (the hard sigmoid's
# clamp, a pooling window's argmax) between the phases; measured relative errors are 1e-10 to
# 1e-7 here. A kink crossed costs percents (1e-3: up to 1.3e-2 on a trained network), which the
# 1e-6 bar would catch.
@pytest.mark.parametrize("activation,loss,options", [
    ("hard_sigmoid", "cross_entropy", {}),
    ("hard_sigmoid", "mse", {"hidden_dims": [12], "schedule": "sync"}),
    ("sigmoid", "cross_entropy", {"pool_size": 1}),
])
def test_conv_ep_matches_bptt(activation, loss, options, digits):
    torch.manual_seed(1)
    model = ConvEP(digits.image_shape, [4, 6], 10, activation=activation, loss=loss,
                   **options).double()
    assert model.gradient_regime == "exact"
    x, y = digits.x_train[:8].double(), digits.y_train[:8]
    eqprop = estimator_gradients(model, x, y, "eqprop", beta=1e-4)
    bptt = estimator_gradients(model, x, y, "bptt")
    for name in bptt:  # every parameter and the input
        result = compare(eqprop[name], bptt[name])
        assert result.cosine >= 0.99999 and result.relative_error <= 1e-6, (name, result)


def test_conv_ep_symmetric_nudging_error_is_second_order(digits):
    torch.manual_seed(1)
    model = ConvEP(digits.image_shape, [4, 6], 10, activation="sigmoid").double()
    x, y = digits.x_train[:8].double(), digits.y_train[:8]
    bptt = estimator_gradients(model, x, y, "bptt")["convs.0.weight"]
    errors = [compare(estimator_gradients(model, x, y, "eqprop", beta=beta)["convs.0.weight"],
                      bptt).relative_error for beta in (1e-1, 1e-2)]
    assert 50 < errors[0] / errors[1] < 200  # 10x smaller beta, ~100x smaller error


def test_modern_eqprop_is_the_vector_field_estimate(digits):
    torch.manual_seed(2)
    model = ModernEqProp(digits.input_dim, 12, 10, ffn_dim=20).double().eval()
    assert model.gradient_regime == "approximate"
    x, y = digits.x_train[:6].double(), digits.y_train[:6]
    eqprop = estimator_gradients(model, x, y, "eqprop", beta=1e-4)

    # the reference: v = (I - J)^{-1} g per sample with J = dT/dh at h*, then (1/B) v^T dT/dtheta
    net = model.network(x)
    h = model.relax(x, net, max_steps=10000, tol=1e-14).states[0]
    jacobian = torch.func.jacrev(lambda s: model.field(x, [s], net)[0])(h)
    eye = torch.eye(12, dtype=torch.float64)
    g = model.output_error(h, model.nudge(1.0, y, x, net, [h]), net)
    v = torch.stack([torch.linalg.solve(eye - jacobian[b, :, b], g[b]) for b in range(6)]) / 6
    model.zero_grad()
    torch.autograd.backward([model.field(x, [h], net)[0], model.loss(model.output([h], net), y)], [v, None])
    for name, p in model.named_parameters():
        assert compare(eqprop[name], p.grad).relative_error <= 1e-6, name

    # ... which is not backprop's gradient (J is not symmetric), but close to it in direction
    bptt = estimator_gradients(model, x, y, "bptt")
    implicit = estimator_gradients(model, x, y, "implicit")
    for name in ("input.weight", "ffn_in.parametrizations.weight.original"):
        assert compare(implicit[name], bptt[name]).relative_error <= 1e-8
        result = compare(eqprop[name], bptt[name])
        assert result.relative_error > 1e-2 and result.cosine > 0.8, (name, result)


def test_modern_eqprop_gate_changes_speed_not_equilibrium(digits):
    x, y = digits.x_train[:6].double(), digits.y_train[:6]
    runs = []
    for damping in (0.0, 0.6):
        model = make("modern", digits, damping=damping).double().eval()
        model(x)
        runs.append((model.last_states[0], int(model.last_steps.max()),
                     estimator_gradients(model, x, y, "eqprop", beta=1e-4)["input.weight"]))
    (h0, steps0, grad0), (h1, steps1, grad1) = runs
    torch.testing.assert_close(h0, h1, rtol=0, atol=1e-3)  # both within tol = 1e-4 of h*
    assert compare(grad1, grad0).relative_error <= 1e-6
    assert steps1 > steps0


def test_modern_eqprop_stays_contracting_after_training(digits):
    model = make("modern", digits)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), beta=0.5)
    fit(trainer, digits.x_train[:512], digits.y_train[:512], epochs=2, progress=False)
    model.eval()
    # |dT/dh| <= recurrent_scale by construction (spectral norms 1, |rho'| <= 1, |dLN/dh| <= 1)
    assert 0.0 < lipschitz(model, digits.x_test[:32]) <= model.recurrent_scale + 1e-3


def test_lipschitz_of_conv_ep_is_the_jacobians_spectral_norm(digits):
    model = make("conv", digits).double()
    x = digits.x_test[:1].double()
    net = model.network(x)
    states = model.relax(x, net).states
    shapes = [s.shape for s in states]
    sizes = [s.numel() for s in states]

    def flat_step(flat):
        parts = [p.view(shape) for p, shape in zip(flat.split(sizes), shapes)]
        return torch.cat([s.flatten() for s in model.step(x, parts, net)])

    jacobian = torch.func.jacrev(flat_step)(torch.cat([s.flatten() for s in states]).detach())
    expected = float(torch.linalg.matrix_norm(jacobian.detach(), ord=2))
    assert lipschitz(model, x, iterations=300) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("build,match", [
    (lambda: ModernEqProp(64, 0, 10), "hidden_dim must be >= 1"),
    (lambda: ModernEqProp(64, 32, 10, norm_eps=0.0), "norm_eps must be > 0"),
    (lambda: ModernEqProp(64, 32, 10, recurrent_scale=-1.0), "recurrent_scale must be > 0"),
    (lambda: ModernEqProp(64, 32, 10, damping=1.0), r"damping must be in \[0, 1\)"),
    (lambda: ModernEqProp(64, 32, 10, activation="relu"), "activation must be one of"),
    (lambda: ModernEqProp(64, 32, 10, loss="hinge"), "loss must be"),
    (lambda: ConvEP((8, 8), [4], 10), r"input_shape must be \(C, H, W\)"),
    (lambda: ConvEP((1, 8, 8), [], 10), "channels must list at least one"),
    (lambda: ConvEP((1, 8, 8), [4, 4, 4, 4], 10), "convolutional layer 3 would leave no pixels"),
    (lambda: ConvEP((1, 8, 8), [4], 10, activation="tanh"), "'tanh' takes negative values"),
    (lambda: ConvEP((1, 8, 8), [4], 10, schedule="random"), "schedule must be"),
    (lambda: ConvEP((1, 8, 8), [4], 10, max_steps=0), "max_steps must be a positive int"),
    (lambda: ConvEP((1, 8, 8), [4], 10, hidden_dims=[0]), "hidden_dims must be positive"),
])
def test_bad_constructor_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("name", ["modern", "conv"])
def test_divergence_is_reported_with_advice(name, digits):
    model = make(name, digits)
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=1e30), beta=0.5)
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        for i in range(0, 320, 32):
            trainer.step(digits.x_train[i:i + 32], digits.y_train[i:i + 32])


def test_nudged_phase_without_target_is_refused(digits):
    model = make("modern", digits)
    with pytest.raises(ValueError, match="needs a target"):
        model.relax(digits.x_test[:2], beta=0.5)


def test_command_line_builds_and_trains_both(capsys, digits):
    assert isinstance(build_model("modern_eqprop", 64, 10, 32), ModernEqProp)
    conv = build_model("conv_ep", 64, 10, 32, image_shape=(1, 8, 8), channels=[4, 8])
    assert isinstance(conv, ConvEP) and [c.out_channels for c in conv.convs] == [4, 8]
    with pytest.raises(ValueError, match="conv_ep needs image_shape"):
        build_model("conv_ep", 64, 10, 32)
    assert main(["train", "--model", "conv_ep", "--channels", "4,8", "--epochs", "1",
                 "--free-steps", "20", "--compare", "bptt", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "conv_ep (EqProp)" in out and "conv_ep (BPTT)" in out
