"""The character-level language-model study: EqProp variants against backprop on Tiny Shakespeare.

It reproduces the prototype's design (`lm-scale-study-design.md` and `lm-comparison-*.md`
in the prototype's reports) with the variants of [`build_lm`][toreq.nn.lm.build_lm], three
experiments:

* `"variants"`: every variant of [`LM_VARIANTS`][toreq.nn.lm.LM_VARIANTS] at `scales` of a base
  parameter count (all variants of one scale at the same count), trained on the training split;
* `"data_size"`: the training text cut to its first `N` characters, `N` in `data_sizes`,
  for backprop and the prototype's EqProp variants (`data_variants`) at `data_params`;
* `"seq_len"`: context lengths `seq_lens` on `seq_chars` characters, backprop against the
  best EqProp variant (the lowest perplexity of the `"variants"` experiment at its largest
  scale, or `seq_variant`).

Every run trains a fresh model with [`train_lm`][toreq.lm_training.train_lm] (Adam, random windows) and is
measured on the first `eval_chars` characters of the held-out validation split
([`evaluate_lm`][toreq.nn.lm.evaluate_lm]: perplexity, next-character accuracy, bits per character),
next to the unigram perplexity of its own training text
([`unigram_perplexity`][toreq.nn.lm.unigram_perplexity]). Each finished run's row (with its
hyper-parameters) is added to `results.jsonl` at once, by writing a new file and renaming it over
the old, so an interruption loses at most the current run, and
[`run_study`][toreq.lm_study.run_study] with `resume=True` skips the runs already there. At the end
[`write_outputs`][toreq.lm_study.write_outputs] writes `results.json`, `results.csv` and
`summary.md` (the tables and the crossover point: the smallest training text at which an EqProp
variant beats backprop).

`toreq lm-study` is the command line; [`QUICK`][toreq.lm_study.QUICK] (minutes on a CPU) and
[`FULL`][toreq.lm_study.FULL] (the ~2.2M-parameter base, for a GPU) its configurations.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toreq.data import CharCorpus
from toreq.lm_training import train_lm
from toreq.nn.lm import LM_VARIANTS, build_lm, count_parameters, evaluate_lm, unigram_perplexity
from toreq.nn.transformer import BLOCK_DEFAULTS

__all__ = ["EXPERIMENTS", "FULL", "QUICK", "Run", "StudyConfig", "best_eqprop_variant",
           "crossover", "plan", "read_results", "run_one", "run_study", "size_comparison",
           "summarize", "write_outputs"]

EXPERIMENTS = ("variants", "data_size", "seq_len")
"""The experiments of the study, in the order they run (`toreq lm-study --experiments`)."""
EQPROP_VARIANTS = tuple(v for v in LM_VARIANTS if v != "backprop")


@dataclass(frozen=True)
class StudyConfig:
    """The study's sizes and hyper-parameters (every run records those it used).

    Attributes:
        name: a label written with the results (`"quick"`, `"full"`, ...).
        base_params: the parameter count of scale 1.0 of the `"variants"` experiment.
        scales: the fractions of `base_params` compared.
        n_layers, n_heads: the transformers' blocks and heads ([`build_lm`][toreq.nn.lm.build_lm]).
        seq_len: the context of the `"variants"` and `"data_size"` runs.
        batch_size, steps, lr: [`train_lm`][toreq.lm_training.train_lm]'s windows per step, optimizer
            steps (of the `"variants"` runs) and Adam's learning rate (of every run).
        block_options: every EqProp sublayer's [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock]
        options. looped_options: `context`, `embed_dim` of `looped_mlp`.
        eval_chars: the validation characters every run is measured on.
        variants: the variants of the `"variants"` experiment.
        data_sizes, data_params, data_variants: the `"data_size"` experiment's training texts
            (first characters of the training split), parameter count and variants.
        data_steps: the optimizer steps of the `"data_size"` and `"seq_len"` runs (the same
            for every size: the same compute, however small the text).
        seq_lens, seq_chars, seq_variant: the `"seq_len"` experiment's contexts, training
            characters, and EqProp variant (`None`: the best of `"variants"`, else
            `"attention_only"`, the prototype's best).
        tolerance: [`build_lm`][toreq.nn.lm.build_lm]'s largest relative parameter mismatch.
    """

    name: str = "full"
    base_params: int = 2_175_041  # the prototype's backprop base
    scales: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0)
    n_layers: int = 3
    n_heads: int = 4
    seq_len: int = 64
    batch_size: int = 64
    steps: int = 5000
    lr: float = 1e-3
    block_options: dict[str, Any] = field(default_factory=lambda: dict(BLOCK_DEFAULTS))
    looped_options: dict[str, Any] = field(default_factory=lambda: dict(context=8, embed_dim=32))
    eval_chars: int = 100_000
    variants: tuple[str, ...] = tuple(LM_VARIANTS)
    data_sizes: tuple[int, ...] = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000)
    data_params: int = 600_000  # about the prototype's 128-wide, 3-layer backprop model
    data_variants: tuple[str, ...] = ("backprop", "looped_mlp", "recurrent_core", "full")
    data_steps: int = 2000
    seq_lens: tuple[int, ...] = (16, 32, 64, 128)
    seq_chars: int = 10_000
    seq_variant: str | None = None
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        for name in ("variants", "data_variants"):
            unknown = set(getattr(self, name)) - set(LM_VARIANTS)
            if unknown:
                raise ValueError(f"{name} must be among {tuple(LM_VARIANTS)}, got "
                                 f"{sorted(unknown)}")
        if self.seq_variant is not None and self.seq_variant not in EQPROP_VARIANTS:
            raise ValueError(f"seq_variant must be None or one of {EQPROP_VARIANTS}, got "
                             f"{self.seq_variant!r}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive fractions, got {self.scales}")

    def identity(self) -> str:
        """A hash of every field: the rows of one `results.jsonl` share it."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


FULL = StudyConfig()
"""The prototype's sizes: a ~2.2M-parameter base (`d_model` 244 for backprop, 3 blocks of 4
heads), 5,000 steps of 64 windows of 64 characters per `"variants"` run (about 20 passes over
the training split), 2,000 steps at ~600K parameters in the size and length experiments, the
EqProp blocks at `BLOCK_DEFAULTS`. For a GPU
(`device="cuda"`): with the EqProp sublayers' relaxations it takes days on a CPU. Its learning rate
was not tuned at this size."""

QUICK = StudyConfig(
    name="quick", base_params=80_000, n_layers=2, n_heads=2, seq_len=32, batch_size=16,
    steps=400, data_steps=400, lr=3e-3,
    block_options=dict(BLOCK_DEFAULTS, max_steps=20, tol=1e-3),
    eval_chars=4_000, data_params=40_000, seq_chars=10_000, tolerance=0.08)
"""Small models and few steps: the whole study in about 15 minutes on two CPU cores."""


@dataclass(frozen=True)
class Run:
    """One training run of the study; `key` identifies it in `results.jsonl`."""

    experiment: str
    variant: str
    params: int
    seq_len: int
    train_chars: int | None  # None: the whole training split
    steps: int
    seed: int
    scale: float | None = None

    @property
    def key(self) -> str:
        """`experiment/variant/scale-or-size-or-seq_len/seed`."""
        level = {"variants": f"scale={self.scale}", "data_size": f"chars={self.train_chars}",
                 "seq_len": f"seq_len={self.seq_len}"}[self.experiment]
        return f"{self.experiment}/{self.variant}/{level}/seed={self.seed}"


def plan(experiment: str, config: StudyConfig, seed: int,
         rows: Sequence[dict[str, Any]] = ()) -> list[Run]:
    """The runs of one experiment; `rows` (the results so far) choose the `"seq_len"`
    experiment's EqProp variant when `config.seq_variant` is None."""
    if experiment == "variants":
        return [Run(experiment, v, round(config.base_params * s), config.seq_len, None,
                    config.steps, seed, s) for s in config.scales for v in config.variants]
    if experiment == "data_size":
        return [Run(experiment, v, config.data_params, config.seq_len, n, config.data_steps, seed)
                for n in config.data_sizes for v in config.data_variants]
    if experiment == "seq_len":
        variant = config.seq_variant or best_eqprop_variant(rows) or "attention_only"
        return [Run(experiment, v, config.data_params, t, config.seq_chars, config.data_steps,
                    seed) for t in config.seq_lens for v in ("backprop", variant)]
    raise ValueError(f"experiment must be one of {EXPERIMENTS}, got {experiment!r}")


def best_eqprop_variant(rows: Iterable[dict[str, Any]]) -> str | None:
    """The EqProp variant of the lowest validation perplexity in the `"variants"` experiment
    at its largest scale, or None without such rows."""
    runs = [r for r in rows if r["experiment"] == "variants" and r["variant"] != "backprop"]
    if not runs:
        return None
    largest = max(r["scale"] for r in runs)
    return min((r for r in runs if r["scale"] == largest),
               key=lambda r: r["val_perplexity"])["variant"]


def run_one(run: Run, config: StudyConfig, corpus: CharCorpus,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Trains and measures one run; its row of results (metrics and hyper-parameters)."""
    train = corpus.train if run.train_chars is None else corpus.train[:run.train_chars]
    if train.numel() <= run.seq_len + 1:
        raise ValueError(f"{run.key}: {train.numel()} training characters, not more than "
                         f"seq_len + 1 = {run.seq_len + 1}")
    val = corpus.val[:config.eval_chars]
    options: dict[str, Any] = {}
    if run.variant != "backprop":
        options["block_options"] = dict(config.block_options)
    if run.variant == "looped_mlp":
        options.update(config.looped_options)
    torch.manual_seed(run.seed)
    model = build_lm(run.variant, corpus.vocab_size, run.seq_len, params=run.params,
                     n_layers=config.n_layers, n_heads=config.n_heads,
                     tolerance=config.tolerance, vocab=corpus.vocab, **options).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    device = torch.device(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    started = time.perf_counter()
    history = train_lm(model, optimizer, train.to(device), run.steps,
                       batch_size=config.batch_size,
                       generator=torch.Generator().manual_seed(run.seed))
    synchronize()
    seconds = time.perf_counter() - started
    metrics = evaluate_lm(model, val.to(device), run.seq_len)
    last = [h["loss"] for h in history[-20:]]
    return {
        "key": run.key, "experiment": run.experiment, "variant": run.variant,
        "scale": run.scale, "train_chars": train.numel(), "seq_len": run.seq_len,
        "seed": run.seed, "target_params": run.params, "params": count_parameters(model),
        "width": model.config.get("d_model", model.config.get("hidden")),
        "n_layers": config.n_layers if run.variant != "looped_mlp" else None,
        "n_heads": config.n_heads if run.variant != "looped_mlp" else None,
        "lr": config.lr, "steps": run.steps, "batch_size": config.batch_size,
        "block_options": options.get("block_options"),
        "looped_options": dict(config.looped_options) if run.variant == "looped_mlp" else None,
        "val_perplexity": metrics["perplexity"], "val_accuracy": metrics["accuracy"],
        "bits_per_char": metrics["bits_per_char"],
        "unigram_perplexity": unigram_perplexity(train, val, corpus.vocab_size),
        "train_loss": sum(last) / len(last) if last else math.nan,
        "wall_time_s": seconds, "eval_chars": val.numel(), "device": str(device),
        "threads": torch.get_num_threads(), "config": config.name, "config_id": config.identity(),
    }


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a `results.jsonl` (none when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, row: dict[str, Any]) -> None:
    """Adds a row to `path` atomically: the old lines and the new one go to a temporary file
    renamed over `path`, so the file holds either the old rows or all of them."""
    temporary = path.with_name(path.name + ".tmp")
    old = path.read_text() if path.exists() else ""
    with temporary.open("w") as f:
        f.write(old + json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def run_study(corpus: CharCorpus, out: str | os.PathLike, config: StudyConfig = FULL, *,
              experiments: Sequence[str] = EXPERIMENTS, seed: int = 0,
              device: str | torch.device = "cpu", resume: bool = False,
              log: Callable[[str], None] = lambda line: None) -> list[dict[str, Any]]:
    """Runs the chosen experiments (in [`EXPERIMENTS`][toreq.lm_study.EXPERIMENTS] order), adding
    each run's row to `<out>/results.jsonl` as it finishes, then
    [`write_outputs`][toreq.lm_study.write_outputs]. Returns every row.

    With `resume=True` the runs whose key is already in `results.jsonl` are skipped (its rows
    must come from the same configuration); without it an existing `results.jsonl` is an
    error, so that no finished results are overwritten.
    """
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown or not experiments:
        raise ValueError(f"experiments must be a non-empty subset of {EXPERIMENTS}, got "
                         f"{list(experiments)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    rows = read_results(jsonl)
    if rows and not resume:
        raise FileExistsError(f"{jsonl} already holds {len(rows)} runs: resume them, or choose "
                              "another output folder")
    other = {r["config_id"] for r in rows} - {config.identity()}
    if other:
        raise ValueError(f"{jsonl} holds runs of another configuration ({sorted(other)}, this one "
                         f"is {config.identity()}): choose another output folder")
    done = {r["key"] for r in rows}
    for experiment in (e for e in EXPERIMENTS if e in experiments):
        runs = plan(experiment, config, seed, rows)
        for i, run in enumerate(runs, 1):
            if run.key in done:
                log(f"[{experiment} {i}/{len(runs)}] {run.key}: done before, skipped")
                continue
            row = run_one(run, config, corpus, device)
            _append(jsonl, row)
            rows.append(row)
            done.add(run.key)
            log(f"[{experiment} {i}/{len(runs)}] {run.key}: {row['params']:,} params, "
                f"perplexity {row['val_perplexity']:.2f} (unigram "
                f"{row['unigram_perplexity']:.2f}), {row['wall_time_s']:.1f} s")
    write_outputs(rows, out, config)
    return rows


def size_comparison(rows: Iterable[dict[str, Any]]) -> list[tuple[int, str, float, float]]:
    """Per training-text size of the `"data_size"` experiment (ascending) with both a backprop
    and an EqProp run: `(characters, the best EqProp variant, its validation perplexity,
    backprop's)`."""
    runs = [r for r in rows if r["experiment"] == "data_size"]
    backprop = {r["train_chars"]: r["val_perplexity"] for r in runs if r["variant"] == "backprop"}
    comparison = []
    for n in sorted(backprop):
        eqprop = [r for r in runs if r["train_chars"] == n and r["variant"] != "backprop"]
        if eqprop:
            best = min(eqprop, key=lambda r: r["val_perplexity"])
            comparison.append((n, best["variant"], best["val_perplexity"], backprop[n]))
    return comparison


def crossover(rows: Iterable[dict[str, Any]]) -> tuple[int, str, float, float] | None:
    """The smallest training text of the `"data_size"` experiment at which an EqProp variant's
    validation perplexity is below backprop's: `(characters, variant, its perplexity,
    backprop's)` (the best variant there, [`size_comparison`][toreq.lm_study.size_comparison]),
    or None when none is."""
    return next((c for c in size_comparison(rows) if c[2] < c[3]), None)


def write_outputs(rows: Sequence[dict[str, Any]], out: str | os.PathLike,
                  config: StudyConfig) -> Path:
    """Writes `results.json` (the configuration and the rows), `results.csv` (one line a
    run; nested values as JSON) and `summary.md` into `out`; returns the summary's path."""
    out = Path(out)
    (out / "results.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "config_id": config.identity(),
         "crossover": crossover(rows), "rows": list(rows)}, indent=1))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v
                             for k, v in r.items()})
    summary = out / "summary.md"
    summary.write_text(summarize(rows, config))
    return summary


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def _by_level(rows: Sequence[dict[str, Any]], level: str
              ) -> tuple[list[str], list[tuple[Any, dict[str, dict[str, Any]]]]]:
    """The variants among `rows` (in `LM_VARIANTS` order), and for each value of the
    column `level`, ascending, its rows by variant: a table with a line per level."""
    names = [v for v in LM_VARIANTS if any(r["variant"] == v for r in rows)]
    levels = [(value, {r["variant"]: r for r in rows if r[level] == value})
              for value in sorted({r[level] for r in rows})]
    return names, levels


def summarize(rows: Sequence[dict[str, Any]], config: StudyConfig) -> str:
    """`summary.md`: one table per experiment run, the crossover point and the settings."""
    text = [f"# Character-level LM study ({config.name})", "",
            f"Tiny Shakespeare, {len(rows)} runs. Validation: the first {config.eval_chars:,} "
            f"characters of the held-out split. Every run: Adam lr {config.lr}, "
            f"{config.batch_size} random windows a step, {config.steps} steps ({config.data_steps} "
            f"in the size and length experiments); EqProp blocks {config.block_options}. "
            "Perplexity, accuracy (next character) and bits per character on the validation text; "
            "time: training wall-clock seconds.", ""]
    variants = [r for r in rows if r["experiment"] == "variants"]
    if variants:
        base = {r["scale"]: r for r in variants if r["variant"] == "backprop"}
        text += [f"## Variants x scale (seq_len {config.seq_len}, base "
                 f"{config.base_params:,} parameters)", ""]
        order = {v: i for i, v in enumerate(LM_VARIANTS)}
        lines = []
        for r in sorted(variants, key=lambda r: (order[r["variant"]], -r["scale"])):
            b = base.get(r["scale"])
            lines.append([r["variant"], f"{100 * r['scale']:.0f}%", f"{r['params']:,}",
                          str(r["width"]), f"{r['val_perplexity']:.2f}",
                          f"{100 * r['val_accuracy']:.1f}%", f"{r['bits_per_char']:.2f}",
                          f"{r['wall_time_s']:.1f}",
                          f"{r['val_perplexity'] / b['val_perplexity']:.2f}" if b else "-",
                          f"{r['wall_time_s'] / b['wall_time_s']:.1f}" if b else "-"])
        text += _table(["variant", "scale", "params", "width", "perplexity", "accuracy", "BPC",
                        "time (s)", "ppl / backprop", "time / backprop"], lines)
        text += ["", f"Unigram perplexity of the training split: "
                     f"{variants[0]['unigram_perplexity']:.2f}.", ""]
    sizes = [r for r in rows if r["experiment"] == "data_size"]
    if sizes:
        names, levels = _by_level(sizes, "train_chars")
        text += [f"## Training-text size (validation perplexity; ~{config.data_params:,} "
                 f"parameters, seq_len {config.seq_len})", ""]
        lines = [[f"{n:,}", f"{next(iter(at.values()))['unigram_perplexity']:.2f}",
                  *(f"{at[v]['val_perplexity']:.2f}" if v in at else "-" for v in names)]
                 for n, at in levels]
        text += _table(["train chars", "unigram", *names], lines)
        point, comparison = crossover(rows), size_comparison(rows)
        wins = [n for n, _, eqprop, backprop in comparison if eqprop < backprop]
        # the smallest size from which EqProp wins at every larger size measured
        since = next((comparison[i][0] for i in range(len(comparison))
                      if all(c[2] < c[3] for c in comparison[i:])), None)
        text += ["", f"**Crossover**: at {point[0]:,} training characters {point[1]} reaches "
                     f"perplexity {point[2]:.2f}, below backprop's {point[3]:.2f} (the smallest "
                     "such size). An EqProp variant beats backprop at "
                     f"{', '.join(f'{n:,}' for n in wins)} characters; "
                     + (f"at every size from {since:,} on." if since is not None else
                        "not at the largest size measured.") if point else
                 "**Crossover**: none: no EqProp variant beat backprop's perplexity at any "
                 "training-text size measured.", ""]
    lengths = [r for r in rows if r["experiment"] == "seq_len"]
    if lengths:
        names, levels = _by_level(lengths, "seq_len")
        text += [f"## Sequence length (validation perplexity, training seconds; "
                 f"{config.seq_chars:,} training characters)", ""]
        lines = [[str(t), *(f"{at[v]['val_perplexity']:.2f} ({at[v]['wall_time_s']:.1f} s)"
                            if v in at else "-" for v in names)]
                 for t, at in levels]
        text += _table(["seq_len", *names], lines) + [""]
    return "\n".join(text)
