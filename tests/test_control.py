"""Control tasks (toreq.control): the experts, the data they generate, its cache, behaviour cloning
judged on held-out states and in closed loop, and the error without Gymnasium."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toreq import control
from toreq.control import (TASKS, control_data, evaluate_policy, expert_policy, generate,
                           load_control, model_policy, run_episodes)
from toreq.data import load_classification
from toreq.presets import build_trainer, get_preset
from toreq.train import fit

# every test but the one of the error without it (Gymnasium is in the test extra)
needs_gymnasium = pytest.mark.skipif(importlib.util.find_spec("gymnasium") is None,
                                     reason="the control extra: pip install 'toreq[control]'")

ROOT = Path(__file__).resolve().parents[1]


def random_policy(num_actions: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda observations: rng.integers(num_actions, size=len(observations))


@needs_gymnasium
def test_experts_take_the_actions_of_their_switching_rules():
    cartpole, acrobot = TASKS["cartpole"], TASKS["acrobot"]
    # (x, x_dot, theta, theta_dot): the pole leaning right -> push right (1), and vice versa;
    # a cart far right with an upright pole -> push right, to tilt the pole back to the centre
    states = np.array([[0, 0, 0.05, 0], [0, 0, -0.05, 0], [0, 0, 0, 0.2], [1.0, 0, 0, 0]])
    assert cartpole.expert(states).tolist() == [1, 0, 1, 1]
    # (cos t1, sin t1, cos t2, sin t2, t1_dot, t2_dot): torque along theta2_dot + 0.3 sin theta1
    states = np.array([[1, 0, 1, 0, 0, 1.0], [1, 0, 1, 0, 0, -1.0], [0, 1, 1, 0, 0, -0.2],
                       [0, -1, 1, 0, 0, 0.2]])
    assert acrobot.expert(states).tolist() == [2, 0, 2, 0]


@needs_gymnasium
def test_experts_solve_their_environments_deterministically():
    first = run_episodes(expert_policy("cartpole"), "cartpole", episodes=3)
    assert [e["return"] for e in first] == [500.0] * 3  # balanced for the whole episode
    again = run_episodes(expert_policy("cartpole"), "cartpole", episodes=3)
    assert all(np.array_equal(a["observations"], b["observations"]) for a, b in zip(first, again))
    acrobot = evaluate_policy(expert_policy("acrobot"), "acrobot", episodes=10)
    # random torques rarely swing the tip up within the 500 steps (return -500)
    assert acrobot["mean"] > -150 and max(acrobot["returns"]) > -100, acrobot
    assert evaluate_policy(expert_policy("acrobot"), "acrobot", episodes=10) == acrobot


@needs_gymnasium
def test_data_generation_is_deterministic_for_a_seed_and_split_by_episode():
    a = generate("acrobot", seed=3, train_episodes=4, test_episodes=2)
    b = generate("acrobot", seed=3, train_episodes=4, test_episodes=2)
    for field in ("observations", "actions", "episodes", "returns"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    other = generate("acrobot", seed=4, train_episodes=4, test_episodes=2)
    assert not np.array_equal(a.observations[:50], other.observations[:50])
    # labels are the expert's actions in the visited states (also where a random one was taken)
    assert np.array_equal(a.actions, TASKS["acrobot"].expert(a.observations))
    assert set(np.unique(a.episodes).tolist()) == set(range(6)) and len(a.returns) == 6
    data = a.classification()
    n_train = int((a.episodes < 4).sum())
    assert data.x_train.shape == (n_train, 6)
    assert data.x_test.shape == (len(a.episodes) - n_train, 6)
    expected = torch.from_numpy(TASKS["acrobot"].features(a.observations[a.episodes >= 4]))
    assert torch.equal(data.x_test, expected)  # the last episodes, in order: a split by episode
    assert data.num_classes == 3 and data.image_shape == (1, 1, 6)


@needs_gymnasium
def test_cache_is_keyed_by_a_checksum_of_the_settings(tmp_path, monkeypatch):
    first = control_data("cartpole", tmp_path, seed=1, train_episodes=2, test_episodes=1)
    files = sorted((tmp_path / "control").glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("cartpole-")
    assert len(files[0].stem.split("-")[1]) == 16
    with np.load(files[0]) as f:
        assert json.loads(str(f["settings"])) == first.settings

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of read from the cache")

    with monkeypatch.context() as m:
        m.setattr(control, "generate", no_generation)
        cached = control_data("cartpole", tmp_path, seed=1, train_episodes=2, test_episodes=1)
    assert np.array_equal(cached.observations, first.observations)
    control_data("cartpole", tmp_path, seed=2, train_episodes=2, test_episodes=1)
    assert len(list((tmp_path / "control").glob("*.npz"))) == 2  # other settings, other file

    files[0].write_bytes(b"not an npz file")  # a damaged cache is made again
    again = control_data("cartpole", tmp_path, seed=1, train_episodes=2, test_episodes=1)
    assert np.array_equal(again.observations, first.observations)
    with np.load(files[0]) as f:
        assert np.array_equal(f["observations"], first.observations)


@needs_gymnasium
def test_an_unwritable_root_only_loses_the_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data root's folder would go")
    with pytest.warns(UserWarning, match="cannot cache the cartpole data"):
        data = load_control("cartpole", blocker, train_episodes=1, test_episodes=1)
    assert data.x_train.shape == (500, 4)


@needs_gymnasium
def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="task must be one of \\('cartpole', 'acrobot'\\)"):
        generate("pong")
    with pytest.raises(ValueError, match="train_episodes must be a positive int, got 0"):
        generate("cartpole", train_episodes=0)
    with pytest.raises(ValueError, match="exploration must be in \\[0, 1\\), got 1.5"):
        generate("cartpole", exploration=1.5)
    with pytest.raises(ValueError, match="episodes must be a positive int"):
        evaluate_policy(expert_policy("cartpole"), "cartpole", episodes=0)


@needs_gymnasium
@pytest.mark.parametrize("task", ["cartpole", "acrobot"])
def test_short_training_beats_majority_class_and_a_random_policy(task, tmp_path, one_thread):
    data = load_classification(task, root=tmp_path, train_episodes=10 if task == "cartpole"
                               else 50)
    preset = get_preset(f"{task}-looped")
    model, trainer, scheduler = build_trainer(preset, data.input_dim, data.num_classes, seed=0)
    history = fit(trainer, data.x_train, data.y_train, data.x_test, data.y_test, epochs=2,
                  batch_size=preset.batch_size, scheduler=scheduler, progress=False)
    majority = float(torch.bincount(data.y_test).max()) / len(data.y_test)
    assert history[-1]["test_accuracy"] > majority + 0.3, (history[-1], majority)
    policy = evaluate_policy(model_policy(model, task), task, episodes=5)
    random = evaluate_policy(random_policy(TASKS[task].num_actions), task, episodes=5)
    # random: CartPole falls within ~20 steps, Acrobot's tip seldom rises within 500
    assert policy["mean"] > random["mean"] + (200 if task == "cartpole" else 100), \
        (policy, random)


def test_a_clear_one_line_error_without_gymnasium(tmp_path, monkeypatch, capsys):
    from toreq.cli import main

    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` raises ImportError
    with pytest.raises(ImportError, match=r"need Gymnasium.*pip install 'toreq\[control\]'") as e:
        load_classification("cartpole", root=tmp_path)
    assert "\n" not in str(e.value)
    code = main(["train", "--dataset", "acrobot", "--data-dir", str(tmp_path), "--no-progress"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and message.startswith("toreq train: error: ") and "toreq[control]" in message


@needs_gymnasium
def test_command_line_reports_the_closed_loop_return(tmp_path, capsys, one_thread):
    from toreq.cli import main

    assert main(["train", "--dataset", "cartpole", "--compare", "backprop", "--epochs", "1",
                 "--hidden", "32", "--data-dir", str(tmp_path), "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"]["name"] == "cartpole-looped"
    assert report["expert"]["mean"] == 500.0 and report["expert"]["episodes"] == 20
    for result in report["results"]:
        assert len(result["closed_loop"]["returns"]) == 20
        assert result["test_accuracy"] > 0.8, result["model"]


@needs_gymnasium
def test_accuracy_benchmark_quick_run_on_a_control_task(tmp_path, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    out = tmp_path / "out"
    assert accuracy.main(["--quick", "--datasets", "acrobot", "--out", str(out),
                          "--data-dir", str(tmp_path)]) == 0
    table = (out / "accuracy.md").read_text()
    assert "| acrobot | - | expert |" in table and "| acrobot | acrobot-looped | eqprop |" in table
    record = json.loads((out / "accuracy.json").read_text())["datasets"][0]
    assert record["expert"]["episodes"] == 20
    assert len(record["runs"]["eqprop"][0]["closed_loop"]["returns"]) == 20
