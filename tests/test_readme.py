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


def readme_commands() -> list[str]:
    """Every toreq command of the README's bash blocks, verbatim; of an install line, the
    command after the install (the install itself is what CI runs)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            command = line.split(" && ")[-1]
            if command.startswith("toreq "):
                commands.append(command)
    return commands


def test_the_readme_shows_the_commands():
    commands = [c.split()[1] for c in readme_commands()]
    assert commands == ["train", "train", "export", "lm-train", "generate"]


def test_the_readme_commands_run_verbatim(tmp_path, shakespeare_root):
    """In the README's order, in one folder (export reads train's checkpoint, generate
    lm-train's), each exits 0 with no traceback and prints to stderr as it goes."""
    import os
    import shutil

    import sys

    # The toreq of this interpreter's environment; one torch thread, as everywhere in the suite
    # on a shared machine (the commands stay verbatim).
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "TOREQ_DATA": str(shakespeare_root), "OMP_NUM_THREADS": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    assert shutil.which("toreq", path=env["PATH"]).startswith(bin_dir)
    for command in readme_commands():
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, command
        assert result.stdout.strip(), command
        if command.split()[1] in ("train", "lm-train"):
            assert result.stderr.count("\n") >= 2, f"{command}\n{result.stderr}"  # progress
    assert (tmp_path / "model.pt2").exists() and (tmp_path / "lm.pt").exists()


def test_the_readme_reads_in_five_minutes():
    sections = re.findall(r"^## (.+)$", README, flags=re.M)
    assert sections == ["Two commands", "Quickstart", "What is in the box", "Headline results",
                        "License"]
    assert len(README.split()) < 1500  # words: about five minutes of reading
    for link in re.findall(r"\]\(([^)#]+)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_command_line_entry_points_start():
    import shutil
    import sys

    for command in ([sys.executable, "-m", "toreq", "--help"], [shutil.which("toreq") or "toreq", "train", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "toreq" in result.stdout
