"""Inputs that used to give silently wrong results are refused with an error naming what is wrong:
an unbatched sample, degenerate sizes, an optimizer over other parameters, labels of the wrong
kind (toreq.validation, called by the models and trainers)."""

from __future__ import annotations

import pytest
import torch

from toreq.nn import EPMLP, ConvEP, FeedforwardMLP, LoopedMLP, ModernEqProp, ToroidalMLP
from toreq.train import BackpropTrainer, BPTTTrainer, EqPropTrainer, evaluate

MODELS = {
    "LoopedMLP": lambda: LoopedMLP(64, 16, 10),
    "ToroidalMLP": lambda: ToroidalMLP(64, 16, 10),
    "EPMLP": lambda: EPMLP(64, [16], 10),
    "ModernEqProp": lambda: ModernEqProp(64, 16, 10),
    "ConvEP": lambda: ConvEP((1, 8, 8), [4], 10),
}


@pytest.mark.parametrize("name", MODELS)
def test_an_unbatched_sample_is_refused(name):
    model = MODELS[name]()
    with pytest.raises(ValueError, match=rf"{name}: x must be a batch of shape \(batch, \.\.\.\), "
                                         r"got shape \(64,\); for one sample, pass x.unsqueeze\(0\)"):
        model(torch.rand(64))
    assert model(torch.rand(64).unsqueeze(0)).shape == (1, 10)  # what the message advises works


@pytest.mark.parametrize("x, error, match", [
    (torch.rand(64), ValueError, r"got shape \(64,\)"),
    (torch.randint(0, 2, (4, 64)), TypeError, "x must be a floating-point tensor, got torch.int64"),
    ([[0.0] * 64], TypeError, "x must be a torch.Tensor of shape"),
])
def test_trainers_refuse_inputs_that_are_not_a_batch(x, error, match):
    model = LoopedMLP(64, 16, 10)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(error, match=match):
        trainer.step(x, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("build, match", [
    (lambda: LoopedMLP(64, 0, 10), "LoopedMLP: hidden_dim must be a positive int, got 0"),
    (lambda: LoopedMLP(64, -3, 10), "LoopedMLP: hidden_dim must be a positive int, got -3"),
    (lambda: LoopedMLP(0, 16, 10), "LoopedMLP: input_dim must be a positive int, got 0"),
    (lambda: ToroidalMLP(64, 0, 10), "ToroidalMLP: hidden_dim must be a positive int, got 0"),
    (lambda: EPMLP(64, [], 10), r"EPMLP: hidden_dims must list at least one layer.*got \[\]"),
    (lambda: EPMLP(64, [16, 0], 10), r"EPMLP: hidden_dims .* got \[16, 0\]"),
    (lambda: FeedforwardMLP(64, [], 10), r"FeedforwardMLP: hidden_dims must list at least one"),
    (lambda: FeedforwardMLP(64, [8], 0), "FeedforwardMLP: output_dim must be a positive int"),
    (lambda: LoopedMLP(64, 16, 10, max_steps=0), "max_steps must be a positive int, got 0"),
    (lambda: EqPropTrainer(m := LoopedMLP(64, 8, 10), torch.optim.SGD(m.parameters(), lr=0.1),
                           free_steps=0), "free_steps must be a positive int, got 0"),
    (lambda: EqPropTrainer(m := LoopedMLP(64, 8, 10), torch.optim.SGD(m.parameters(), lr=0.1),
                           nudged_steps=0), "nudged_steps must be a positive int, got 0"),
    (lambda: BPTTTrainer(m := LoopedMLP(64, 8, 10), torch.optim.SGD(m.parameters(), lr=0.1),
                         steps=0), "steps must be a positive int, got 0"),
])
def test_degenerate_sizes_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("trainer", [EqPropTrainer, BPTTTrainer, BackpropTrainer])
def test_an_optimizer_over_other_parameters_is_refused(trainer):
    model = FeedforwardMLP(64, [8], 10) if trainer is BackpropTrainer else LoopedMLP(64, 8, 10)
    other = torch.nn.Linear(64, 10)
    with pytest.raises(ValueError, match=f"optimizer holds none of the {type(model).__name__}'s "
                                         "parameters, so training would not change the model"):
        trainer(model, torch.optim.SGD(other.parameters(), lr=0.1))
    trainer(model, torch.optim.SGD(list(model.parameters())[:1], lr=0.1))  # a subset is fine


LABELS = [
    (torch.zeros(4), TypeError, r"integer class indices \(torch.long\) of shape \(4,\), got "
                                r"torch.float32 labels of shape \(4,\); .*y.long\(\)"),
    (torch.nn.functional.one_hot(torch.arange(4), 10).float(), TypeError,
     r"got one-hot targets of shape \(4, 10\); use y.argmax\(1\)"),
    (torch.zeros(4, dtype=torch.bool), TypeError, "torch.bool labels"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"one class index per sample, shape \(4,\), "
                                                   r"got shape \(3,\)"),
    (torch.zeros(4, 1, dtype=torch.long), ValueError, r"got shape \(4, 1\)"),
    ([0, 1, 2, 3], TypeError, "y must be a tensor of class indices, got list"),
]


@pytest.mark.parametrize("y, error, match", LABELS)
@pytest.mark.parametrize("kind", ["eqprop", "bptt", "backprop", "evaluate"])
def test_labels_of_the_wrong_kind_are_refused(kind, y, error, match):
    model = FeedforwardMLP(64, [8], 10) if kind == "backprop" else LoopedMLP(64, 8, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    call = {"eqprop": lambda: EqPropTrainer(model, optimizer).step,
            "bptt": lambda: BPTTTrainer(model, optimizer).step,
            "backprop": lambda: BackpropTrainer(model, optimizer).step,
            "evaluate": lambda: lambda x, y: evaluate(model, x, y)}[kind]()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        call(torch.rand(4, 64), y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing trained
