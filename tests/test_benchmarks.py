"""The benchmark suite's docs update: the published results are the benchmarks' own output."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_suite():
    spec = importlib.util.spec_from_file_location("benchmarks_main",
                                                  ROOT / "benchmarks" / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_marked_blocks_are_replaced_by_the_results(tmp_path):
    suite = load_suite()
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "accuracy.md").write_text(
        "# Test accuracy\n\n`/opt/py/bin/python3.11 benchmarks/accuracy.py --quick` on today\n\n"
        "## Targets\n\n- PASS digits\n")
    readme = ("intro\n<!-- benchmark:accuracy -->\nold table\n<!-- /benchmark:accuracy -->\n"
              "middle\n<!-- benchmark:memory -->\nold memory\n<!-- /benchmark:memory -->\nend\n")
    text, updated = suite.with_results(readme, tmp_path)
    assert updated == ["accuracy"]  # no memory results: that block stays as it was
    assert text == ("intro\n<!-- benchmark:accuracy -->\n"
                    "`python benchmarks/accuracy.py --quick` on today\n\n#### Targets\n\n"
                    "- PASS digits\n<!-- /benchmark:accuracy -->\n"
                    "middle\n<!-- benchmark:memory -->\nold memory\n<!-- /benchmark:memory -->\n"
                    "end\n")


def test_the_results_page_holds_every_benchmark_block_filled():
    suite = load_suite()
    page = suite.RESULTS_PAGE.read_text()
    for name, markdown in suite.RESULTS_BLOCKS.items():
        start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
        assert start in page and end in page, name
        block = page.split(start, 1)[1].split(end, 1)[0]
        script = Path(markdown).stem  # the benchmark that wrote it
        assert f"benchmarks/{script}.py" in block and "|---" in block, name
        assert start not in (ROOT / "README.md").read_text()  # the long tables left the README


def test_update_docs_fills_the_page_and_the_readme_headline(tmp_path):
    suite = load_suite()
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "accuracy.md").write_text(
        "# Test accuracy\n\n`/opt/bin/python3 benchmarks/accuracy.py --quick` on today\n\n"
        "| data | preset | method | params | seeds | test accuracy | train time (s) | target |\n"
        "|---|---|---|---:|---:|---:|---:|---|\n"
        "| digits | digits-looped | eqprop | 84,746 | 2 | 96.10 ± 0.20% | 6 | **PASS** |\n"
        "| digits | digits-looped | backprop | 19,210 | 2 | 95.00 ± 0.10% | 1 |  |\n")
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    page.write_text("# R\n<!-- benchmark:accuracy -->\nold\n<!-- /benchmark:accuracy -->\n")
    readme.write_text("intro\n<!-- headline:accuracy -->\nold\n<!-- /headline:accuracy -->\nend\n")
    assert suite.update_docs(tmp_path, readme, page) == ["accuracy", "README headline"]
    assert "96.10 ± 0.20%" in page.read_text() and "old" not in page.read_text()
    assert readme.read_text() == (
        "intro\n<!-- headline:accuracy -->\n`python benchmarks/accuracy.py --quick` on today\n\n"
        "| data set | EqProp test accuracy | backprop, same width | seeds |\n|---|---:|---:|---:|\n"
        "| digits | 96.10 ± 0.20% | 95.00 ± 0.10% | 2 |\n<!-- /headline:accuracy -->\nend\n")


def test_the_readme_headline_is_the_accuracy_benchmarks_own():
    suite = load_suite()
    page = suite.RESULTS_PAGE.read_text()
    block = page.split("<!-- benchmark:accuracy -->", 1)[1].split("<!-- /benchmark:accuracy -->")[0]
    readme = (ROOT / "README.md").read_text()
    assert f"<!-- headline:accuracy -->\n{suite.headline(block)}\n<!-- /headline:accuracy -->" in readme


def test_estimators_benchmark_measures_gradient_quality(tmp_path):
    """The quick gradient part: centered EqProp tight at small beta, holomorphic EqProp's error
    falling with N, one-sided nudging O(beta)."""
    import json
    import runpy

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        main = runpy.run_path(str(ROOT / "benchmarks" / "estimators.py"))["main"]
        assert main(["--quick", "--parts", "gradients", "--out", str(tmp_path)]) == 0
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = json.loads((tmp_path / "estimators.json").read_text())["gradients"]

    def error(rule, value):
        return next(r["relative_error"] for r in rows if r["rule"] == rule and r["value"] == value)

    assert error("EqProp centered", 1e-4) < 1e-7
    assert error("EqProp positive", 1e-2) > 50 * error("EqProp positive", 1e-4)  # O(beta)
    holo = [error("holomorphic, radius 0.1", n) for n in (2, 4, 8)]
    assert holo[0] > holo[1] > holo[2] and holo[2] < 1e-8
    assert (tmp_path / "estimators.md").read_text().count("| EqProp centered |") == 3


def test_train_step_benchmarks_plain_reference_gives_toreqs_gradients():
    """The hand-written step the training-step benchmark compares with computes toreq's
    gradients (float32 round-off), for every configuration that has one."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for config in train_step.configs(quick=True):
        torch.manual_seed(1)
        x, y = torch.rand(6, config.input_dim), torch.randint(0, 10, (6,))
        assert train_step.plain_matches(config, x, y) < 1e-4, config.name


def test_train_step_judges_tolerance_within_its_noise_and_names_a_target_under_the_floor():
    """The tol ratio passes at most 1, or within an A/A spread of at most 5%; a step / plain
    limit under the floor (the GEMMs at peak rate) is called out of reach."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def verdicts(step_tol, step_again, plain=3.0, floor=1.0):
        row = {"config": "c", "batch": 20, "threads": 1, "step": 2.0, "step_tol": step_tol,
               "step_again": step_again, "plain": plain, "bound": 1.0, "floor": floor,
               "peak_flops": 8e10, "parts": {"checks": 0.001}}
        return {text.split(": ")[1].split(" =")[0]: (ok, text)
                for ok, text in train_step.judge([row], [1])}

    tol = "step with tol / step with tol=0"
    assert verdicts(1.9, 2.0)[tol][0]  # faster
    assert verdicts(2.04, 2.06)[tol][0]  # 2% slower, inside a 3% A/A spread
    assert not verdicts(2.04, 2.01)[tol][0]  # outside a 0.5% spread
    assert not verdicts(2.2, 2.4)[tol][0]  # a 20% spread judges nothing
    ok, text = verdicts(2.0, 2.0)["step / plain"]
    assert not ok and "out of reach" not in text  # 0.5 x 3.0 ms is above the 1.0 ms floor
    ok, text = verdicts(2.0, 2.0, floor=1.6)["step / plain"]
    assert not ok and "out of reach: the target's 1.5e+03 ms is under the floor" in text


def test_the_learning_rules_table_renders_and_the_readme_headline_quotes_it(tmp_path):
    """An estimators record's learning rows (written here) through --render: the comparison
    with the comparative study reads the means right, and the README headline puts each
    algorithm's accuracy and time per epoch under its data set and network."""
    import json
    import runpy

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        main = runpy.run_path(str(ROOT / "benchmarks" / "estimators.py"))["main"]
        means = {"EqProp positive": 0.93, "EqProp negative": 0.95, "EqProp centered": 0.96,
                 "CL": 0.94}
        rows = [{"dataset": "mnist", "network": "DHN 784-1024-10", "algorithm": name,
                 "mean": mean, "std": 0.001, "seconds_per_epoch": 4.0, "runs": []}
                for name, mean in means.items()]
        rows.append({**rows[0], "network": "DHN 784-512-512-10", "algorithm": "EqProp positive",
                     "mean": 0.97})
        rows += [{**r, "network": "DHN 784-512-512-10"} for r in rows[1:3]]
        record = {"command": "python benchmarks/estimators.py --parts learning", "mode": "full",
                  "seeds": 3, "epochs": 3, "jobs": 2, "seconds": 60.0, "learning": rows,
                  "machine": {"date": "today", "cpu_model": "cpu", "logical_cpus": 2,
                              "torch": "2", "threads": 1}}
        source = tmp_path / "run.json"
        source.write_text(json.dumps(record))
        assert main(["--render", str(source), "--out", str(tmp_path / "estimators_learning")]) == 0
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    text = (tmp_path / "estimators_learning" / "estimators.md").read_text()
    assert ("- mnist, DHN 784-1024-10: centered EqProp the best: yes; negative nudging better "
            "than positive: yes (+2.00 points; std 0.10 and 0.10).") in text
    assert ("- mnist, DHN 784-512-512-10: centered EqProp the best: no: EqProp positive is 1.00 "
            "points above it (std 0.10 and 0.10); negative nudging better than positive: no "
            "(-2.00 points") in text
    headline = load_suite().estimators_headline(text)
    assert headline.startswith("`python benchmarks/estimators.py --parts learning` on today")
    assert "| algorithm | mnist, 784-1024-10 | mnist, 784-512-512-10 |" in headline
    assert "| EqProp centered | 96.00 ± 0.10% (4.0s) | 96.00 ± 0.10% (4.0s) |" in headline
    assert "| CL | 94.00 ± 0.10% (4.0s) | - |" in headline
    assert "centered EqProp the best" not in headline  # the findings stay on the results page
