"""The modern Hopfield interaction (toreq.nn.hopfield): its field against the gradient of its
energy and a hand-written softmax read-out, the step of a network with memories against a
hand-written step, EqProp (centered, holomorphic) and implicit differentiation against BPTT in
float64, errors, training on real data, export."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from toreq.data import load_digits
from toreq.diagnostics import compare
from toreq.estimators import BPTT, EqProp, HolomorphicEqProp, ImplicitDifferentiation
from toreq.export import export_model
from toreq.nn import EPMLP, ConvEP
from toreq.nn.hopfield import ModernHopfield
from toreq.presets import PRESETS, parameter_groups
from toreq.train import EqPropTrainer, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_field_is_the_energys_gradient_and_the_softmax_read_out():
    torch.manual_seed(0)
    memory = ModernHopfield(6, 5, temperature=0.4).double()
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(memory.energy(s), s)
    xi = memory.patterns.detach()
    by_hand = torch.softmax(s.detach() @ xi.T / 0.4, dim=1) @ xi
    energy = 0.4 * torch.logsumexp(s.detach() @ xi.T / 0.4, dim=1).sum()
    torch.testing.assert_close(memory.field(s.detach()), by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(memory.energy(s.detach()), energy, rtol=1e-12, atol=1e-12)
    # scores far beyond exp's range: the shift keeps both finite
    assert torch.isfinite(memory.field(1e4 * s.detach())).all()
    assert torch.isfinite(memory.energy(1e4 * s.detach()))


def test_complex_states_continue_the_real_functions_analytically():
    """On complex states the field is the complex softmax read-out, and the energy's complex
    derivative along a direction matches it (the function is holomorphic)."""
    torch.manual_seed(1)
    memory = ModernHopfield(4, 3).double()
    s = torch.randn(2, 4, dtype=torch.complex128) * 0.3
    xi = memory.patterns.detach().to(torch.complex128)
    e = torch.exp(s @ xi.T)
    torch.testing.assert_close(memory.field(s), (e / e.sum(1, keepdim=True)) @ xi)
    direction, h = torch.randn(2, 4, dtype=torch.complex128), 1e-6
    derivative = (memory.energy(s + h * direction) - memory.energy(s - h * direction)) / (2 * h)
    torch.testing.assert_close(derivative, (memory.field(s) * direction).sum(), rtol=1e-7,
                               atol=1e-9)


def test_the_step_adds_the_read_out_to_the_layers_input():
    """One synchronous step of an EPMLP with a memory on each layer, written out by hand."""
    torch.manual_seed(2)
    model = EPMLP(5, [4], 3, activation="sigmoid", schedule="sync", memories={0: 6, 1: 2},
                  memory_temperature=0.5).double()
    x = torch.rand(3, 5, dtype=torch.float64)
    s = [torch.rand(3, 4, dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64)]
    net = model.network(x)
    got = model.step(x, s, net)

    def read_out(memory, state):
        xi = memory.patterns.detach()
        return torch.softmax(state @ xi.T / 0.5, dim=1) @ xi

    w, b = model.layers[0].weight.detach(), model.layers[0].bias.detach()
    hidden = torch.sigmoid(model.input(x).detach() + s[1] @ w + read_out(model.memories["0"], s[0]))
    output = torch.sigmoid(s[0] @ w.T + b + read_out(model.memories["1"], s[1]))
    torch.testing.assert_close(got[0], hidden, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], output, rtol=1e-12, atol=1e-12)
    plain = EPMLP(5, [4], 3).double()
    assert not model.op_expresses(None, net) and plain.op_expresses(None, plain.network(x))


def _gradients(model, x, y, estimator):
    model.zero_grad(set_to_none=True)
    model.max_steps, model.tol, model.nudged_steps = 5000, 1e-14, None
    estimator.backward(model, x, y, model.network(x))
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _models():
    torch.manual_seed(3)
    dense = EPMLP(6, [5, 4], 3, activation="sigmoid", memories={0: 7, 1: 3},
                  memory_temperature=0.5).double()
    conv = ConvEP((1, 6, 6), [2, 3], 3, activation="sigmoid", pooling="avg", hidden_dims=[4],
                  loss="mse", memories={1: 5, 2: 4}, memory_temperature=0.7).double()
    return {"EPMLP": (dense, torch.rand(4, 6, dtype=torch.float64)),
            "ConvEP": (conv, torch.rand(4, 36, dtype=torch.float64))}


ESTIMATORS = {  # name: (estimator, bound on the relative error against BPTT)
    "centered EqProp": (lambda: EqProp(1e-4, "centered"), 1e-6),
    "holomorphic EqProp": (lambda: HolomorphicEqProp(0.1, 8), 1e-8),
    "implicit differentiation": (ImplicitDifferentiation, 1e-10),
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["EPMLP", "ConvEP"])
def test_estimators_match_bptt_with_memories(kind, estimator):
    model, x = _models()[kind]
    make, bound = ESTIMATORS[estimator]
    if kind == "ConvEP" and estimator == "holomorphic EqProp":
        with pytest.raises(ValueError, match="coupling-list"):
            make().check(model)
        return
    y = torch.tensor([0, 2, 1, 2])
    reference = _gradients(model, x, y, BPTT(steps=400))
    got = _gradients(model, x, y, make())
    assert any(name.startswith("memories.") for name in reference)
    for name, want in reference.items():
        assert want.abs().max() > 0, name
        assert compare(got[name], want).relative_error <= bound, name


@pytest.mark.parametrize("options, match", [
    (dict(memories={3: 4}), r"memories: layer must be an int in \[0, 2\)"),
    (dict(memories={0: 0}), "memories: layer 0 needs an int >= 1"),
    (dict(memories=[4]), "memories must map layer indices"),
    (dict(memories={0: 4}, memory_temperature=0.0), "temperature"),
])
def test_bad_memories_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        EPMLP(5, [4], 3, **options)


def test_a_state_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="ModernHopfield expects states of 6 units"):
        ModernHopfield(6, 2).field(torch.zeros(3, 5))


def test_json_keys_name_layers_and_layer_rates_are_refused_with_memories():
    model = EPMLP(5, [4], 3, memories={"1": 2})
    assert list(model.memories) == ["1"]
    preset = dataclasses.replace(PRESETS["digits-looped"], layer_lrs=(0.1, 0.1))
    with pytest.raises(ValueError, match=r"also has \['memories.1.patterns'\]"):
        parameter_groups(model, preset)


@pytest.mark.filterwarnings("ignore::toreq.nn.ConvergenceWarning")
def test_memories_train_on_the_digits():
    """A one-hidden-layer network with a 32-pattern memory on its hidden layer, centered EqProp:
    above 88% test accuracy after four epochs on the digits (91.7% measured; 92.2% without the
    memory), and the patterns move."""
    data = load_digits()
    torch.manual_seed(0)
    model = EPMLP(data.input_dim, [64], data.num_classes, activation="sigmoid",
                  memories={0: 32}, max_steps=40)
    before = model.memories["0"].patterns.detach().clone()
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2),
                            estimator=EqProp(0.5, "centered"))
    order = torch.Generator().manual_seed(0)
    for _ in range(4):
        perm = torch.randperm(data.x_train.shape[0], generator=order)
        for i in range(0, perm.numel(), 32):
            trainer.step(data.x_train[perm[i:i + 32]], data.y_train[perm[i:i + 32]])
    assert evaluate(model, data.x_test, data.y_test)["accuracy"] > 0.88
    assert (model.memories["0"].patterns.detach() - before).abs().max() > 1e-3


def test_export_runs_a_convolutional_network_with_a_memory():
    torch.manual_seed(4)
    model = ConvEP((1, 8, 8), [3], 4, pooling="avg", memories={0: 6}).eval()
    x = torch.rand(5, 64)
    program = export_model(model, x[:2], steps=10, tol=0.0)
    out, steps = program.module()(x)
    with torch.no_grad():
        net = model.network(x)
        expected = model.output(model.relax(x, net, max_steps=10, tol=0.0).states, net)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
