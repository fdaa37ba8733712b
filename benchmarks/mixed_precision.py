"""Test accuracy of the presets trained in bfloat16 (or float16) against float32, on the CPU.

    python benchmarks/mixed_precision.py [--datasets digits mnist] [--precisions float32 bfloat16]
                                         [--seed 0] [--threads 1] [--quick] [--out DIR]

"Trained in bfloat16" means: each preset's EqProp training (``toreq.presets.train_preset``: the
preset's model, AdamW, cosine schedule, epochs and batches) runs under
``torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)``, so that

* the parameters, their gradients and AdamW's state stay float32 (master weights);
* every relaxation (free and nudged phases, and the test-set evaluation) runs in bfloat16:
  ``toreq.relax``'s autocast kernel casts its states, couplings and drives to bfloat16, the
  states are stored in bfloat16 and updated in float32 arithmetic (GEMMs with float32
  accumulation, the element update and the convergence test in float32), and the input
  projections are autocast's bfloat16 ``linear``;
* the Hebbian update, a gradient of float32 parameters, is computed in float32 from the
  bfloat16 activities (the op's autocast kernel), and the readout's loss in float32 (autocast's
  rule for ``cross_entropy``).

``cache_enabled=False``: autocast otherwise caches the bfloat16 copy of each parameter until
the autocast region is left, and the whole training is one region, so every step would use the
first step's weights.

Each finished run is appended to ``<out>/runs.jsonl`` (a run already there is skipped, so the
long runs can be made one command at a time); then ``mixed_precision.json`` and
``mixed_precision.md`` summarise every run in it: each reduced precision's test accuracy
against float32's on the same data set and seed, with the target |difference| <= 0.3 point.
``--quick`` (two epochs, 5,000 MNIST training images) checks that it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from machine import machine_info, write_results
from toreq.data import load_classification
from toreq.presets import dataset_preset, train_preset

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET_POINTS = 0.3  # the largest |reduced - float32| test accuracy, in points


def preset_for(dataset: str):
    return dataset_preset(dataset)


def precision_context(precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype, cache_enabled=False)


def run_key(run: dict) -> tuple:
    return run["dataset"], run["precision"], run["seed"], run["quick"]


def summarise(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows (one per run, with the difference to float32's run) and their verdicts."""
    base = {(r["dataset"], r["seed"], r["quick"]): r for r in runs if r["precision"] == "float32"}
    rows, verdicts = [], []
    for r in sorted(runs, key=lambda r: (r["dataset"], r["quick"], r["seed"],
                                         list(PRECISIONS).index(r["precision"]))):
        b = base.get((r["dataset"], r["seed"], r["quick"]))
        diff = None if b is None else r["test_accuracy"] - b["test_accuracy"]
        rows.append({**r, "difference": diff})
        if r["precision"] != "float32" and diff is not None:
            ok = abs(diff) <= TARGET_POINTS
            verdicts.append(f"**{'PASS' if ok else 'FAIL'}** {r['dataset']} {r['precision']}"
                            f"{' (quick)' if r['quick'] else ''}, seed {r['seed']}: "
                            f"{r['test_accuracy']:.2f}% against float32's "
                            f"{b['test_accuracy']:.2f}% ({diff:+.2f} points; target within "
                            f"{TARGET_POINTS} point)")
    return rows, verdicts


def markdown(info: dict, rows: list[dict], verdicts: list[str]) -> str:
    lines = [
        "# Presets trained in reduced precision against float32 (CPU)", "",
        f"`{info['command']}` on {info['date']}: CPU {info['cpu_model']} "
        f"({info['logical_cpus']} logical CPUs), {info['threads']} torch threads, torch "
        f"{info['torch']}. Runs accumulated in runs.jsonl (each line records its own command "
        "and time).", "",
        "Reduced precision = the preset's EqProp training under `torch.autocast(\"cpu\", "
        "dtype, cache_enabled=False)`: float32 parameters, gradients and optimizer; "
        "relaxations in the reduced dtype (states stored in it, float32 arithmetic and "
        "accumulation); the Hebbian update in float32. Time: one training run on a machine "
        "shared with other work.", "",
    ]
    lines += [f"- {v}" for v in verdicts] + [""]
    lines += ["| data | preset | precision | epochs | test accuracy | vs float32 | free steps "
              "(test mean) | train time (s) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        diff = "" if r["difference"] is None or r["precision"] == "float32" else \
            f"{r['difference']:+.2f}"
        steps = "" if r.get("test_steps_mean") is None else f"{r['test_steps_mean']:.1f}"
        lines.append(f"| {r['dataset']}{' (quick)' if r['quick'] else ''} | {r['preset']} | "
                     f"{r['precision']} | {r['epochs']} | {r['test_accuracy']:.2f}% | {diff} | "
                     f"{steps} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=("digits", "mnist", "fashion_mnist"),
                        default=["digits", "mnist"])
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS),
                        default=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="two epochs, 5,000 training images for MNIST: checks that it runs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default="results/mixed_precision")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {run_key(r) for r in runs}
    info = machine_info(torch.device("cpu"), args.threads, args.threads)
    for dataset in args.datasets:
        preset = preset_for(dataset)
        data = load_classification(dataset, root=args.data_dir)
        if args.quick:
            preset = dataclasses.replace(preset, epochs=min(preset.epochs, 2))
            if dataset != "digits":
                data = dataclasses.replace(data, x_train=data.x_train[:5000],
                                           y_train=data.y_train[:5000])
        for precision in args.precisions:
            key = (dataset, precision, args.seed, args.quick)
            if key in done:
                print(f"{dataset} {precision} seed {args.seed}: in {log} already", flush=True)
                continue
            started = time.perf_counter()
            with precision_context(precision):
                result = train_preset(preset, data, "eqprop", args.seed)
            run = dict(dataset=dataset, preset=preset.name, precision=precision, seed=args.seed,
                       quick=args.quick, epochs=preset.epochs,
                       test_accuracy=result["test_accuracy"],
                       train_accuracy=result["train_accuracy"],
                       test_steps_mean=result["test_steps_mean"], seconds=result["seconds"],
                       wall_seconds=time.perf_counter() - started, command=info["command"],
                       date=info["date"], threads=args.threads, history=result["history"])
            with open(log, "a") as f:
                f.write(json.dumps(run) + "\n")
            runs.append(run)
            print(f"{dataset} {precision} seed {args.seed}: test {run['test_accuracy']:.2f}% "
                  f"in {run['seconds']:.0f} s", flush=True)
    rows, verdicts = summarise(runs)
    write_results(out, "mixed_precision", dict(machine=info, target_points=TARGET_POINTS,
                                               runs=rows, verdicts=verdicts),
                  markdown(info, rows, verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
