"""The papers' dynamics: the nudge outside the activation, the steep sigmoid, against BPTT."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from toreq.diagnostics import compare
from toreq.estimators import BPTT, EqProp, HolomorphicEqProp
from toreq.nn import EPMLP
from toreq.ops import activate
from toreq.presets import Preset, build_trainer, get_preset, train_preset
from toreq.solvers import Iteration
from toreq.train import BPTTTrainer, EqPropTrainer


def _gradients(model, x, y, estimator) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.max_steps, model.tol = 4000, 1e-14
    estimator.backward(model, x, y, model.network(x))
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _prototypical(activation: str, seed: int = 1) -> EPMLP:
    torch.manual_seed(seed)
    model = EPMLP(5, [6], 3, activation=activation, schedule="sync",
                  nudge_position="outside").double()
    if activation == "hard_sigmoid":  # small weights, biases at 1/2: every unit off its clamps
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.3)
            model.input.bias.add_(0.5)
            model.layers[0].bias.add_(0.5)
    return model


X = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 2, 1, 2])


def test_steep_sigmoid_is_the_papers_sigmoid():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert torch.allclose(activate("steep_sigmoid", x), 1 / (1 + torch.exp(-4 * (x - 0.5))),
                          rtol=0, atol=1e-15)


def test_outside_nudge_step_is_the_prototypical_model():
    """One nudged step against Ernoult et al.'s equations written out by hand:
    s_out <- rho(W2 s_h + b2) + beta (y - s_out), s_h <- rho(W1 x + b1 + W2^T s_out)."""
    model = _prototypical("steep_sigmoid")
    net = model.network(X)
    torch.manual_seed(5)
    states = [torch.rand(4, 6, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)]
    beta, rows = 0.3, torch.eye(3, dtype=torch.float64)[Y]
    got = model.step(X, states, net, model.nudge(beta, Y, X, net, states))
    w1, b1 = model.input.weight, model.input.bias
    w2, b2 = model.layers[0].weight, model.layers[0].bias
    rho = lambda a: 1 / (1 + torch.exp(-4 * (a - 0.5)))  # noqa: E731
    hidden = rho(X @ w1.T + b1 + states[1] @ w2)
    output = rho(states[0] @ w2.T + b2) + beta * (rows - states[1])
    torch.testing.assert_close(got[0], hidden, rtol=0, atol=1e-14)
    torch.testing.assert_close(got[1], output, rtol=0, atol=1e-14)
    # the inside nudge differs: it goes through the activation
    model.nudge_position = "inside"
    inside = model.step(X, states, net, model.nudge(beta, Y, X, net, states))
    assert (inside[1] - output).abs().max() > 1e-3


def test_outside_nudge_with_the_hard_sigmoid_is_exact():
    """rho' = 1 on unclamped outputs: the outside nudge is the inside one, EqProp is BPTT."""
    model = _prototypical("hard_sigmoid")
    free = model.relax(X, max_steps=4000, tol=1e-14).states
    assert all(bool(((s > 0.05) & (s < 0.95)).all()) for s in free)  # off the clamp edges
    assert model.gradient_regime == "exact"
    reference = _gradients(model, X, Y, BPTT(steps=400))
    got = _gradients(model, X, Y, EqProp(1e-4, "centered"))
    for name, want in reference.items():
        assert compare(got[name], want).relative_error <= 1e-6, name


def test_outside_nudge_with_a_smooth_activation_weights_the_error_by_one_over_rho_prime():
    """EqProp with the nudge outside the steep sigmoid is the gradient of <g, s_out*> with
    g = (s_out* - y) / rho'(a_out*), rho' = 4 s (1 - s); not BPTT's gradient of the MSE."""
    model = _prototypical("steep_sigmoid")
    assert model.gradient_regime == "approximate"
    got = _gradients(model, X, Y, EqProp(1e-4, "centered"))
    free = model.relax(X, max_steps=4000, tol=1e-14).states[-1]
    g = ((free - torch.eye(3, dtype=torch.float64)[Y]) / (4 * free * (1 - free))).detach()
    model.zero_grad(set_to_none=True)
    ((g * model.unrolled(X, 400)[-1]).sum() / X.shape[0]).backward()
    weighted = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    bptt = _gradients(model, X, Y, BPTT(steps=400))
    for name in weighted:
        assert compare(got[name], weighted[name]).relative_error <= 1e-6, name
        assert compare(got[name], bptt[name]).relative_error > 0.1, name


@pytest.mark.parametrize("activation", ["steep_sigmoid", "hard_sigmoid"])
def test_outside_nudge_gives_the_same_gradients_on_the_op_and_the_python_loop(activation):
    """The op (nudge_position='outside' in its element update) and the Python loop agree."""
    model = _prototypical(activation).float()
    x, estimator = X.float(), EqProp(0.1, "positive", nudged_steps=15)
    model.max_steps, model.tol = 40, 0.0
    auto = {}
    for solver in ("auto", "iteration"):
        model.solver = Iteration() if solver == "iteration" else model.solver
        model.zero_grad(set_to_none=True)
        estimator.backward(model, x, Y, model.network(x))
        auto[solver] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, want in auto["iteration"].items():
        torch.testing.assert_close(auto["auto"][name], want, rtol=1e-5, atol=1e-6)


def test_nudge_position_is_checked():
    with pytest.raises(ValueError, match="nudge_position"):
        EPMLP(5, [6], 3, nudge_position="after")


# ------------------------------------------------------------------ the papers' presets
def test_random_nudging_draws_both_signs_and_averages_to_the_centered_update():
    """Scellier & Bengio's random sign: each batch one-sided, +beta or -beta; the mean of the
    two one-sided updates is the centered one."""
    torch.manual_seed(2)
    model = EPMLP(5, [6], 3, activation="sigmoid", schedule="sync").double()
    model.max_steps, model.tol = 4000, 1e-14
    estimator = EqProp(1e-3, "random")
    phases = set()
    for seed in range(8):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        estimate = estimator.backward(model, X, Y, model.network(X))
        phases |= set(estimate.phases) - {"free"}
        assert len(estimate.phases) == 2  # the free phase and one nudged phase
    assert phases == {"positive", "negative"}
    one_sided = [_gradients(model, X, Y, EqProp(1e-3, n)) for n in ("positive", "negative")]
    centered = _gradients(model, X, Y, EqProp(1e-3, "centered"))
    for name, want in centered.items():
        mean = (one_sided[0][name] + one_sided[1][name]) / 2
        torch.testing.assert_close(mean, want, rtol=1e-6, atol=1e-12)


def test_the_papers_learning_rates_are_read_in_the_papers_order():
    """Ernoult et al.'s --lr_tab runs from the output layer down: P-1h's 0.04 is the output
    layer's rate, 0.08 the input layer's."""
    preset = get_preset("ernoult2019-p1h")
    model, trainer, scheduler = build_trainer(preset, 784, 10, method="eqprop")
    groups = trainer.optimizer.param_groups
    assert scheduler is None and isinstance(trainer.optimizer, torch.optim.SGD)
    assert groups[0]["lr"] == 0.08 and groups[0]["params"][0] is model.input.weight
    assert groups[1]["lr"] == 0.04 and groups[1]["params"][0] is model.layers[0].weight
    assert model.nudge_position == "outside" and model.activation == "steep_sigmoid"
    assert (model.schedule, model.tol, model.max_steps) == ("sync", 0.0, 40)
    with pytest.raises(ValueError, match=r"layer_lrs must hold one rate per weight layer of "
                                         r"EPMLP \(2\), got 3"):
        build_trainer(dataclasses.replace(preset, layer_lrs=(0.1, 0.1, 0.1)), 784, 10)
    with pytest.raises(ValueError, match="layer_lrs needs a model with per-layer parameters"):
        build_trainer(dataclasses.replace(get_preset("digits-looped"), layer_lrs=(0.1, 0.1)),
                      64, 10)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_trainer(dataclasses.replace(preset, optimizer="lbfgs"), 784, 10)


def test_the_bptt_baseline_backpropagates_through_the_last_k_plus_1_of_t_steps():
    preset = get_preset("ernoult2019-p1h")
    _, trainer, _ = build_trainer(preset, 784, 10, method="bptt")
    assert trainer.free_steps + trainer.estimator.truncation == preset.free_steps == 40
    assert trainer.estimator.truncation == 16  # K + 1 with K = 15
    with pytest.raises(ValueError, match=r"truncation must be below steps \(40\), got 40"):
        BPTTTrainer(EPMLP(5, [4], 3), torch.optim.SGD(EPMLP(5, [4], 3).parameters()),
                    steps=40, truncation=40)


def test_glorot_initialisation_and_the_preset_round_trip():
    preset = get_preset("scellier2017-1h")
    model, _, _ = build_trainer(preset, 784, 10, method="eqprop")
    bound = (6 / (784 + 500)) ** 0.5
    assert model.input.weight.abs().max() <= bound and model.input.weight.abs().max() > 0.9 * bound
    assert not model.input.bias.any() and not model.layers[0].bias.any()
    assert Preset.from_dict(json.loads(json.dumps(preset.as_dict()))) == preset


@pytest.mark.parametrize("name", ["ernoult2019-p1h", "laborieux2021-mlp", "scellier2017-1h"])
def test_a_quick_run_of_a_papers_preset_learns_mnist(name, mnist):
    """One epoch on 2,000 MNIST images (the real data, `$TOREQ_DATA`) already beats chance by
    far; the full runs are `benchmarks/accuracy.py --papers`."""
    data = dataclasses.replace(mnist, x_train=mnist.x_train[:2000], y_train=mnist.y_train[:2000],
                               x_test=mnist.x_test[:1000], y_test=mnist.y_test[:1000])
    run = train_preset(dataclasses.replace(get_preset(name), epochs=1), data, "eqprop", seed=0)
    assert run["test_accuracy"] >= 70.0, run["test_accuracy"]


# ------------------------------------------------------------------ per-layer activations
def test_per_layer_activations_match_bptt_and_a_hand_written_step():
    """A deep Hopfield network with a linear output layer (Scellier et al. 2023): hidden
    sigmoid, output identity. EqProp against BPTT in float64, and one step by hand."""
    torch.manual_seed(7)
    model = EPMLP(5, [6, 4], 3, activation=("sigmoid", "tanh", "identity"), schedule="sync",
                  damping=0.3).double()
    with torch.no_grad():  # a linear output layer contracts only with small enough weights
        model.layers[1].weight.mul_(0.5)
    assert model.activation == ("sigmoid", "tanh", "identity")
    assert model.gradient_regime == "exact" and not model.op_expresses(None)
    net = model.network(X)
    states = [torch.rand(4, n, dtype=torch.float64) for n in (6, 4, 3)]
    got = model.step(X, states, net)
    w0, w1, w2 = model.input.weight, model.layers[0].weight, model.layers[1].weight
    b0, b1, b2 = model.input.bias, model.layers[0].bias, model.layers[1].bias
    want = [torch.sigmoid(X @ w0.T + b0 + states[1] @ w1),
            torch.tanh(states[0] @ w1.T + b1 + states[2] @ w2),
            states[1] @ w2.T + b2]
    for g, w, s in zip(got, want, states):
        torch.testing.assert_close(g, 0.3 * s + 0.7 * w, rtol=0, atol=1e-14)
    reference = _gradients(model, X, Y, BPTT(steps=600))
    for estimator in (EqProp(1e-4, "centered"), HolomorphicEqProp(0.05, points=6)):
        got = _gradients(model, X, Y, estimator)
        for name, want in reference.items():
            assert compare(got[name], want).relative_error <= 1e-6, (estimator, name)


def test_per_layer_activations_are_checked():
    with pytest.raises(ValueError, match=r"one per layer \(2: the hidden layers and, with "
                                         r"loss='mse', the output layer\), got 3"):
        EPMLP(5, [6], 3, activation=("sigmoid", "tanh", "identity"))
    with pytest.raises(ValueError, match="activation must be one of"):
        EPMLP(5, [6], 3, activation=("sigmoid", "relu"))
    assert EPMLP(5, [6], 3, activation=("tanh", "tanh")).activation == "tanh"
    with pytest.raises(ValueError, match="holomorphic activation"):
        HolomorphicEqProp().check(EPMLP(5, [6], 3, activation=("hard_sigmoid", "identity")))


def test_the_fast_cifar10_preset_builds_the_libraries_network_and_initialisation():
    """scellier2023-cifar10-fast: four max-pooled convolutional layers and a linear output layer,
    weights within +-gain / sqrt(fan_in) (and reaching near it), biases within +-0.5 / sqrt(fan_in),
    the cosine schedule down to 2e-6."""
    preset = get_preset("scellier2023-cifar10-fast")
    model, trainer, scheduler = build_trainer(preset, 3072, 10, image_shape=(3, 32, 32))
    assert model.state_shapes == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2), (10,)]
    assert model.activation == ("hard_sigmoid",) * 4 + ("identity",)
    assert model.schedule == "async" and scheduler.eta_min == 2e-6
    for (weight, bias), gain in zip(model.layer_parameters(), preset.init_gains):
        fan_in = weight[0].numel()
        assert 0.95 * gain / fan_in ** 0.5 < weight.abs().max() <= gain / fan_in ** 0.5
        assert 0.5 * 0.5 / fan_in ** 0.5 < bias.abs().max() <= 0.5 / fan_in ** 0.5
    with pytest.raises(ValueError, match=r"init_gains, one per weight layer of ConvEP \(5\), got 2"):
        build_trainer(dataclasses.replace(preset, init_gains=(0.1, 0.2)), 3072, 10,
                      image_shape=(3, 32, 32))


@pytest.mark.filterwarnings("ignore::toreq.nn.ConvergenceWarning")
def test_deep_hopfield_networks_flatten_inputs_of_any_shape():
    """Images (B, 1, 8, 8) relax and train as their flattened rows do; a wrong size is named."""
    torch.manual_seed(8)
    model = EPMLP(64, [12], 10, activation=("sigmoid", "identity"))
    images = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(images), model(images.flatten(1)), rtol=0, atol=0)
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.isfinite(torch.tensor(trainer.step(images, torch.arange(5))["loss"]))
    with pytest.raises(ValueError, match=r"EPMLP expects x with 64 features per sample \(of any "
                                         r"shape, flattened\), got shape \(5, 1, 8, 7\)"):
        model(torch.rand(5, 1, 8, 7))


def test_the_hopfield_resnet13_preset_builds_the_named_configuration():
    """The preset and ConvEP.hopfield_resnet13 hold the same network (the two are written in two
    places: the preset's options and the class method's), at the preset's step cap."""
    from toreq.nn import ConvEP

    model, _, _ = build_trainer(get_preset("hopfield-resnet13-cifar10"), 3072, 10,
                                image_shape=(3, 32, 32))
    named = ConvEP.hopfield_resnet13()
    for attribute in ("state_shapes", "strides", "paddings", "conv_skips", "skips", "activation",
                      "poolings", "pool_size", "schedule", "max_steps", "loss_name"):
        assert getattr(model, attribute) == getattr(named, attribute), attribute
    assert [p.shape for p in model.parameters()] == [p.shape for p in named.parameters()]
