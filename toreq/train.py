"""Trainers: EqProp, and the backprop-through-time and feedforward-backprop baselines.

Each trainer's `step` (e.g. [`EqPropTrainer.step`][toreq.train.EqPropTrainer.step]) takes one
batch, writes gradients into the parameters' `.grad` and steps the optimizer, so every
`torch.optim` optimizer and LR scheduler works. One EqProp step reads top to bottom: free
relaxation, nudged relaxation(s), contrastive update, optimizer step. [`fit`][toreq.train.fit]
runs epochs with evaluation, a progress bar, metric logs and atomic, exactly-resumable
checkpoints ([`toreq.checkpoint`][toreq.checkpoint], whose
[`save_checkpoint`][toreq.checkpoint.save_checkpoint],
[`read_checkpoint`][toreq.checkpoint.read_checkpoint] and
[`load_checkpoint`][toreq.checkpoint.load_checkpoint] are re-exported here).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from toreq.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from toreq.distributed import average_over_ranks, is_main_process, shard
from toreq.dynamics import default_loss
from toreq.errors import DivergenceError, TrainingDiverged
from toreq.estimators import BPTT, EqProp, Estimator, get_estimator, run_free_phase
from toreq.nn import EquilibriumBlock, EquilibriumModel
from toreq.ops import RelaxResult
from toreq.solvers import PhaseSettings
from toreq.validation import (check_batch, check_optimizer_covers, check_positive_float,
                              check_positive_int)

__all__ = [
    "BPTTTrainer", "BackpropTrainer", "EqPropTrainer", "PersistentStates", "TrainingDiverged",
    "evaluate", "fit", "load_checkpoint", "read_checkpoint", "save_checkpoint",
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


class PersistentStates:
    """Each training sample's last free equilibrium, the start of its next free phase (the
    persistent particles of Scellier & Bengio 2017): after the first epoch a free phase starts
    next to its fixed point and reaches the tolerance in fewer steps. Where the dynamics has one
    fixed point the result is the same to within the tolerance; where it has several, a sample
    stays in the basin it reached.

    `start(index, init)` gives the batch's initial states (the stored ones for samples seen
    before, `init` for the others); `store(index, states)` keeps the free equilibrium. The
    store is allocated at the first `store`, one tensor per layer of shape
    `(num_samples, *state_shape)`.
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.states: list[Tensor] | None = None
        self.seen: Tensor | None = None

    def start(self, index: Tensor, init: list[Tensor]) -> list[Tensor]:
        if self.states is None:
            return init
        seen = self.seen[index]
        return [torch.where(seen.view(-1, *[1] * (i.dim() - 1)), s[index].to(i), i)
                for s, i in zip(self.states, init)]

    def store(self, index: Tensor, states: list[Tensor]) -> None:
        if self.states is None:
            self.states = [s.new_zeros(self.num_samples, *s.shape[1:]) for s in states]
            self.seen = torch.zeros(self.num_samples, dtype=torch.bool, device=states[0].device)
        for stored, s in zip(self.states, states):
            stored[index] = s.detach().to(stored)
        self.seen[index] = True

    def state_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "states": self.states, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"the checkpoint's persistent states are for {state['num_samples']} "
                             f"samples, this training set has {self.num_samples}")
        self.states, self.seen = state["states"], state["seen"]


class EqPropTrainer:
    """Trains an equilibrium model with a gradient estimator (EqProp by default), never with
    backprop through the relaxation.

    The estimator ([`toreq.estimators`][toreq.estimators]) owns the phases; the trainer adds
    what every step needs: the batch's effective weights built once, the safety checks
    (NaN/Inf, loss blow-up), data-parallel averaging, the optimizer step and per-phase
    statistics.

    Args:
        model: a [`toreq.nn.EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel], or any
            module containing [`toreq.nn.EquilibriumBlock`][toreq.nn.block.EquilibriumBlock]
            layers (trained through its blocks' own backward, with `loss_fn`).
        optimizer: any `torch.optim` optimizer over `model.parameters()`.
        beta: nudging strength of the default EqProp estimator (fixed by default; the earlier
            prototype found annealing it unstable); a given `estimator` keeps its own.
        free_steps: the free phase's step cap (`None`: the model's `max_steps`).
        nudged_steps: each nudged phase's step cap.
        symmetric: the default estimator's nudging: centered (`+beta` against `-beta`, bias
            $O(\beta^2)$) when True, else positive (`+beta` against the free phase).
        tol: overrides the model's relaxation tolerance when given.
        damping: overrides the model's damping when given.
        loss: override the model's loss (`"cross_entropy"` or `"mse"`) when given.
        beta_schedule: optional `step -> beta` function (e.g. for annealing studies); it
            overrides the estimator's beta at every step.
        max_loss_ratio: a step whose loss exceeds this multiple of `max(1, first step's loss)`
            raises [`TrainingDiverged`][toreq.errors.TrainingDiverged] (a blow-up that has not
            reached Inf yet, e.g. a learning rate far too large); None turns the check off.
        process_group: data-parallel training over this `torch.distributed` group (e.g.
            `torch.distributed.group.WORLD`): each rank passes its shard of the global batch
            and the gradients are averaged over the global batch before the optimizer step
            (see [`toreq.distributed`][toreq.distributed]; [`fit`][toreq.train.fit] shards the
            batches itself).
        estimator: an estimator name of
            [`toreq.estimators.estimator_names`][toreq.estimators.estimator_names] or a
            [`toreq.estimators.Estimator`][toreq.estimators.Estimator] (default: EqProp from
            `beta`, `symmetric` and `nudged_steps`).
        loss_fn: for modules with blocks, `loss_fn(model(x), y)` (default
            [`toreq.dynamics.default_loss`][toreq.dynamics.default_loss]: cross-entropy for
            integer labels).
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
        check_optimizer_covers(optimizer, model)
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
        self.persistent: PersistentStates | None = None

    def _phases(self, x: Tensor, y: Tensor, beta: float | None,
                index: Tensor | None) -> tuple[Tensor, Tensor, dict, dict]:
        """The estimator's phases and gradients: `(loss, output, phases, tolerances)`."""
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
        free = None
        if index is not None and self.persistent is not None:
            free = run_free_phase(model, x, net, settings,
                                  start=self.persistent.start(index, model.init_states(x, net)))
            self.persistent.store(index, free.states)
        estimate = self.estimator.backward(model, x, y, net, free=free, beta=beta,
                                           free_settings=settings)
        model.remember(estimate.phases["free"])
        return estimate.loss, estimate.output, estimate.phases, estimate.tolerances

    def step(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> dict[str, float]:
        """One training step on the batch `(x, y)`; with a process group, on this rank's shard.

        `index` (int64, the samples' positions in the training set) starts the free phase from
        `persistent`'s stored states (a [`PersistentStates`][toreq.train.PersistentStates], set
        by `fit(persistent=True)`) and stores the new equilibrium there.

        Returns:
            The batch's loss, accuracy and relaxation statistics per phase (with a process
                group: over the global batch, except `free_steps_max`, which is this rank's).
                `unconverged` and `nudged_unconverged` are the shares of samples that stopped
                at their phase's cap above its tolerance.

        Raises:
            TrainingDiverged: leaving the parameters as they were, when the relaxation, the
                loss or a gradient is NaN or Inf or the loss exploded; and when the optimizer
                step overflowed or made a parameter NaN or Inf.
        """
        model, group = self.model, self.process_group
        check_batch(type(model).__name__, x, y)
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
        sums = [0.0] * 6
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss, output, phases, tols = self._phases(x, y, scheduled, index)
            if loss is not None:
                free = phases["free"]
                sums = _batch_sums(loss, output, y, phases, tols)
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
            status = torch.tensor([*sums, batch, failure is not None], dtype=torch.float64,
                                  device=x.device)
            dist.all_reduce(status, group=group)
            status = status.tolist()
            sums, total = status[:6], int(status[6])
            if status[7] and failure is None:
                failure = _diverged("the relaxation blew up on another rank", self)
        if failure is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise failure
        if total == 0:
            raise ValueError("x is an empty batch; EqProp averages its gradients over the batch")
        loss_sum, correct_sum, free_sum, nudged_sum, unconverged_sum, nudged_unconverged_sum = sums
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


def _batch_sums(loss: Tensor, output: Tensor, y: Tensor, phases: dict[str, RelaxResult],
                tols: dict[str, float]) -> list[float]:
    """The step's statistics as batch sums: the loss, correct predictions, free steps, nudged
    steps (the mean over the nudged phases), unconverged free samples and unconverged nudged
    samples (summed over the phases); one stacked reduction and one transfer to the host."""
    batch = y.shape[0]
    # every contrasted phase (nudged, clamped, holomorphic) besides the free one
    nudged = [n for n in phases if n not in ("free", "adjoint", "bptt")]
    tested = [n for n in ["free", *nudged] if tols[n] > 0]  # tol 0: no sample converges
    with torch.no_grad():
        rows = [output.argmax(dim=1) == y, phases["free"].steps]
        rows += [phases[n].steps for n in nudged]
        rows += [phases[n].residual < tols[n] for n in tested]
        counts = torch.stack(rows).sum(1, dtype=torch.float64)
        values = torch.cat([loss.detach().double().view(1), counts]).tolist()
    loss_mean, correct, free_steps = values[:3]
    nudged_steps = values[3:3 + len(nudged)]
    converged = dict(zip(tested, values[3 + len(nudged):]))
    unconverged = {n: batch - c for n, c in converged.items()}
    return [loss_mean * batch, correct, free_steps,
            sum(nudged_steps) / len(nudged) if nudged else 0.0,
            unconverged.get("free", 0.0), sum(v for n, v in unconverged.items() if n != "free")]


def _check_finite(named: list[tuple[str, Tensor]], what: str, tensor: Callable[[Tensor], Tensor],
                  trainer: Any) -> None:
    """Raises TrainingDiverged naming the first tensor with NaN or Inf (one device sync).

    The fast test is one sum per tensor: NaN and Inf propagate through it, so a finite sum
    proves a finite tensor. Only when a sum is not finite (NaN or Inf in the tensor, or a sum of
    finite values that overflowed) does the element-wise test run, which decides and names it.
    """
    if not named:
        return
    if all(map(math.isfinite, torch.stack([tensor(p).sum() for _, p in named]).tolist())):
        return
    finite = torch.stack([torch.isfinite(tensor(p)).all() for _, p in named])
    if not bool(finite.all()):
        name = named[int((~finite).nonzero()[0])][0]
        raise _diverged(f"{what} {name} holds NaN or Inf", trainer)


class BPTTTrainer(EqPropTrainer):
    """Backprop through time over the same dynamics, unrolled `steps` steps from rest: the
    [`EqPropTrainer`][toreq.train.EqPropTrainer] with the
    [`toreq.estimators.BPTT`][toreq.estimators.BPTT] estimator. With `truncation=k` the
    trajectory still has `steps` steps, and only its last `k` are backpropagated through (the
    first `steps - k` run without a graph), as the papers' baselines ran it."""

    def __init__(self, model: EquilibriumModel, optimizer: torch.optim.Optimizer, *,
                 steps: int | None = None, truncation: int | None = None) -> None:
        steps = model.max_steps if steps is None else steps
        check_positive_int("steps", steps)
        check_positive_int("truncation", truncation, allow_none=True)
        if truncation is not None and truncation >= steps:
            raise ValueError(f"truncation must be below steps ({steps}), got {truncation}")
        free_steps = steps if truncation is None else steps - truncation
        super().__init__(model, optimizer, free_steps=free_steps,
                         estimator=BPTT(truncation=truncation, steps=steps))
        self.steps = steps


class BackpropTrainer:
    """Ordinary backprop for a feedforward model (e.g.
    [`toreq.nn.FeedforwardMLP`][toreq.nn.models.FeedforwardMLP])."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        check_optimizer_covers(optimizer, model)

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        check_batch(type(self.model).__name__, x, y)
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
    """Loss, accuracy and (for equilibrium models) mean relaxation steps on `(x, y)`."""
    check_batch(type(model).__name__, x, y)
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


# ------------------------------------------------------------------------ fit
def fit(trainer: Any, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None,
        y_test: Tensor | None = None, *, epochs: int = 10, batch_size: int = 64, seed: int = 0,
        log_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
        resume: bool = False, overwrite: bool = False, progress: bool | str = True,
        desc: str = "train", scheduler: Any = None, deterministic: bool = False,
        about: dict[str, Any] | None = None, tensorboard: bool = False,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        persistent: bool = False) -> list[dict[str, Any]]:
    """Trains for `epochs` epochs and returns one metrics dict per epoch.

    The batch order of epoch `e` depends only on `(seed, e)`, so a run resumed from the
    checkpoint of epoch `e` (`checkpoint=..., resume=True`) reproduces the uninterrupted
    run's losses exactly. An existing `checkpoint` is never overwritten by a new run unless
    `overwrite=True` (`FileExistsError`); `about` describes the run in every checkpoint
    (see [`toreq.checkpoint`][toreq.checkpoint]). With `log_dir`, metrics go to `metrics.jsonl`
    and `metrics.csv` there (and, with `tensorboard=True`, to TensorBoard event files: the
    `tensorboard` extra). A [`TrainingDiverged`][toreq.errors.TrainingDiverged] error stops
    training with advice.

    `persistent=True` starts every sample's free phase from its own last equilibrium
    ([`PersistentStates`][toreq.train.PersistentStates], saved in the checkpoint; an
    [`EqPropTrainer`][toreq.train.EqPropTrainer] of an equilibrium model, one process).

    `augment(x, generator)` transforms every training batch before its step (e.g.
    [`RandomCropFlip`][toreq.data.RandomCropFlip]`(data.image_shape)`), never the test set; its
    draws come from the generator that drew the epoch's batch order, seeded by `(seed, epoch)`,
    so a resumed run augments as the uninterrupted one did.

    `progress`: `True` shows a progress bar on a terminal and, where stderr is not a
    terminal (a log file, CI), no bar but a line every 10 s within an epoch; both print one line
    per epoch to stderr. `"epochs"`: the epoch lines only. `False`: nothing.

    Every epoch's record holds its training time (`seconds`) and the torch thread count
    (`threads`): float sums in matrix products are split by thread, so the same seed can
    give slightly different results with another thread count. `deterministic=True` runs the
    epochs on one thread under `torch.use_deterministic_algorithms(True)` (both restored
    afterwards): an op without a deterministic implementation raises instead of varying
    silently, and the result does not depend on the thread count (CUDA also needs
    `CUBLAS_WORKSPACE_CONFIG=:4096:8` in the environment; see PyTorch's reproducibility
    notes). Parameters are initialised by the caller: seed with `torch.manual_seed` before
    building the model.

    With a data-parallel trainer (`EqPropTrainer(..., process_group=...)`) `batch_size` is
    the global batch: every rank draws the same batches and trains on its shard of each
    ([`toreq.distributed.shard`][toreq.distributed.shard]), so the run matches one process on
    the same batches; only rank 0 shows progress, writes logs and saves checkpoints.
    """
    from toreq.validation import check_choice, check_nonnegative_int, check_positive_int

    check_nonnegative_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    check_choice("progress", progress, (True, False, "epochs"))
    if x_train.shape[0] != y_train.shape[0] or x_train.shape[0] == 0:
        raise ValueError(f"x_train and y_train must hold the same number (> 0) of samples, got "
                         f"{x_train.shape[0]} and {y_train.shape[0]}")
    group = getattr(trainer, "process_group", None)
    main = is_main_process(group)
    if persistent:
        if not (isinstance(trainer, EqPropTrainer) and isinstance(trainer.model, EquilibriumModel)):
            raise ValueError("persistent=True needs an EqPropTrainer of an equilibrium model "
                             f"(toreq.nn.EquilibriumModel), got {type(trainer).__name__} of "
                             f"{type(getattr(trainer, 'model', None)).__name__}")
        if group is not None:
            raise ValueError("persistent=True keeps each sample's states in this process; with "
                             "a process group the ranks would hold different shards of them")
        trainer.persistent = PersistentStates(x_train.shape[0])
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        if resume:
            state = load_checkpoint(checkpoint, trainer)
            history, start_epoch = state["history"], state["epoch"]
            if scheduler is not None and "scheduler" in state["extra"]:
                scheduler.load_state_dict(state["extra"]["scheduler"])
            if persistent and "persistent" in state["extra"]:
                trainer.persistent.load_state_dict(state["extra"]["persistent"])
        elif not overwrite:
            raise FileExistsError(f"checkpoint {checkpoint} exists; resume from it "
                                  "(resume=True, --resume) or replace it (overwrite=True, "
                                  "--overwrite)")
    log = Path(log_dir) if log_dir is not None and main else None
    if log is not None:
        log.mkdir(parents=True, exist_ok=True)
    writer = _tensorboard_writer(log) if tensorboard and log is not None else None
    report = _Progress(progress if main else False, desc, epochs)
    try:
        with _deterministic_algorithms(deterministic):
            n = x_train.shape[0]
            for epoch in range(start_epoch, epochs):
                draws = torch.Generator().manual_seed(seed * 100003 + epoch)
                order = torch.randperm(n, generator=draws)
                started = time.perf_counter()
                sums: dict[str, float] = {}
                batches = range(0, n, batch_size)
                report.start_epoch(epoch, len(batches))
                for count, start in enumerate(batches, 1):
                    idx = order[start:start + batch_size]
                    x = x_train[idx]
                    if augment is not None:  # the global batch: every rank draws the same
                        x = augment(x, draws)
                    if group is not None:
                        mine = shard(torch.arange(idx.numel()), group)
                        x, idx = x[mine], idx[mine]
                    metrics = (trainer.step(x, y_train[idx], index=idx) if persistent
                               else trainer.step(x, y_train[idx]))
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    report.batch(count, sums["loss"] / count, sums["accuracy"] / count)
                if scheduler is not None:
                    scheduler.step()
                record: dict[str, Any] = {"epoch": epoch + 1,
                                          **{f"train_{k}": v / len(batches) for k, v in sums.items()},
                                          "seconds": time.perf_counter() - started,
                                          "threads": torch.get_num_threads()}
                if x_test is not None:
                    record.update({f"test_{k}": v for k, v in
                                   evaluate(trainer.model, x_test, y_test).items()})
                history.append(record)
                report.end_epoch(record)
                if log is not None:
                    _append_metrics(log, record)
                if writer is not None:
                    for key, value in record.items():
                        if key != "epoch" and isinstance(value, (int, float)):
                            writer.add_scalar(key, value, epoch + 1)
                    writer.flush()
                if checkpoint is not None and main:
                    extra = {"scheduler": scheduler.state_dict()} if scheduler is not None else {}
                    if persistent:
                        extra["persistent"] = trainer.persistent.state_dict()
                    save_checkpoint(checkpoint, trainer, epoch + 1, history, extra, about)
    finally:
        report.close()
        if writer is not None:
            writer.close()
    return history


#: Off a terminal, fit prints a line at least this often (seconds) within a long epoch.
HEARTBEAT_S = 10.0


class _Progress:
    """fit's progress: a tqdm bar on a terminal, a line every HEARTBEAT_S elsewhere, a line per
    epoch."""

    def __init__(self, mode: bool | str, desc: str, epochs: int) -> None:
        self.mode, self.desc, self.epochs = mode, desc, epochs
        self.terminal = sys.stderr.isatty()
        self.bar: Any = None

    def start_epoch(self, epoch: int, batches: int) -> None:
        self.epoch, self.batches = epoch, batches
        self.started = self.last = time.perf_counter()
        if self.mode is True and self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=batches, desc=f"{self.desc} {epoch + 1}/{self.epochs}",
                            leave=False, file=sys.stderr)

    def batch(self, count: int, loss: float, accuracy: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", refresh=False)
        elif self.mode is True and time.perf_counter() - self.last >= HEARTBEAT_S:
            self.last = time.perf_counter()
            self._line(f"{count}/{self.batches} batches, loss {loss:.4f}, accuracy "
                       f"{100 * accuracy:.2f}%, {self.last - self.started:.0f} s")

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.close()
        if self.mode:
            test = (f", test accuracy {100 * record['test_accuracy']:.2f}%"
                    if "test_accuracy" in record else "")
            self._line(f"{self.batches}/{self.batches} batches in {record['seconds']:.1f} s, "
                       f"train loss {record['train_loss']:.4f}, train accuracy "
                       f"{100 * record['train_accuracy']:.2f}%{test}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()  # the last count, which throttled redraws may have skipped
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        print(f"{self.desc} epoch {self.epoch + 1}/{self.epochs}: {text}", file=sys.stderr,
              flush=True)


def _tensorboard_writer(log: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError('TensorBoard logging needs the tensorboard package: '
                          'pip install "toreq[tensorboard]"') from error
    return SummaryWriter(str(log))


@contextmanager
def _deterministic_algorithms(enabled: bool):
    """Deterministic algorithms on one thread (a thread count changes float summation order)."""
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if enabled:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)


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
