"""What a new user meets on the command line: bad values stop at parsing with one line and exit
code 2; errors of the library while a command runs are one line with exit code 1 (``--debug``
shows the traceback); checkpoints say what they hold; long commands print their progress."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from toreq.checkpoint import read_checkpoint, save_checkpoint
from toreq.cli import main
from toreq.presets import build_trainer, get_preset, run_description
from toreq.train import fit

ROOT = Path(__file__).resolve().parents[1]


def one_line(text: str) -> str:
    """The only line of ``text`` (a test fails when there are more) but for the lines a command
    prints when it has been quiet for a while on a busy machine."""
    lines = [line for line in text.strip("\n").split("\n")
             if not re.fullmatch(r"toreq \S+: still working \(\d+ s\)", line)]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# ------------------------------------------------------------------ 1. values checked when parsed
BAD_VALUES = [
    (["train"], "--epochs", ["0", "-1", "2.5", "ten"]),
    (["train"], "--batch-size", ["0", "-5", "1e3"]),
    (["train"], "--hidden", ["-3", "0", "x"]),
    (["train"], "--layers", ["0"]),
    (["train"], "--lr", ["0", "-1e-3", "nan", "inf", "100"]),
    (["train"], "--beta", ["0", "-0.1", "nan", "1e9"]),
    (["train"], "--free-steps", ["0", "-2"]),
    (["train"], "--nudged-steps", ["0"]),
    (["train"], "--threads", ["0", "-1", "100000"]),
    (["train"], "--seed", ["-1", "1.5", str(2**40)]),
    (["export", "--checkpoint", "run.pt", "--output", "m.pt2"], "--steps", ["0", "-1"]),
    (["export", "--checkpoint", "run.pt", "--output", "m.pt2"], "--tol", ["-1", "nan"]),
    (["export", "--checkpoint", "run.pt"], "--output", ["model.bin", "model"]),
    (["lm-train", "--checkpoint", "lm.pt"], "--steps", ["-1"]),
    (["lm-train", "--checkpoint", "lm.pt"], "--d-model", ["0"]),
    (["lm-train", "--checkpoint", "lm.pt"], "--seq-len", ["0", "-4"]),
    (["lm-train", "--checkpoint", "lm.pt"], "--lr", ["0", "inf"]),
    (["lm-train", "--checkpoint", "lm.pt"], "--params", ["0"]),
    (["lm-train", "--checkpoint", "lm.pt"], "--eval-chars", ["0"]),
    (["lm-study"], "--threads", ["0"]),
    (["lm-study"], "--seed", ["-3"]),
    (["generate", "--checkpoint", "lm.pt"], "--temperature", ["0", "-1", "nan"]),
    (["generate", "--checkpoint", "lm.pt"], "--top-k", ["0"]),
    (["generate", "--checkpoint", "lm.pt"], "--max-new-tokens", ["-1"]),
    (["validate"], "--seeds", ["0", "-2", "1000"]),
    (["validate"], "--threads", ["0"]),
]


@pytest.mark.parametrize("command, option, value",
                         [(c, o, v) for c, o, values in BAD_VALUES for v in values])
def test_a_bad_number_stops_at_parsing_with_one_line(command, option, value, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command, f"{option}={value}"])  # = : argparse reads "-1e-3" alone as an option
    assert stop.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"toreq {command[0]}: error: argument {option}: expected ")
    assert repr(value) in line


def test_the_entry_point_exits_2_on_a_bad_value():
    result = subprocess.run([sys.executable, "-m", "toreq", "train", "--epochs", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert one_line(result.stderr) == ("toreq train: error: argument --epochs: expected an "
                                       "integer >= 1, got '0' (see toreq train --help)")


# ------------------------------------------------------------------ 2. library errors: one line
def tiny_run(tmp_path: Path, epochs: int = 1, hidden: int = 16) -> Path:
    path = tmp_path / "run.pt"
    assert main(["train", "--epochs", str(epochs), "--hidden", str(hidden), "--no-progress",
                 "--threads", "1", "--checkpoint", str(path)]) == 0
    return path


def lm_checkpoint(tmp_path: Path) -> Path:
    from toreq.nn.lm import CharTransformerLM

    model = CharTransformerLM(5, 8, 1, 2, 6, vocab="abcde")
    path = tmp_path / "lm.pt"
    save_checkpoint(path, SimpleNamespace(model=model, optimizer=torch.optim.Adam(
        model.parameters())), 0, [], extra={"lm_config": model.config},
        about={"command": "toreq lm-train", "model": {"class": "CharTransformerLM"}})
    return path


def corrupt_mnist(tmp_path: Path, root: Path) -> Path:
    """A data folder whose MNIST test labels fail their checksum (the rest is the real data)."""
    real = root / "mnist"
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for file in real.iterdir():
        (folder / file.name).symlink_to(file)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.unlink()
    labels.write_bytes(gzip.compress(b"\0" * 100))
    return tmp_path / "data"


ERRORS = {
    "diverged training": (lambda tmp, root: ["train", "--epochs", "1", "--lr", "9", "--beta", "50",
                                       "--no-progress"], "training diverged: .*lower the learning rate"),
    "corrupt checkpoint": (lambda tmp, root: ["export", "--checkpoint", str(
        _write(tmp / "bad.pt", b"PK\3\4 not a zip")), "--output", str(tmp / "m.pt2")],
        "cannot read checkpoint .*bad.pt: the file is corrupt or truncated"),
    "missing checkpoint (export)": (lambda tmp, root: ["export", "--checkpoint", str(tmp / "none.pt"),
                                                 "--output", str(tmp / "m.pt2")],
                                    "checkpoint .*none.pt does not exist"),
    "missing checkpoint (generate)": (lambda tmp, root: ["generate", "--checkpoint",
                                                   str(tmp / "none.pt")], "does not exist"),
    "failed data checksum": (lambda tmp, root: ["train", "--dataset", "mnist", "--data-dir",
                                          str(corrupt_mnist(tmp, root)), "--epochs", "1"],
                             "t10k-labels-idx1-ubyte.gz fails its sha256 check"),
    "resume from an LM checkpoint": (lambda tmp, root: ["train", "--resume", "--checkpoint",
                                                  str(lm_checkpoint(tmp))],
                                     "needs a checkpoint written by toreq train, but .*lm.pt holds "
                                     "a CharTransformerLM.*toreq lm-train.*toreq generate"),
    "export an LM checkpoint": (lambda tmp, root: ["export", "--checkpoint", str(lm_checkpoint(tmp)),
                                             "--output", str(tmp / "m.pt2")],
                                "toreq export needs a checkpoint written by toreq train"),
    "generate from a classifier": (lambda tmp, root: ["generate", "--checkpoint", str(tiny_run(tmp))],
                                   "not a language-model checkpoint: .*run.pt holds a LoopedMLP "
                                   r"\(preset digits-looped\) trained on digits by eqprop"),
    "overwrite a checkpoint": (lambda tmp, root: ["train", "--epochs", "1", "--checkpoint",
                                            str(tiny_run(tmp))],
                               "--checkpoint .*run.pt holds a LoopedMLP .* add --resume .* "
                               "--overwrite"),
    "resume with another setting": (lambda tmp, root: ["train", "--resume", "--hidden", "64",
                                                 "--checkpoint", str(tiny_run(tmp))],
                                    "--hidden 64 differs from the checkpoint's 16"),
    "tensorboard without a log folder": (lambda tmp, root: ["train", "--tensorboard"],
                                         "--tensorboard writes into --log-dir"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", ERRORS)
def test_a_library_error_is_one_line_with_exit_code_1(case, tmp_path, capsys, monkeypatch,
                                                     shakespeare_root):
    argv, message = ERRORS[case]
    argv = argv(tmp_path, shakespeare_root)  # the real data's folder (MNIST beside Shakespeare)
    capsys.readouterr()  # what building the case printed
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    *progress, line = err.strip("\n").split("\n")  # a training prints its epoch lines first
    assert all(re.match(r"\w+ epoch \d+/\d+: |toreq \S+: still working \(|toreq train: training ",
                        p) for p in progress), err
    assert line.startswith(f"toreq {argv[0]}: error: ") and line.endswith(
        "(--debug shows the traceback)")
    assert re.search(message, line), line


def test_debug_shows_the_traceback(tmp_path):
    from toreq.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        main(["train", "--epochs", "1", "--lr", "9", "--beta", "50", "--no-progress", "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["generate", "--checkpoint", str(tmp_path / "none.pt"), "--debug"])


def test_onnx_without_the_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    checkpoint = tiny_run(tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("onnx") else find_spec(name, *a))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoint), "--output",
                 str(tmp_path / "model.onnx")]) == 1
    assert one_line(capsys.readouterr().err) == (
        'toreq export: error: writing ONNX needs onnx and onnxscript: pip install "toreq[onnx]" '
        "(--debug shows the traceback)")
    assert not (tmp_path / "model.onnx").exists()


# ------------------------------------------------------------------ 4. checkpoints describe themselves
def test_a_train_checkpoint_describes_its_run(tmp_path):
    about = read_checkpoint(tiny_run(tmp_path))["about"]
    assert about["command"] == "toreq train" and about["dataset"] == "digits"
    assert about["model"]["class"] == "LoopedMLP"
    assert about["model"]["arguments"]["hidden"] == 16 and about["preset"]["hidden"] == 16
    assert about["preset"]["name"] == "digits-looped" and about["seed"] == 0
    assert about["algorithm"]["beta"] == 0.1 and about["algorithm"]["method"] == "eqprop"
    assert about["threads"] == 1 and about["toreq_version"] == __import__("toreq").__version__


def test_resume_needs_only_the_checkpoint_and_counts_every_segment(tmp_path, capsys):
    preset = dataclasses.replace(get_preset("digits-looped"), hidden=16, epochs=3)
    from toreq.data import load_digits

    data = load_digits()
    model, trainer, scheduler = build_trainer(preset, data.input_dim, data.num_classes, seed=0)
    path = tmp_path / "run.pt"
    first = fit(trainer, data.x_train, data.y_train, data.x_test, data.y_test, epochs=1,
                batch_size=preset.batch_size, seed=0, scheduler=scheduler, checkpoint=path,
                progress=False, about=run_description(preset, "digits", model, 0))
    assert main(["train", "--checkpoint", str(path), "--resume", "--json", "--threads", "1"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert main(["train", "--hidden", "16", "--epochs", "3", "--json", "--threads", "1"]) == 0
    whole = json.loads(capsys.readouterr().out)
    history = resumed["results"][0]["history"]
    assert [r["train_loss"] for r in history] == [
        r["train_loss"] for r in whole["results"][0]["history"]]  # bit-identical
    assert history[0]["seconds"] == first[0]["seconds"]  # the first segment's epoch
    assert resumed["results"][0]["seconds"] == pytest.approx(sum(r["seconds"] for r in history))
    assert resumed["threads"] == 1 and resumed["seed"] == 0


def test_overwrite_replaces_and_fit_refuses_without_it(tmp_path):
    path = tiny_run(tmp_path, hidden=16)
    before = path.read_bytes()
    assert main(["train", "--epochs", "1", "--checkpoint", str(path)]) == 1
    assert path.read_bytes() == before  # refused: the 16-unit run is intact
    assert main(["train", "--epochs", "1", "--hidden", "8", "--no-progress", "--overwrite",
                 "--checkpoint", str(path)]) == 0
    assert read_checkpoint(path)["about"]["preset"]["hidden"] == 8
    model, trainer, _ = build_trainer(get_preset("digits-looped"), 64, 10)
    with pytest.raises(FileExistsError, match="exists; resume from it .* or replace it"):
        fit(trainer, torch.rand(8, 64), torch.zeros(8, dtype=torch.long), epochs=1,
            checkpoint=path, progress=False)


def test_a_checkpoint_of_another_model_says_what_it_holds(tmp_path):
    from toreq.checkpoint import load_checkpoint

    path = tiny_run(tmp_path, hidden=16)
    _, trainer, _ = build_trainer(dataclasses.replace(get_preset("digits-looped"), hidden=32),
                                  64, 10)
    with pytest.raises(RuntimeError) as error:
        load_checkpoint(path, trainer)
    assert "\n" not in str(error.value)
    assert re.search(r"holds a LoopedMLP \(preset digits-looped\) trained on digits by eqprop, "
                     r"1 epoch\(s\).*does not fit this LoopedMLP: \d+ of another shape \(e.g. "
                     r"'input.weight': \(16, 64\) in the checkpoint, \(32, 64\) in the model\)",
                     str(error.value))


class _Payload:
    """An object whose unpickling would create a file: what a crafted checkpoint could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles_code(tmp_path):
    from toreq.checkpoint import FORMAT

    marker, path = tmp_path / "ran", tmp_path / "crafted.pt"
    torch.save({"format": FORMAT, "model": {}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(RuntimeError, match="refusing to load .*crafted.pt: it holds objects other "
                                           "than tensors and plain data.*Unsupported"):
        read_checkpoint(path)
    assert not marker.exists()
    torch.save({"format": "toreq-checkpoint-1", "model": {}}, path)
    with pytest.raises(RuntimeError, match="'toreq-checkpoint-1' checkpoint; this toreq reads "
                                           "'toreq-checkpoint-2'"):
        read_checkpoint(path)


def test_safetensors_export_holds_the_weights_and_the_description(tmp_path, capsys):
    from safetensors import safe_open

    path = tiny_run(tmp_path)
    out = tmp_path / "weights.safetensors"
    assert main(["export", "--checkpoint", str(path), "--output", str(out)]) == 0
    assert f"wrote {out}: the weights of LoopedMLP" in capsys.readouterr().out
    state = read_checkpoint(path)["model"]
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {k for k, v in state.items() if isinstance(v, torch.Tensor)}
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), state[key])
        assert json.loads(f.metadata()["about"])["preset"]["hidden"] == 16



def test_compare_names_the_conv_models_twin(capsys):
    """A conv_ep's backprop baseline is its FeedforwardCNN twin (the same layers and initial
    weights, so the same parameter count), and the table says so."""
    assert main(["train", "--model", "conv_ep", "--channels", "4", "--epochs", "1",
                 "--compare", "backprop", "--no-progress", "--threads", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    eqprop = next(r for r in rows if r[:2] == ["conv_ep", "(EqProp)"])
    twin = next(r for r in rows if r[:4] == ["feedforward", "CNN", "twin", "(backprop)"])
    assert eqprop[2] == twin[4]  # parameters


# ------------------------------------------------------------------ 5. progress
def test_train_prints_a_line_per_epoch_and_no_bar_off_a_terminal(capsys):
    assert main(["train", "--epochs", "2", "--hidden", "16", "--compare", "backprop",
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redraws in a log
    start, *lines = err.strip().splitlines()
    assert start == ("toreq train: training looped_mlp (preset digits-looped) on digits: 2 epochs, "
                     "seed 0, 1 torch thread(s)")
    assert [line.split(":")[0] for line in lines] == [
        "eqprop epoch 1/2", "eqprop epoch 2/2", "backprop epoch 1/2", "backprop epoch 2/2"]
    assert all(" 45/45 batches in " in line for line in lines)  # the real count, backprop's too


def test_a_long_epoch_prints_a_heartbeat_and_no_progress_keeps_epoch_lines(monkeypatch, capsys):
    from toreq import train

    model, trainer, _ = build_trainer(dataclasses.replace(get_preset("digits-looped"), hidden=8),
                                      64, 10)
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    monkeypatch.setattr(train, "HEARTBEAT_S", 0.0)  # every batch is "10 s later"
    fit(trainer, x, y, epochs=1, batch_size=16, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1].split(",")[0] for line in err[:-1]] == [
        "1/4 batches", "2/4 batches", "3/4 batches", "4/4 batches"]
    assert err[-1].startswith("train epoch 1/1: 4/4 batches in ")
    fit(trainer, x, y, epochs=2, batch_size=16, progress="epochs")
    assert [line.split(":")[0] for line in capsys.readouterr().err.splitlines()] == [
        "train epoch 1/2", "train epoch 2/2"]
    fit(trainer, x, y, epochs=1, batch_size=16, progress=False)
    assert capsys.readouterr().err == ""


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_ends_on_its_real_count(monkeypatch):
    from toreq.nn import FeedforwardMLP
    from toreq.train import BackpropTrainer

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    mlp = FeedforwardMLP(64, [16], 10)
    fit(BackpropTrainer(mlp, torch.optim.Adam(mlp.parameters())), torch.rand(90, 64),
        torch.randint(0, 10, (90,)), epochs=1, batch_size=2, desc="backprop")
    assert "45/45" in terminal.text.split("backprop epoch 1/1:")[0]  # the bar's last draw
    assert "0/45" in terminal.text  # its first


def test_a_quiet_command_says_it_is_still_working(tmp_path, capsys, monkeypatch):
    import toreq.cli
    from toreq import train

    monkeypatch.setattr(toreq.cli, "QUIET_S", 0.2)
    monkeypatch.setattr(train, "HEARTBEAT_S", 1e9)
    real = train.EqPropTrainer.step

    def slow_step(self, x, y):  # a step that a busy machine makes take a second
        import time

        time.sleep(0.3 if self.steps_done < 2 else 0)
        return real(self, x, y)

    monkeypatch.setattr(train.EqPropTrainer, "step", slow_step)
    assert main(["train", "--epochs", "1", "--hidden", "8", "--threads", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("toreq train: training looped_mlp")
    assert re.fullmatch(r"toreq train: still working \(\d+ s\)", err[1]), err
    assert err[-1].startswith("eqprop epoch 1/1: 45/45 batches")
    assert sys.stderr is not None and not type(sys.stderr).__name__ == "_Watched"  # restored


def test_lm_train_reports_its_progress(tmp_path, capsys, shakespeare_root):
    assert main(["lm-train", "--steps", "4", "--d-model", "8", "--seq-len", "8",
                 "--data-dir", str(shakespeare_root),
                 "--eval-chars", "500", "--threads", "1",
                 "--checkpoint", str(tmp_path / "lm.pt")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("lm-train: both LM, ") and "4 steps of 32 windows" in err[0]
    assert err[-1].startswith("lm-train: step 4/4, loss ")
    assert read_checkpoint(tmp_path / "lm.pt")["about"]["command"] == "toreq lm-train"


def test_tensorboard_logging_writes_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "--epochs", "2", "--hidden", "8", "--no-progress", "--log-dir",
                 str(tmp_path), "--tensorboard"]) == 0
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    losses = [e.value for e in events.Scalars("train_loss")]
    logged = [json.loads(line)["train_loss"] for line in (tmp_path / "metrics.jsonl").open()]
    assert losses == pytest.approx(logged) and len(losses) == 2


# ------------------------------------------------------------------ 7. threads
def test_every_epoch_records_its_threads_and_deterministic_ignores_them():
    from toreq.nn import LoopedMLP
    from toreq.train import EqPropTrainer

    x, y = torch.rand(256, 64), torch.randint(0, 10, (256,))

    def run(threads: int, deterministic: bool) -> tuple[list, list]:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = LoopedMLP(64, 256, 10)
        trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=2e-3), beta=0.2)
        history = fit(trainer, x, y, epochs=2, batch_size=64, progress=False,
                      deterministic=deterministic)
        assert torch.get_num_threads() == threads  # restored
        return history, [p.detach().clone() for p in model.parameters()]

    before = torch.get_num_threads()
    try:
        one, params_one = run(1, True)
        two, params_two = run(2, True)
        plain = run(2, False)[0]
    finally:
        torch.set_num_threads(before)
    assert [r["threads"] for r in one + two] == [1] * 4 and [r["threads"] for r in plain] == [2, 2]
    assert [r["train_loss"] for r in one] == [r["train_loss"] for r in two]
    assert all(torch.equal(a, b) for a, b in zip(params_one, params_two))


# ------------------------------------------------------------------ 6. install and examples
def test_a_build_with_isolation_says_so_and_gives_the_command(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("CMakeLists.txt", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "csrc", source / "csrc")
    (source / "toreq").mkdir()
    shutil.copy(ROOT / "toreq" / "__init__.py", source / "toreq")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", str(source)],
                            capture_output=True, text=True, timeout=600)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert ("pip is building toreq in an isolated environment (build isolation), which cannot see "
            "the torch installed in your Python") in output, output[-3000:]
    assert "pip install --no-build-isolation -e ." in output


def test_the_notebooks_extra_holds_what_the_notebooks_import():
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {re.split(r"[<>=\[ ]", r)[0].lower()
              for r in project["dependencies"] + project["optional-dependencies"]["notebooks"]}
    assert "nbconvert" in wanted  # jupyter nbconvert --execute
    distributions = importlib.metadata.packages_distributions()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for module in set(re.findall(r"^\s*(?:from|import) (\w+)", code, flags=re.M)):
            if (module in sys.stdlib_module_names or module == "toreq"
                    or (ROOT / "benchmarks" / f"{module}.py").exists()):  # the repo's scripts
                continue
            owners = {d.lower() for d in distributions.get(module, [module])}
            assert owners & wanted, f"{notebook.name} imports {module}, not in the notebooks extra"
    result = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_docs_install_the_readmes_torch():
    readme = (ROOT / "README.md").read_text()
    pins = set(re.findall(r"pip install torch==([\d.]+)", readme))
    assert len(pins) == 1
    installs = [(page.name, line) for page in sorted((ROOT / "docs").glob("**/*.md"))
                for line in re.findall(r"pip install torch\b\S*", page.read_text())]
    assert installs  # the docs do show how to install
    for name, line in installs:
        assert line == f"pip install torch=={pins.pop()}", f"docs/{name}: {line}"
        pins.add(line.split("==")[1])


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_has_help_and_quick(script):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "show this help message" in result.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--epochs", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "argument --epochs: expected an integer >= 1" in bad.stderr


@pytest.mark.parametrize("script", ["train_digits.py", "ddp_train.py"])
def test_quick_examples_run(script, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(r"\d+\.\d+%", result.stdout)


# ------------------------------------------------------------------ the gradient estimator by name
def test_train_takes_the_estimator_and_its_settings_by_name(capsys):
    code = main(["train", "--algorithm", "holomorphic", "--algorithm-setting", "points=4",
                 "--algorithm-setting", "beta=0.2", "--hidden", "32", "--epochs", "2", "--json",
                 "--threads", "1", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"]["algorithm"] == "holomorphic"
    assert [list(p) for p in report["preset"]["algorithm_settings"]] == [["points", 4], ["beta", 0.2]]
    assert report["results"][0]["test_accuracy"] > 0.5  # digits, 10 classes, 2 epochs


@pytest.mark.parametrize("options,code,message", [
    (["--algorithm", "eqprop", "--algorithm-setting", "betta=0.1"], 1,
     r"estimator 'eqprop': unknown setting\(s\) 'betta'; accepted: beta, nudged_steps"),
    (["--algorithm", "cpl", "--algorithm-setting", "eta=2"], 1, r"eta must be in \(0, 1\]"),
    (["--algorithm-setting", "eta"], 2, "expected NAME=VALUE"),
    (["--algorithm", "hebbian"], 2, "invalid choice: 'hebbian'"),
])
def test_a_bad_estimator_or_setting_is_one_line(options, code, message, capsys):
    command = ["train", *options, "--epochs", "1", "--threads", "1", "--no-progress"]
    if code == 2:  # refused by the parser
        with pytest.raises(SystemExit) as exit_:
            main(command)
        assert exit_.value.code == 2
    else:
        assert main(command) == code
    assert re.search(message, one_line(capsys.readouterr().err))


def test_an_estimator_that_does_not_fit_the_model_stops_the_run_in_one_line(capsys):
    # contrastive learning clamps the output layer; the digits preset's LoopedMLP has a readout
    assert main(["train", "--algorithm", "cl", "--epochs", "1", "--threads", "1",
                 "--no-progress"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("toreq train: error: ") and "through a readout" in lines[-1]
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in "".join(lines)


def test_a_checkpoint_resumes_with_its_estimator(tmp_path, capsys):
    path = tmp_path / "run.pt"
    common = ["--hidden", "16", "--threads", "1", "--no-progress", "--json"]
    assert main(["train", "--algorithm", "eqprop", "--algorithm-setting", "nudging=negative",
                 "--epochs", "1", "--checkpoint", str(path), *common]) == 0
    capsys.readouterr()
    about = read_checkpoint(path)["about"]
    assert about["algorithm"]["estimator"] == "eqprop"
    assert about["algorithm"]["estimator_settings"]["nudging"] == "negative"
    # --resume needs only the path: the estimator and its settings come from the checkpoint
    assert main(["train", "--checkpoint", str(path), "--resume", "--threads", "1",
                 "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"]["algorithm"] == "eqprop"
    assert [list(p) for p in report["preset"]["algorithm_settings"]] == [["nudging", "negative"]]
    # a different estimator on resume is refused
    assert main(["train", "--checkpoint", str(path), "--resume", "--algorithm", "cpl",
                 "--threads", "1", "--no-progress"]) == 1
    assert "differs from the checkpoint's" in one_line(capsys.readouterr().err)
