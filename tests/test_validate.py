"""toreq validate: statistics against a hand computation, the report's structure, FAIL shown."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest

from toreq.cli import main
from toreq.data import load_digits
from toreq.presets import get_preset, train_preset
from toreq.validate import (
    CLAIMS,
    annealed_beta,
    claim_gradient,
    claim_memory,
    markdown,
    run_claims,
    summarise,
    write_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summary_statistics_match_a_hand_computation():
    # 1, 2, 3, 4: mean 2.5, sum of squares 5, std sqrt(5/3); t(0.975, 3) = 3.182446 from a
    # printed t table, so the interval is 2.5 +- 3.182446 sqrt(5/3) / 2.
    s = summarise([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert s["n"] == 4 and s["mean"] == 2.5
    assert s["std"] == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert s["ci_low"] == pytest.approx(2.5 - half, rel=1e-6)
    assert s["ci_high"] == pytest.approx(2.5 + half, rel=1e-6)
    # 10, 12: std sqrt(2), so the half-width is t(0.975, 1) sqrt(2) / sqrt(2) = 12.7062
    s = summarise([10.0, 12.0])
    assert s["ci_high"] - s["mean"] == pytest.approx(12.7062, rel=1e-5)
    one = summarise([3.0])
    assert one["std"] == 0.0 and one["ci_low"] is None and one["ci_high"] is None
    with pytest.raises(ValueError, match="at least one value"):
        summarise([])


def test_report_of_two_cheap_claims(tmp_path):
    report = run_claims(["gradient", "memory"], 2, quick=True)
    assert report["seeds"] == 2 and report["quick"] is True
    env = report["environment"]
    assert env["torch"] and env["threads"] == 1 and env["device"] == "cpu"
    assert [c["name"] for c in report["claims"]] == ["gradient", "memory"]
    for claim in report["claims"]:
        assert claim["seeds"] == [0, 1] and claim["checks"] and claim["passed"], claim
        for m in claim["metrics"]:
            assert len(m["values"]) == 2
            assert m["mean"] == pytest.approx(statistics.fmean(m["values"]))
            assert m["std"] == pytest.approx(statistics.stdev(m["values"]), abs=1e-15)
            assert m["ci_low"] <= m["mean"] <= m["ci_high"]
    gradient, memory = report["claims"]
    assert min(gradient["metrics"][0]["values"]) >= 0.99999  # cosine, every seed
    assert max(gradient["metrics"][1]["values"]) <= 1e-4  # relative error
    growth = next(m for m in memory["metrics"] if m["name"].startswith("growth"))
    assert max(growth["values"]) <= 5.0

    path = write_report(report, tmp_path)
    text = path.read_text()
    assert "| claim | verdict | checks |" in text and "Quick run" in text
    assert text.count("**PASS**") == 2 + 4  # the summary rows and every check
    assert "| metric | unit | per seed | mean | std | 95% CI |" in text
    assert f"torch {env['torch']}" in text
    assert json.loads((tmp_path / "validation.json").read_text())["claims"][0]["name"] == \
        "gradient"


def test_an_impossible_bar_is_reported_as_fail():
    result = claim_gradient([0], min_cosine=1.5)
    assert not result.passed
    assert [c.passed for c in result.checks] == [False, True]
    result = claim_memory([0], quick=True, max_ratio=0.0)
    assert not result.passed and not result.checks[1].passed and result.checks[0].passed
    report = {"environment": {"command": "t", "date": "d", "torch": "x", "toreq": "y",
                              "python": "3", "cpu": "c", "logical_cpus": 1, "threads": 1,
                              "device": "cpu", "gpu": None},
              "quick": False, "seeds": 1, "seconds": 0.0, "claims": [result.as_dict()]}
    text = markdown(report)
    assert "| **FAIL** |" in text and "- **FAIL** every seed: EqProp / BPTT at T=100 <= 0" in text
    assert "n/a" in text  # one seed: no confidence interval


def test_command_line(tmp_path, capsys):
    assert main(["validate", "--claims", "gradient", "--seeds", "2", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Gradient equivalence" in out and (tmp_path / "validation.md").exists()
    with pytest.raises(SystemExit) as stop:
        main(["validate", "--seeds", "0", "--claims", "gradient", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "argument --seeds: expected an integer >= 1 and <= 100, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["validate", "--claims", "nonsense"])
    assert "argument --claims: invalid choice: 'nonsense'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="claims must be among accuracy_digits"):
        run_claims(["nonsense"], 2, quick=True)
    with pytest.raises(ValueError, match="seeds must be an int >= 1, got 0"):
        run_claims(["gradient"], 0, quick=True)
    assert set(CLAIMS) == {"accuracy_digits", "accuracy_fashion_mnist", "gradient", "memory",
                           "speed", "beta"}


def test_annealed_beta_schedule(tmp_path):
    schedule = annealed_beta(0.5, 0.01, 101)
    assert schedule(0) == pytest.approx(0.5)
    assert schedule(50) == pytest.approx(math.sqrt(0.5 * 0.01))  # geometric midpoint
    assert schedule(100) == pytest.approx(0.01) and schedule(500) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="start, end > 0 and total_steps >= 2"):
        annealed_beta(0.5, 0.0, 10)
    digits = load_digits()
    preset = dataclasses.replace(get_preset("digits-looped"), epochs=1, hidden=16)
    with pytest.raises(ValueError, match="beta_schedule applies to method 'eqprop' only"):
        train_preset(preset, digits, "backprop", 0, beta_schedule=schedule)
    asked = []  # the trainer asks the schedule for every step's beta

    def recorded(step: int) -> float:
        asked.append(step)
        return schedule(step)

    run = train_preset(preset, digits, "eqprop", 0, beta_schedule=recorded)
    batches = math.ceil(digits.x_train.shape[0] / preset.batch_size)
    assert asked == list(range(batches)) and 0 <= run["test_accuracy"] <= 100


def test_the_accuracy_claims_train_with_a_chosen_estimator(monkeypatch, capsys):
    from toreq import presets

    short = dataclasses.replace(presets.PRESETS["digits-looped"], epochs=2, hidden=32)
    monkeypatch.setitem(presets.PRESETS, "digits-looped", short)
    report = run_claims(["accuracy_digits"], 1, True, algorithm="eqprop",
                        algorithm_settings=[("nudging", "negative"), ("beta", 0.2)])
    claim = report["claims"][0]
    assert claim["notes"][0] == ("Estimator: EqProp(beta=0.2, nudging='negative', "
                                 "nudged_steps=30, nudged_tol=None).")
    eqprop = next(m for m in claim["metrics"] if m["name"] == "EqProp test accuracy")
    assert eqprop["values"][0] > 50.0  # two epochs of digits, trained by negative nudging
    with pytest.raises(TypeError, match="unknown setting.*'eta'"):
        run_claims(["accuracy_digits"], 1, True, algorithm="eqprop",
                   algorithm_settings=[("eta", 0.2)])
    assert main(["validate", "--claims", "gradient", "--algorithm-setting", "beta=0.1"]) == 1
    assert "--algorithm-setting needs --algorithm" in capsys.readouterr().err
