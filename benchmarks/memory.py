"""Peak memory and time of one training step against the number of relaxation steps T.

One run measures, side by side for T in {10, 30, 100, 300} (``tol=0``: exactly T free steps),
one training step (free phase, gradients, optimizer step) of the same model trained by EqProp
and by backprop through time:

* ``looped``: :class:`toreq.nn.LoopedMLP`; :class:`toreq.train.EqPropTrainer` (T free steps in
  the compiled op, nudged phases of 10 steps, the contrastive update) against
  :class:`toreq.train.BPTTTrainer` (T steps unrolled with autograd);
* ``block``: ``Linear -> EquilibriumBlock -> Linear`` with a symmetric tanh cell; the block's
  ``gradient="eqprop"`` (T free steps in Python without a graph, nudged phases of 10 steps, one
  vector-Jacobian product) against ``gradient="bptt"``, the same torch optimizer.

Memory, on CPU: every (model, method, T) point runs in a fresh Python subprocess, which builds
the model and the batch, runs one warm-up step (lazy initialisation, thread pools) and then
measures one step twice:

* **peak tensor bytes** (the figure the targets use, the CPU counterpart of CUDA's
  ``max_memory_allocated``): ``torch.profiler`` with ``profile_memory=True`` records every
  allocation and free of a tensor's storage by torch's CPU allocator, the compiled ops'
  included; summed in time order, their running total's maximum is the most memory that
  tensors allocated during the step held at once, on top of what existed before it
  (parameters, data, the previous step's gradients; frees of those are not credited).
  Deterministic, byte-exact; Python objects and autograd's graph nodes (small beside the
  tensors they save) are not in it;
* **peak RSS** (a cross-check at the operating system's level): the kernel's resident-set
  high-water mark ``VmHWM`` is reset to the resident set (``5`` written to
  ``/proc/self/clear_refs``) and read, the step run and ``VmHWM`` read again: peak = the
  difference. The subprocess runs with
  ``MALLOC_MMAP_THRESHOLD_=16384`` so that glibc serves every allocation of 16 KiB or more by
  ``mmap`` and returns it on free (the warm-up's freed tensors do not linger in malloc's free
  lists and each step's allocations show in the resident set). Page-granular, and the kernel's
  RSS counters lag by up to a few hundred KiB, so small peaks read noisily. Linux only.

A calibration point allocates a tensor of known size. On CUDA, in this process:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
``memory_allocated`` before the step.

Time: in this process (no malloc setting), the median over repeats of one step, EqProp and
BPTT alternated at each T so that both see the same machine load. One thread by default
(``--threads``): the question is a ratio, and on a shared machine multi-threaded small matrix
products stall at the thread pool's barriers whenever other processes hold a core (a run with
two threads on a busy two-core machine took 13 minutes, some steps 100x slower than alone).

Both nudging schemes are measured: symmetric (the trainers' default, two nudged phases of 10
steps: 20 nudged steps) and one-sided (one phase of 10 steps). Targets (PASS/FAIL, per model and
scheme): EqProp's peak grows <= 5% from T=10 to T=300; at T=100 its peak is <= 0.2x BPTT's; at
T=30 its step time is <= 0.6x BPTT's. (Counting matrix products, EqProp at T=30 does 30 + 20
(symmetric) or 30 + 10 (one-sided) steps against BPTT's 30 forward and 30 backward steps of two
products each: 50/90 = 0.56 and 40/90 = 0.44 are the ratios of its compute.)

Writes ``memory.json`` (every number and the machine) and ``memory.md`` into ``--out`` and
prints the Markdown to stdout; progress goes to stderr.

    python benchmarks/memory.py [--quick] [--device cpu|cuda] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench_ops import Clock, fmt, log
from machine import machine_info, write_results
from toreq import utils
from toreq.nn import EquilibriumBlock
from toreq.validate import looped_step, tensor_peak

STEPS = (10, 30, 100, 300)
MODELS = ("looped", "block")
METHODS = ("eqprop", "eqprop_one_sided", "bptt")
EQPROP = ("eqprop", "eqprop_one_sided")
LABELS = {"eqprop": "EqProp, symmetric (2 x 10 nudged)",
          "eqprop_one_sided": "EqProp, one-sided (10 nudged)", "bptt": "BPTT"}
NUDGED_STEPS = 10
INPUTS, CLASSES = 64, 10
SIZES = {"quick": dict(batch=256, hidden=256, repeats=3),
         "full": dict(batch=256, hidden=512, repeats=7)}
MMAP_THRESHOLD = 16384
CALIBRATION_BYTES = 32 * 2 ** 20

TARGET_GROWTH = 0.05  # (a) EqProp peak(T=300) / peak(T=10) - 1
TARGET_MEMORY_RATIO = 0.2  # (b) EqProp / BPTT peak at T=100
TARGET_TIME_RATIO = 0.6  # (c) EqProp / BPTT step time at T=30


class Cell(nn.Module):
    """``x + c W s + b``: the pre-activation of a recurrent layer (``x`` is already ``U x``),
    ``W`` symmetric at spectral norm 1, ``c = 0.8``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.recurrent = utils.spectral_norm(utils.symmetric(nn.Linear(n, n)))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x + 0.8 * self.recurrent(s)


def make_step(model: str, method: str, steps: int, batch: int, hidden: int,
              device: torch.device) -> Callable[[], object]:
    """One training step of ``model`` by ``method`` with ``steps`` free steps, as a closure."""
    if model == "looped":
        return looped_step(method, steps, batch=batch, hidden=hidden, nudged_steps=NUDGED_STEPS,
                           seed=0, device=device)
    torch.manual_seed(0)
    x = torch.rand(batch, INPUTS, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    symmetric = method == "eqprop"
    block = EquilibriumBlock(Cell(hidden), hidden, activation="tanh", max_steps=steps, tol=0.0,
                             beta=0.1, symmetric=symmetric, nudged_steps=NUDGED_STEPS,
                             gradient="bptt" if method == "bptt" else "eqprop")
    net = nn.Sequential(nn.Linear(INPUTS, hidden), block, nn.Linear(hidden, CLASSES)).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_peak(step: Callable[[], object]) -> int:
    """Resident-set high-water mark during ``step()`` minus the resident set before it."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmHWM")  # the same counter as the peak's: never above it
    step()
    return (_status_kib("VmHWM") - before) * 1024


def cuda_peak(step: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def point_main(args: argparse.Namespace) -> int:
    """Subprocess entry: one (model, method, T) point, or the calibration; prints JSON."""
    torch.set_num_threads(args.threads)
    if args.point[0] == "calibration":
        def step():
            buffer = torch.empty(CALIBRATION_BYTES // 4)
            buffer.fill_(1.0)  # touched, so resident
            return float(buffer[0])
    else:
        model, method, steps = args.point[0], args.point[1], int(args.point[2])
        step = make_step(model, method, steps, args.batch, args.hidden, torch.device("cpu"))
    step()  # warm-up
    print(json.dumps({"tensor_peak_bytes": tensor_peak(step), "rss_peak_bytes": rss_peak(step)}))
    return 0


def measure_point_memory(point: list[str], batch: int, hidden: int, threads: int) -> dict:
    """One point in a fresh subprocess: ``{"tensor_peak_bytes": ..., "rss_peak_bytes": ...}``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    command = [sys.executable, str(Path(__file__).resolve()), "--point", *point, "--batch",
               str(batch), "--hidden", str(hidden), "--threads", str(threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"memory point {point} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def row(rows: list[dict], model: str, method: str, steps: int) -> dict:
    return next(r for r in rows if (r["model"], r["method"], r["steps"]) == (model, method, steps))


def evaluate_targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    results = []
    for model in MODELS:
        for method in EQPROP:
            name = f"{model}, {LABELS[method]}"
            low, high = row(rows, model, method, STEPS[0]), row(rows, model, method, STEPS[-1])
            growth = high["peak_bytes"] / low["peak_bytes"] - 1
            results.append((f"{name}: peak grows <= {100 * TARGET_GROWTH:.0f}% from T={STEPS[0]} "
                            f"to T={STEPS[-1]}", growth <= TARGET_GROWTH, f"{100 * growth:+.1f}%"))
            bptt = row(rows, model, "bptt", 100)["peak_bytes"]
            ratio = row(rows, model, method, 100)["peak_bytes"] / bptt
            results.append((f"{name}: at T=100 peak <= {TARGET_MEMORY_RATIO:g}x BPTT's",
                            ratio <= TARGET_MEMORY_RATIO, f"{ratio:.3f}x"))
            bptt = row(rows, model, "bptt", 30)["median_s"]
            ratio = row(rows, model, method, 30)["median_s"] / bptt
            results.append((f"{name}: at T=30 step time <= {TARGET_TIME_RATIO:g}x BPTT's",
                            ratio <= TARGET_TIME_RATIO, f"{ratio:.2f}x"))
    return results


def markdown(info: dict, size: dict, rows: list[dict], calibration: dict | None,
             targets: list, elapsed_s: float, quick: bool) -> str:
    mib = 2 ** 20
    cuda = info["device"].startswith("cuda")
    out = ["# toreq memory and time: EqProp vs BPTT", ""]
    out.append(f"`{info['command']}` on {info['date']} ({'quick' if quick else 'full'}, "
               f"{elapsed_s:.0f} s). Device `{info['device']}`"
               f"{' (' + info['gpu'] + ')' if 'gpu' in info else ''}; CPU {info['cpu_model']} "
               f"({info['logical_cpus']} logical CPUs); torch {info['torch']}; "
               f"torch.set_num_threads({info['threads']}).")
    out.append("")
    out.append(f"Batch {size['batch']}, {INPUTS} inputs, hidden {size['hidden']}, {CLASSES} "
               f"classes, float32, SGD. One training step with T free steps (tol=0); EqProp adds "
               f"two nudged phases (+beta, -beta) of {NUDGED_STEPS} steps (symmetric) or one "
               f"(one-sided). Peak: "
               + ("`torch.cuda.max_memory_allocated` during the step minus the memory allocated "
                  "before it." if cuda else
                  "the most tensor bytes the step held on top of what existed before it "
                  "(torch.profiler's allocation records), in a fresh subprocess per point after "
                  "one warm-up step; RSS: the resident-set high-water mark during the step minus "
                  "the resident set before it, in the same subprocess (see the script's "
                  "docstring)."))
    if calibration:
        out.append(f"Calibration: a {calibration['allocated_bytes'] / mib:.1f} MiB tensor "
                   f"measured as {calibration['tensor_peak_bytes'] / mib:.2f} MiB of tensors and "
                   f"{calibration['rss_peak_bytes'] / mib:.2f} MiB of RSS.")
    out.append(f"Time: median of {size['repeats']} steps after a warm-up, EqProp and BPTT "
               "alternated.")
    out += ["", "## Targets", ""]
    for name, ok, value in targets:
        out.append(f"- **{'PASS' if ok else 'FAIL'}** {name}: {value}")
    out += ["", "## Results", "",
            "| model | T | method | peak MiB |" + ("" if cuda else " RSS MiB |")
            + " memory / BPTT | step ms | time / BPTT |",
            "|---|---:|---|---:|" + ("" if cuda else "---:|") + "---:|---:|---:|"]
    for model in MODELS:
        for steps in STEPS:
            bp = row(rows, model, "bptt", steps)
            for method in METHODS:
                r = row(rows, model, method, steps)
                rss = "" if cuda else f" {fmt(r['rss_peak_bytes'] / mib)} |"
                out.append(f"| {model} | {steps} | {LABELS[method]} | "
                           f"{fmt(r['peak_bytes'] / mib)} |"
                           f"{rss} {r['peak_bytes'] / bp['peak_bytes']:.3f}x | "
                           f"{fmt(r['median_s'] * 1e3)} | {r['median_s'] / bp['median_s']:.2f}x |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"batch {SIZES['quick']['batch']}, hidden {SIZES['quick']['hidden']}, "
                             f"{SIZES['quick']['repeats']} timed steps per point")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default="results/memory", help="output directory")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1, see the docstring)")
    parser.add_argument("--point", nargs="+", help=argparse.SUPPRESS)  # subprocess entry
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.point:
        return point_main(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but torch.cuda.is_available() is False")
        return 2
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        log("error: CPU peak memory needs Linux's /proc/self/clear_refs and VmHWM")
        return 2
    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    info = machine_info(device, args.threads, default_threads)
    log(f"toreq memory: device {device}, threads {args.threads}, batch {size['batch']}, "
        f"hidden {size['hidden']}")
    start = time.perf_counter()

    calibration = None
    if device.type == "cpu":
        calibration = dict(allocated_bytes=CALIBRATION_BYTES, **measure_point_memory(
            ["calibration"], size["batch"], size["hidden"], args.threads))
        log(f"[calibration] {CALIBRATION_BYTES / 2 ** 20:.1f} MiB allocated: "
            f"{calibration['tensor_peak_bytes'] / 2 ** 20:.2f} MiB of tensors, "
            f"{calibration['rss_peak_bytes'] / 2 ** 20:.2f} MiB of RSS measured")

    clock = Clock(device)
    rows = []
    for model in MODELS:
        for steps in STEPS:
            fns = {method: make_step(model, method, steps, size["batch"], size["hidden"], device)
                   for method in METHODS}
            for fn in fns.values():
                fn()  # warm-up
            samples: dict[str, list[float]] = {method: [] for method in METHODS}
            for _ in range(size["repeats"]):
                for method, fn in fns.items():
                    samples[method].append(clock.run(fn, 1))
            for method in METHODS:
                if device.type == "cpu":
                    memory = measure_point_memory([model, method, str(steps)], size["batch"],
                                                  size["hidden"], args.threads)
                    peak, rss = memory["tensor_peak_bytes"], memory["rss_peak_bytes"]
                else:
                    peak, rss = cuda_peak(fns[method], device), None
                rows.append(dict(model=model, method=method, steps=steps, peak_bytes=peak,
                                 rss_peak_bytes=rss, median_s=statistics.median(samples[method]),
                                 samples_s=samples[method]))
                log(f"[{model} T={steps:<3d}] {method:16s} peak {peak / 2 ** 20:8.2f} MiB"
                    + ("" if rss is None else f" (RSS {rss / 2 ** 20:8.2f} MiB)")
                    + f"  step {rows[-1]['median_s'] * 1e3:8.1f} ms")
    elapsed = time.perf_counter() - start
    targets = evaluate_targets(rows)
    md = markdown(info, size, rows, calibration, targets, elapsed, args.quick)
    record = dict(machine=info, quick=args.quick, elapsed_s=elapsed, size=size, steps=STEPS,
                  nudged_steps=NUDGED_STEPS, mmap_threshold=MMAP_THRESHOLD,
                  calibration=calibration,
                  targets=[dict(target=name, passed=ok, value=value)
                           for name, ok, value in targets],
                  rows=rows)
    write_results(args.out, "memory", record, md)
    log(f"wrote memory.json and memory.md into {args.out} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
