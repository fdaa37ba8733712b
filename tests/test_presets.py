"""Presets: the digits preset reaches its documented accuracy; every preset builds and steps."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from toreq.data import load_digits
from toreq.presets import PRESETS, build_trainer, get_preset
from toreq.train import fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_preset_reaches_its_accuracy_next_to_backprop(digits):
    # The full preset, one seed (the benchmark's figure is the mean over three seeds): EqProp
    # on the 360 test digits within about a point of backprop of the same width.
    preset = get_preset("digits-looped")
    accuracy = {}
    for method in ("eqprop", "backprop"):
        _, trainer, scheduler = build_trainer(preset, digits.input_dim, digits.num_classes,
                                              method=method, seed=0)
        history = fit(trainer, digits.x_train, digits.y_train, digits.x_test, digits.y_test,
                      epochs=preset.epochs, batch_size=preset.batch_size, seed=0,
                      scheduler=scheduler, progress=False)
        accuracy[method] = history[-1]["test_accuracy"]
    assert accuracy["eqprop"] >= 0.965, accuracy
    assert accuracy["backprop"] - accuracy["eqprop"] <= 0.015, accuracy


def _preset_methods():
    """Every preset with the methods it is trained by: ours by EqProp, BPTT and backprop; a
    paper's by EqProp and its own baseline."""
    for name, preset in sorted(PRESETS.items()):
        methods = (("eqprop", "bptt", "backprop") if not preset.paper
                   else ("eqprop", *([preset.baseline] if preset.baseline else [])))
        yield from ((name, method) for method in methods)


@pytest.mark.parametrize("name,method", list(_preset_methods()))
def test_every_preset_builds_and_takes_a_step(name, method):
    preset = dataclasses.replace(get_preset(name), hidden=16)
    image_shape = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28),
                   "fashion_mnist": (1, 28, 28)}.get(preset.dataset)
    if preset.model == "conv_ep":  # the paper's widths and steps, shrunk for a test
        preset = dataclasses.replace(preset, channels=(2,) * len(preset.channels), free_steps=4,
                                     nudged_steps=3)
    dims = {"digits": 64, "cartpole": 4, "acrobot": 6, "cifar10": 3072}.get(preset.dataset, 784)
    model, trainer, scheduler = build_trainer(preset, dims, 10, method=method, seed=1,
                                              image_shape=image_shape)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.step(torch.rand(8, dims), torch.randint(0, 10, (8,)))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if preset.optimizer == "adamw" or preset.lr_schedule == "cosine":
        assert scheduler.T_max == preset.epochs
    else:
        assert scheduler is None
    if preset.optimizer == "sgd":  # the papers' SGD, at per-layer rates input side first
        assert isinstance(trainer.optimizer, torch.optim.SGD)
        rates = [group["lr"] for group in trainer.optimizer.param_groups]
        if preset.layer_lrs:
            assert rates == list(preset.learning_rates())
            assert len(rates) == len(model.layer_parameters())
        else:
            assert rates == [preset.lr]
        assert trainer.optimizer.defaults["momentum"] == preset.momentum
        assert trainer.optimizer.defaults["nesterov"] == preset.nesterov


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown preset 'nope'; choose one of digits-looped"):
        get_preset("nope")
    with pytest.raises(ValueError, match="method must be 'eqprop', 'bptt' or 'backprop'"):
        build_trainer(get_preset("digits-looped"), 64, 10, method="sgd")


def test_accuracy_benchmark_quick_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    assert accuracy.main(["--quick", "--datasets", "digits", "--crop-padding", "1", "--flip",
                          "--out", str(tmp_path)]) == 0
    table = (tmp_path / "accuracy.md").read_text()
    assert "| digits | digits-looped | eqprop |" in table and "(quick)" in table
    assert "augmented by random crop after padding 1 and flip" in table
    record = json.loads((tmp_path / "accuracy.json").read_text())
    assert record["datasets"][0]["preset"]["crop_padding"] == 1
    for bad in (["--channels", "4,8"], ["--conv", "--channels", "0,8"], ["--crop-padding", "-1"]):
        with pytest.raises(SystemExit):
            accuracy.main(["--quick", "--datasets", "digits", *bad])


def test_command_line_options_override_the_preset(capsys):
    import json

    from toreq.cli import main

    assert main(["train", "--epochs", "1", "--hidden", "16", "--beta", "0.3", "--one-sided",
                 "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    preset = report["preset"]
    assert preset["name"] == "digits-looped" and preset["epochs"] == 1
    assert preset["hidden"] == 16 and preset["beta"] == 0.3
    assert preset["symmetric_nudging"] is False
    assert preset["lr"] == get_preset("digits-looped").lr  # not given: the preset's
    assert report["results"][0]["parameters"] == 64 * 16 + 16 + 16 * 16 + 16 * 10 + 10


def test_the_papers_options_on_the_command_line(capsys):
    """Per-layer rates in the paper's order, SGD and the steep sigmoid from the command line."""
    import json

    from toreq.cli import main

    assert main(["train", "--preset", "ernoult2019-p1h", "--dataset", "digits", "--epochs", "1",
                 "--hidden", "16", "--optimizer", "sgd", "--layer-lrs", "0.02", "0.1",
                 "--layer-order", "output_first", "--activation", "steep_sigmoid", "--json",
                 "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    preset = report["preset"]
    assert preset["layer_lrs"] == [0.02, 0.1] and preset["layer_order"] == "output_first"
    assert preset["optimizer"] == "sgd" and preset["activation"] == "steep_sigmoid"
    assert report["results"][0]["test_accuracy"] > 0.2  # a fraction; chance is 0.1
    assert main(["train", "--preset", "ernoult2019-p1h", "--dataset", "digits", "--epochs", "1",
                 "--layer-lrs", "0.1"]) == 1
    assert "layer_lrs must hold one rate per weight layer of EPMLP (2), got 1" in \
        capsys.readouterr().err


def test_a_presets_augmentation_trains_on_cropped_and_flipped_batches(digits, monkeypatch,
                                                                      capsys):
    """crop_padding and flip reach fit as a RandomCropFlip of the data's image shape, in
    train_preset and on the command line; the default preset does not augment."""
    import json

    import toreq.train
    from toreq.cli import main
    from toreq.data import RandomCropFlip
    from toreq.presets import train_preset

    preset = dataclasses.replace(get_preset("digits-looped"), hidden=16, epochs=1)
    assert preset.augmentation(digits.image_shape) is None
    augmented = dataclasses.replace(preset, crop_padding=1, flip=True)
    assert augmented.augmentation(digits.image_shape) == RandomCropFlip((1, 8, 8), 1, True)
    with pytest.raises(ValueError, match="preset 'digits-looped' augments images .* no "
                                         "image_shape"):
        augmented.augmentation(None)
    seen = []
    real_fit = toreq.train.fit

    def recording_fit(*args, augment=None, **kwargs):
        seen.append(augment)
        return real_fit(*args, augment=augment, **kwargs)

    monkeypatch.setattr(toreq.train, "fit", recording_fit)
    plain = train_preset(preset, digits, "eqprop", seed=0)
    runs = [train_preset(augmented, digits, method, seed=0) for method in ("eqprop", "backprop")]
    assert seen == [None] + [RandomCropFlip((1, 8, 8), 1, True)] * 2
    # the augmented batches change the training, not only the recorded settings
    assert runs[0]["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    seen.clear()
    assert main(["train", "--epochs", "1", "--hidden", "16", "--crop-padding", "1", "--flip",
                 "--compare", "backprop", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"]["crop_padding"] == 1 and report["preset"]["flip"] is True
    assert seen == [RandomCropFlip((1, 8, 8), 1, True)] * 2  # EqProp and its baseline


def test_memories_on_the_command_line(capsys):
    """--memories gives the model a modern Hopfield interaction per named layer (its patterns
    counted in the parameters); a model without them, or a malformed value, is one line."""
    import json

    from toreq.cli import main

    assert main(["train", "--dataset", "digits", "--model", "ep_mlp", "--hidden", "16",
                 "--memories", "0:8", "--epochs", "1", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert dict(report["preset"]["model_options"])["memories"] == [[0, 8]]
    assert report["results"][0]["parameters"] == 64 * 16 + 16 + 16 * 10 + 10 + 8 * 16
    assert report["results"][0]["test_accuracy"] > 0.2
    assert main(["train", "--dataset", "digits", "--model", "looped_mlp", "--memories", "0:8",
                 "--epochs", "1"]) == 1
    assert "--memories applies to --model ep_mlp or conv_ep, not looped_mlp" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--memories", "0-8"])
    assert "expected LAYER:PATTERNS, e.g. 0:256; got '0-8'" in capsys.readouterr().err


def test_accuracy_benchmark_judges_the_convolutional_presets_on_their_targets(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    assert accuracy.preset_for("mnist", conv=True).name == "mnist-conv"
    assert accuracy.preset_for("fashion_mnist", conv=True).model == "conv_ep"
    assert accuracy.judge("mnist", {"mean": 99.35}, {"mean": 99.8}, conv=True)[0]
    assert not accuracy.judge("mnist", {"mean": 99.25}, {"mean": 99.3}, conv=True)[0]
    assert not accuracy.judge("fashion_mnist", {"mean": 91.6}, {"mean": 92.2}, conv=True)[0]
    with pytest.raises(SystemExit):  # --conv covers MNIST and Fashion-MNIST only
        accuracy.main(["--conv", "--datasets", "digits"])


def test_accuracy_benchmark_merges_the_seeds_of_several_records(tmp_path, monkeypatch):
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    preset = json.loads(json.dumps(PRESETS["mnist-conv"].as_dict()))

    def record(path, seed, eqprop, backprop, preset=preset):
        runs = {m: [{"seed": seed, "test_accuracy": acc, "train_accuracy": acc,
                     "seconds": 10.0 * (1 + seed), "parameters": 5}]
                for m, acc in (("eqprop", eqprop), ("backprop", backprop))}
        machine = {"command": f"accuracy.py --first-seed {seed}", "date": "today",
                   "cpu_model": "cpu", "logical_cpus": 2, "threads": 1, "torch": "2"}
        path.parent.mkdir()
        path.write_text(json.dumps({"machine": machine, "quick": False, "seconds": 100.0,
                                    "datasets": [{"dataset": "mnist", "preset": preset,
                                                  "runs": runs}]}))
        return str(path)

    first = record(tmp_path / "a" / "accuracy.json", 0, 99.4, 99.5)
    second = record(tmp_path / "b" / "accuracy.json", 1, 99.2, 99.5)
    assert accuracy.main(["--merge", first, second, "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "accuracy.json").read_text())["datasets"][0]
    assert merged["summary"]["eqprop"]["seeds"] == 2
    assert merged["summary"]["eqprop"]["mean"] == pytest.approx(99.3)
    assert merged["pass"]  # 99.3 >= 99.3 and within 0.5 of 99.5
    table = (tmp_path / "m" / "accuracy.md").read_text()
    assert "The runs of 2 records: `accuracy.py --first-seed 0`" in table
    assert "| mnist | mnist-conv | eqprop | 5 | 2 | 99.30 ± 0.14% |" in table
    with pytest.raises(SystemExit, match="seed\\(s\\) \\[0\\] twice"):
        accuracy.main(["--merge", first, first, "--out", str(tmp_path / "m")])
    other = record(tmp_path / "c" / "accuracy.json", 2, 99.0, 99.0, preset={**preset, "lr": 1.0})
    with pytest.raises(SystemExit, match="different presets"):
        accuracy.main(["--merge", first, other, "--out", str(tmp_path / "m")])
