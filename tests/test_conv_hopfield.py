"""Convolutional Hopfield networks (ConvEP's poolings and skips): the step against a reference
written independently, EqProp against BPTT, shapes, errors, a CIFAR-shaped run, export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from toreq.diagnostics import compare
from toreq.estimators import BPTT, EqProp
from toreq.export import export_model
from toreq.nn import ConvEP
from toreq.train import EqPropTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the reference, by windows
# The pooling windows through F.unfold / F.fold (the model uses reshapes), the skips' transpose
# through nearest-neighbour upsampling (the model spreads windows).
def _columns(z, size):
    b, c = z.shape[:2]
    return F.unfold(z, size, stride=size).view(b, c, size * size, -1)


def _fold(columns, size, shape):
    b, c = columns.shape[:2]
    return F.fold(columns.reshape(b, c * size * size, -1), tuple(shape), size, stride=size)


def reference_pool(kind, z, size, tau):
    """`P(z)` and `J_P(z)^T` as a function."""
    b, c, h, w = z.shape
    cols = _columns(z, size)
    if kind == "max":
        weights = F.one_hot(cols.argmax(dim=2), size * size).transpose(2, 3).to(z.dtype)
        value = cols.max(dim=2).values
    elif kind == "avg":
        weights = torch.full_like(cols, 1.0 / (size * size))
        value = cols.mean(dim=2)
    else:
        weights = torch.softmax(cols / tau, dim=2)
        value = tau * (torch.logsumexp(cols / tau, dim=2) - math.log(size * size))
    shape = (b, c, h // size, w // size)
    return value.view(shape), lambda u: _fold(weights * u.flatten(2).unsqueeze(2), size, (h, w))


def reference_skip(i, j, model, states):
    """`S_ij s_i` and `S_ij^T s_j`."""
    c_i, c_j = states[i].shape[1], states[j].shape[1]
    k = states[i].shape[-1] // states[j].shape[-1]
    forward = torch.zeros_like(states[j])
    forward[:, :c_i] = F.avg_pool2d(states[i], k)
    transpose = F.interpolate(states[j][:, :c_i], scale_factor=k, mode="nearest") / k ** 2
    return forward, transpose


def reference_step(model, x, states):
    """One synchronous free step of a ConvEP of convolutional layers and a readout."""
    convs, s = model.convs, states
    pres, feedback = [], []
    for layer, conv in enumerate(convs):
        z = F.conv2d(x if layer == 0 else s[layer - 1], conv.weight, conv.bias,
                     padding=model.paddings[layer])
        value, transpose = reference_pool(model.poolings[layer], z, model.pool_size,
                                          model.pool_temperature)
        pres.append(value)
        feedback.append(transpose)
    for layer in range(len(convs) - 1):
        above = convs[layer + 1]
        pres[layer] = pres[layer] + F.conv_transpose2d(feedback[layer + 1](s[layer + 1]),
                                                       above.weight, padding=above.padding)
    for i, j in model.skips:
        forward, transpose = reference_skip(i, j, model, s)
        pres[j], pres[i] = pres[j] + forward, pres[i] + transpose
    return [torch.sigmoid(p) for p in pres]


STEP_CASES = {
    "max": dict(pooling="max"),
    "avg": dict(pooling="avg"),
    "soft": dict(pooling="soft", pool_temperature=0.7),
    "avg then soft": dict(pooling=("avg", "soft")),
    "skip": dict(pooling="avg", skips=((0, 1),)),
    "skip, channel padding, no pooling": dict(pool_size=1, skips=((0, 1),)),
}


@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("image", [(1, 8, 8), (2, 7, 9)], ids=["whole windows", "cropped"])
def test_step_is_the_reference_step(case, image):
    options = STEP_CASES[case]
    if options.get("skips") and image == (2, 7, 9):
        options = {**options, "pool_size": 1}  # 7 x 9 pooled twice leaves no whole skip factor
    torch.manual_seed(0)
    model = ConvEP(image, [2, 3], 4, activation="sigmoid", schedule="sync", **options).double()
    x = torch.rand(3, *image, dtype=torch.float64)
    net = model.network(x)
    states = [torch.rand_like(s) for s in model.init_states(x, net)]
    expected = reference_step(model, x, states)
    for got, want in zip(model.step(x, states, net), expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # and the step is rho(dPhi/ds): the primitive and the written-out feedback agree
    leaves = [s.clone().requires_grad_() for s in states]
    grads = torch.autograd.grad(model.primitive(x, leaves, net), leaves)
    for got, grad in zip(model.step(x, states, net), grads):
        torch.testing.assert_close(got, torch.sigmoid(grad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", ["async", "sync"])
def test_a_relaxation_reuses_convolutions_of_unchanged_tensors(schedule, monkeypatch):
    """The image's convolution and (asynchronous schedule) the second group's convolutions are
    reused by the next step: the states are those of steps that recompute everything, with
    fewer convolutions; a state changed in place is convolved again."""
    torch.manual_seed(0)
    model = ConvEP((1, 12, 12), [3, 4], 5, schedule=schedule, pooling="max", padding=1)
    x = torch.rand(4, 1, 12, 12)
    calls = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real_conv2d(*a, **k))

    def relax(fresh):
        calls.clear()
        net = model.network(x)
        states = model.init_states(x, net)
        with torch.no_grad():
            for _ in range(6):
                if fresh:
                    net.reused.clear()
                states = model.step(x, states, net)
        return states, len(calls)

    (reused, fewer), (recomputed, all_of_them) = relax(False), relax(True)
    for a, b in zip(reused, recomputed):
        assert torch.equal(a, b)
    # per step, sync: the image's convolution and layer 1's; async: the image's, layer 1's
    # for the first group (the feedback's pooling) and again for the second
    assert all_of_them == 6 * (2 if schedule == "sync" else 3)
    assert fewer == all_of_them - 5 - (5 if schedule == "async" else 0)
    net = model.network(x)
    with torch.no_grad():
        states = model.step(x, model.init_states(x, net), net)
        changed = [t.clone() for t in states]
        states[0].add_(0.25)  # in place: the kept convolution of states[0] is stale
        changed[0].add_(0.25)
        again = model.step(x, states, net)
        net.reused.clear()
        for a, b in zip(again, model.step(x, changed, net)):
            assert torch.equal(a, b)


def test_soft_pooling_lies_between_average_and_maximum():
    torch.manual_seed(1)
    models = {kind: ConvEP((1, 8, 8), [3], 4, pooling=kind, pool_temperature=tau,
                           loss="mse").double()
              for kind, tau in (("max", 1.0), ("avg", 1.0), ("soft", 1.0))}
    for model in models.values():
        model.load_state_dict(models["max"].state_dict())
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    states = [torch.rand_like(s) for s in models["max"].init_states(x, models["max"].network(x))]

    def phi(kind, tau=1.0):
        models[kind].pool_temperature = tau
        with torch.no_grad():
            return float(models[kind].primitive(x, states, models[kind].network(x)))

    assert phi("avg") < phi("soft") < phi("max")
    assert phi("soft", 1e-4) == pytest.approx(phi("max"), rel=1e-3)
    assert phi("soft", 1e4) == pytest.approx(phi("avg"), rel=1e-3)


# ------------------------------------------------------------------ EqProp against BPTT
def _gradients(model, x, y, estimator):
    model.zero_grad(set_to_none=True)
    model.max_steps, model.tol = 5000, 1e-14
    estimator.backward(model, x, y, model.network(x))
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# sigmoid everywhere (no clamp edge); max pooling on continuous random inputs has no tie, and
# at beta = 1e-4 no argmax moves between the phases
EXACT_CASES = {
    "avg": dict(pooling="avg"),
    "soft": dict(pooling="soft"),
    "soft, cold": dict(pooling="soft", pool_temperature=0.2),
    "max then avg": dict(pooling=("max", "avg")),
    "skip, avg": dict(pooling="avg", skips=((0, 1),)),
    "skip, max": dict(pooling="max", skips=((0, 1),)),
    "skip, soft, mse": dict(pooling="soft", skips=((0, 1),), loss="mse", hidden_dims=[4]),
    "skips across three layers, async": dict(channels=[2, 2, 3], pool_size=1,
                                             skips=((0, 2), (1, 2))),
    "tanh, avg": dict(pooling="avg", activation="tanh"),
    "linear output layer, mse": dict(pooling="avg", loss="mse", hidden_dims=[4],
                                     activation=("sigmoid", "sigmoid", "sigmoid", "identity")),
    "strided, learned skips from the image and between layers": dict(
        channels=[2, 2, 3], pool_size=1, stride=(1, 2, 1), conv_skips=((-1, 1), (0, 2))),
    "strided and pooled, a learned and an identity skip": dict(
        channels=[2, 3], pooling="avg", stride=(1, 2), conv_skips=((-1, 0),), skips=((0, 1),)),
}


@pytest.mark.parametrize("case", EXACT_CASES)
def test_eqprop_matches_bptt(case):
    options = {"channels": [2, 3], "activation": "sigmoid", **EXACT_CASES[case]}
    torch.manual_seed(2)
    model = ConvEP((1, 6, 6), options.pop("channels"), 3, **options).double().eval()
    x, y = torch.rand(4, 36, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    reference = _gradients(model, x, y, BPTT(steps=400))
    got = _gradients(model, x, y, EqProp(1e-4, "centered"))
    assert EqProp(1e-4, "centered").exact_for(model)
    for name, want in reference.items():
        assert want.abs().max() > 0, name
        error = compare(got[name], want).relative_error
        assert error <= 1e-6, (name, error)


# ------------------------------------------------------------------ shapes and arguments
def test_states_have_the_pooled_shapes_of_each_layer():
    torch.manual_seed(3)
    model = ConvEP((3, 14, 13), [2, 4, 4], 5, padding=(1, 0, 1), pooling=("soft", "avg", "max"),
                   skips=((1, 2),), hidden_dims=[6])
    assert model.paddings == (1, 0, 1) and model.poolings == ("soft", "avg", "max")
    # 14 x 13 -> 7 x 6 (the 13th column dropped) -> without padding 5 x 4 -> 2 x 2 -> 1 x 1
    assert model.state_shapes == [(2, 7, 6), (4, 2, 2), (4, 1, 1), (6,)]
    model(torch.rand(2, 3, 14, 13))
    assert [tuple(s.shape[1:]) for s in model.last_states] == model.state_shapes
    assert [tuple(c.padding) for c in model.convs] == [(1, 1), (0, 0), (1, 1)]


@pytest.mark.parametrize("options,match", [
    ({"pooling": "min"}, r"pooling must be one of \('max', 'avg', 'soft'\), got 'min'"),
    ({"pooling": ("max", "avg", "avg")}, r"pooling must be one value or one per convolutional "
                                         r"layer \(2\)"),
    ({"pooling": ("max", "median")}, "pooling must be one of"),
    ({"padding": (1,)}, r"padding must be one value or one per convolutional layer \(2\)"),
    ({"padding": (1, -1)}, "padding must be >= 0"),
    ({"pool_temperature": 0.0}, "pool_temperature must be a finite float > 0"),
    ({"skips": ((1, 1),)}, r"skips: a skip couples two different layers, got \(1, 1\)"),
    ({"skips": ((1, 0),)}, r"skips must be pairs \(i, j\) with 0 <= i < j < 2"),
    ({"skips": ((0, 2),)}, r"skips must be pairs \(i, j\) with 0 <= i < j < 2 \(the "
                           r"convolutional layers\), got \(0, 2\)"),
    ({"skips": ((0, 1), (0, 1))}, r"skips: \(0, 1\) is given twice"),
    ({"skips": (0, 1)}, r"skips must be pairs \(i, j\) of layer indices, got 0"),
    ({"channels": [3, 2], "skips": ((0, 1),)}, r"skips: layer 0 \(3, 4, 4\) cannot be coupled "
                                               r"to layer 1 \(2, 2, 2\).*C_i <= C_j"),
    ({"input_shape": (1, 10, 10), "skips": ((0, 1),)},
     r"skips: layer 0 \(2, 5, 5\) cannot be coupled to layer 1 \(3, 2, 2\).*whole number"),
    ({"activation": "tanh", "pooling": ("avg", "max")}, "'tanh' takes negative values"),
    ({"activation": ("sigmoid", "tanh")}, "'tanh' takes negative values"),
    ({"stride": 0}, "stride must be >= 1"),
    ({"conv_skips": ((1, 0),)}, r"conv_skips must be pairs \(i, j\) with -1 <= i < j < 2"),
    ({"conv_skips": ((-1, 0), (-1, 0))}, r"conv_skips: \(-1, 0\) is given twice"),
    ({"input_shape": (1, 10, 10), "conv_skips": ((0, 1),)},
     r"conv_skips: layer 0 \(2, 5, 5\) cannot reach layer 1 \(3, 2, 2\)"),
    ({"activation": ("sigmoid",)}, r"one per state layer \(2: "),
    ({"activation": ("sigmoid", "relu")}, "activation"),
])
def test_bad_arguments_are_named(options, match):
    options = {"input_shape": (1, 8, 8), "channels": [2, 3], **options}
    with pytest.raises(ValueError, match=match):
        ConvEP(options.pop("input_shape"), options.pop("channels"), 4, **options)


@pytest.mark.parametrize("image", [(2, 8, 8), (1, 9, 7)], ids=["even", "odd: output padding"])
def test_strided_layers_and_learned_skips_step_along_the_primitives_gradient(image):
    """rho(dPhi/ds) by autograd of Phi against the written-out step (the transposed strided
    convolutions, the learned skips' both directions), and the shapes each stride gives."""
    torch.manual_seed(7)
    model = ConvEP(image, [3, 3, 4], 3, activation="sigmoid", pool_size=1, stride=(1, 2, 2),
                   conv_skips=((-1, 1), (0, 2)) if image[1] == 8 else (),
                   schedule="sync").double()
    h, w = image[1:]
    half = ((h - 1) // 2 + 1, (w - 1) // 2 + 1)
    assert model.state_shapes[:3] == [(3, h, w), (3, *half),
                                      (4, (half[0] - 1) // 2 + 1, (half[1] - 1) // 2 + 1)]
    x = torch.rand(2, *image, dtype=torch.float64)
    net = model.network(x)
    states = [torch.rand_like(t) for t in model.init_states(x, net)]
    leaves = [t.clone().requires_grad_() for t in states]
    grads = torch.autograd.grad(model.primitive(x, leaves, net), leaves)
    for got, grad in zip(model.step(x, states, net), grads):
        torch.testing.assert_close(got, torch.sigmoid(grad), rtol=1e-12, atol=1e-12)


def test_hopfield_resnet13_builds_the_papers_network():
    model = ConvEP.hopfield_resnet13()
    assert model.state_shapes == [(128, 32, 32), (128, 16, 16), (256, 16, 16), (256, 8, 8),
                                  (512, 8, 8), (512, 4, 4), (512, 4, 4), (512, 2, 2), (10,)]
    assert [tuple(c.weight.shape) for c in model.skip_convs] == [
        (128, 3, 1, 1), (256, 128, 1, 1), (512, 256, 1, 1), (512, 512, 1, 1)]
    assert all(c.stride == (2, 2) and c.bias is None for c in model.skip_convs)
    assert len(model.layer_parameters()) == 13  # the paper's thirteen weights


def test_per_layer_activations_apply_to_their_layers():
    """A linear output layer (identity) after sigmoid layers: the step's output state is the
    pre-activation itself, the hidden ones its sigmoid (rho(dPhi/ds) layer by layer)."""
    torch.manual_seed(5)
    model = ConvEP((1, 6, 6), [2], 3, pooling="avg", loss="mse", schedule="sync",
                   activation=("sigmoid", "identity")).double()
    assert model.activation == ("sigmoid", "identity")
    x = torch.rand(2, 36, dtype=torch.float64)
    net = model.network(x)
    states = [torch.rand_like(s) for s in model.init_states(x, net)]
    leaves = [s.clone().requires_grad_() for s in states]
    grads = torch.autograd.grad(model.primitive(x, leaves, net), leaves)
    hidden, output = model.step(x, states, net)
    torch.testing.assert_close(hidden, torch.sigmoid(grads[0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(output, grads[1], rtol=1e-12, atol=1e-12)


def test_tanh_is_accepted_without_max_pooling():
    model = ConvEP((1, 8, 8), [2, 3], 4, activation="tanh", pooling=("avg", "soft"))
    assert model.activation == "tanh"


# ------------------------------------------------------------------ CIFAR-shaped runs, export
def _images(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3 * 32 * 32, generator=generator),
            torch.randint(0, 10, (batch,), generator=generator))


@pytest.mark.filterwarnings("ignore::toreq.errors.ConvergenceWarning")  # a few steps only
def test_a_tiny_network_trains_on_cifar_shaped_images():
    torch.manual_seed(4)
    model = ConvEP((3, 32, 32), [4, 8], 10, pooling=("soft", "avg"), skips=((0, 1),),
                   max_steps=15)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.05), beta=0.5,
                            nudged_steps=5)
    x, y = _images(8, 0)
    losses = [trainer.step(x, y)["loss"] for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert [tuple(s.shape) for s in model.last_states] == [(8, 4, 16, 16), (8, 8, 8, 8)]


@pytest.mark.filterwarnings("ignore::toreq.errors.ConvergenceWarning")  # a few steps only
def test_laborieux2021_cifar10_builds_the_papers_network_and_takes_a_step():
    torch.manual_seed(5)
    model = ConvEP.laborieux2021_cifar10(max_steps=8)  # the paper's 250 free steps: too slow here
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in model.convs] == [
        (3, 128, (3, 3), (1, 1)), (128, 256, (3, 3), (1, 1)), (256, 512, (3, 3), (1, 1)),
        (512, 512, (3, 3), (0, 0))]
    assert model.state_shapes == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 1, 1)]
    assert model.poolings == ("max",) * 4 and model.pool_size == 2 and model.skips == ()
    assert (model.readout.in_features, model.readout.out_features) == (512, 10)
    assert model.cost.name == "cross_entropy" and model.schedule == "sync"
    assert ConvEP.laborieux2021_cifar10().max_steps == 250
    # synchronous updates carry the nudge one layer down per step: 5 nudged steps reach s_1
    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), beta=0.5,
                            nudged_steps=5)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.step(*_images(2, 1))
    assert math.isfinite(result["loss"])
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("options", [dict(pooling="avg"), dict(pooling="soft", skips=((0, 1),))],
                         ids=["avg", "soft with a skip"])
def test_export_runs_the_models_relaxation(options):
    torch.manual_seed(6)
    model = ConvEP((3, 16, 16), [3, 4], 10, **options).eval()
    x = _images(5, 2)[0].view(5, 3, 32, 32)[:, :, :16, :16]
    program = export_model(model, x[:2], steps=12, tol=0.0)
    out, steps = program.module()(x)  # another batch size than the example's
    with torch.no_grad():
        net = model.network(x)
        result = model.relax(x, net, max_steps=12, tol=0.0)
        expected = model.output(result.states, net)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(steps, result.steps)


# ------------------------------------------------------------- the feedforward twin (backprop)
@pytest.mark.parametrize("pooling", ["max", "avg", "soft"])
def test_feedforward_twin_is_the_same_layers_without_feedback(pooling):
    from toreq.nn import FeedforwardCNN

    torch.manual_seed(0)
    model = ConvEP((1, 9, 9), (3, 4), 5, hidden_dims=(6,), kernel_size=3, padding=(1, 0),
                   stride=(1, 1), pooling=pooling, loss="mse",
                   activation=("hard_sigmoid", "sigmoid", "sigmoid", "identity"))
    twin = FeedforwardCNN(model)
    x = torch.rand(2, 81)
    # written out: conv -> pool -> rho per layer, then the dense layers (mse: no readout)
    s = x.view(2, 1, 9, 9)
    for layer, (conv, rho) in enumerate(zip(model.convs, (lambda u: u.clamp(0, 1),
                                                          torch.sigmoid))):
        z = F.conv2d(s, conv.weight, conv.bias, padding=model.paddings[layer])
        s = rho(reference_pool(pooling, z, 2, model.pool_temperature)[0])
    s = torch.sigmoid(F.linear(s.flatten(1), model.dense[0].weight, model.dense[0].bias))
    expected = F.linear(s, model.dense[1].weight, model.dense[1].bias)
    assert torch.allclose(twin(x), expected, atol=1e-6)
    # its own parameters, equal at the start, in the same per-layer order
    assert [p.shape for ps in twin.layer_parameters() for p in ps] == \
        [p.shape for ps in model.layer_parameters() for p in ps]
    assert all(torch.equal(a, b) and a is not b
               for a, b in zip(twin.parameters(), model.parameters()))
    readout = FeedforwardCNN(ConvEP((1, 8, 8), (2,), 3))
    assert readout(torch.rand(4, 64)).shape == (4, 3)


def test_feedforward_twin_refuses_couplings_it_cannot_express():
    from toreq.nn import FeedforwardCNN

    for options in ({"skips": ((0, 1),)}, {"conv_skips": ((-1, 1),)}, {"memories": {0: 4}}):
        model = ConvEP((1, 8, 8), (2, 2), 3, pool_size=1, **options)
        with pytest.raises(ValueError, match="no feedforward counterpart"):
            FeedforwardCNN(model)
