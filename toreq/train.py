"""Trainers: EqProp, and the backprop-through-time and feedforward-backprop baselines.

Each trainer's :meth:`step` takes one batch, writes gradients into the parameters' ``.grad``
and steps the optimizer, so every ``torch.optim`` optimizer and LR scheduler works. One EqProp
step reads top to bottom: free relaxation -> nudged relaxation(s) -> contrastive update ->
optimizer step. :func:`fit` runs epochs with evaluation, a progress bar, metric logs and
atomic, exactly-resumable checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from toreq.nn import EquilibriumModel

__all__ = [
    "BPTTTrainer", "BackpropTrainer", "EqPropTrainer", "TrainingDiverged", "evaluate", "fit",
    "load_checkpoint", "save_checkpoint",
]


class TrainingDiverged(RuntimeError):
    """Training produced NaN/Inf; the message says what to lower or enable."""


def _diverged(what: str, trainer: Any) -> TrainingDiverged:
    hints = ["lower the learning rate"]
    if isinstance(trainer, EqPropTrainer):
        hints += [f"lower beta (now {trainer.beta})", "raise damping (e.g. 0.5)",
                  "keep spectral normalisation on (spectral_norm=True)"]
    return TrainingDiverged(f"training diverged: {what}. To fix it: " + "; ".join(hints) + ".")


def _accuracy(output: Tensor, y: Tensor) -> float:
    return float((output.argmax(dim=1) == y).float().mean())


class EqPropTrainer:
    """Equilibrium Propagation: gradients from a free and a nudged phase, never from backprop.

    Args:
        model: an :class:`toreq.nn.EquilibriumModel`.
        optimizer: any ``torch.optim`` optimizer over ``model.parameters()``.
        beta: nudging strength (fixed by default; the earlier prototype found annealing it
            unstable).
        free_steps, nudged_steps: step caps of the two phases (``None``: the model's
            ``max_steps`` for the free phase, 10 for the nudged one).
        symmetric: contrast a ``+beta`` and a ``-beta`` phase (bias O(beta^2) instead of
            O(beta)); otherwise contrast ``+beta`` with the free phase.
        tol, damping: override the model's relaxation tolerance and damping when given.
        loss: override the model's loss (``"cross_entropy"`` or ``"mse"``) when given.
        beta_schedule: optional ``step -> beta`` function (e.g. for annealing studies).
    """

    def __init__(self, model: EquilibriumModel, optimizer: torch.optim.Optimizer, *,
                 beta: float = 0.5, free_steps: int | None = None, nudged_steps: int = 10,
                 symmetric: bool = True, tol: float | None = None, damping: float | None = None,
                 loss: str | None = None,
                 beta_schedule: Callable[[int], float] | None = None) -> None:
        if not isinstance(model, EquilibriumModel):
            raise TypeError(f"EqPropTrainer needs a toreq.nn.EquilibriumModel, got {type(model).__name__}")
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be finite and > 0, got {beta}")
        self.model, self.optimizer = model, optimizer
        self.beta, self.beta_schedule = beta, beta_schedule
        self.free_steps = model.max_steps if free_steps is None else free_steps
        self.nudged_steps, self.symmetric = nudged_steps, symmetric
        if tol is not None:
            model.tol = tol
        if damping is not None:
            model.damping = damping
        if loss is not None:
            model.loss_name = loss
        self.steps_done = 0

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        model = self.model
        model.train()
        beta = self.beta if self.beta_schedule is None else self.beta_schedule(self.steps_done)
        try:
            net = model.network(x)
            free = model.relax(x, net, max_steps=self.free_steps)
            nudged = model.relax(x, net, states=free.states, beta=beta, target=y,
                                 max_steps=self.nudged_steps)
            if self.symmetric:
                reference = model.relax(x, net, states=free.states, beta=-beta, target=y,
                                        max_steps=self.nudged_steps)
                contrast = 2 * beta
            else:
                reference, contrast = free, beta
            self.optimizer.zero_grad(set_to_none=True)
            loss = model.eqprop_backward(x, y, net, free, nudged, reference, contrast)
        except RuntimeError as error:
            if "NaN or Inf" in str(error) or "diverged" in str(error):
                raise _diverged(f"the relaxation blew up ({error})", self) from error
            raise
        if not torch.isfinite(loss):
            raise _diverged(f"the loss is {float(loss)}", self)
        self.optimizer.step()
        self.steps_done += 1
        model._remember(free)
        with torch.no_grad():
            output = model.output(free.states, net)
        return {
            "loss": float(loss),
            "accuracy": _accuracy(output, y),
            "free_steps_mean": float(free.steps.float().mean()),
            "free_steps_max": int(free.steps.max()),
            "nudged_steps_mean": float(nudged.steps.float().mean()),
            "unconverged": float((free.residual >= model.tol).float().mean()) if model.tol > 0 else 0.0,
            "beta": beta,
        }


class BPTTTrainer:
    """Backprop through time over the same dynamics, unrolled ``steps`` steps from rest."""

    def __init__(self, model: EquilibriumModel, optimizer: torch.optim.Optimizer, *,
                 steps: int | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.steps = model.max_steps if steps is None else steps

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        self.model.train()
        net = self.model.network(x)
        states = self.model.unrolled(x, self.steps, net)
        output = self.model.output(states, net)
        loss = self.model.loss(output, y)
        if not torch.isfinite(loss):
            raise _diverged(f"the loss is {loss.item()}", self)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "accuracy": _accuracy(output.detach(), y),
                "free_steps_mean": float(self.steps), "free_steps_max": self.steps}


class BackpropTrainer:
    """Ordinary backprop for a feedforward model (e.g. :class:`toreq.nn.FeedforwardMLP`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        self.model.train()
        output = self.model(x)
        loss = nn.functional.cross_entropy(output, y)
        if not torch.isfinite(loss):
            raise _diverged(f"the loss is {loss.item()}", self)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "accuracy": _accuracy(output.detach(), y)}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Loss, accuracy and (for equilibrium models) mean relaxation steps on ``(x, y)``."""
    model.eval()
    total_loss, correct, steps = 0.0, 0, 0.0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        output = model(xb)
        if isinstance(model, EquilibriumModel):
            total_loss += float(model.loss(output, yb)) * xb.shape[0]
            steps += float(model.last_steps.float().sum())
        else:
            total_loss += float(nn.functional.cross_entropy(output, yb, reduction="sum"))
        correct += int((output.argmax(dim=1) == yb).sum())
    n = x.shape[0]
    metrics = {"loss": total_loss / n, "accuracy": correct / n}
    if isinstance(model, EquilibriumModel):
        metrics["steps_mean"] = steps / n
    return metrics


# ------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def save_checkpoint(path: str | os.PathLike, trainer: Any, epoch: int,
                    history: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Writes a checkpoint atomically: a temporary file in the same folder, fsynced, renamed.

    A crash while writing leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "toreq-checkpoint-1",
        "epoch": epoch,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "trainer_steps": getattr(trainer, "steps_done", 0),
        "history": history,
        "rng": _rng_state(),
        "extra": extra or {},
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


def load_checkpoint(path: str | os.PathLike, trainer: Any) -> dict[str, Any]:
    """Restores model, optimizer, RNGs and trainer counters; returns the checkpoint dict."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for damaged files
        raise RuntimeError(
            f"cannot read checkpoint {path}: the file is corrupt or truncated ({error}). Delete "
            "it or point --resume at another checkpoint."
        ) from error
    if not isinstance(state, dict) or state.get("format") != "toreq-checkpoint-1":
        raise RuntimeError(f"{path} is not a toreq checkpoint (no 'toreq-checkpoint-1' format tag)")
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if hasattr(trainer, "steps_done"):
        trainer.steps_done = state["trainer_steps"]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state


# ------------------------------------------------------------------------ fit
def fit(trainer: Any, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None,
        y_test: Tensor | None = None, *, epochs: int = 10, batch_size: int = 64, seed: int = 0,
        log_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
        resume: bool = False, progress: bool = True, desc: str = "train",
        scheduler: Any = None) -> list[dict[str, Any]]:
    """Trains for ``epochs`` epochs and returns one metrics dict per epoch.

    The batch order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed from the
    checkpoint of epoch ``e`` (``checkpoint=..., resume=True``) reproduces the uninterrupted
    run's losses exactly. With ``log_dir``, metrics go to ``metrics.jsonl`` and
    ``metrics.csv`` there. A TrainingDiverged error stops training with advice.
    """
    from tqdm.auto import tqdm

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, trainer)
        history, start_epoch = state["history"], state["epoch"]
        if scheduler is not None and "scheduler" in state["extra"]:
            scheduler.load_state_dict(state["extra"]["scheduler"])
    log = Path(log_dir) if log_dir is not None else None
    if log is not None:
        log.mkdir(parents=True, exist_ok=True)
    n = x_train.shape[0]
    for epoch in range(start_epoch, epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        started = time.perf_counter()
        sums: dict[str, float] = {}
        batches = range(0, n, batch_size)
        bar = tqdm(batches, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for count, start in enumerate(bar, 1):
            idx = order[start:start + batch_size]
            metrics = trainer.step(x_train[idx], y_train[idx])
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", acc=f"{sums['accuracy'] / count:.3f}")
        if scheduler is not None:
            scheduler.step()
        record: dict[str, Any] = {"epoch": epoch + 1,
                                  **{f"train_{k}": v / len(batches) for k, v in sums.items()},
                                  "seconds": time.perf_counter() - started}
        if x_test is not None:
            record.update({f"test_{k}": v for k, v in evaluate(trainer.model, x_test, y_test).items()})
        history.append(record)
        if log is not None:
            _append_metrics(log, record)
        if checkpoint is not None:
            extra = {"scheduler": scheduler.state_dict()} if scheduler is not None else None
            save_checkpoint(checkpoint, trainer, epoch + 1, history, extra)
    return history


def _append_metrics(log: Path, record: dict[str, Any]) -> None:
    with open(log / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    csv_path = log / "metrics.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)
