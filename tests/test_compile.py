"""torch.compile of the models: forward and relaxation phases without graph breaks, EqProp steps."""

from __future__ import annotations

import copy

import pytest
import torch

from toreq.nn import EPMLP, LoopedMLP
from toreq.train import EqPropTrainer

MODELS = {
    "looped": lambda: LoopedMLP(16, 12, 4),  # symmetric + spectral-norm parametrizations
    "ep": lambda: EPMLP(16, [12, 8], 4),     # tied layered network, async schedule
}


def twins(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    return model, copy.deepcopy(model)


def batch(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, 16, generator=g), torch.randint(0, 4, (size,), generator=g)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_forward_matches_eager(name):
    """fullgraph=True with inductor, in training mode (the spectral norm's power iteration
    updates its buffers on every call) and for a second batch size (a recompilation)."""
    eager, twin = twins(name)
    compiled = torch.compile(twin, fullgraph=True)
    for size in (5, 9):
        x, _ = batch(size)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(twin.last_steps, eager.last_steps)  # the attribute is still written
        torch.testing.assert_close(twin.last_residual, eager.last_residual, rtol=1e-4, atol=1e-7)
    for (key, got), want in zip(twin.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)


def phases(model, x, y):
    """The free and the two nudged phases of an EqProp step."""
    net = model.network(x)
    free = model.relax(x, net)
    plus = model.relax(x, net, states=free.states, beta=0.5, target=y, max_steps=10)
    minus = model.relax(x, net, states=free.states, beta=-0.5, target=y, max_steps=10)
    return net, free, plus, minus


@pytest.mark.parametrize("name", MODELS)
def test_relaxation_phases_compile_without_graph_breaks(name):
    """The relaxation phases compile as one graph; EqProp's gradients from them (written into
    .grad by eqprop_backward, which calls autograd and so stays eager) match eager's."""
    eager, twin = twins(name)
    x, y = batch(6)
    compiled = torch.compile(lambda x, y: phases(twin, x, y), fullgraph=True, backend="aot_eager")
    for model, run in ((eager, lambda x, y: phases(eager, x, y)), (twin, compiled)):
        net, free, plus, minus = run(x, y)
        model.eqprop_backward(x, y, net, free, plus, minus, 1.0)
    for (key, got), want in zip(twin.named_parameters(), eager.parameters()):
        assert want.grad is not None and want.grad.abs().sum() > 0, key
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=key)


def test_compiled_trainer_step_matches_eager():
    """torch.compile(trainer.step): graph breaks at optimizer.zero_grad and
    torch.autograd.backward (both skipped by dynamo by design) and at the metrics' .tolist().
    One model suffices: the step's code is the same for every model (the phases of each are
    compared above)."""
    eager, twin = twins("ep")
    trainers = [EqPropTrainer(m, torch.optim.Adam(m.parameters(), lr=1e-2)) for m in (eager, twin)]
    step = torch.compile(trainers[1].step, backend="aot_eager")
    for seed in range(3):
        x, y = batch(8, seed)
        want, got = trainers[0].step(x, y), step(x, y)
        assert got.keys() == want.keys()
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["free_steps_mean"] == want["free_steps_mean"]
    for (key, got), want in zip(twin.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=key)
