"""The README's code runs as written, and CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", README))))
def test_python_blocks_run(index, capsys):
    block = re.findall(r"```python\n(.*?)```", README, flags=re.S)[index]
    exec(compile(block, f"README.md python block {index}", "exec"), {})
    assert capsys.readouterr().out  # every block prints what it shows


def test_ci_runs_the_readme_test_command():
    awk = re.search(r"test_command=\$\(awk '(.*?)' README.md\)", (ROOT / ".ci/run").read_text()).group(1)
    command = subprocess.run(["awk", awk, "README.md"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    assert command.endswith("python -m pytest") and f"```bash\n{command}\n```" in README


def test_cli_help_is_complete():
    from toreq.cli import make_parser

    parser = make_parser()
    top = parser.format_help()
    assert "train" in top
    sub = parser._subparsers._group_actions[0].choices["train"].format_help()
    for option in ("--model", "--dataset", "--compare", "--beta", "--epochs", "--checkpoint",
                   "--resume", "--log-dir", "--data-dir"):
        assert option in sub


def test_cli_trains_and_compares(capsys, tmp_path):
    from toreq.cli import main

    assert main(["train", "--epochs", "1", "--hidden", "32", "--compare", "backprop",
                 "--no-progress", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "looped_mlp (EqProp)" in out and "feedforward MLP (backprop)" in out
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.csv").exists()


def test_command_line_entry_points_start():
    import shutil
    import sys

    for command in ([sys.executable, "-m", "toreq", "--help"], [shutil.which("toreq") or "toreq", "train", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "toreq" in result.stdout
