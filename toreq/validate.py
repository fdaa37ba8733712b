"""Our claims, measured over several seeds, with statistics and a verdict against each bar.

`toreq validate` runs every claim of [`CLAIMS`][toreq.validate.CLAIMS] for the seeds `0 .. n-1` and
writes `validation.md` and `validation.json`. Each claim is a function `(seeds, quick, ...) ->`
[`ClaimResult`][toreq.validate.ClaimResult] reusing the library's own code (presets, trainers,
diagnostics): it records the measured values per seed ([`Metric`][toreq.validate.Metric]) and judges
them against its bars ([`Check`][toreq.validate.Check]), which are keyword arguments so that a bar
can be changed, and a failure seen.

Statistics of the `n` values `v_i` of one metric ([`summarise`][toreq.validate.summarise]): mean
`m = sum_i v_i / n`, sample standard deviation `s = sqrt(sum_i (v_i - m)^2 / (n - 1))` and
the 95% confidence interval of the mean `m +- t_{0.975, n-1} s / sqrt(n)`, with Student's t
quantile from `scipy.stats.t.ppf` (none for `n = 1`).

A bar on a statistical quantity (accuracy, time) is judged on the mean over seeds; a bar on a
deterministic one (a gradient's error, a peak of memory) on every seed. `quick=True` runs
Fashion-MNIST for fewer epochs on a training subset and fewer timed repeats: its verdicts
are indicative only, and the report says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CLAIMS", "Check", "ClaimResult", "Metric", "annealed_beta", "claim_accuracy",
    "claim_beta_stability",
    "claim_gradient", "claim_memory", "claim_speed", "environment", "looped_step", "markdown",
    "run_claims", "summarise", "tensor_peak", "write_report",
]


# -------------------------------------------------------------------------------- statistics
def summarise(values: Sequence[float], confidence: float = 0.95) -> dict[str, float | None]:
    """Mean, sample standard deviation and the `confidence` interval of the mean (Student t).

    `ci_low, ci_high = m -+ t s / sqrt(n)`, `t = scipy.stats.t.ppf((1 + confidence) / 2,
    n - 1)`; for one value the standard deviation is 0 and the interval None.
    """
    from scipy.stats import t as student_t

    n = len(values)
    if n == 0:
        raise ValueError("summarise needs at least one value")
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "ci_low": None, "ci_high": None}
    std = statistics.stdev(values)
    half = float(student_t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


@dataclass
class Metric:
    """One measured quantity, one value per seed; `fmt` formats its numbers in the report."""

    name: str
    unit: str
    values: list[float]
    fmt: str = ".2f"

    def summary(self) -> dict[str, float | None]:
        return summarise(self.values)


@dataclass
class Check:
    """One bar: what it asks (`bar`), the value judged (`measured`) and the verdict."""

    bar: str
    measured: str
    passed: bool


@dataclass
class ClaimResult:
    """A claim's metrics over the seeds, its checks, notes (what the numbers mean) and time."""

    name: str
    title: str
    seeds: list[int]
    metrics: list[Metric]
    checks: list[Check]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "seeds": self.seeds,
                "passed": self.passed, "seconds": self.seconds, "notes": self.notes,
                "metrics": [dict(name=m.name, unit=m.unit, fmt=m.fmt, values=m.values,
                                 **m.summary())
                            for m in self.metrics],
                "checks": [dataclasses.asdict(c) for c in self.checks]}


def _metric(name: str, unit: str, values: list[float], fmt: str = ".2f") -> Metric:
    return Metric(name, unit, [float(v) for v in values], fmt)


# -------------------------------------------------------------------------------- 1. accuracy
ACCURACY_BARS = {  # data set: (EqProp's least mean test accuracy, largest mean gap), in points
    "digits": (97.0, 1.0),
    "fashion_mnist": (88.5, 0.5),
}
QUICK_TRAINING = {"fashion_mnist": dict(samples=30000, epochs=4)}  # digits: the full preset


def claim_accuracy(seeds: Sequence[int], quick: bool = False, *, dataset: str = "digits",
                   min_accuracy: float | None = None, max_gap: float | None = None,
                   data_dir: str | None = None, algorithm: str | None = None,
                   algorithm_settings: Sequence[tuple[str, Any]] = ()) -> ClaimResult:
    """The data set's preset trained by EqProp and its backprop baseline of the same width
    ([`train_preset`][toreq.presets.train_preset], as `benchmarks/accuracy.py`), per seed: test
    accuracy of each and `gap = backprop - EqProp` in points. Passes when the mean EqProp
    accuracy is `>= min_accuracy` and the mean gap `<= max_gap` (default: the bars of
    `ACCURACY_BARS`). `algorithm` (a name of
    [`estimator_names`][toreq.estimators.estimator_names]) with `algorithm_settings` trains the
    preset's model by that estimator instead of the preset's own; the bars stay the same."""
    from toreq.data import load_classification
    from toreq.presets import dataset_preset, train_preset

    if dataset not in ACCURACY_BARS:
        raise ValueError(f"dataset must be one of {', '.join(ACCURACY_BARS)}, got {dataset!r}")
    least, gap_bar = ACCURACY_BARS[dataset]
    least = least if min_accuracy is None else min_accuracy
    gap_bar = gap_bar if max_gap is None else max_gap
    preset = dataset_preset(dataset)
    if algorithm is not None:
        preset = dataclasses.replace(preset, algorithm=algorithm,
                                     algorithm_settings=tuple(algorithm_settings))
    estimator = preset.estimator()  # an unknown algorithm or setting is refused here
    data = load_classification(dataset, root=data_dir)
    notes = [f"Estimator: {estimator!r}.",
             f"Preset `{preset.name}`: {preset.model} hidden {preset.hidden}, {preset.epochs} "
             f"epochs, batch {preset.batch_size}, AdamW lr {preset.lr} (cosine), beta "
             f"{preset.beta} ({'symmetric' if preset.symmetric_nudging else 'one-sided'}); "
             f"backprop: a feedforward MLP of the same width, same optimiser and batches."]
    if quick and dataset in QUICK_TRAINING:
        cut = QUICK_TRAINING[dataset]
        preset = dataclasses.replace(preset, epochs=cut["epochs"])
        data = dataclasses.replace(data, x_train=data.x_train[:cut["samples"]],
                                   y_train=data.y_train[:cut["samples"]])
        notes.append(f"Quick: {cut['epochs']} epochs on the first {cut['samples']} training "
                     "images; the bars are those of the full preset, so the verdict is "
                     "indicative only.")
    runs = {m: [train_preset(preset, data, m, seed) for seed in seeds]
            for m in ("eqprop", "backprop")}
    eqprop = [r["test_accuracy"] for r in runs["eqprop"]]
    backprop = [r["test_accuracy"] for r in runs["backprop"]]
    gaps = [b - e for e, b in zip(eqprop, backprop)]
    mean_eq, mean_gap = statistics.fmean(eqprop), statistics.fmean(gaps)
    return ClaimResult(
        f"accuracy_{dataset}", f"Test accuracy on {data.name}: EqProp against backprop",
        list(seeds),
        [_metric("EqProp test accuracy", "%", eqprop),
         _metric("backprop test accuracy", "%", backprop),
         _metric("gap (backprop - EqProp)", "points", gaps),
         _metric("EqProp training time", "s", [r["seconds"] for r in runs["eqprop"]])],
        [Check(f"mean EqProp accuracy >= {least:g}%", f"{mean_eq:.2f}%", mean_eq >= least),
         Check(f"mean gap <= {gap_bar:g} points", f"{mean_gap:+.2f}", mean_gap <= gap_bar)],
        notes)


# -------------------------------------------------------------------------------- 2. gradient
def claim_gradient(seeds: Sequence[int], quick: bool = False, *, min_cosine: float = 0.99999,
                   max_relative_error: float = 1e-4) -> ClaimResult:
    """[`gradient_check`][toreq.diagnostics.gradient_check] of a tied
    [`EPMLP`][toreq.nn.models.EPMLP] (8 -> [7, 6] -> 3, tanh, squared error, float64) on 6 random
    samples, beta 1e-4, symmetric nudging, per seed (the seed draws the weights and the batch). Per
    seed: the lowest cosine and the highest relative error of EqProp's gradient against BPTT's and
    implicit differentiation's over every tensor (the input included). Passes when, on every seed,
    every tensor has `cosine >= min_cosine` and `relative error <= max_relative_error` against
    both."""
    from toreq.diagnostics import gradient_check
    from toreq.nn import EPMLP

    cosines, errors, fd = [], [], []
    for seed in seeds:
        torch.manual_seed(seed)
        model = EPMLP(8, [7, 6], 3, loss="mse", activation="tanh").double()
        x = torch.rand(6, 8, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))
        check = gradient_check(model, x, y, beta=1e-4, symmetric=True, gdd_steps=0)
        worst = [check.worst(reference) for reference in ("bptt", "implicit")]
        cosines.append(min(w.cosine for w in worst))
        errors.append(max(w.relative_error for w in worst))
        fd.append(max(t.finite_difference for t in check.tensors
                      if t.finite_difference is not None))
    return ClaimResult(
        "gradient", "Gradient equivalence: EqProp = BPTT = implicit differentiation (EPMLP)",
        list(seeds),
        [_metric("worst cosine (every tensor, vs BPTT and implicit)", "", cosines, ".9f"),
         _metric("worst relative error (vs BPTT and implicit)", "", errors, ".2e"),
         _metric("worst relative error vs finite differences (3 entries per tensor)", "", fd,
                 ".2e")],
        [Check(f"every seed: cosine >= {min_cosine:g}", f"min {min(cosines):.10f}",
               min(cosines) >= min_cosine),
         Check(f"every seed: relative error <= {max_relative_error:g}",
               f"max {max(errors):.3g}", max(errors) <= max_relative_error)],
        ["Relaxations to tol 1e-14 in float64, so the differences measure the estimators "
         "(EQPROP-MATH.md; toreq.diagnostics). Finite differences are shown, not judged."])


# -------------------------------------------------------------------------------- 3-4. memory, time
SIZES = {True: dict(batch=256, hidden=512, repeats=3),  # quick: fewer timed repeats only
         False: dict(batch=256, hidden=512, repeats=7)}
INPUTS, CLASSES, NUDGED_STEPS = 64, 10, 10


def looped_step(method: str, steps: int, *, batch: int, hidden: int,
                nudged_steps: int = NUDGED_STEPS, seed: int = 0,
                device: torch.device | str = "cpu") -> Callable[[], object]:
    """One training step of a [`LoopedMLP`][toreq.nn.models.LoopedMLP] (64 -> `hidden` -> 10, SGD)
    with exactly `steps` free steps (`tol=0`), as a closure on a fixed random batch: `method`
    `"eqprop"` (two nudged phases of `nudged_steps`, beta 0.5), `"eqprop_one_sided"` (one)
    or `"bptt"` (`steps` steps unrolled with autograd). The seed draws weights and batch."""
    from toreq.nn import LoopedMLP
    from toreq.train import BPTTTrainer, EqPropTrainer

    if method not in ("eqprop", "eqprop_one_sided", "bptt"):
        raise ValueError(f"method must be 'eqprop', 'eqprop_one_sided' or 'bptt', got {method!r}")
    torch.manual_seed(seed)
    x = torch.rand(batch, INPUTS, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    net = LoopedMLP(INPUTS, hidden, CLASSES, max_steps=steps, tol=0.0).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
    trainer = (BPTTTrainer(net, optimizer, steps=steps) if method == "bptt" else
               EqPropTrainer(net, optimizer, beta=0.5, free_steps=steps,
                             nudged_steps=nudged_steps, symmetric=method == "eqprop", tol=0.0))
    return lambda: trainer.step(x, y)


def tensor_peak(step: Callable[[], object]) -> int:
    """Peak of live bytes of the tensors allocated during `step()`, from the allocation
    records of `torch.profiler` (`profile_memory=True`): every CPU tensor allocation and
    free, in time order, summed (the profiler leaves out frees of blocks allocated before it
    started). The records are read from the profiler's event tree,
    `kineto_results.experimental_event_tree()`, which torch does not promise to keep."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _peak(method: str, steps: int, seed: int, size: dict) -> int:
    step = looped_step(method, steps, batch=size["batch"], hidden=size["hidden"], seed=seed)
    step()  # warm-up: lazy initialisation is not the step's memory
    return tensor_peak(step)


def claim_memory(seeds: Sequence[int], quick: bool = False, *, max_growth: float = 0.05,
                 max_ratio: float = 0.2) -> ClaimResult:
    """EqProp's memory is flat in the number of free steps T. Per seed, peak tensor bytes of
    one training step of a LoopedMLP ([`looped_step`][toreq.validate.looped_step], symmetric
    nudging, batch 256, hidden 512) measured in-process by
    [`tensor_peak`][toreq.validate.tensor_peak] after a warm-up:
    `growth = peak(T=300) / peak(T=10) - 1` and `ratio = peak_EqProp(T=100) / peak_BPTT(T=100)`.
    Passes when on every seed `growth <= max_growth` and `ratio <= max_ratio`."""
    size = SIZES[quick]
    growth, ratio, low, high = [], [], [], []
    for seed in seeds:
        p10, p300 = _peak("eqprop", 10, seed, size), _peak("eqprop", 300, seed, size)
        p100, bptt = _peak("eqprop", 100, seed, size), _peak("bptt", 100, seed, size)
        low.append(p10 / 2 ** 20)
        high.append(p300 / 2 ** 20)
        growth.append(100 * (p300 / p10 - 1))
        ratio.append(p100 / bptt)
    return ClaimResult(
        "memory", "Memory flat in T: EqProp against BPTT (LoopedMLP)", list(seeds),
        [_metric("EqProp peak at T=10", "MiB", low), _metric("EqProp peak at T=300", "MiB", high),
         _metric("growth T=10 -> T=300", "%", growth),
         _metric("EqProp / BPTT peak at T=100", "x", ratio, ".3f")],
        [Check(f"every seed: growth <= {100 * max_growth:g}%", f"max {max(growth):+.2f}%",
               max(growth) <= 100 * max_growth),
         Check(f"every seed: EqProp / BPTT at T=100 <= {max_ratio:g}", f"max {max(ratio):.3f}",
               max(ratio) <= max_ratio)],
        [f"Batch {size['batch']}, hidden {size['hidden']}, float32, CPU; peak = the most bytes "
         "of tensors allocated during the step held at once (torch.profiler's allocation "
         "records), on top of what existed before it. EqProp: symmetric nudging, 2 x "
         f"{NUDGED_STEPS} nudged steps. benchmarks/memory.py adds RSS and CUDA figures."])


def claim_speed(seeds: Sequence[int], quick: bool = False, *,
                max_ratio: float = 0.6) -> ClaimResult:
    """EqProp is faster than BPTT. Per seed, the median over repeats (3 quick, 7 full) of one
    training step's wall time at T=30 of a LoopedMLP ([`looped_step`][toreq.validate.looped_step]):
    EqProp with one one-sided nudged phase of 10 steps against BPTT, the two alternated so both see
    the same machine load, after a warm-up each. Passes when the mean ratio is `<= max_ratio`."""
    size = SIZES[quick]
    eqprop_ms, bptt_ms, ratio = [], [], []
    for seed in seeds:
        steps = {m: looped_step(m, 30, batch=size["batch"], hidden=size["hidden"], seed=seed)
                 for m in ("eqprop_one_sided", "bptt")}
        times: dict[str, list[float]] = {m: [] for m in steps}
        for fn in steps.values():
            fn()
        for _ in range(size["repeats"]):
            for method, fn in steps.items():
                started = time.perf_counter()
                fn()
                times[method].append(time.perf_counter() - started)
        eqprop_ms.append(1e3 * statistics.median(times["eqprop_one_sided"]))
        bptt_ms.append(1e3 * statistics.median(times["bptt"]))
        ratio.append(eqprop_ms[-1] / bptt_ms[-1])
    mean = statistics.fmean(ratio)
    return ClaimResult(
        "speed", "Speed: EqProp step time against BPTT at T=30 (LoopedMLP)", list(seeds),
        [_metric("EqProp step (one-sided, 10 nudged)", "ms", eqprop_ms),
         _metric("BPTT step", "ms", bptt_ms), _metric("EqProp / BPTT", "x", ratio, ".3f")],
        [Check(f"mean EqProp / BPTT <= {max_ratio:g}", f"{mean:.3f}", mean <= max_ratio)],
        [f"Batch {size['batch']}, hidden {size['hidden']}, float32, CPU, "
         f"{torch.get_num_threads()} torch thread(s); medians of {size['repeats']} steps. "
         "Counting matrix products EqProp does 30 + 10 steps against BPTT's 30 forward and 30 "
         "backward steps of two products each (40/90 = 0.44)."])


# -------------------------------------------------------------------------------- 5. beta
def annealed_beta(start: float, end: float, total_steps: int) -> Callable[[int], float]:
    """`beta(k) = start (end / start)^(k / (total_steps - 1))`: geometric from `start` at the
    first step to `end` at the last (and `end` after)."""
    if not (start > 0 and end > 0 and total_steps >= 2):
        raise ValueError(f"annealed_beta needs start, end > 0 and total_steps >= 2, got "
                         f"{start}, {end}, {total_steps}")
    return lambda k: start * (end / start) ** (min(k, total_steps - 1) / (total_steps - 1))


def claim_beta_stability(seeds: Sequence[int], quick: bool = False, *,
                         min_accuracy: float = 96.0, anneal: tuple[float, float] = (0.5, 0.01),
                         data_dir: str | None = None) -> ClaimResult:
    """Fixed beta against annealed beta, on the digits preset (LoopedMLP, EqProp), per seed:
    the preset's fixed beta (0.1) and `beta` annealed geometrically from `anneal[0]` to
    `anneal[1]` over all training steps ([`annealed_beta`][toreq.validate.annealed_beta],
    `EqPropTrainer(beta_schedule=...)`), everything else the preset's. The prototype claimed
    annealing collapses training while a fixed beta is stable; the check is `fixed beta's test
    accuracy >= min_accuracy on every seed`; the annealed runs are reported as measured, with
    a note that says whether they collapsed (a seed below 50%, or diverged)."""
    from toreq.data import load_classification
    from toreq.presets import get_preset, train_preset
    from toreq.train import TrainingDiverged

    preset = get_preset("digits-looped")
    data = load_classification("digits", root=data_dir)
    total = preset.epochs * math.ceil(data.x_train.shape[0] / preset.batch_size)
    schedule = annealed_beta(*anneal, total)
    fixed, annealed, diverged = [], [], []
    for seed in seeds:
        fixed.append(train_preset(preset, data, "eqprop", seed)["test_accuracy"])
        try:
            annealed.append(train_preset(preset, data, "eqprop", seed,
                                         beta_schedule=schedule)["test_accuracy"])
        except TrainingDiverged:
            annealed.append(math.nan)  # the stats show nan: a diverged run has no accuracy
            diverged.append(seed)
    collapsed = [s for s, a in zip(seeds, annealed) if not a >= 50.0]
    finding = (f"Annealed beta {anneal[0]:g} -> {anneal[1]:g}: mean "
               f"{statistics.fmean(annealed):.2f}% against fixed beta {preset.beta:g}: "
               f"{statistics.fmean(fixed):.2f}%; ")
    finding += (f"collapsed (below 50% or diverged) on seed(s) {collapsed}"
                + (f" (diverged: {diverged})" if diverged else "") if collapsed else
                "no collapse on any seed: the prototype's finding that annealing collapses "
                "training is not reproduced here")
    return ClaimResult(
        "beta", "beta stability: fixed against annealed beta (digits, LoopedMLP)", list(seeds),
        [_metric(f"fixed beta {preset.beta:g}: test accuracy", "%", fixed),
         _metric(f"annealed beta {anneal[0]:g} -> {anneal[1]:g}: test accuracy", "%", annealed)],
        [Check(f"every seed: fixed-beta accuracy >= {min_accuracy:g}%", f"min {min(fixed):.2f}%",
               min(fixed) >= min_accuracy)],
        [f"Preset `digits-looped` ({preset.epochs} epochs, {total} steps, symmetric nudging) "
         "in both runs. " + finding + ". The annealed runs have no bar."])


# -------------------------------------------------------------------------------- running
CLAIMS: dict[str, Callable[..., ClaimResult]] = {
    "accuracy_digits": functools.partial(claim_accuracy, dataset="digits"),
    "accuracy_fashion_mnist": functools.partial(claim_accuracy, dataset="fashion_mnist"),
    "gradient": claim_gradient,
    "memory": claim_memory,
    "speed": claim_speed,
    "beta": claim_beta_stability,
}
"""Each claim by name (`toreq validate --claims`): a function of the seeds and `quick` that
returns its [`ClaimResult`][toreq.validate.ClaimResult]."""
USES_DATA = ("accuracy_digits", "accuracy_fashion_mnist", "beta")
USES_ESTIMATOR = ("accuracy_digits", "accuracy_fashion_mnist")


def environment() -> dict:
    """The command, date, versions, CPU, GPU and torch threads of this run."""
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import toreq

    return {
        "command": shlex.join(["toreq" if Path(sys.argv[0]).name in ("toreq", "__main__.py")
                               else sys.argv[0]] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "toreq": toreq.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": cpu, "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "device": "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_claims(names: Sequence[str], seeds: int, quick: bool, *, data_dir: str | None = None,
               log: Callable[[str], None] | None = None, algorithm: str | None = None,
               algorithm_settings: Sequence[tuple[str, Any]] = ()) -> dict:
    """Runs the claims `names` (keys of [`CLAIMS`][toreq.validate.CLAIMS]) for seeds `0 .. seeds-1`;
    returns the report:
    `{"environment", "quick", "seeds", "seconds", "claims": [ClaimResult.as_dict()]}`.
    `algorithm` and `algorithm_settings` choose the estimator of the accuracy claims
    ([`claim_accuracy`][toreq.validate.claim_accuracy])."""
    unknown = [n for n in names if n not in CLAIMS]
    if unknown or not names:
        raise ValueError(f"claims must be among {', '.join(CLAIMS)}, got {list(names)}")
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    started = time.perf_counter()
    report = {"environment": environment(), "quick": quick, "seeds": seeds, "claims": []}
    for name in names:
        begun = time.perf_counter()
        options = {"data_dir": data_dir} if name in USES_DATA else {}
        if name in USES_ESTIMATOR and algorithm is not None:
            options.update(algorithm=algorithm, algorithm_settings=tuple(algorithm_settings))
        result = CLAIMS[name](list(range(seeds)), quick, **options)
        result.seconds = time.perf_counter() - begun
        report["claims"].append(result.as_dict())
        if log is not None:
            log(f"{name}: {'PASS' if result.passed else 'FAIL'} ({result.seconds:.0f} s)")
    report["seconds"] = time.perf_counter() - started
    return report


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    """The report as Markdown: environment, a summary table of verdicts, then per claim every
    metric (values per seed, mean, standard deviation, 95% CI) and every check."""
    env = report["environment"]
    quick = report["quick"]
    lines = [
        "# toreq validate: our claims over seeds", "",
        f"`{env['command']}` on {env['date']} ({report['seconds']:.0f} s, "
        f"{'quick' if quick else 'full'}, seeds 0..{report['seeds'] - 1}). torch {env['torch']}, "
        f"toreq {env['toreq']}, Python {env['python']}; device {env['device']}, CPU "
        f"{env['cpu']} ({env['logical_cpus']} logical CPUs), {env['threads']} torch thread(s); "
        f"GPU: {env['gpu'] + ' (unused: every claim runs on the CPU)' if env['gpu'] else 'none'}.",
        "",
        "Statistics over seeds: mean, sample standard deviation (n - 1) and the 95% confidence "
        "interval of the mean, mean +- t(0.975, n-1) std / sqrt(n), Student's t from "
        "scipy.stats.", ""]
    if quick:
        lines += ["**Quick run**: Fashion-MNIST trained for fewer epochs on a subset, fewer "
                  "timed repeats; the bars are the full claims', so these verdicts are "
                  "indicative only.", ""]
    lines += ["| claim | verdict | checks |", "|---|---|---|"]
    for c in report["claims"]:
        checks = "; ".join(f"{'PASS' if k['passed'] else 'FAIL'} {k['bar']} ({k['measured']})"
                           for k in c["checks"])
        lines.append(f"| {c['title']} | **{'PASS' if c['passed'] else 'FAIL'}** | {checks} |")
    for c in report["claims"]:
        lines += ["", f"## {c['title']}: {'PASS' if c['passed'] else 'FAIL'}", "",
                  f"Claim `{c['name']}`, seeds {c['seeds']}, {c['seconds']:.0f} s.", "",
                  "| metric | unit | per seed | mean | std | 95% CI |",
                  "|---|---|---|---:|---:|---|"]
        for m in c["metrics"]:
            f = m["fmt"]
            ci = ("n/a" if m["ci_low"] is None else
                  f"[{_fmt(m['ci_low'], f)}, {_fmt(m['ci_high'], f)}]")
            lines.append(f"| {m['name']} | {m['unit']} | "
                         f"{', '.join(_fmt(v, f) for v in m['values'])} | {_fmt(m['mean'], f)} | "
                         f"{_fmt(m['std'], f)} | {ci} |")
        lines += [""] + [f"- **{'PASS' if k['passed'] else 'FAIL'}** {k['bar']}: "
                         f"{k['measured']}" for k in c["checks"]]
        lines += [""] + c["notes"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """Writes `validation.json` and `validation.md` into `out_dir`; returns the .md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(report, indent=1) + "\n")
    path = out / "validation.md"
    path.write_text(markdown(report))
    return path
