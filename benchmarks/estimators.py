"""The field's learning rules on one network: gradient quality and learning.

    python benchmarks/estimators.py [--quick] [--parts gradients learning] [--seeds 3]
                                    [--epochs 5] [--threads N] [--jobs N]
                                    [--out results/estimators]

1. **Gradient quality**: on one fixed tied network in float64 (a deep Hopfield network
   20-16-12-5, sigmoid, squared error, synchronous schedule, 8 samples), every estimator's
   gradient of the loss at the free equilibrium against BPTT's (unrolled from rest, far past
   convergence): cosine and relative error, for beta (or eta) from 1e-4 to 1, holomorphic
   EqProp for N = 2 .. 12 points on circles of radius |beta| = 0.1 and 0.5, truncated BPTT for
   K steps.
2. **Learning**: MNIST and Fashion-MNIST test accuracy of a deep Hopfield network with one
   hidden layer of 1024 units (the comparative study's shape, Scellier et al. 2023) and one with
   two hidden layers of 512, trained by each algorithm with the same budget (epochs, batches,
   AdamW, step caps), over seeds: mean ± std and seconds per epoch; ``--jobs N`` runs N of the
   independent runs at a time, one process each (with ``--threads 1`` on N cores, each run's
   time per epoch is then one core's, sharing the memory bus).

``--quick``: the gradient part at fewer settings, and the learning part on 2,000 training and
1,000 test images, one epoch, one seed, the one-hidden-layer network: it checks that
everything runs; its accuracies are not the figures of the full run. Writes
``estimators.json``, ``estimators.md`` and (with matplotlib) ``estimators.png`` (gradients) and
``estimators_learning.png`` (learning) into ``--out``; ``--render JSON`` writes the Markdown and
plots of an earlier run's record again (after a change of their layout), running nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import multiprocessing
import statistics
import sys
import time

import torch

from machine import machine_info, write_results
from toreq.data import load_classification
from toreq.diagnostics import compare
from toreq.estimators import (BPTT, ContrastiveLearning, CoupledLearning, EqProp,
                              HolomorphicEqProp, ImplicitDifferentiation)
from toreq.nn import EPMLP
from toreq.train import EqPropTrainer, evaluate


def gradient_network() -> tuple[EPMLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = EPMLP(20, [16, 12], 5, activation="sigmoid", schedule="sync").double().eval()
    with torch.no_grad():  # weights large enough that the layers interact
        for layer in [model.input, *model.layers]:
            layer.weight.mul_(2.0)
    x = torch.rand(8, 20, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    return model, x, y


def gradient_of(model: EPMLP, x, y, estimator) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model.max_steps, model.tol, model.nudged_steps = 20000, 1e-14, None
    estimator.backward(model, x, y, model.network(x))
    # a parameter the estimate does not reach (truncated BPTT's first steps) gets zero
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                      for p in model.parameters()])


def gradient_quality(quick: bool) -> list[dict]:
    model, x, y = gradient_network()
    reference = gradient_of(model, x, y, BPTT(steps=2000))
    strengths = [1e-4, 1e-2, 1.0] if quick else [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    rows = []

    def add(rule: str, setting: str, value: float, estimator) -> None:
        c = compare(gradient_of(model, x, y, estimator), reference)
        rows.append({"rule": rule, "setting": setting, "value": value, "cosine": c.cosine,
                     "relative_error": c.relative_error})

    for nudging in EqProp.NUDGINGS:
        for beta in strengths:
            add(f"EqProp {nudging}", "beta", beta, EqProp(beta, nudging))
    for nudging in CoupledLearning.NUDGINGS:
        for eta in strengths:
            add(f"CpL {nudging}", "eta", eta, CoupledLearning(eta, nudging))
    add("CL", "-", math.nan, ContrastiveLearning())
    for radius in (0.1, 0.5):
        for points in ([2, 4, 8] if quick else [2, 3, 4, 6, 8, 10, 12]):
            add(f"holomorphic, radius {radius:g}", "N", points, HolomorphicEqProp(radius, points))
    add("implicit (RBP)", "-", math.nan, ImplicitDifferentiation())
    for k in ([5, 50] if quick else [2, 5, 10, 20, 50, 100]):
        add("truncated BPTT", "K", k, BPTT(truncation=k))
    return rows


ALGORITHMS = {  # name: estimator factory (the same budget for all; see train_one())
    "EqProp positive": lambda: EqProp(0.5, "positive"),
    "EqProp negative": lambda: EqProp(0.5, "negative"),
    "EqProp centered": lambda: EqProp(0.5, "centered"),
    "CL": ContrastiveLearning,
    "CpL positive": lambda: CoupledLearning(0.5, "positive"),
    "CpL negative": lambda: CoupledLearning(0.5, "negative"),
    "CpL centered": lambda: CoupledLearning(0.5, "centered"),
    "holomorphic N=4": lambda: HolomorphicEqProp(0.5, 4),
    "implicit (RBP)": ImplicitDifferentiation,
    "truncated BPTT (K=10)": lambda: BPTT(truncation=10),
}
NETWORKS = {"DHN 784-1024-10": [1024], "DHN 784-512-512-10": [512, 512]}
DATASETS = ("mnist", "fashion_mnist")


@functools.lru_cache(maxsize=2)
def _data(dataset: str, data_dir: str | None, quick: bool):
    data = load_classification(dataset, root=data_dir)
    split = (data.x_train, data.y_train, data.x_test, data.y_test)
    if quick:
        split = (data.x_train[:2000], data.y_train[:2000], data.x_test[:1000], data.y_test[:1000])
    return data.input_dim, data.num_classes, split


def train_one(dataset: str, network: str, algorithm: str, seed: int, epochs: int,
              data_dir: str | None, quick: bool, threads: int | None) -> dict:
    """One (data set, network, algorithm, seed) run: test accuracy and seconds per epoch. A
    top-level function so that ``--jobs`` can run it in a worker process."""
    if threads:
        torch.set_num_threads(threads)
    input_dim, classes, (x_train, y_train, x_test, y_test) = _data(dataset, data_dir, quick)
    torch.manual_seed(seed)
    model = EPMLP(input_dim, NETWORKS[network], classes, activation="sigmoid",
                  loss="mse", schedule="async", max_steps=30, tol=1e-4)
    model.nudged_steps = 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = EqPropTrainer(model, optimizer, free_steps=30, estimator=ALGORITHMS[algorithm]())
    order = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(x_train.shape[0], generator=order)
        for i in range(0, x_train.shape[0], 128):
            idx = perm[i:i + 128]
            trainer.step(x_train[idx], y_train[idx])
    seconds = (time.perf_counter() - started) / epochs
    accuracy = evaluate(model, x_test, y_test)["accuracy"]
    print(f"{dataset} {network} {algorithm} seed {seed}: {100 * accuracy:.2f}% "
          f"({seconds:.1f} s/epoch)", file=sys.stderr, flush=True)
    return {"seed": seed, "test_accuracy": accuracy, "seconds_per_epoch": seconds}


def learning(quick: bool, seeds: int, epochs: int, data_dir: str | None, jobs: int,
             threads: int | None) -> list[dict]:
    networks = list(NETWORKS)[:1] if quick else list(NETWORKS)
    runs = [(dataset, network, algorithm, seed) for dataset in DATASETS for network in networks
            for algorithm in ALGORITHMS for seed in range(seeds)]
    settings = (epochs, data_dir, quick, threads)
    if jobs > 1:  # independent runs, one process each ("spawn": no torch state forked)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            results = list(pool.map(train_one, *zip(*[(*run, *settings) for run in runs])))
    else:
        results = [train_one(*run, *settings) for run in runs]
    grouped: dict[tuple[str, str, str], list[dict]] = {}
    for (dataset, network, algorithm, _), result in zip(runs, results):
        grouped.setdefault((dataset, network, algorithm), []).append(result)
    rows = []
    for (dataset, network, algorithm), group in grouped.items():
        accs = [r["test_accuracy"] for r in group]
        rows.append({"dataset": dataset, "network": network, "algorithm": algorithm,
                     "mean": statistics.fmean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in group),
                     "runs": group})
    return rows


def comparison(rows: list[dict]) -> list[str]:
    """Per data set and network, the comparative study's two findings (Scellier et al. 2023:
    centered EqProp the best of the rules, negative nudging better than positive) checked
    against our means, each difference next to the runs' standard deviations."""
    lines = []
    for dataset, network in dict.fromkeys((r["dataset"], r["network"]) for r in rows):
        mine = {r["algorithm"]: r for r in rows
                if r["dataset"] == dataset and r["network"] == network}
        best = max(mine, key=lambda name: mine[name]["mean"])
        centered = mine["EqProp centered"]
        if best == "EqProp centered":
            verdict = "yes"
        else:
            lead = 100 * (mine[best]["mean"] - centered["mean"])
            verdict = (f"no: {best} is {lead:.2f} points above it (std {100 * mine[best]['std']:.2f}"
                       f" and {100 * centered['std']:.2f})")
        positive, negative = mine["EqProp positive"], mine["EqProp negative"]
        gap = 100 * (negative["mean"] - positive["mean"])
        lines.append(f"- {dataset}, {network}: centered EqProp the best: {verdict}; negative "
                     f"nudging better than positive: {'yes' if gap > 0 else 'no'} ({gap:+.2f} "
                     f"points; std {100 * negative['std']:.2f} and {100 * positive['std']:.2f}).")
    return lines


def markdown(record: dict) -> str:
    info = record["machine"]
    out = [f"`{record['command']}` on {info['date']} ({record['mode']}, {record['seconds']:.0f} s)."
           f" CPU {info['cpu_model']} ({info['logical_cpus']} logical CPUs); torch "
           f"{info['torch']}; torch.set_num_threads({info['threads']}).", ""]
    if record.get("gradients"):
        out += ["#### Gradient quality against BPTT", "",
                "Deep Hopfield network 20-16-12-5 (sigmoid, squared error, synchronous), "
                "float64, 8 samples; every phase relaxed to 1e-14.", "",
                "| rule | setting | value | cosine | relative error |", "|---|---|---:|---:|---:|"]
        for r in record["gradients"]:
            value = "-" if math.isnan(r["value"]) else f"{r['value']:g}"
            out.append(f"| {r['rule']} | {r['setting']} | {value} | {r['cosine']:.6f} | "
                       f"{r['relative_error']:.2e} |")
        out.append("")
    if record.get("learning"):
        jobs = record.get("jobs", 1)
        out += ["#### Learning (test accuracy)", "",
                f"{record['epochs']} epoch(s), batch 128, AdamW lr 1e-3, sigmoid, squared error, "
                "async schedule, free/nudged caps 30/10, tol 1e-4; beta 0.5 (EqProp, "
                "holomorphic: |beta|, N = 4), eta 0.5 (CpL), K = 10 (truncated BPTT); "
                f"{record['seeds']} seed(s)"
                f"{' on 2,000/1,000 images' if record['mode'] == 'quick' else ''}; test accuracy "
                f"after the last epoch; {jobs} run(s) at a time"
                f"{', one process each' if jobs > 1 else ''}.",
                "", "| data | network | algorithm | test accuracy | s / epoch |",
                "|---|---|---|---:|---:|"]
        for r in record["learning"]:
            out.append(f"| {r['dataset']} | {r['network']} | {r['algorithm']} | "
                       f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}% | "
                       f"{r['seconds_per_epoch']:.1f} |")
        out += ["", "Against the comparative study (Scellier et al. 2023):", "",
                *comparison(record["learning"]), ""]
    return "\n".join(out)


def plot(record: dict, out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    if record.get("gradients"):
        plot_gradients(plt, record["gradients"], f"{out}/estimators.png")
    if record.get("learning"):
        plot_learning(plt, record["learning"], f"{out}/estimators_learning.png")


def plot_gradients(plt, rows: list[dict], path: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for rule in dict.fromkeys(r["rule"] for r in rows):
        points = [r for r in rows if r["rule"] == rule and r["setting"] in ("beta", "eta")]
        if points:
            left.loglog([r["value"] for r in points], [r["relative_error"] for r in points],
                        marker="o", label=rule)
        holo = [r for r in rows if r["rule"] == rule and r["setting"] == "N"]
        if holo:
            right.semilogy([r["value"] for r in holo], [r["relative_error"] for r in holo],
                           marker="o", label=rule)
    left.set(xlabel="beta or eta", ylabel="relative error against BPTT")
    right.set(xlabel="N (points on the circle)", ylabel="relative error against BPTT")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_learning(plt, rows: list[dict], path: str) -> None:
    """One panel per data set and network: each algorithm's mean test accuracy, std as bars."""
    panels = list(dict.fromkeys((r["dataset"], r["network"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for axis, (dataset, network) in zip(axes[0], panels):
        mine = [r for r in rows if r["dataset"] == dataset and r["network"] == network]
        axis.barh([r["algorithm"] for r in mine], [100 * r["mean"] for r in mine],
                  xerr=[100 * r["std"] for r in mine])
        low = min(100 * r["mean"] for r in mine)
        axis.set(title=f"{dataset}, {network}", xlabel="test accuracy (%)",
                 xlim=(max(0.0, low - 5), 100))
        axis.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run that checks everything")
    parser.add_argument("--parts", nargs="+", choices=("gradients", "learning"),
                        default=["gradients", "learning"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each run (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="learning runs at a time, one process each (default 1)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/estimators")
    parser.add_argument("--render", metavar="JSON",
                        help="run nothing: write the Markdown and plots of an earlier run's "
                             "estimators.json into --out (its command and figures unchanged)")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as handle:
            record = json.load(handle)
        write_results(args.out, "estimators", record, markdown(record))
        plot(record, args.out)
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)
    started = time.perf_counter()
    record = {"command": "python benchmarks/estimators.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "mode": "quick" if args.quick else "full", "seeds": seeds, "epochs": epochs,
              "machine": machine_info(torch.device("cpu"), torch.get_num_threads(), default_threads)}
    if "gradients" in args.parts:
        record["gradients"] = gradient_quality(args.quick)
    if "learning" in args.parts:
        record["jobs"] = args.jobs
        record["learning"] = learning(args.quick, seeds, epochs, args.data_dir, args.jobs,
                                      args.threads)
    record["seconds"] = time.perf_counter() - started
    write_results(args.out, "estimators", record, markdown(record))
    plot(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
