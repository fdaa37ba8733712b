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
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from toreq.distributed import average_over_ranks, is_main_process, shard
from toreq.dynamics import default_loss
from toreq.errors import DivergenceError, TrainingDiverged
from toreq.estimators import BPTT, EqProp, Estimator, get_estimator
from toreq.nn import EquilibriumBlock, EquilibriumModel
from toreq.ops import RelaxResult
from toreq.solvers import PhaseSettings
from toreq.validation import check_positive_float, check_positive_int

__all__ = [
    "BPTTTrainer", "BackpropTrainer", "EqPropTrainer", "TrainingDiverged", "evaluate", "fit",
    "load_checkpoint", "read_checkpoint", "save_checkpoint",
]


def _diverged(what: str, trainer: Any) -> TrainingDiverged:
    lrs = sorted({group["lr"] for group in trainer.optimizer.param_groups if "lr" in group})
    hints = ["lower the learning rate" + (f" (now {', '.join(map(str, lrs))})" if lrs else "")]
    if isinstance(trainer, EqPropTrainer) and isinstance(trainer.estimator, EqProp):
        hints += [f"lower beta (now {trainer.estimator.beta})" if trainer.beta_schedule is None
                  else "lower the betas of beta_schedule", "raise damping (e.g. 0.5)",
                  "keep spectral normalisation on (spectral_norm=True)"]
    return TrainingDiverged(f"training diverged: {what}. To fix it: " + "; ".join(hints) + ".")


def _accuracy(output: Tensor, y: Tensor) -> float:
    return float((output.argmax(dim=1) == y).float().mean())


class EqPropTrainer:
    """Trains an equilibrium model with a gradient estimator (EqProp by default), never with
    backprop through the relaxation.

    The estimator (:mod:`toreq.estimators`) owns the phases; the trainer adds what every step
    needs: the batch's effective weights built once, the safety checks (NaN/Inf, loss
    blow-up), data-parallel averaging, the optimizer step and per-phase statistics.

    Args:
        model: a :class:`toreq.nn.EquilibriumModel`, or any module containing
            :class:`toreq.nn.EquilibriumBlock` s (trained through its blocks' own backward, with
            ``loss_fn``).
        optimizer: any ``torch.optim`` optimizer over ``model.parameters()``.
        beta: nudging strength of the default EqProp estimator (fixed by default; the earlier
            prototype found annealing it unstable); a given ``estimator`` keeps its own.
        free_steps: the free phase's step cap (``None``: the model's ``max_steps``).
        nudged_steps: each nudged phase's step cap.
        symmetric: the default estimator's nudging: centered (``+beta`` against ``-beta``, bias
            O(beta^2)) when True, else positive (``+beta`` against the free phase).
        tol: overrides the model's relaxation tolerance when given.
        damping: overrides the model's damping when given.
        loss: override the model's loss (``"cross_entropy"`` or ``"mse"``) when given.
        beta_schedule: optional ``step -> beta`` function (e.g. for annealing studies); it
            overrides the estimator's beta at every step.
        max_loss_ratio: a step whose loss exceeds this multiple of ``max(1, first step's loss)``
            raises :class:`TrainingDiverged` (a blow-up that has not reached Inf yet, e.g. a
            learning rate far too large); None turns the check off.
        process_group: data-parallel training over this ``torch.distributed`` group (e.g.
            ``torch.distributed.group.WORLD``): each rank passes its shard of the global batch
            and the gradients are averaged over the global batch before the optimizer step
            (see :mod:`toreq.distributed`; :func:`fit` shards the batches itself).
        estimator: an estimator name of :func:`toreq.estimators.estimator_names` or a
            :class:`toreq.estimators.Estimator` (default: EqProp from ``beta``, ``symmetric``
            and ``nudged_steps``).
        loss_fn: for modules with blocks, ``loss_fn(model(x), y)`` (default
            :func:`toreq.dynamics.default_loss`: cross-entropy for integer labels).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 beta: float = 0.5, free_steps: int | None = None, nudged_steps: int = 10,
                 symmetric: bool = True, tol: float | None = None, damping: float | None = None,
                 loss: str | None = None,
                 beta_schedule: Callable[[int], float] | None = None,
                 max_loss_ratio: float | None = 1e3,
                 process_group: dist.ProcessGroup | None = None,
                 estimator: str | Estimator | None = None,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        blocks = [m for m in model.modules() if isinstance(m, EquilibriumBlock)]
        if not isinstance(model, EquilibriumModel) and not blocks:
            raise TypeError(f"EqPropTrainer needs a toreq.nn.EquilibriumModel or a module "
                            f"containing EquilibriumBlocks, got {type(model).__name__}")
        check_positive_float("beta", beta)
        if max_loss_ratio is not None and not max_loss_ratio > 1:
            raise ValueError(f"max_loss_ratio must be > 1 or None, got {max_loss_ratio}")
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group was given but torch.distributed is not initialised; "
                             "call torch.distributed.init_process_group first (torchrun sets "
                             "up the environment for it)")
        self.model, self.optimizer = model, optimizer
        self.blocks, self.loss_fn = blocks, loss_fn
        self.beta, self.beta_schedule = beta, beta_schedule
        self.free_steps = (getattr(model, "max_steps", None) if free_steps is None
                           else check_positive_int("free_steps", free_steps))
        self.nudged_steps = check_positive_int("nudged_steps", nudged_steps)
        self.symmetric = symmetric
        self.estimator = (EqProp(beta, "centered" if symmetric else "positive", nudged_steps)
                          if estimator is None else get_estimator(estimator))
        self.max_loss_ratio, self.process_group = max_loss_ratio, process_group
        if isinstance(model, EquilibriumModel):
            if tol is not None:
                model.tol = tol
            if damping is not None:
                model.damping = damping
            if loss is not None:
                model.loss_name = loss
        self.steps_done = 0
        self._first_loss: float | None = None

    def _phases(self, x: Tensor, y: Tensor,
                beta: float | None) -> tuple[Tensor, Tensor, dict, dict]:
        """The estimator's phases and gradients: ``(loss, output, phases, tolerances)``."""
        model = self.model
        if not isinstance(model, EquilibriumModel):  # blocks: their backward is the estimator
            output = model(x)
            loss = (default_loss(output, y) if self.loss_fn is None
                    else self.loss_fn(output, y))
            loss.backward()
            phases = {"free": RelaxResult([], self.blocks[0].last_steps,
                                          self.blocks[0].last_residual)}
            return loss.detach(), output.detach(), phases, {"free": self.blocks[0].tol}
        # Built on every rank, an empty shard's too: it advances the spectral norm's power
        # iteration, which must stay in step across ranks.
        net = model.network(x)
        if x.shape[0] == 0:
            return None, None, {}, {}
        settings = PhaseSettings(self.free_steps, model.tol)
        estimate = self.estimator.backward(model, x, y, net, beta=beta, free_settings=settings)
        model.remember(estimate.phases["free"])
        return estimate.loss, estimate.output, estimate.phases, estimate.tolerances

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One training step on the batch ``(x, y)``; with a process group, on this rank's shard.

        Returns the batch's loss, accuracy and relaxation statistics per phase (with a process
        group: over the global batch, except ``free_steps_max``, which is this rank's).
        ``unconverged`` and ``nudged_unconverged`` are the shares of samples that stopped at
        their phase's cap above its tolerance. Raises :class:`TrainingDiverged`, leaving the
        parameters as they were, when the relaxation, the loss or a gradient is NaN or Inf or
        the loss exploded; and when the optimizer step overflowed or made a parameter NaN or Inf.
        """
        model, group = self.model, self.process_group
        model.train()
        # the schedule's beta, else the estimator's own (None: estimators without one)
        scheduled = None if self.beta_schedule is None else self.beta_schedule(self.steps_done)
        beta = getattr(self.estimator, "beta", None) if scheduled is None else scheduled
        if beta is not None and x.is_floating_point() and not abs(beta) <= torch.finfo(x.dtype).max:
            raise _diverged(f"beta = {beta} overflows {x.dtype}, so the nudge cannot be "
                            "represented", self)
        batch, failure, free = x.shape[0], None, None
        # Batch sums of: loss, correct predictions, free steps, nudged steps, unconverged free
        # samples, unconverged nudged samples.
        sums = torch.zeros(6, dtype=torch.float64, device=x.device)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss, output, phases, tols = self._phases(x, y, scheduled)
            if loss is not None:
                with torch.no_grad():
                    free = phases["free"]
                    # every contrasted phase (nudged, clamped, holomorphic) besides the free one
                    nudged_names = [n for n in phases if n not in ("free", "adjoint", "bptt")]
                    nudged = [phases[n] for n in nudged_names]
                    correct = output.argmax(dim=1) == y
                    nudged_steps = (torch.stack([r.steps for r in nudged]).double().mean(0).sum()
                                    if nudged else free.steps.new_zeros(()))
                    unconverged = (~free.converged(tols["free"])).sum() if tols["free"] > 0 \
                        else free.steps.new_zeros(())
                    nudged_unconverged = sum(
                        ((~phases[n].converged(tols[n])).sum() if tols[n] > 0
                         else phases[n].steps.new_zeros(())) for n in nudged_names)
                    sums = torch.stack([loss.double() * batch, correct.sum(), free.steps.sum(),
                                        nudged_steps, unconverged,
                                        torch.as_tensor(nudged_unconverged)]).double()
        except RuntimeError as error:
            if not isinstance(error, DivergenceError) and "NaN or Inf" not in str(error) \
                    and "diverged" not in str(error):
                raise
            failure = _diverged(f"the relaxation blew up ({error})", self)
            failure.__cause__ = error
        total = batch
        if group is not None:
            # Every rank learns of a failure anywhere before the gradient all-reduce, where the
            # healthy ranks would otherwise wait forever.
            status = torch.cat([sums, sums.new_tensor([batch, failure is not None])])
            dist.all_reduce(status, group=group)
            sums, total = status[:6], int(status[6])
            if bool(status[7]) and failure is None:
                failure = _diverged("the relaxation blew up on another rank", self)
        if failure is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise failure
        if total == 0:
            raise ValueError("x is an empty batch; EqProp averages its gradients over the batch")
        loss_sum, correct_sum, free_sum, nudged_sum, unconverged_sum, nudged_unconverged_sum = \
            sums.tolist()
        mean_loss = loss_sum / total
        if not math.isfinite(mean_loss):
            raise _diverged(f"the loss is {mean_loss}", self)
        if self._first_loss is None:
            self._first_loss = mean_loss
        if (self.max_loss_ratio is not None
                and mean_loss > self.max_loss_ratio * max(1.0, self._first_loss)):
            raise _diverged(f"the loss grew to {mean_loss:.4g}, more than max_loss_ratio = "
                            f"{self.max_loss_ratio:g} times max(1, the first step's loss "
                            f"{self._first_loss:.4g})", self)
        if group is None:
            named = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
        else:  # the same tensors on every rank, an empty shard's included
            named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
            for _, p in named:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            average_over_ranks([p.grad for _, p in named], batch, total, group)
        _check_finite(named, "the gradient of", lambda p: p.grad, self)
        try:
            self.optimizer.step()
        except RuntimeError as error:  # e.g. Adam with a learning rate beyond float range
            if "overflow" not in str(error):
                raise
            raise _diverged(f"the optimizer step overflowed ({error})", self) from error
        _check_finite(named, "after the optimizer step, parameter", lambda p: p, self)
        self.steps_done += 1
        return {
            "loss": mean_loss,
            "accuracy": correct_sum / total,
            "free_steps_mean": free_sum / total,
            "free_steps_max": int(free.steps.max()) if free is not None and batch else 0,
            "nudged_steps_mean": nudged_sum / total,
            "unconverged": unconverged_sum / total,
            "nudged_unconverged": nudged_unconverged_sum / total,
            "beta": math.nan if beta is None else beta,
        }


def _check_finite(named: list[tuple[str, Tensor]], what: str, tensor: Callable[[Tensor], Tensor],
                  trainer: Any) -> None:
    """Raises TrainingDiverged naming the first tensor with NaN or Inf (one device sync).

    The fast test is one sum per tensor: NaN and Inf propagate through it, so a finite sum
    proves a finite tensor. Only when a sum is not finite (NaN or Inf in the tensor, or a sum of
    finite values that overflowed) does the element-wise test run, which decides and names it.
    """
    if not named:
        return
    sums = torch.stack([tensor(p).sum() for _, p in named])
    if bool(torch.isfinite(sums).all()):
        return
    finite = torch.stack([torch.isfinite(tensor(p)).all() for _, p in named])
    if not bool(finite.all()):
        name = named[int((~finite).nonzero()[0])][0]
        raise _diverged(f"{what} {name} holds NaN or Inf", trainer)


class BPTTTrainer(EqPropTrainer):
    """Backprop through time over the same dynamics, unrolled ``steps`` steps from rest: the
    :class:`EqPropTrainer` with the :class:`toreq.estimators.BPTT` estimator."""

    def __init__(self, model: EquilibriumModel, optimizer: torch.optim.Optimizer, *,
                 steps: int | None = None, truncation: int | None = None) -> None:
        steps = model.max_steps if steps is None else steps
        super().__init__(model, optimizer, free_steps=steps,
                         estimator=BPTT(truncation=truncation, steps=steps))
        self.steps = steps


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


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The dict of a checkpoint written by :func:`save_checkpoint`, verified before unpickling.

    ``torch.save`` writes a zip archive holding a CRC-32 of every record, and ``torch.load``
    does not check them, so a flipped byte in a tensor would otherwise load as silently damaged
    weights. A missing file raises ``FileNotFoundError``; a truncated or corrupt file, or one
    that is not a toreq checkpoint, a ``RuntimeError`` that says so.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every record and checks its CRC-32
        if damaged is not None:
            raise ValueError(f"record {damaged} fails its CRC-32 check")
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # zipfile and torch raise several types for damaged files
        raise RuntimeError(
            f"cannot read checkpoint {path}: the file is corrupt or truncated ({error}). Delete "
            "it, or resume from or load another checkpoint."
        ) from error
    if not isinstance(state, dict) or state.get("format") != "toreq-checkpoint-1":
        raise RuntimeError(f"{path} is not a toreq checkpoint (no 'toreq-checkpoint-1' format tag)")
    return state


def load_checkpoint(path: str | os.PathLike, trainer: Any) -> dict[str, Any]:
    """Restores model, optimizer, RNGs and trainer counters; returns the checkpoint dict.

    The file is verified first (:func:`read_checkpoint`). A truncated or corrupt file, or a
    checkpoint that does not fit ``trainer``, raises a ``RuntimeError`` that says so.
    """
    state = read_checkpoint(path)
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if hasattr(trainer, "steps_done"):
            trainer.steps_done = state["trainer_steps"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise RuntimeError(
            f"checkpoint {path} does not fit this trainer ({type(error).__name__}: {error}); "
            "was it written for another model, optimizer or toreq version?"
        ) from error
    return state


# ------------------------------------------------------------------------ fit
def fit(trainer: Any, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None,
        y_test: Tensor | None = None, *, epochs: int = 10, batch_size: int = 64, seed: int = 0,
        log_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
        resume: bool = False, progress: bool = True, desc: str = "train",
        scheduler: Any = None, deterministic: bool = False) -> list[dict[str, Any]]:
    """Trains for ``epochs`` epochs and returns one metrics dict per epoch.

    The batch order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed from the
    checkpoint of epoch ``e`` (``checkpoint=..., resume=True``) reproduces the uninterrupted
    run's losses exactly. With ``log_dir``, metrics go to ``metrics.jsonl`` and
    ``metrics.csv`` there. A TrainingDiverged error stops training with advice.
    ``deterministic=True`` runs the epochs under ``torch.use_deterministic_algorithms(True)``
    (restored afterwards): an op without a deterministic implementation raises instead of
    varying silently, so two runs with the same seeds give identical results (CUDA also needs
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment; see PyTorch's reproducibility notes).
    Parameters are initialised by the caller: seed with ``torch.manual_seed`` before building
    the model.

    With a data-parallel trainer (``EqPropTrainer(..., process_group=...)``) ``batch_size`` is
    the global batch: every rank draws the same batches and trains on its shard of each
    (:func:`toreq.distributed.shard`), so the run matches one process on the same batches; only
    rank 0 shows progress, writes logs and saves checkpoints.
    """
    from tqdm.auto import tqdm

    group = getattr(trainer, "process_group", None)
    main = is_main_process(group)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, trainer)
        history, start_epoch = state["history"], state["epoch"]
        if scheduler is not None and "scheduler" in state["extra"]:
            scheduler.load_state_dict(state["extra"]["scheduler"])
    log = Path(log_dir) if log_dir is not None and main else None
    if log is not None:
        log.mkdir(parents=True, exist_ok=True)
    with _deterministic_algorithms(deterministic):
        n = x_train.shape[0]
        for epoch in range(start_epoch, epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            started = time.perf_counter()
            sums: dict[str, float] = {}
            batches = range(0, n, batch_size)
            bar = tqdm(batches, desc=f"{desc} {epoch + 1}/{epochs}", disable=not (progress and main),
                       leave=False)
            for count, start in enumerate(bar, 1):
                idx = order[start:start + batch_size]
                if group is not None:
                    idx = shard(idx, group)
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
            if checkpoint is not None and main:
                extra = {"scheduler": scheduler.state_dict()} if scheduler is not None else None
                save_checkpoint(checkpoint, trainer, epoch + 1, history, extra)
    return history


@contextmanager
def _deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


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
