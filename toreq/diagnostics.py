"""Diagnostics: is EqProp's gradient the gradient, and does relaxation adapt to difficulty?

[`gradient_check`][toreq.diagnostics.gradient_check] compares, per parameter tensor (and the input),
three estimators of the gradient of the loss `L` at the free equilibrium `s*`:

* EqProp: the free and nudged phases and the model's contrastive update (an
  [`EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel]'s `eqprop_backward`, an
  [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] with `gradient="eqprop"`);
* BPTT: backprop through the dynamics unrolled from rest to convergence;
* implicit differentiation: `dL/dtheta = dL/dtheta|_direct + a^T dF/dtheta` with the adjoint
  `a = (I - J^T)^{-1} dL/ds*` (`J = dF/ds` at `s*`) solved by iteration with
  vector-Jacobian products of one step;

and checks EqProp against central finite differences `(L(theta + eps) - L(theta - eps)) /
(2 eps)` of a few entries (those with the largest BPTT gradient), every loss evaluated at a
converged free phase. It also traces the GDD curve of Ernoult et al. (2019): EqProp's estimate
after `k` nudged steps against BPTT's gradient truncated to the last `k` steps (from the
free equilibrium), `k = 1, 2, ...`; where the step's Jacobian is symmetric the two agree at
every `k` as beta -> 0 (both are `sum_{j<k} (J^T)^j g` pushed through `dF/dtheta`): a
LoopedMLP with symmetric `W`, an EPMLP with `schedule="sync"`, a block whose cell has a
symmetric `W`. The `"async"` schedule's step (even layers, then odd ones from them) has no
symmetric Jacobian: its curve meets BPTT's only as `k` grows.

Everything is relaxed far below the usual tolerance (`tol=1e-14`, float64 recommended), so
that the differences measure the estimators, not the solver. Bias of EqProp: O(beta) one-sided,
O(beta^2) symmetric, where the model's regime is exact (`gradient_regime`); with
piecewise-linear activations (the hard sigmoid) a large beta also moves units between the
saturated and the active region between the phases, and the linearisation behind EqProp breaks
for them: errors of percents at beta = 1e-3 on a small network where beta = 1e-4 gives 1e-8
(`EQPROP-MATH.md` section 2). Use small beta for checks, symmetric nudging for training.

[`steps_vs_difficulty`][toreq.diagnostics.steps_vs_difficulty] relates per-sample relaxation steps
(every model keeps them in `last_steps`) to per-sample difficulty (loss, or negative margin) and
reports their correlation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from toreq.dynamics import default_loss
from toreq.estimators import (BPTT, EqProp, Estimator, ImplicitDifferentiation,
                              run_free_phase)
from toreq.nn.block import EquilibriumBlock
from toreq.nn.equilibrium import EquilibriumModel
from toreq.ops import RelaxResult
from toreq.validation import check_positive_float

__all__ = [
    "AdaptiveCompute", "Comparison", "GDDPoint", "GradientCheck", "TensorCheck", "compare",
    "correlation", "estimator_gradients", "gradient_check", "steps_vs_difficulty",
]

METHODS = ("eqprop", "bptt", "implicit")
# gradient_check's absolute floor: ROUND_OFF times the largest BPTT gradient norm of the model,
# or STATE_ROUND_OFF machine epsilons over beta, whichever is larger
ROUND_OFF = 1e-9
STATE_ROUND_OFF = 1e3
LossFn = Callable[[Tensor, Tensor], Tensor]


# -------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class Comparison:
    """How close an estimate `a` is to a reference `b`.

    `cosine`: `<a, b> / (|a| |b|)`; `relative_error`: `|a - b| / |b|` (see
    [`compare`][toreq.diagnostics.compare] for the absolute floor);
    `sign_agreement`: the share of entries where `sign(a) == sign(b)`, entries below
    `1e-6 max |b|` in magnitude counting as 0.
    """

    cosine: float
    relative_error: float
    sign_agreement: float


def compare(estimate: Tensor, reference: Tensor, floor: float = 0.0) -> Comparison:
    """[`Comparison`][toreq.diagnostics.Comparison] of two tensors of the same shape.

    `floor`: an absolute scale below which a norm is round-off. Where both `|a|` and `|b|`
    are at most `floor` the two agree (cosine 1, relative error 0), so that two gradients that
    are zero up to round-off (a fully saturated layer) compare as equal rather than as
    unrelated; otherwise the relative error is `|a - b| / max(|b|, floor)`.
    """
    a, b = estimate.detach().flatten().double(), reference.detach().flatten().double()
    if a.shape != b.shape:
        raise ValueError(f"compare needs tensors of one shape, got {tuple(estimate.shape)} and "
                         f"{tuple(reference.shape)}")
    na, nb = float(a.norm()), float(b.norm())
    diff = float((a - b).norm())
    if na <= floor and nb <= floor:  # both zero up to round-off
        return Comparison(1.0, 0.0, 1.0)
    if na == 0.0 or nb == 0.0:
        cosine = 1.0 if na == nb else 0.0
    else:
        cosine = float(a @ b) / (na * nb)
    scale = max(nb, floor)
    relative = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    sign_floor = max(1e-6 * float(b.abs().max()) if b.numel() else 0.0, floor)

    def sign(t: Tensor) -> Tensor:
        return torch.where(t.abs() <= sign_floor, torch.zeros_like(t), t.sign())

    agree = float((sign(a) == sign(b)).double().mean()) if b.numel() else 1.0
    return Comparison(cosine, relative, agree)


def _flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.detach().flatten().double() for g in grads.values()])


# -------------------------------------------------------------------------------- subjects
class _Layered:
    """An [`EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel]: every estimator of
    [`toreq.estimators`][toreq.estimators] on it, with the check's budget for every phase."""

    def __init__(self, model: EquilibriumModel, beta: float, symmetric: bool, max_steps: int,
                 tol: float) -> None:
        self.model, self.beta, self.symmetric = model, beta, symmetric
        self.budget = dict(max_steps=max_steps, tol=tol, nudged_steps=None)

    @contextmanager
    def _configured(self) -> Iterator[None]:
        saved = {name: getattr(self.model, name) for name in self.budget}
        try:
            for name, value in self.budget.items():
                setattr(self.model, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(self.model, name, value)

    def _free(self, x: Tensor, net) -> RelaxResult:
        return run_free_phase(self.model, x, net, self.model.free_settings)

    def loss(self, x: Tensor, y: Tensor) -> float:
        model = self.model
        with torch.no_grad(), self._configured():
            net = model.network(x)
            return float(model.loss(model.output(self._free(x, net).states, net), y))

    def gradients(self, x: Tensor, y: Tensor, method: str,
                  truncation: int | None = None) -> dict[str, Tensor]:
        model = self.model
        x = x.detach().clone().requires_grad_(x.is_floating_point())
        model.zero_grad(set_to_none=True)
        with self._configured():
            net = model.network(x)
            free = self._free(x, net)
            if method == "eqprop":
                estimator: Estimator = EqProp(
                    self.beta, "centered" if self.symmetric else "positive",
                    nudged_steps=truncation, nudged_tol=None if truncation is None else 0.0)
            elif method == "bptt":
                # from rest, twice the steps the free phase needed; or the last `truncation`
                # steps from the free equilibrium
                estimator = (BPTT(steps=2 * int(free.steps.max())) if truncation is None
                             else BPTT(truncation=truncation))
            else:
                estimator = ImplicitDifferentiation()
            estimator.backward(model, x, y, net, free=free)
        return _collect(model, x)


class _WithBlocks:
    """Any module containing [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] s, their options
    set per estimator."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, beta: float, symmetric: bool,
                 max_steps: int, tol: float) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, EquilibriumBlock)]
        if not self.blocks:
            raise TypeError(f"model must be a toreq.nn.EquilibriumModel or contain "
                            f"EquilibriumBlocks, got {type(model).__name__} without any")
        self.model, self.loss_fn = model, loss_fn
        self.common = dict(beta=beta, symmetric=symmetric, max_steps=max_steps, tol=tol)

    @contextmanager
    def _configured(self, **options) -> Iterator[None]:
        saved = [{name: getattr(b, name) for name in options} for b in self.blocks]
        try:
            for b in self.blocks:
                for name, value in options.items():
                    setattr(b, name, value)
            yield
        finally:
            for b, values in zip(self.blocks, saved):
                for name, value in values.items():
                    setattr(b, name, value)

    def _loss(self, output: Tensor, y: Tensor) -> Tensor:
        return default_loss(output, y) if self.loss_fn is None else self.loss_fn(output, y)

    def loss(self, x: Tensor, y: Tensor) -> float:
        with torch.no_grad(), self._configured(**self.common):
            return float(self._loss(self.model(x), y))

    def gradients(self, x: Tensor, y: Tensor, method: str,
                  truncation: int | None = None) -> dict[str, Tensor]:
        options = dict(self.common, gradient=method, nudged_steps=None, bptt_steps=None)
        if method == "eqprop":
            options["nudged_steps"] = truncation
        if method == "bptt":
            options.update(solver="iteration", bptt_steps=truncation)
        x = x.detach().clone().requires_grad_(x.is_floating_point())
        self.model.zero_grad(set_to_none=True)
        with self._configured(**options):
            self._loss(self.model(x), y).backward()
        return _collect(self.model, x)


def _collect(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    grads = {}
    if x.requires_grad:  # zero where the loss does not reach x (e.g. a short truncation)
        grads["input"] = torch.zeros_like(x) if x.grad is None else x.grad.detach().clone()
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
    return grads


def _subject(model: nn.Module, loss_fn: LossFn | None, beta: float, symmetric: bool,
             max_steps: int, tol: float) -> _Layered | _WithBlocks:
    check_positive_float("beta", beta)
    if isinstance(model, EquilibriumModel):
        if loss_fn is not None:
            raise ValueError("loss_fn applies to modules with EquilibriumBlocks; an "
                             "EquilibriumModel's loss is its own (model.loss)")
        return _Layered(model, beta, symmetric, max_steps, tol)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _WithBlocks(model, loss_fn, beta, symmetric, max_steps, tol)


def estimator_gradients(model: nn.Module, x: Tensor, y: Tensor, method: str, *,
                        beta: float = 1e-4, symmetric: bool = True,
                        loss_fn: LossFn | None = None, max_steps: int = 20000,
                        tol: float = 1e-14, truncation: int | None = None) -> dict[str, Tensor]:
    """One estimator's gradients, `{"input": dL/dx, <parameter name>: dL/dtheta, ...}`.

    `method`: `"eqprop"`, `"bptt"` or `"implicit"`. `model`: an
    [`EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel] (its own loss) or a module
    containing [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] s (`loss_fn(model(x), y)`;
    default cross-entropy for integer `y`, else squared error). Phases relax to `tol` within
    `max_steps`. `truncation=k`: EqProp with `k` nudged steps, or BPTT through the last `k` steps
    from the free equilibrium (the GDD pairs). The model's `.grad` s are overwritten; put it in eval
    mode first if it has parametrizations that change in training mode (spectral normalisation's
    power iteration).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if truncation is not None and (method == "implicit" or truncation < 1):
        raise ValueError(f"truncation must be a positive int with 'eqprop' or 'bptt', got "
                         f"{truncation!r} with {method!r}")
    subject = _subject(model, loss_fn, beta, symmetric, max_steps, tol)
    return subject.gradients(x, y, method, truncation)


# -------------------------------------------------------------------------------- the check
@dataclass(frozen=True)
class TensorCheck:
    """EqProp's gradient of one tensor against BPTT's, implicit differentiation's and finite
    differences (`finite_difference`: the relative error over `entries` entries, None where
    the reference gradient is zero)."""

    name: str
    shape: tuple[int, ...]
    bptt: Comparison
    implicit: Comparison
    finite_difference: float | None
    entries: int


@dataclass(frozen=True)
class GDDPoint:
    """EqProp after `step` nudged steps against BPTT truncated to the last `step` steps
    (all tensors concatenated)."""

    step: int
    cosine: float
    relative_error: float


@dataclass
class GradientCheck:
    """The result of [`gradient_check`][toreq.diagnostics.gradient_check]; `str()` gives Markdown
    tables."""

    model: str
    regime: str | None
    beta: float
    symmetric: bool
    loss: float
    tensors: list[TensorCheck]
    gdd: list[GDDPoint]
    gradients: dict[str, dict[str, Tensor]] = field(repr=False)

    def worst(self, reference: str = "bptt") -> Comparison:
        """The lowest cosine, highest relative error and lowest sign agreement over tensors."""
        if reference not in ("bptt", "implicit"):
            raise ValueError(f"reference must be 'bptt' or 'implicit', got {reference!r}")
        rows = [getattr(t, reference) for t in self.tensors]
        return Comparison(min(r.cosine for r in rows), max(r.relative_error for r in rows),
                          min(r.sign_agreement for r in rows))

    def to_markdown(self) -> str:
        nudging = "symmetric" if self.symmetric else "one-sided"
        out = [f"Gradient check of {self.model} (regime: {self.regime or 'unknown'}), "
               f"beta={self.beta:g} ({nudging}), loss {self.loss:.6g}", "",
               "| tensor | shape | cos BPTT | rel err BPTT | sign BPTT | cos implicit | "
               "rel err implicit | sign implicit | rel err FD |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for t in self.tensors:
            fd = "-" if t.finite_difference is None else f"{t.finite_difference:.2e} ({t.entries})"
            out.append(f"| {t.name} | {tuple(t.shape)} | {t.bptt.cosine:.8f} | "
                       f"{t.bptt.relative_error:.2e} | {t.bptt.sign_agreement:.3f} | "
                       f"{t.implicit.cosine:.8f} | {t.implicit.relative_error:.2e} | "
                       f"{t.implicit.sign_agreement:.3f} | {fd} |")
        if self.gdd:
            out += ["", "GDD: EqProp after k nudged steps vs BPTT truncated to the last k steps",
                    "", "| k | cosine | rel err |", "|---:|---:|---:|"]
            out += [f"| {p.step} | {p.cosine:.8f} | {p.relative_error:.2e} |" for p in self.gdd]
        return "\n".join(out)

    __str__ = to_markdown


def _finite_differences(subject, model: nn.Module, x: Tensor, y: Tensor, name: str,
                        index: Tensor, eps: float) -> Tensor:
    """Central differences of the converged loss for the flat entries `index` of a tensor."""
    values = []
    with torch.no_grad():
        if name == "input":
            x = x.detach().clone()
            flat = x.view(-1)
        else:
            flat = dict(model.named_parameters())[name].detach().view(-1)
        for i in index.tolist():
            original = float(flat[i])
            flat[i] = original + eps
            up = subject.loss(x, y)
            flat[i] = original - eps
            down = subject.loss(x, y)
            flat[i] = original
            values.append((up - down) / (2 * eps))
    return torch.tensor(values, dtype=torch.float64)


def gradient_check(model: nn.Module, x: Tensor, y: Tensor, *, beta: float = 1e-4,
                   symmetric: bool = True, loss_fn: LossFn | None = None,
                   max_steps: int = 20000, tol: float = 1e-14, fd_entries: int = 3,
                   fd_eps: float = 1e-6, gdd_steps: int = 10) -> GradientCheck:
    """EqProp's gradients against BPTT, implicit differentiation and finite differences.

    Args:
        model: an [`EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel], or any module
            containing [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] s (every block is
            switched between the estimators; its other options are kept).
        x: the batch's inputs (use float64 for tight comparisons).
        y: the batch's targets.
        beta: EqProp's nudging strength.
        symmetric: contrast `+beta` with `-beta` (else `+beta` with the free phase).
        loss_fn: for modules with blocks, `loss_fn(model(x), y)` (default: cross-entropy for
            integer `y`, else squared error).
        max_steps: every relaxation's budget.
        tol: every relaxation's tolerance.
        fd_entries: finite differences of the `fd_entries` largest-gradient entries of each
            tensor (0: none).
        fd_eps: the finite differences' step.
        gdd_steps: the GDD curve for `k = 1 .. gdd_steps` (0: none).

    Returns:
        [`GradientCheck`][toreq.diagnostics.GradientCheck]. Every comparison has an absolute floor
            (see [`compare`][toreq.diagnostics.compare]): `max(ROUND_OFF * the largest BPTT
            gradient norm, STATE_ROUND_OFF * eps / beta)`, so that a tensor whose gradients are
            zero up to round-off agrees with BPTT's zero. The model is put in eval mode during the
            check (spectral normalisation then keeps one weight for every estimator) and restored
            after; its `.grad` s are overwritten.
    """
    if not (isinstance(fd_entries, int) and fd_entries >= 0):
        raise ValueError(f"fd_entries must be an int >= 0, got {fd_entries!r}")
    if not (isinstance(gdd_steps, int) and gdd_steps >= 0):
        raise ValueError(f"gdd_steps must be an int >= 0, got {gdd_steps!r}")
    subject = _subject(model, loss_fn, beta, symmetric, max_steps, tol)
    training = model.training
    model.eval()
    try:
        grads = {m: subject.gradients(x, y, m) for m in METHODS}
        # round-off: relative to the whole model's gradient, and EqProp's own (one ulp of a
        # state difference over beta). A tensor whose gradients are all below it (a fully
        # saturated layer) agrees rather than scoring cosine 0.
        eps = torch.finfo(next(iter(grads["bptt"].values())).dtype).eps
        floor = max(ROUND_OFF * max(float(g.norm()) for g in grads["bptt"].values()),
                    STATE_ROUND_OFF * eps / beta)
        tensors = []
        for name, ep in grads["eqprop"].items():
            bp, im = grads["bptt"][name], grads["implicit"][name]
            fd_error, entries = None, 0
            if fd_entries and float(bp.abs().max()) > 0:
                index = bp.flatten().abs().topk(min(fd_entries, bp.numel())).indices
                fd = _finite_differences(subject, model, x, y, name, index, fd_eps)
                fd_error = compare(ep.flatten()[index], fd).relative_error
                entries = len(index)
            tensors.append(TensorCheck(name, tuple(ep.shape), compare(ep, bp, floor),
                                       compare(ep, im, floor), fd_error, entries))
        gdd = []
        for k in range(1, gdd_steps + 1):
            c = compare(_flat(subject.gradients(x, y, "eqprop", k)),
                        _flat(subject.gradients(x, y, "bptt", k)))
            gdd.append(GDDPoint(k, c.cosine, c.relative_error))
        loss = subject.loss(x, y)
    finally:
        model.train(training)
        model.zero_grad(set_to_none=True)
    return GradientCheck(type(model).__name__, getattr(model, "gradient_regime", None), beta,
                         symmetric, loss, tensors, gdd, grads)


# -------------------------------------------------------------------------------- adaptive compute
def _ranks(v: Tensor) -> Tensor:
    """1-based ranks, ties sharing their average rank."""
    values, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def correlation(a: Tensor, b: Tensor, method: str = "spearman") -> float:
    """Pearson's correlation of `a` and `b` (1-D), or Spearman's (Pearson's of their
    ranks, ties averaged). NaN where either is constant."""
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"correlation needs two 1-D tensors of one length >= 2, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if method == "spearman":
        a, b = _ranks(a), _ranks(b)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else math.nan


@dataclass(frozen=True)
class AdaptiveCompute:
    """Per-sample relaxation steps against per-sample difficulty (higher: harder): the loss, or
    minus the margin (`measure`)."""

    steps: Tensor
    difficulty: Tensor
    measure: str
    method: str
    correlation: float

    def __str__(self) -> str:
        s = self.steps.double()
        what = "loss" if self.measure == "loss" else "negative margin"
        text = (f"{self.method.capitalize()} correlation of relaxation steps with {what}: "
                f"{self.correlation:+.3f} over {s.numel()} samples (steps: mean "
                f"{float(s.mean()):.1f}, min {int(s.min())}, max {int(s.max())})")
        if math.isnan(self.correlation):
            text += "; undefined: every sample took the same number of steps (tol=0?)"
        return text


def steps_vs_difficulty(model: nn.Module, x: Tensor, y: Tensor, *, measure: str = "loss",
                        method: str = "spearman", loss_fn: LossFn | None = None,
                        block: EquilibriumBlock | None = None) -> AdaptiveCompute:
    """Relates the free phase's per-sample step counts to how hard each sample is.

    Runs `model(x)` (no gradient, eval mode, the model's own `max_steps` and `tol`) and
    takes the step counts from `model.last_steps` (an
    [`EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel]) or from the module's
    [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] (`block`, needed when there are several).
    Difficulty: `measure="loss"`, the per-sample loss (the model's own, or `loss_fn`: default
    cross-entropy); `measure="margin"`, minus the margin `o_y - max_{j != y} o_j` of the output `o`
    (integer labels). A positive correlation means harder samples take more steps.
    """
    if measure not in ("loss", "margin"):
        raise ValueError(f"measure must be 'loss' or 'margin', got {measure!r}")
    if isinstance(model, EquilibriumModel):
        source, per_sample_loss = model, model.loss
    else:
        blocks = [m for m in model.modules() if isinstance(m, EquilibriumBlock)]
        if block is None:
            if len(blocks) != 1:
                raise ValueError(f"model has {len(blocks)} EquilibriumBlocks; pass block= to say "
                                 "whose steps to use" if blocks else
                                 f"model must be an EquilibriumModel or contain an "
                                 f"EquilibriumBlock, got {type(model).__name__}")
            block = blocks[0]
        elif all(block is not b for b in blocks):
            raise ValueError("block must be one of model's EquilibriumBlocks")
        source, per_sample_loss = block, (default_loss if loss_fn is None else loss_fn)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(x)
            if measure == "loss":
                difficulty = torch.stack([per_sample_loss(output[i:i + 1], y[i:i + 1])
                                          for i in range(x.shape[0])])
            else:
                if y.is_floating_point() or output.dim() != 2:
                    raise ValueError("measure='margin' needs integer labels y and (batch, classes) "
                                     "outputs")
                true = output.gather(1, y.view(-1, 1)).squeeze(1)
                others = output.scatter(1, y.view(-1, 1), -math.inf).amax(dim=1)
                difficulty = others - true
    finally:
        model.train(training)
    steps = source.last_steps.detach().clone()
    return AdaptiveCompute(steps, difficulty.detach(), measure, method,
                           correlation(steps, difficulty, method))
