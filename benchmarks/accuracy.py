"""Test accuracy of EqProp against backprop of the same width, over several seeds.

    python benchmarks/accuracy.py [--datasets digits mnist fashion_mnist] [--seeds 3] [--quick]
    python benchmarks/accuracy.py --datasets cartpole acrobot [--seeds 3] [--quick]
    python benchmarks/accuracy.py --conv [--datasets mnist fashion_mnist] [--seeds 3] [--quick]

For each data set, trains the model of its preset (``toreq.presets``) by EqProp and a
feedforward MLP of the same width by backprop, with the same optimiser, learning-rate schedule,
epochs and batches, for every seed; reports the mean and standard deviation of the final test
accuracy and the training time on this machine, and judges the targets of the models issue:

* digits: EqProp >= 97%, within 1 point of backprop;
* MNIST: EqProp >= 98.0%, within 0.5 point of backprop;
* Fashion-MNIST: EqProp >= 88.5%, within 0.5 point of backprop.

``--conv`` trains the convolutional presets instead (``mnist-conv``, ``fashion_mnist-conv``: a
convolutional Hopfield network by centered EqProp against its ``FeedforwardCNN`` twin, the same
convolutions, poolings, activations and initial weights trained by backprop), judged on the
targets of the literature's-networks issue:

* MNIST: EqProp >= 99.3%, within 0.5 point of backprop;
* Fashion-MNIST: EqProp >= 91.5%, within 0.5 point of backprop.

The behaviour-cloning tasks of ``toreq.control`` (they need the ``control`` extra, so they run
only when named) are judged twice, on the action accuracy on the held-out episodes' states and
on the closed-loop return of each trained policy (greedy, the 20 evaluation episodes), next to
the expert's return on the same episodes (the control issue's targets):

* CartPole: EqProp >= 97.2%, within 2 points of backprop; mean return >= 95% of the expert's;
* Acrobot: EqProp >= 96.9%, within 2 points of backprop; mean return within 10% of the
  expert's.

``--papers NAME ...`` runs the papers' presets instead (``scellier2017-1h``, ``ernoult2019-p1h``,
``laborieux2021-mlp``, ...: SGD with their per-layer rates, their dynamics): EqProp and the
preset's own baseline (the BPTT of the same model, truncated as the paper ran it, where the
paper has one), and writes ``papers.json`` and ``papers.md``: test error mean ± std over the
seeds and seconds per epoch (training and the per-epoch evaluation) next to the paper's figure.

``--first-seed N`` trains seeds N, N + 1, ...; ``--merge A/accuracy.json B/accuracy.json``
combines the runs of such records (the same presets) into one report judged over every seed.

``--quick`` (one seed, two epochs, 5,000 training images for MNIST and Fashion-MNIST) checks
that everything runs; its accuracies are not the preset's figures. Writes ``accuracy.json``
and ``accuracy.md`` into ``--out`` (default ``results/accuracy``). MNIST and Fashion-MNIST are
read from ``--data-dir`` or ``$TOREQ_DATA`` (see ``toreq.data``); the control data are generated
and cached there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from machine import machine_info, write_results
from toreq.cli import NONNEGATIVE_INT, parse_channels
from toreq.control import evaluate_policy, expert_policy, model_policy
from toreq.data import load_classification
from toreq.presets import PRESETS, dataset_preset, train_preset

TARGETS = {  # data set: (EqProp's least mean test accuracy, largest gap to backprop), in %
    "digits": (97.0, 1.0),
    "mnist": (98.0, 0.5),
    "fashion_mnist": (88.5, 0.5),
    "cartpole": (97.2, 2.0),
    "acrobot": (96.9, 2.0),
}
CONV_TARGETS = {"mnist": (99.3, 0.5), "fashion_mnist": (91.5, 0.5)}
#: control data set: how far below the expert's mean return EqProp's may fall, as a fraction of
#: the expert's |mean| (CartPole: >= 95% of 500 = 475)
RETURN_TOLERANCE = {"cartpole": 0.05, "acrobot": 0.10}
VISION = ("digits", "mnist", "fashion_mnist")
METHODS = ("eqprop", "backprop")


def preset_for(dataset: str, conv: bool = False):
    """The data set's preset: its own (`dataset_preset`), or with `conv` its convolutional one."""
    return PRESETS[f"{dataset}-conv"] if conv else dataset_preset(dataset)


def with_options(preset, args: argparse.Namespace):
    """`preset` with the command line's --channels, --crop-padding and --flip (each given one
    replaces the preset's; the record's preset shows what ran)."""
    channels = None if args.channels is None else tuple(args.channels)
    changes = {name: value for name, value in (("channels", channels),
                                               ("crop_padding", args.crop_padding),
                                               ("flip", args.flip)) if value is not None}
    return dataclasses.replace(preset, **changes) if changes else preset


def summarise(runs: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    summary = {
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "seconds_mean": statistics.fmean(r["seconds"] for r in runs),
        "parameters": runs[0]["parameters"],
        "seeds": len(runs),
    }
    if "closed_loop" in runs[0]:  # every seed's evaluation episodes, pooled
        returns = [x for r in runs for x in r["closed_loop"]["returns"]]
        summary["return_mean"] = statistics.fmean(returns)
        summary["return_std"] = statistics.pstdev(returns)
    return summary


def judge(dataset: str, eqprop: dict, backprop: dict,
          expert: dict | None = None, conv: bool = False) -> tuple[bool, str]:
    least, gap = (CONV_TARGETS if conv else TARGETS)[dataset]
    measured_gap = backprop["mean"] - eqprop["mean"]
    ok = eqprop["mean"] >= least and measured_gap <= gap
    verdict = (f"EqProp {eqprop['mean']:.2f}% (target >= {least}%), backprop "
               f"{backprop['mean']:.2f}%, gap {measured_gap:+.2f} points (target <= {gap})")
    if expert is not None:
        bar = expert["mean"] - RETURN_TOLERANCE[dataset] * abs(expert["mean"])
        ok = ok and eqprop["return_mean"] >= bar
        verdict += (f"; closed-loop return EqProp {eqprop['return_mean']:.1f} (target >= "
                    f"{bar:.1f}: expert {expert['mean']:.1f} less "
                    f"{100 * RETURN_TOLERANCE[dataset]:.0f}%), backprop "
                    f"{backprop['return_mean']:.1f}")
    return ok, verdict


def judged(entry: dict, runs: dict[str, list[dict]]) -> dict:
    """A data set's entry of the report: its runs, their summary and the targets' verdict
    (the convolutional presets' targets for a `conv_ep` preset)."""
    summary = {method: summarise(r) for method, r in runs.items()}
    ok, verdict = judge(entry["dataset"], summary["eqprop"], summary["backprop"],
                        entry.get("expert"), entry["preset"]["model"] == "conv_ep")
    return {**entry, "summary": summary, "pass": ok, "verdict": verdict, "runs": runs}


def merge(paths: list[str], out: str) -> int:
    """One report from the runs of earlier `accuracy.json` records (the same presets, other
    seeds), summarised and judged over all of them."""
    records = [json.loads(Path(path).read_text()) for path in paths]
    if any(record.get("quick") or "datasets" not in record for record in records):
        raise SystemExit("--merge takes full (not --quick) records of the data sets' runs")
    entries: dict[str, dict] = {}
    for record in records:
        for d in record["datasets"]:
            entry = entries.setdefault(d["dataset"], {
                **{k: d[k] for k in ("dataset", "preset", "expert") if k in d},
                "runs": {method: [] for method in METHODS}})
            if entry["preset"] != d["preset"]:
                raise SystemExit(f"--merge: the records train {d['dataset']} with different "
                                 "presets; merge runs of one preset only")
            for method in METHODS:
                entry["runs"][method] += d["runs"][method]
    for name, entry in entries.items():
        for method, runs in entry["runs"].items():
            seeds = [r["seed"] for r in runs]
            if len(set(seeds)) != len(seeds):
                raise SystemExit(f"--merge: {name} {method} has seed(s) "
                                 f"{sorted({s for s in seeds if seeds.count(s) > 1})} twice")
    report = {"machine": {**records[0]["machine"], "command": " ".join(sys.argv)},
              "quick": False, "seconds": sum(record["seconds"] for record in records),
              "merged": [{k: record["machine"][k] for k in ("command", "date")}
                         | {"seconds": record["seconds"]} for record in records],
              "datasets": [judged({k: v for k, v in e.items() if k != "runs"}, e["runs"])
                           for e in entries.values()]}
    write_results(out, "accuracy", report, markdown(report))
    print(f"wrote accuracy.json and accuracy.md into {out}")
    return 0


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Test accuracy: EqProp against backprop of the same width", "",
        f"`{m['command']}` on {m['date']} ({report['seconds']:.0f} s): CPU {m['cpu_model']} "
        f"({m['logical_cpus']} logical CPUs), {m['threads']} torch threads, torch {m['torch']}.",
        "",
        *([f"The runs of {len(report['merged'])} records: " + "; ".join(
            f"`{r['command']}` on {r['date']} ({r['seconds']:.0f} s)" for r in report["merged"])
           + ".", ""] if "merged" in report else []),
        "Each preset's model is trained by EqProp; a feedforward network of the same width by "
        "backprop (an MLP; for a convolutional preset its FeedforwardCNN twin: the same "
        "layers and initial weights), with the same AdamW learning rate, cosine schedule, "
        "epochs and batches. "
        "Mean ± standard deviation of the final test accuracy over the seeds; time is the mean "
        "training time of one run on this machine.", "",
    ]
    control = [d for d in report["datasets"] if "expert" in d]
    if control:
        episodes = control[0]["expert"]["episodes"]
        lines += [
            "Control tasks (behaviour cloning, `toreq.control`): the test accuracy is the "
            "expert's action predicted on the states of held-out episodes; the closed-loop "
            f"return is the trained policy's (greedy) in the environment, mean ± standard "
            f"deviation over {episodes} seeded episodes per seed, pooled over the seeds; the "
            "expert's on the same episodes.", ""]
    lines += [
        "| data | preset | method | params | seeds | test accuracy | closed-loop return "
        "| train time (s) | s/epoch | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for d in report["datasets"]:
        if "expert" in d:
            e = d["expert"]
            lines.append(f"| {d['dataset']} | - | expert | - | - | - | "
                         f"{e['mean']:.1f} ± {e['std']:.1f} | - | |")
        for method in METHODS:
            s = d["summary"][method]
            target = ("(quick)" if report["quick"] else "**PASS**" if d["pass"] else "**FAIL**"
                      ) if method == "eqprop" else ""
            closed_loop = (f"{s['return_mean']:.1f} ± {s['return_std']:.1f}"
                           if "return_mean" in s else "-")
            lines.append(
                f"| {d['dataset']} | {d['preset']['name']} | {method} | {s['parameters']:,} | "
                f"{s['seeds']} | {s['mean']:.2f} ± {s['std']:.2f}% | {closed_loop} | "
                f"{s['seconds_mean']:.0f} | {s['seconds_mean'] / d['preset']['epochs']:.1f} | "
                f"{target} |")
    if report["quick"]:
        lines += ["", "Quick run (one seed, two epochs, a training subset): it checks that the "
                  "benchmark runs; the targets are judged on full runs only."]
    else:
        lines += ["", "Targets:", ""]
        lines += [f"- {'PASS' if d['pass'] else 'FAIL'} {d['dataset']}: {d['verdict']}"
                  for d in report["datasets"]]
    lines += ["", "Presets (hyper-parameters):", ""]
    for d in report["datasets"]:
        p = d["preset"]
        size = (f"channels {tuple(p['channels'])}, {dict(p['model_options'])}"
                if p["model"] == "conv_ep" else f"hidden {p['hidden']}")
        lines.append(
            f"- `{p['name']}`: {p['model']} {size}, {p['activation']}, "
            f"{p['epochs']} epochs, batch {p['batch_size']}, AdamW lr {p['lr']} (cosine), "
            f"beta {p['beta']} ({'symmetric' if p['symmetric_nudging'] else 'one-sided'}), "
            f"free/nudged step caps {p['free_steps']}/{p['nudged_steps']}"
            + augmentation_words(p))
    return "\n".join(lines) + "\n"


def augmentation_words(preset: dict) -> str:
    """The preset's training augmentation in words ('' without one; older records lack it)."""
    crop, flip = preset.get("crop_padding", 0), preset.get("flip", False)
    parts = ([f"random crop after padding {crop}"] if crop else []) + (["flip"] if flip else [])
    return f", augmented by {' and '.join(parts)}" if parts else ""


def papers_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# The papers' MNIST configurations", "",
        f"`{m['command']}` on {m['date']} ({report['seconds']:.0f} s): CPU {m['cpu_model']} "
        f"({m['logical_cpus']} logical CPUs), {m['threads']} torch threads, torch {m['torch']}.",
        "", "Test error of the last epoch, mean ± standard deviation over the seeds; seconds per "
        "epoch include the per-epoch evaluation.", "",
        "| preset | method | seeds | epochs | test error | best epoch's test error | train error "
        "| s/epoch |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for entry in report["presets"]:
        for method, s in entry["summary"].items():
            lines.append(
                f"| {entry['preset']['name']} | {method} | {s['seeds']} | "
                f"{entry['preset']['epochs']} | {s['error_mean']:.2f} ± {s['error_std']:.2f}% | "
                f"{s['best_error_mean']:.2f} ± {s['best_error_std']:.2f}% | "
                f"{s['train_error_mean']:.2f}% | {s['seconds_per_epoch']:.1f} |")
    if report["quick"]:
        lines += ["", "Quick run (one seed, two epochs, 5,000 training images): it checks that "
                  "the benchmark runs; these are not the presets' figures."]
    lines += ["", "The papers' figures and command lines:", ""]
    for entry in report["presets"]:
        p = entry["preset"]
        lines.append(f"- `{p['name']}`: {p['paper']}. Their command: `{p['paper_command']}`. "
                     f"Ours: `toreq train --preset {p['name']}`.")
    return "\n".join(lines) + "\n"


def run_papers(names: list[str], args: argparse.Namespace, seeds: int) -> int:
    """The papers' presets: EqProp and the preset's baseline, `seeds` seeds each."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    report = {"machine": machine_info(torch.device("cpu"), threads, threads), "quick": args.quick,
              "presets": []}
    for name in names:
        preset = PRESETS[name]
        data = load_classification(preset.dataset, root=args.data_dir)
        if args.quick:
            preset = dataclasses.replace(preset, epochs=min(preset.epochs, 2))
            data = dataclasses.replace(data, x_train=data.x_train[:5000],
                                       y_train=data.y_train[:5000])
        methods = ("eqprop",) + ((preset.baseline,) if preset.baseline else ())
        runs = {method: [] for method in methods}
        for seed in range(seeds):
            for method in methods:
                run = train_preset(preset, data, method, seed, progress=args.progress)
                runs[method].append(run)
                print(f"{name:<20} seed {seed} {method:<8} test error "
                      f"{100 - run['test_accuracy']:.2f}% {run['seconds']:.0f} s", flush=True)
        summary = {}
        for method, rs in runs.items():
            errors = [100 - r["test_accuracy"] for r in rs]
            best = [100 - 100 * max(h["test_accuracy"] for h in r["history"]) for r in rs]
            summary[method] = {
                "seeds": len(rs), "error_mean": statistics.fmean(errors),
                "error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                "best_error_mean": statistics.fmean(best),
                "best_error_std": statistics.stdev(best) if len(best) > 1 else 0.0,
                "train_error_mean": statistics.fmean(100 - r["train_accuracy"] for r in rs),
                "seconds_per_epoch": statistics.fmean(r["seconds"] for r in rs) / preset.epochs,
            }
        report["presets"].append({"preset": preset.as_dict(), "summary": summary, "runs": runs})
    report["seconds"] = time.perf_counter() - started
    write_results(args.out, "papers", report, papers_markdown(report))
    print(f"wrote papers.json and papers.md into {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(TARGETS), default=None,
                        help="default: the vision sets (with --conv: mnist, fashion_mnist); "
                             "cartpole and acrobot need the control extra")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--conv", action="store_true",
                        help="the convolutional presets of mnist and fashion_mnist instead")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="train seeds FIRST_SEED .. FIRST_SEED + SEEDS - 1 (default 0)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="instead of training, combine the runs of these accuracy.json "
                             "records (other seeds of the same presets) into one report")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, two epochs, 5,000 training images: checks that it runs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="results/accuracy")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--channels", type=parse_channels, default=None,
                        help="with --conv: the convolutional layers' channels instead of the "
                             "presets', comma-separated")
    parser.add_argument("--crop-padding", type=NONNEGATIVE_INT, default=None, metavar="PIXELS",
                        help="augment the training images by a random crop after this padding "
                             "(instead of the presets')")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="augment the training images by mirroring half of them (instead "
                             "of the presets')")
    parser.add_argument("--papers", nargs="+", default=None, metavar="PRESET",
                        choices=[n for n, p in PRESETS.items() if p.paper],
                        help="run these papers' presets instead of the data sets")
    args = parser.parse_args(argv)
    if args.channels is not None and not args.conv:
        parser.error("--channels sizes the convolutional presets: add --conv")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        return merge(args.merge, args.out)
    seeds = 1 if args.quick else args.seeds
    args.datasets = args.datasets or list(CONV_TARGETS if args.conv else VISION)
    if args.papers:
        return run_papers(args.papers, args, seeds)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    report = {"machine": machine_info(torch.device("cpu"), threads, threads), "quick": args.quick,
              "datasets": []}
    for dataset in args.datasets:
        if args.conv and dataset not in CONV_TARGETS:
            parser.error(f"--conv covers {', '.join(CONV_TARGETS)}, not {dataset}")
        preset = with_options(preset_for(dataset, args.conv), args)
        data = load_classification(dataset, root=args.data_dir)
        if args.quick:
            preset = dataclasses.replace(preset, epochs=min(preset.epochs, 2))
            if dataset in ("mnist", "fashion_mnist"):
                data = dataclasses.replace(data, x_train=data.x_train[:5000],
                                           y_train=data.y_train[:5000])
        entry = {"dataset": dataset, "preset": preset.as_dict()}
        closed_loop = None
        if dataset in RETURN_TOLERANCE:
            entry["expert"] = evaluate_policy(expert_policy(dataset), dataset)

            def closed_loop(model, task=dataset):
                return {"closed_loop": evaluate_policy(model_policy(model, task), task)}
        runs = {method: [] for method in METHODS}
        for seed in range(args.first_seed, args.first_seed + seeds):
            for method in METHODS:
                run = train_preset(preset, data, method, seed, progress=args.progress,
                                   judge=closed_loop)
                runs[method].append(run)
                returns = (f" return {run['closed_loop']['mean']:.1f}"
                           if "closed_loop" in run else "")
                print(f"{dataset:<14} seed {seed} {method:<9} test {run['test_accuracy']:.2f}% "
                      f"train {run['train_accuracy']:.2f}%{returns} {run['seconds']:.0f} s",
                      flush=True)
        report["datasets"].append(judged(entry, runs))
    report["seconds"] = time.perf_counter() - started
    write_results(args.out, "accuracy", report, markdown(report))
    print(f"wrote accuracy.json and accuracy.md into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
