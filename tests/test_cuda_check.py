"""The one-call GPU check (benchmarks/gpu_check.sh): its dry run passes on any machine, and
catches a command or option that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["build", "pytest_cuda", "bench_ops", "bench_ops_eager", "memory", "lm_study"]


def dry_run(script: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHON=sys.executable))


def test_dry_run_checks_every_step(tmp_path):
    result = dry_run(ROOT / "benchmarks" / "gpu_check.sh", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.md").read_text()
    for step in STEPS:
        assert f"| {step} | parses |" in summary, summary
    # the entry points really ran: their help texts are in the logs
    assert "--budget" in (tmp_path / "bench_ops.log").read_text()
    assert "--scales" in (tmp_path / "lm_study.log").read_text()
    assert "tests collected" in (tmp_path / "pytest_cuda.log").read_text()


def test_dry_run_fails_on_an_option_that_does_not_exist(tmp_path):
    """The same script with one option misspelt, in a tree that links to the real files."""
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    for name in ("tests", "toreq", "pyproject.toml"):
        (tree / name).symlink_to(ROOT / name)
    for name in ("bench_ops.py", "memory.py", "machine.py"):
        (tree / "benchmarks" / name).symlink_to(ROOT / "benchmarks" / name)
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    command = "--experiments variants --scales 1.0"  # the command, not its description above
    assert text.count(command) == 1
    (tree / "benchmarks" / "gpu_check.sh").write_text(
        text.replace(command, "--experiments variants --scale 1.0"))
    result = dry_run(tree / "benchmarks" / "gpu_check.sh", tmp_path / "out")
    assert result.returncode != 0
    assert "FAILED  lm_study" in result.stdout
    assert "option --scale is not in the help" in (tmp_path / "out" / "lm_study.log").read_text()
