"""Figures of the benchmarks' JSON records, drawn with matplotlib.

Each ``draw_*`` function takes a record (the parsed ``<name>.json`` of one benchmark) and a
matplotlib ``Figure`` and adds its panels to the figure; it imports nothing from matplotlib, so
the notebooks draw into ``pyplot`` figures and :func:`write_plots` into plain ``Figure`` s
saved as PNG. Everything drawn is read from the record: a figure shows what its benchmark
measured and nothing else.

    from plots import write_plots
    write_plots("memory", json.load(open("results/memory/memory.json")), "results/memory")
"""

from __future__ import annotations

import statistics
from pathlib import Path

MIB = 2 ** 20
MEMORY_STYLES = {"eqprop": "-o", "eqprop_one_sided": "-s", "bptt": "--^"}
MEMORY_LABELS = {"eqprop": "EqProp, symmetric", "eqprop_one_sided": "EqProp, one-sided",
                 "bptt": "BPTT"}


def draw_memory(record: dict, figure) -> None:
    """``memory.json``: peak memory of one training step against T (one panel per model) and
    EqProp's step time as a fraction of BPTT's against T."""
    rows = record["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    axes = figure.subplots(1, len(models) + 1)
    for ax, model in zip(axes, models):
        for method, style in MEMORY_STYLES.items():
            points = sorted((r["steps"], r["peak_bytes"] / MIB) for r in rows
                            if r["model"] == model and r["method"] == method)
            if points:
                ax.loglog(*zip(*points), style, ms=4, label=MEMORY_LABELS[method])
        ax.set(title=f"{model}: peak memory of one step", xlabel="relaxation steps T",
               ylabel="peak MiB")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for model in models:
        bptt = {r["steps"]: r["median_s"] for r in rows
                if r["model"] == model and r["method"] == "bptt"}
        for method in ("eqprop", "eqprop_one_sided"):
            points = sorted((r["steps"], r["median_s"] / bptt[r["steps"]]) for r in rows
                            if r["model"] == model and r["method"] == method
                            and r["steps"] in bptt)
            if points:
                ax.semilogx(*zip(*points), MEMORY_STYLES[method], ms=4,
                            label=f"{model}, {MEMORY_LABELS[method]}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(title="step time, EqProp / BPTT", xlabel="relaxation steps T", ylabel="ratio")
    ax.legend(fontsize=8)


def draw_bench_ops(record: dict, figure) -> None:
    """``bench_ops.json``: the compiled relaxation's speed-up over the PyTorch reference against
    the width (one panel per network, one line per batch size, at the most steps measured), and
    the Hebbian update's speed-up."""
    relax = record["relax"]
    nets = list(dict.fromkeys(r["net"] for r in relax))
    axes = figure.subplots(1, len(nets) + 1)
    for ax, net in zip(axes, nets):
        rows = [r for r in relax if r["net"] == net]
        steps = max(r["steps"] for r in rows)
        for batch in sorted({r["batch"] for r in rows}):
            points = sorted((r["hidden"], r["speedup"]) for r in rows
                            if r["batch"] == batch and r["steps"] == steps)
            ax.loglog(*zip(*points), "-o", ms=4, label=f"batch {batch}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"relax, {net} ({steps} steps)", xlabel="hidden units",
               ylabel="speed-up (reference / op)")
        ax.legend(fontsize=8)
    ax = axes[-1]
    hebbian = record.get("hebbian", [])
    labels = [f"{r['mode']}\nB={r['batch']} H={r['hidden']}" for r in hebbian]
    ax.bar(range(len(hebbian)), [r["speedup"] for r in hebbian])
    ax.set_xticks(range(len(hebbian)), labels, fontsize=7, rotation=60)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(title="hebbian_update", ylabel="speed-up (reference / op)")


def draw_accuracy(record: dict, figure) -> None:
    """``accuracy.json``: final test accuracy (mean and standard deviation over seeds) per data
    set and method, and the mean test accuracy per epoch."""
    datasets = record["datasets"]
    methods = list(datasets[0]["summary"]) if datasets else []
    bars, curves = figure.subplots(1, 2)
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        summaries = [d["summary"][method] for d in datasets]
        bars.bar([j + i * width for j in range(len(datasets))], [s["mean"] for s in summaries],
                 width, yerr=[s["std"] for s in summaries], label=method, capsize=3)
        for d in datasets:
            histories = [run["history"] for run in d["runs"][method]]
            epochs = [h["epoch"] for h in histories[0]]
            mean = [100 * statistics.fmean(h[e]["test_accuracy"] for h in histories)
                    for e in range(len(epochs))]
            curves.plot(epochs, mean, "-o", ms=3, label=f"{d['dataset']}, {method}")
    bars.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(datasets))],
                    [d["dataset"] for d in datasets])
    low = min((d["summary"][m]["mean"] for d in datasets for m in methods), default=0.0)
    bars.set(title="final test accuracy", ylabel="%", ylim=(max(0.0, low - 10), 100))
    bars.legend(fontsize=8)
    curves.set(title="test accuracy per epoch (mean over seeds)", xlabel="epoch", ylabel="%")
    curves.legend(fontsize=8)


DRAW = {"bench_ops": draw_bench_ops, "memory": draw_memory, "accuracy": draw_accuracy}


def write_plots(name: str, record: dict, out_dir: str | Path) -> list[Path]:
    """Draws benchmark ``name``'s record into ``out_dir/<name>.png``; returns the files written
    (none, with a printed note, where matplotlib is not installed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"note: matplotlib is not installed, so no plot of {name} was drawn "
              "(pip install matplotlib)")
        return []
    figure = Figure(figsize=(15, 4.2), layout="constrained")
    DRAW[name](record, figure)
    path = Path(out_dir) / f"{name}.png"
    figure.savefig(path, dpi=110)
    return [path]
