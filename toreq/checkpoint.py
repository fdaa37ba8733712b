"""Checkpoints that describe themselves: atomic writes, verified and safe reads.

A checkpoint (`toreq-checkpoint-2`) is a `torch.save` archive of plain data and tensors
only: the model's and optimizer's `state_dict`, the trainer's step count, the metrics
history, the RNG states, an `extra` dict for the caller, and `about`, the run's own
description: what wrote it (`command`: `toreq train`, `toreq lm-train`), the model
(`model`: its class and the arguments that rebuild it), the preset, the data set, the
algorithm's settings, the seed, and the toreq and torch versions and torch thread count it ran
with. So `toreq export`, `toreq generate` and `toreq train --resume` need only the path,
and a checkpoint given to the wrong command or model is answered with one line saying what it
holds ([`describe_checkpoint`][toreq.checkpoint.describe_checkpoint]).

Reading never unpickles code: [`read_checkpoint`][toreq.checkpoint.read_checkpoint] checks every
record's CRC-32 and then loads with `torch.load(weights_only=True)`. This module imports no
model, so every layer (the trainers, the language models, the command line) can use it.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "describe_checkpoint", "load_checkpoint", "read_checkpoint",
           "save_checkpoint", "save_safetensors"]

FORMAT = "toreq-checkpoint-2"
"""The format tag every checkpoint carries; a file with another tag is refused."""


def _rng_state() -> dict[str, Any]:
    """The torch, Python and NumPy generators' states in types `weights_only` loads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached"]))


def save_checkpoint(path: str | os.PathLike, trainer: Any, epoch: int,
                    history: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                    about: dict[str, Any] | None = None) -> None:
    """Writes a checkpoint atomically: a temporary file in the same folder, fsynced, renamed.

    `trainer` is anything with `model` and `optimizer` (and optionally `steps_done`).
    `about` describes the run (see the module docstring); the toreq and torch versions and
    the torch thread count are added to it. A crash while writing leaves the previous
    checkpoint intact.
    """
    import toreq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "epoch": epoch,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "trainer_steps": getattr(trainer, "steps_done", 0),
        "history": history,
        "rng": _rng_state(),
        "extra": extra or {},
        "about": {"model": {"class": type(trainer.model).__name__}, **(about or {}),
                  "toreq_version": toreq.__version__,
                  "torch_version": str(torch.__version__), "threads": torch.get_num_threads()},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The dict of a checkpoint written by [`save_checkpoint`][toreq.checkpoint.save_checkpoint],
    verified, loaded safely.

    `torch.save` writes a zip archive holding a CRC-32 of every record, and `torch.load`
    does not check them, so a flipped byte in a tensor would otherwise load as silently damaged
    weights. The archive is then loaded with `torch.load(weights_only=True)`, which refuses
    anything but tensors and plain data, so a crafted file cannot run code. A missing file
    raises `FileNotFoundError`; a truncated, corrupt or unsafe file, or one that is not a
    toreq checkpoint of this format, a `RuntimeError` that says so in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every record and checks its CRC-32
        if damaged is not None:
            raise ValueError(f"record {damaged} fails its CRC-32 check")
    except Exception as error:  # zipfile raises several types for damaged files
        raise _corrupt(path, error) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # objects weights_only refuses
        raise RuntimeError(f"refusing to load {path}: it holds objects other than tensors and "
                           "plain data, which torch.load(weights_only=True) does not unpickle; "
                           "only load files you trust with torch.load directly "
                           f"({_unpickler_reason(error)})") from error
    except Exception as error:  # a damaged header the CRC-32s do not cover (PyTorch's reader)
        raise _corrupt(path, error) from error
    if not isinstance(state, dict) or "format" not in state:
        raise RuntimeError(f"{path} is not a toreq checkpoint (no format tag)")
    if state["format"] != FORMAT:
        raise RuntimeError(f"{path} is a {state['format']!r} checkpoint; this toreq reads "
                           f"{FORMAT!r}; it was written by an earlier toreq: train it again")
    return state


def describe_checkpoint(state: dict[str, Any], path: str | os.PathLike = "the checkpoint") -> str:
    """One line saying what a checkpoint (the dict of
    [`read_checkpoint`][toreq.checkpoint.read_checkpoint]) holds."""
    about = state.get("about", {})
    model = about.get("model", {})
    what = model.get("class", "model of unknown class")
    if about.get("preset"):
        what += f" (preset {about['preset']['name']})"
    if about.get("dataset"):
        what += f" trained on {about['dataset']}"
    if about.get("algorithm", {}).get("method"):
        what += f" by {about['algorithm']['method']}"
    command = f" by {about['command']}" if "command" in about else ""
    return (f"{path} holds a {what}, {state.get('epoch', 0)} epoch(s), written{command} with "
            f"toreq {about.get('toreq_version', '?')}")


def load_checkpoint(path: str | os.PathLike, trainer: Any) -> dict[str, Any]:
    """Restores model, optimizer, RNGs and trainer counters; returns the checkpoint dict.

    The file is verified first ([`read_checkpoint`][toreq.checkpoint.read_checkpoint]). A
    checkpoint that does not fit `trainer.model` raises a one-line `RuntimeError` saying what
    the checkpoint holds and how it differs (keys missing or unexpected, the first shape that
    differs).
    """
    state = read_checkpoint(path)
    mismatch = _state_dict_mismatch(state["model"], trainer.model.state_dict())
    if mismatch:
        raise RuntimeError(f"checkpoint {describe_checkpoint(state, path)}; it does not fit "
                           f"this {type(trainer.model).__name__}: {mismatch}")
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if hasattr(trainer, "steps_done"):
            trainer.steps_done = state["trainer_steps"]
        _set_rng_state(state["rng"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise RuntimeError(f"checkpoint {describe_checkpoint(state, path)}; it does not fit "
                           f"this trainer (another model, optimizer or toreq version?): "
                           f"{type(error).__name__}: {_first_line(error)}") from error
    return state


def save_safetensors(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Writes the model weights of a checkpoint dict as a `.safetensors` file (the
    `safetensors` format: tensors and a JSON header only), with the checkpoint's `about`
    as string metadata. Non-tensor entries of the state dict (extra state) are left out."""
    import json

    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    metadata = {"format": "toreq-weights-1", "about": json.dumps(state.get("about", {}))}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def _state_dict_mismatch(saved: dict[str, Any], expected: dict[str, Any]) -> str:
    """How two state dicts differ, in a few words ("" when they fit)."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [(k, tuple(saved[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in saved and isinstance(v, torch.Tensor) and isinstance(saved[k], torch.Tensor)
              and saved[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if shapes:
        name, have, want = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {name!r}: {have} in the checkpoint, "
                     f"{want} in the model)")
    return "; ".join(parts)


def _unpickler_reason(error: BaseException) -> str:
    """The line of torch's long weights_only message that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if "Unsupported" in line), _first_line(error))


def _corrupt(path: Path, error: BaseException) -> RuntimeError:
    return RuntimeError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                        f"({_first_line(error)}). Delete it, or resume from or load another "
                        "checkpoint.")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
