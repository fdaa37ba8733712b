"""Benchmarks toreq's compiled operators against their pure-PyTorch references.

One run measures, side by side:

1. relaxation speed: ``toreq.ops.relax`` (the C++ op) vs ``toreq.ops.relax_reference`` (the
   Python step loop) on the same inputs, for a looped layer and a 3-hidden-layer tied layered
   network, with ``tol=0`` so both do exactly ``steps`` updates; the op's achieved GEMM
   GFLOP/s is compared with ``torch.mm`` on the same GEMM shape (B x H times H x H) measured in
   the same run;
2. steps to tolerance of the ``sync`` and ``async`` schedules, free and nudged phase;
3. the Hebbian update: ``toreq.ops.hebbian_update`` vs ``hebbian_update_reference``;
4. the dtypes: the op on the same layered and looped problems in float32, float64, bfloat16 and
   float16 (reduced-precision states, float32 arithmetic in the element update), one row per
   dtype with its time against float32's and its largest state difference from the float32
   reference;
5. max pooling: ``toreq.ops.max_pool2d`` vs ``max_pool2d_reference`` (``F.max_pool2d`` with
   its indices) at the shapes of ConvEP's convolutional layers (MNIST 16-32 and 32-64
   channels, Laborieux et al.'s CIFAR-10 network), 2 x 2 windows; values and indices must be
   equal.

Before a configuration is timed, the op's result is checked against the reference's
(``allclose``, rtol = atol = 1e-4 in float32; for float16 and bfloat16 against the float32
reference with ``DTYPE_ATOL``); a mismatch aborts the run.

Writes ``bench_ops.json`` (every raw sample and the machine) and ``bench_ops.md`` (tables and
the performance targets, PASS/FAIL) into ``--out`` and prints the Markdown to stdout; progress
goes to stderr.

    python benchmarks/bench_ops.py [--quick] [--device cpu|cuda] [--out DIR] [--threads N]
                                   [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch  # before toreq: loading toreq._C needs torch's shared libraries

from machine import machine_info, write_results
from toreq.ops import (
    Coupling,
    hebbian_update,
    hebbian_update_reference,
    layered_couplings,
    max_pool2d,
    max_pool2d_reference,
    relax,
    relax_reference,
)
from toreq.ops._dispatch import has_kernel

FULL_GRID = dict(batch=[1, 8, 32, 128, 256], hidden=[64, 128, 256, 512, 1024], steps=[10, 30, 100])
QUICK_GRID = dict(batch=[1, 32, 256], hidden=[64, 128, 512, 1024], steps=[10, 30])
HEBBIAN_GRID = dict(batch=[32, 256], hidden=[128, 1024])
TOL_HIDDEN = {"quick": [128, 512], "full": [128, 512, 1024]}
TOL_BATCH = 64
TOL_OUTPUTS = 10
# the dtypes section: (net, batch, hidden) per grid, 30 steps; the largest |state - float32
# reference| allowed per dtype (about 8 units of roundoff on states of magnitude <= 1)
DTYPE_CASES = {"quick": [("layered", 256, 512), ("looped", 32, 128)],
               "full": [("layered", 256, 512), ("layered", 256, 1024), ("looped", 32, 128)]}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DTYPE_ATOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2,
              torch.float16: 4e-3}
DTYPE_STEPS = 30

RTOL = ATOL = 1e-4  # float32 agreement demanded of op vs reference
SPECTRAL_NORM = 0.5  # looped layer: ||W||_2, a contraction for the 1-Lipschitz tanh
LAYERED_SPECTRAL_NORM = 0.4  # layered net: per-weight ||W_l||_2 (tied block matrix <= 0.8)
INPUT_FEATURES = 64  # width of the random input x that the drive U x projects

# Performance targets, checked against the data (PASS/FAIL at the top of the report).
TARGET_SMALL_SPEEDUP = 2.0  # (a) where batch <= 32 and hidden <= 128
TARGET_MIN_SPEEDUP = 0.95  # (b) everywhere
TARGET_MM_FRACTION = 0.70  # (c) at hidden >= 512


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class AbortBenchmark(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Clock:
    """Times a callable ``number`` times in a row; on CUDA with events, synchronised."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn: Callable[[], object], number: int) -> float:
        """Seconds per call, averaged over ``number`` back-to-back calls."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        begin = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - begin) / number


def measure(clock: Clock, fns: dict[str, Callable[[], object]], budget_s: float,
            min_repeats: int = 5, max_repeats: int = 200, min_sample_s: float = 2e-3) -> dict:
    """Median seconds per call of each callable, interleaved so drift hits all alike.

    Each callable is warmed up once more (it already ran in the correctness check), its cost
    estimated from that call, and then timed in ``repeats`` samples of ``number`` calls
    (``number`` makes a sample last at least ``min_sample_s``; ``repeats`` fits the budget, at
    least ``min_repeats``, or 3 where one round takes over a second: big cases get few repeats).
    """
    estimate = {name: max(clock.run(fn, 1), 1e-7) for name, fn in fns.items()}
    number = {name: max(1, math.ceil(min_sample_s / t)) for name, t in estimate.items()}
    per_round = sum(estimate[name] * number[name] for name in fns)
    floor = 3 if per_round > 1.0 else min_repeats
    repeats = int(min(max_repeats, max(floor, budget_s // per_round)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                samples[name].append(clock.run(fn, number[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: dict(median_s=statistics.median(s), min_s=min(s), repeats=repeats,
                   number=number[name], samples_s=s)
        for name, s in samples.items()
    }


BUSY_SHARE = 0.10  # a measurement during which other processes took more CPU is re-taken


class CpuMonitor:
    """How much CPU time *other* processes take while this one measures (from /proc/stat).

    The machine may be shared (builds, tests of other people): a busy neighbour takes cores
    from the timed code and, worse, stalls a multi-threaded kernel at its barriers. Each
    configuration is therefore timed between two snapshots; where others took more than
    ``BUSY_SHARE`` of the machine, the benchmark waits for the machine to go idle and measures
    again (twice at most), keeps the least perturbed measurement and marks it if still busy.
    """

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cpus = os.cpu_count() or 1

    def snapshot(self) -> tuple[float, float | None, float]:
        """(wall s, busy CPU s of the whole machine, CPU s of this process)."""
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            values = [int(v) for v in fields] + [0] * 8
            user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
            busy = (user + nice + system + irq + softirq + steal) / self.tick
        except (OSError, IndexError, ValueError):
            busy = None
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def other_share(self, a: tuple, b: tuple) -> float | None:
        """The share of the machine's CPU time that other processes used between a and b."""
        if a[1] is None or b[1] is None or b[0] <= a[0]:
            return None
        other = max(0.0, (b[1] - a[1]) - (b[2] - a[2]))
        return min(1.0, other / ((b[0] - a[0]) * self.cpus))

    def wait_idle(self, timeout_s: float = 30.0, window_s: float = 0.5) -> float | None:
        """Waits until others use under half of ``BUSY_SHARE`` over a window; the last share."""
        deadline = time.perf_counter() + timeout_s
        share = None
        while time.perf_counter() < deadline:
            a = self.snapshot()
            time.sleep(window_s)
            share = self.other_share(a, self.snapshot())
            if share is None or share < BUSY_SHARE / 2:
                break
        return share


def guarded(clock: Clock, monitor: CpuMonitor, what: str, fns: dict, budget_s: float,
            **kwargs) -> tuple[dict, float | None]:
    """:func:`measure`, re-taken (twice at most) where other processes disturbed it."""
    best, best_share = None, None
    for attempt in range(3):
        if attempt:
            log(f"  machine busy during {what} ({100 * best_share:.0f}% of the CPU time went to "
                f"other processes): waiting for it to go idle and measuring again")
            monitor.wait_idle()
        a = monitor.snapshot()
        result = measure(clock, fns, budget_s, **kwargs)
        share = monitor.other_share(a, monitor.snapshot())
        if best is None or (share is not None and share < best_share):
            best, best_share = result, share
        if share is None or share <= BUSY_SHARE:
            break
    return best, best_share


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def scaled(weight: torch.Tensor, norm: float) -> torch.Tensor:
    """``weight`` rescaled to spectral norm ``norm``."""
    sigma = torch.linalg.matrix_norm(weight.double(), ord=2).item()
    return (weight * (norm / sigma)).contiguous()


class WeightCache:
    """Random weights per (kind, shape), made once: the spectral norm costs an SVD."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device, self.seed, self.cache = device, seed, {}

    def get(self, name: str, rows: int, cols: int, norm: float | None) -> torch.Tensor:
        key = (name, rows, cols, norm)
        if key not in self.cache:
            gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) + self.seed)
            w = torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
            if norm is not None:
                w = scaled(w, norm)
            self.cache[key] = w.to(self.device)
        return self.cache[key]


def input_drive(weights: WeightCache, batch: int, hidden: int, seed: int) -> torch.Tensor:
    """A random input projection ``x U^T`` of shape (batch, hidden), about unit variance."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, INPUT_FEATURES, generator=gen).to(weights.device)
    return (x @ weights.get("U", hidden, INPUT_FEATURES, None).T).contiguous()


def looped_problem(weights: WeightCache, batch: int, hidden: int) -> dict:
    """One looped layer ``h <- tanh(U x + W h)``, ``||W||_2 = 0.5``."""
    w = weights.get("W_looped", hidden, hidden, SPECTRAL_NORM)
    return dict(
        states=[torch.zeros(batch, hidden, device=weights.device)],
        couplings=[Coupling(w, 0, 0)],
        drives=[input_drive(weights, batch, hidden, seed=batch * 7919 + hidden)],
        activation="tanh",
    )


def layered_problem(weights: WeightCache, batch: int, hidden: int,
                    outputs: int | None = None) -> dict:
    """A tied layered net of 3 hidden layers of ``hidden`` units (hard sigmoid).

    Layer 0 is driven by a random input projection ``U x``, layers 1 and 2 by a bias of 0.5;
    feedback is tied (``layered_couplings``). With ``outputs``, an output layer of that many
    units (bias 0) sits on top, which the nudged phase nudges toward a target.
    """
    widths = [hidden, hidden, hidden] + ([outputs] if outputs else [])
    ws = [weights.get(f"W_layered{l}", widths[l + 1], widths[l], LAYERED_SPECTRAL_NORM)
          for l in range(len(widths) - 1)]
    device = weights.device
    drives = [input_drive(weights, batch, hidden, seed=batch * 104729 + hidden)]
    drives += [torch.full((n,), 0.5, device=device) for n in widths[1:3]]
    if outputs:
        drives.append(torch.zeros(outputs, device=device))
    return dict(
        states=[torch.zeros(batch, n, device=device) for n in widths],
        couplings=layered_couplings(ws),
        drives=drives,
        activation="hard_sigmoid",
    )


def gemm_flops_per_step(problem: dict) -> int:
    """2 * B * n_in * n_out per coupling GEMM."""
    batch = problem["states"][0].shape[0]
    total = 0
    for c in problem["couplings"]:
        total += 2 * batch * c.weight.shape[0] * c.weight.shape[1]
    return total


# --------------------------------------------------------------------------------------------
# Correctness guard
# --------------------------------------------------------------------------------------------


def check_close(what: str, got, want) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape or not torch.allclose(g, w, rtol=RTOL, atol=ATOL):
            diff = (g - w).abs().max().item() if g.shape == w.shape else float("nan")
            raise AbortBenchmark(
                f"CORRECTNESS CHECK FAILED for {what}: output {i} of the op differs from the "
                f"reference (max |diff| = {diff:.3g}, shapes {tuple(g.shape)} vs "
                f"{tuple(w.shape)}, rtol=atol={RTOL}). Timings of a wrong op are meaningless; "
                f"aborting."
            )


# --------------------------------------------------------------------------------------------
# 1. Relaxation speed
# --------------------------------------------------------------------------------------------


def mm_baseline(weights: WeightCache, batch: int, hidden: int) -> dict[str, Callable]:
    """``torch.mm`` on the relaxation's GEMM shape, (B x H) @ (H x H), into a reused buffer.

    Both layouts of the right factor that the op multiplies by: ``W^T`` (a forward coupling,
    a transposed view) and ``W`` (tied feedback). The faster is this machine's GEMM rate.
    """
    w = weights.get("W_looped", hidden, hidden, SPECTRAL_NORM)
    x = input_drive(weights, batch, hidden, seed=1)
    out = torch.empty(batch, hidden, device=weights.device)
    return {"mm W^T": lambda: torch.mm(x, w.t(), out=out), "mm W": lambda: torch.mm(x, w, out=out)}


def bench_relax_speed(clock: Clock, monitor: CpuMonitor, weights: WeightCache, grid: dict,
                      budget_s: float) -> list:
    """Op vs reference (and ``torch.mm`` on the GEMM shape), interleaved in one measurement."""
    rows = []
    nets = {"looped": looped_problem, "layered": layered_problem}
    total = len(nets) * len(grid["batch"]) * len(grid["hidden"]) * len(grid["steps"])
    for net, make in nets.items():
        for hidden in grid["hidden"]:
            for batch in grid["batch"]:
                problem = make(weights, batch, hidden)
                args = (problem["states"], problem["couplings"], problem["drives"])
                mm_fns = mm_baseline(weights, batch, hidden)
                for fn in mm_fns.values():
                    fn()
                for steps in grid["steps"]:
                    kw = dict(activation=problem["activation"], max_steps=steps, tol=0.0)
                    what = f"relax net={net} batch={batch} hidden={hidden} steps={steps}"

                    def op(args=args, kw=kw):
                        return relax(*args, **kw)

                    def ref(args=args, kw=kw):
                        return relax_reference(*args, **kw)

                    got, want = op(), ref()
                    clock.sync()
                    check_close(what, got.states, want.states)
                    if not torch.equal(got.steps, want.steps) or int(got.steps.min()) != steps:
                        raise AbortBenchmark(f"CORRECTNESS CHECK FAILED for {what}: step counts "
                                             f"differ ({got.steps.tolist()[:8]} vs "
                                             f"{want.steps.tolist()[:8]}...)")
                    timing, busy = guarded(clock, monitor, what,
                                           {"op": op, "reference": ref, **mm_fns}, budget_s)
                    flops = gemm_flops_per_step(problem) * steps
                    op_s, ref_s = timing["op"]["median_s"], timing["reference"]["median_s"]
                    mm_flops = 2 * batch * hidden * hidden
                    mm_gflops = {k: mm_flops / timing[k]["median_s"] / 1e9 for k in mm_fns}
                    mm_layout = max(mm_gflops, key=mm_gflops.get)
                    op_gflops = flops / op_s / 1e9
                    rows.append(dict(
                        net=net, batch=batch, hidden=hidden, steps=steps,
                        activation=problem["activation"], couplings=len(problem["couplings"]),
                        gemm_flops=flops, op_ms=op_s * 1e3, reference_ms=ref_s * 1e3,
                        speedup=ref_s / op_s, op_gflops=op_gflops,
                        mm_gflops=mm_gflops[mm_layout], mm_layout=mm_layout,
                        mm_gflops_by_layout=mm_gflops,
                        pct_of_mm=100.0 * op_gflops / mm_gflops[mm_layout],
                        other_cpu_share=busy, timing=timing,
                    ))
                    r = rows[-1]
                    log(f"[relax {len(rows)}/{total}] {net:7s} B={batch:<4d} H={hidden:<5d} "
                        f"steps={steps:<4d} op {r['op_ms']:9.3f} ms  ref {r['reference_ms']:9.3f} "
                        f"ms  x{r['speedup']:.2f}  {r['pct_of_mm']:.0f}% of mm "
                        f"({timing['op']['repeats']} repeats)")
    return rows


# --------------------------------------------------------------------------------------------
# 2. Steps to tolerance
# --------------------------------------------------------------------------------------------


def bench_steps_to_tol(clock: Clock, monitor: CpuMonitor, weights: WeightCache,
                       hiddens: list[int]) -> list:
    rows = []
    tol, max_steps, beta = 1e-4, 500, 0.5
    for hidden in hiddens:
        problem = layered_problem(weights, TOL_BATCH, hidden, outputs=TOL_OUTPUTS)
        gen = torch.Generator().manual_seed(hidden)
        labels = torch.randint(0, TOL_OUTPUTS, (TOL_BATCH,), generator=gen)
        target = torch.nn.functional.one_hot(labels, TOL_OUTPUTS).float().to(weights.device)
        for schedule in ("sync", "async"):
            base = dict(activation=problem["activation"], max_steps=max_steps, tol=tol,
                        schedule=schedule)
            free_start = problem["states"]
            free = relax(free_start, problem["couplings"], problem["drives"], **base)
            phases = {
                "free": (free_start, dict(base)),
                "nudged": (free.states, dict(base, beta=beta, loss="mse", target=target)),
            }
            for phase, (start, kw) in phases.items():
                what = f"steps-to-tol hidden={hidden} schedule={schedule} phase={phase}"

                def op(start=start, kw=kw):
                    return relax(start, problem["couplings"], problem["drives"], **kw)

                got = op()
                want = relax_reference(start, problem["couplings"], problem["drives"], **kw)
                clock.sync()
                check_close(what, got.states, want.states)
                steps = got.steps.double()
                timing, busy = guarded(clock, monitor, what, {"op": op}, 0.3, min_repeats=3)
                op_s = timing["op"]["median_s"]
                rows.append(dict(
                    hidden=hidden, layers=[hidden] * 3 + [TOL_OUTPUTS], batch=TOL_BATCH,
                    schedule=schedule, phase=phase, beta=kw.get("beta", 0.0), tol=tol,
                    max_steps=max_steps, mean_steps=steps.mean().item(),
                    max_steps_taken=int(got.steps.max()), min_steps_taken=int(got.steps.min()),
                    converged=int((got.residual < tol).sum()),
                    steps_match_reference=int((got.steps == want.steps).sum()),
                    op_ms=op_s * 1e3, other_cpu_share=busy, steps=got.steps.tolist(),
                ))
                r = rows[-1]
                log(f"[steps-to-tol] H={hidden} {schedule:5s} {phase:6s} mean {r['mean_steps']:.1f}"
                    f" max {r['max_steps_taken']} converged {r['converged']}/{TOL_BATCH}")
    return rows


# --------------------------------------------------------------------------------------------
# 3. Hebbian update
# --------------------------------------------------------------------------------------------


def bench_hebbian(clock: Clock, monitor: CpuMonitor, weights: WeightCache,
                  budget_s: float) -> list:
    rows = []
    beta = 0.5
    device = weights.device
    for mode in ("two-phase", "shared-pre"):
        for batch in HEBBIAN_GRID["batch"]:
            for hidden in HEBBIAN_GRID["hidden"]:
                gen = torch.Generator().manual_seed(batch * 31 + hidden)
                free = [torch.rand(batch, hidden, generator=gen).to(device) for _ in range(2)]
                nudged = [(f + 0.05 * torch.randn(batch, hidden, generator=gen).to(device))
                          .clamp(0, 1) for f in free]
                post_n, pre_n = nudged
                post_f, pre_f = free
                if mode == "shared-pre":  # vector-field form: one pre tensor, one GEMM over B
                    pre_n = pre_f
                what = f"hebbian mode={mode} batch={batch} hidden={hidden}"

                def op(a=(post_n, pre_n, post_f, pre_f)):
                    return hebbian_update(*a, beta)

                def ref(a=(post_n, pre_n, post_f, pre_f)):
                    return hebbian_update_reference(*a, beta)

                got, want = op(), ref()
                clock.sync()
                check_close(what, got, want)
                timing, busy = guarded(clock, monitor, what, {"op": op, "reference": ref},
                                       budget_s)
                op_s, ref_s = timing["op"]["median_s"], timing["reference"]["median_s"]
                gemm_rows = batch if mode == "shared-pre" else 2 * batch
                flops = 2 * gemm_rows * hidden * hidden
                rows.append(dict(
                    mode=mode, batch=batch, hidden=hidden, op_ms=op_s * 1e3,
                    reference_ms=ref_s * 1e3, speedup=ref_s / op_s,
                    op_gflops=flops / op_s / 1e9, other_cpu_share=busy, op_timing=timing["op"],
                    reference_timing=timing["reference"],
                ))
                r = rows[-1]
                log(f"[hebbian] {mode:10s} B={batch:<4d} H={hidden:<5d} op {r['op_ms']:.3f} ms "
                    f"ref {r['reference_ms']:.3f} ms x{r['speedup']:.2f}")
    return rows


# --------------------------------------------------------------------------------------------
# 5. Max pooling
# --------------------------------------------------------------------------------------------

# (batch, channels, height, width) of the pooled convolutions: ConvEP on MNIST (16-32 and 32-64
# channels, kernel 5, padding 2) and Laborieux et al.'s CIFAR-10 network (128-256-512-512)
POOL_SHAPES = {"quick": [(128, 16, 28, 28), (128, 32, 14, 14), (128, 128, 32, 32)],
               "full": [(128, 16, 28, 28), (128, 32, 14, 14), (128, 32, 28, 28),
                        (128, 64, 14, 14), (128, 128, 32, 32), (128, 256, 16, 16),
                        (128, 512, 8, 8), (128, 512, 2, 2)]}


def bench_max_pool(clock: Clock, monitor: CpuMonitor, device: torch.device, shapes: list,
                   budget_s: float) -> list:
    rows = []
    for shape in shapes:
        gen = torch.Generator().manual_seed(sum(shape))
        z = torch.randn(shape, generator=gen).to(device)
        what = f"max_pool2d shape={shape}"
        got, want = max_pool2d(z, 2), max_pool2d_reference(z, 2)
        clock.sync()
        if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
            raise AbortBenchmark(f"{what}: the op's values or indices differ from F.max_pool2d's")
        fns = {"op": lambda: max_pool2d(z, 2), "reference": lambda: max_pool2d_reference(z, 2)}
        timing, busy = guarded(clock, monitor, what, fns, budget_s)
        op_s, ref_s = timing["op"]["median_s"], timing["reference"]["median_s"]
        rows.append(dict(shape=list(shape), op_ms=op_s * 1e3, reference_ms=ref_s * 1e3,
                         speedup=ref_s / op_s, other_cpu_share=busy, op_timing=timing["op"],
                         reference_timing=timing["reference"]))
        log(f"[max_pool2d] {shape} op {op_s * 1e3:.3f} ms ref {ref_s * 1e3:.3f} ms "
            f"x{ref_s / op_s:.2f}")
    return rows


# --------------------------------------------------------------------------------------------
# 4. Dtypes
# --------------------------------------------------------------------------------------------


def cast_problem(problem: dict, dtype: torch.dtype) -> dict:
    return dict(
        problem,
        states=[s.to(dtype) for s in problem["states"]],
        couplings=[c._replace(weight=c.weight.to(dtype)) for c in problem["couplings"]],
        drives=[None if d is None else d.to(dtype) for d in problem["drives"]],
    )


def bench_dtypes(clock: Clock, monitor: CpuMonitor, weights: WeightCache, cases: list,
                 budget_s: float) -> list:
    """The op per dtype on one problem, each dtype timed on its own."""
    rows = []
    nets = {"looped": looped_problem, "layered": layered_problem}
    for net, batch, hidden in cases:
        problem = nets[net](weights, batch, hidden)
        kw = dict(activation=problem["activation"], max_steps=DTYPE_STEPS, tol=0.0)
        want = relax_reference(problem["states"], problem["couplings"], problem["drives"], **kw)
        fns, diffs = {}, {}
        for name, dtype in DTYPES.items():
            p = cast_problem(problem, dtype)

            def op(p=p):
                return relax(p["states"], p["couplings"], p["drives"], **kw)

            got = op()
            clock.sync()
            diffs[name] = max((g.double() - w.double()).abs().max().item()
                              for g, w in zip(got.states, want.states))
            if not diffs[name] <= DTYPE_ATOL[dtype]:
                raise AbortBenchmark(
                    f"CORRECTNESS CHECK FAILED for dtypes net={net} batch={batch} "
                    f"hidden={hidden} {name}: max |state - float32 reference| = "
                    f"{diffs[name]:.3g} > {DTYPE_ATOL[dtype]:g}; aborting.")
            fns[name] = op
        # One dtype at a time, each with its share of the budget: float16, which has no fast
        # GEMM on most CPUs, takes seconds a call, and interleaved rounds would leave every
        # dtype three samples.
        timing, shares = {}, {}
        for name, fn in fns.items():
            what = f"dtypes net={net} batch={batch} hidden={hidden} {name}"
            result, shares[name] = guarded(clock, monitor, what, {name: fn}, budget_s / len(fns))
            timing[name] = result[name]
        base = timing["float32"]["median_s"]
        for name in DTYPES:
            op_s = timing[name]["median_s"]
            rows.append(dict(net=net, batch=batch, hidden=hidden, steps=DTYPE_STEPS, dtype=name,
                             op_ms=op_s * 1e3, vs_float32=base / op_s, max_diff=diffs[name],
                             atol=DTYPE_ATOL[DTYPES[name]], other_cpu_share=shares[name],
                             timing=timing[name]))
            log(f"[dtypes] {net:7s} B={batch:<4d} H={hidden:<5d} {name:9s} "
                f"op {op_s * 1e3:9.3f} ms  x{base / op_s:.2f} of float32  "
                f"max |diff| {diffs[name]:.2g}")
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    """Three significant figures, without scientific notation for ordinary values."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


def busy(r: dict, key: str = "other_cpu_share") -> bool:
    return r.get(key) is not None and r[key] > BUSY_SHARE


def mark(r: dict) -> str:
    """A dagger on rows measured while other processes kept the machine busy."""
    return " \u2020" if busy(r) else ""


def relax_row_name(r: dict) -> str:
    return f"{r['net']} B={r['batch']} H={r['hidden']} steps={r['steps']}{mark(r)}"


def evaluate_targets(relax_rows: list, hebbian_rows: list,
                     pool_rows: list) -> list[tuple[str, bool, list[str]]]:
    results = []
    small = [r for r in relax_rows if r["batch"] <= 32 and r["hidden"] <= 128]
    fail = [f"{relax_row_name(r)}: x{r['speedup']:.2f}" for r in small
            if r["speedup"] < TARGET_SMALL_SPEEDUP]
    results.append((f"(a) speed-up >= {TARGET_SMALL_SPEEDUP:g}x where batch <= 32 and hidden "
                    f"<= 128 ({len(small)} relaxation rows)", not fail and bool(small), fail))
    fail = [f"relax {relax_row_name(r)}: x{r['speedup']:.2f}" for r in relax_rows
            if r["speedup"] < TARGET_MIN_SPEEDUP]
    fail += [f"hebbian {r['mode']} B={r['batch']} H={r['hidden']}{mark(r)}: x{r['speedup']:.2f}"
             for r in hebbian_rows if r["speedup"] < TARGET_MIN_SPEEDUP]
    fail += [f"max_pool2d {tuple(r['shape'])}{mark(r)}: x{r['speedup']:.2f}"
             for r in pool_rows if r["speedup"] < TARGET_MIN_SPEEDUP]
    results.append((f"(b) speed-up >= {TARGET_MIN_SPEEDUP:g}x everywhere ({len(relax_rows)} "
                    f"relaxation + {len(hebbian_rows)} hebbian + {len(pool_rows)} max-pooling "
                    "rows)", not fail, fail))
    big = [r for r in relax_rows if r["hidden"] >= 512]
    fail = [f"{relax_row_name(r)}: {r['pct_of_mm']:.0f}%" for r in big
            if r["pct_of_mm"] < 100 * TARGET_MM_FRACTION]
    results.append((f"(c) op >= {100 * TARGET_MM_FRACTION:.0f}% of torch.mm GFLOP/s at hidden "
                    f">= 512 ({len(big)} relaxation rows)", not fail and bool(big), fail))
    return results


def markdown(info: dict, relax_rows: list, tol_rows: list, hebbian_rows: list,
             dtype_rows: list, pool_rows: list, targets: list, elapsed_s: float,
             quick: bool) -> str:
    out = ["# toreq op benchmarks", ""]
    out.append(f"`{info['command']}` on {info['date']} ({'quick' if quick else 'full'} grid, "
               f"{elapsed_s:.0f} s)")
    out.append("")
    out.append(f"Device `{info['device']}`{' (' + info['gpu'] + ')' if 'gpu' in info else ''}; "
               f"CPU {info['cpu_model']} ({info['logical_cpus']} logical CPUs); "
               f"torch {info['torch']}; torch.set_num_threads({info['threads']}) "
               f"(the machine's default is {info['default_threads']}); "
               f"compiled kernels: {', '.join(k for k, v in info['kernels'].items() if v)}.")
    load = info.get("load", {})
    share = load.get("other_processes_share")
    perturbed = sum(busy(r) for r in relax_rows + tol_rows + hebbian_rows + dtype_rows + pool_rows)
    if share is not None:
        out.append(f"Other processes used {100 * share:.0f}% of the machine's CPU time during "
                   f"the run. A measurement during which they used over "
                   f"{100 * BUSY_SHARE:.0f}% was taken again once the machine was idle (twice "
                   f"at most); rows still measured on a busy machine are marked \u2020"
                   + (f" (**{perturbed} rows: their timings are perturbed**)." if perturbed
                      else " (none here)."))
        out.append("")
    out.append("## Targets")
    out.append("")
    for name, ok, fails in targets:
        out.append(f"- **{'PASS' if ok else 'FAIL'}** {name}"
                   + ("" if ok else f": {len(fails)} failing"))
        for f in fails:
            out.append(f"  - {f}")
    out.append("")
    out.append("## 1. Relaxation speed (tol=0: exactly `steps` updates)")
    out.append("")
    out.append("Median wall time per call after warm-up. `looped`: one layer, "
               "`Coupling(W, 0, 0)`, ||W||_2 = 0.5, tanh, drive = random input projection "
               "(1 GEMM per step). `layered`: 3 hidden layers of `hidden` units, tied "
               "`layered_couplings`, ||W_l||_2 = 0.4, hard_sigmoid (4 GEMMs per step). "
               "Speed-up = reference / op. Op GFLOP/s counts 2*B*n_in*n_out per coupling "
               "GEMM per step; mm GFLOP/s is `torch.mm` (B x H) @ (H x H) into a preallocated "
               "output (the faster of the right factor as W and as W^T), timed interleaved with "
               "the op and the reference in the same measurement; for tiny shapes it includes "
               "a Python call's dispatch (a few us), so % of mm can exceed 100%.")
    out.append("")
    out.append("| net | batch | hidden | steps | op ms | reference ms | speed-up | op GFLOP/s "
               "| mm GFLOP/s | % of mm |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in relax_rows:
        out.append(f"| {r['net']}{mark(r)} | {r['batch']} | {r['hidden']} | {r['steps']} | "
                   f"{fmt(r['op_ms'])} | {fmt(r['reference_ms'])} | {r['speedup']:.2f}x | "
                   f"{fmt(r['op_gflops'])} | {fmt(r['mm_gflops'])} | {r['pct_of_mm']:.0f}% |")
    out.append("")
    out.append("## 2. Steps to tolerance (layered net)")
    out.append("")
    if tol_rows:
        r0 = tol_rows[0]
        out.append(f"Layers {' -> '.join(['hidden'] * 3 + [str(TOL_OUTPUTS)])} (3 tied hidden "
                   f"layers plus a {TOL_OUTPUTS}-unit output layer), hard_sigmoid, "
                   f"||W_l||_2 = {LAYERED_SPECTRAL_NORM}, random input drive, batch "
                   f"{r0['batch']}, tol={r0['tol']:g}, max_steps={r0['max_steps']}. Free phase "
                   f"from zeros (beta=0); nudged phase from that schedule's free state "
                   f"(beta={tol_rows[-1]['beta']:g}, mse to one-hot targets). `steps` is the "
                   f"op's per-sample step count; 'converged' counts samples whose last change "
                   f"< tol; 'match ref' counts samples whose step count equals the reference's.")
    out.append("")
    out.append("| hidden | batch | schedule | phase | mean steps | max steps | converged | "
               "match ref | op ms |")
    out.append("|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for r in tol_rows:
        out.append(f"| {r['hidden']}{mark(r)} | {r['batch']} | {r['schedule']} | {r['phase']} | "
                   f"{r['mean_steps']:.1f} | {r['max_steps_taken']} | "
                   f"{r['converged']}/{r['batch']} | {r['steps_match_reference']}/{r['batch']} | "
                   f"{fmt(r['op_ms'])} |")
    out.append("")
    out.append("## 3. Hebbian update")
    out.append("")
    out.append("`two-phase`: distinct pre tensors per phase (the op's one GEMM over 2B rows); "
               "`shared-pre`: the same pre tensor in both phases (vector-field form, one GEMM "
               "over B rows). Identity activations, beta=0.5. GFLOP/s counts the op's GEMM.")
    out.append("")
    out.append("| mode | batch | hidden | op ms | reference ms | speed-up | op GFLOP/s |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in hebbian_rows:
        out.append(f"| {r['mode']}{mark(r)} | {r['batch']} | {r['hidden']} | {fmt(r['op_ms'])} | "
                   f"{fmt(r['reference_ms'])} | {r['speedup']:.2f}x | {fmt(r['op_gflops'])} |")
    out.append("")
    out.append("## 4. Dtypes")
    out.append("")
    out.append(f"The op on the same problem in each dtype ({DTYPE_STEPS} steps, tol=0; nets as "
               "in section 1), each dtype timed on its own. float16 and bfloat16 hold the "
               "states, weights and drives in that dtype, with the element update and the "
               "convergence test in float32 and float32 accumulation inside the GEMMs. "
               "`vs float32` = float32's time / this dtype's; `max |diff|` = the largest "
               "difference of a final state from the float32 reference (the check's bound in "
               "brackets).")
    out.append("")
    out.append("| net | batch | hidden | dtype | op ms | vs float32 | max abs diff |")
    out.append("|---|---:|---:|---|---:|---:|---:|")
    for r in dtype_rows:
        out.append(f"| {r['net']}{mark(r)} | {r['batch']} | {r['hidden']} | {r['dtype']} | "
                   f"{fmt(r['op_ms'])} | {r['vs_float32']:.2f}x | {r['max_diff']:.2g} "
                   f"(<= {r['atol']:g}) |")
    out.append("")
    out.append("## 5. Max pooling")
    out.append("")
    out.append("`toreq.ops.max_pool2d` (ConvEP's pooling) against `F.max_pool2d(z, 2, "
               "return_indices=True)`, 2 x 2 windows, float32, at the shapes ConvEP pools "
               "(batch, channels, height, width); the values and indices are equal.")
    out.append("")
    out.append("| shape | op ms | reference ms | speed-up |")
    out.append("|---|---:|---:|---:|")
    for r in pool_rows:
        out.append(f"| {' x '.join(map(str, r['shape']))}{mark(r)} | {fmt(r['op_ms'])} | "
                   f"{fmt(r['reference_ms'])} | {r['speedup']:.2f}x |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller grid (batch 1/32/256, hidden 64/128/512/1024, steps 10/30)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default="results/bench_ops", help="output directory")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default on this machine)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds of timing per configuration, all callables (default 1)")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but torch.cuda.is_available() is False")
        return 2
    default_threads = torch.get_num_threads()
    threads = args.threads or default_threads
    torch.set_num_threads(threads)
    for op in ("relax", "hebbian_update", "max_pool2d"):
        if not has_kernel(op, device.type):
            log(f"error: toreq has no compiled {op} kernel for {device.type}; the wrapper would "
                f"fall back to the reference and the benchmark would compare it with itself")
            return 2
    torch.manual_seed(0)
    info = machine_info(device, threads, default_threads)
    log(f"toreq bench_ops: device {device}, threads {threads} (default {default_threads}), "
        f"cpu {info['cpu_model']}, torch {torch.__version__}")

    clock = Clock(device)
    weights = WeightCache(device)
    grid = QUICK_GRID if args.quick else FULL_GRID
    budget = args.budget  # seconds of timing per configuration (all callables)
    monitor = CpuMonitor()
    idle = monitor.wait_idle(timeout_s=10.0)
    if idle is not None and idle > BUSY_SHARE / 2:
        log(f"warning: other processes use {100 * idle:.0f}% of the CPUs; perturbed measurements "
            f"will be re-taken, and marked where they stay perturbed")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    run_start = monitor.snapshot()
    start = time.perf_counter()
    try:
        relax_rows = bench_relax_speed(clock, monitor, weights, grid, budget)
        tol_rows = bench_steps_to_tol(clock, monitor, weights,
                                      TOL_HIDDEN["quick" if args.quick else "full"])
        hebbian_rows = bench_hebbian(clock, monitor, weights, budget)
        dtype_rows = bench_dtypes(clock, monitor, weights,
                                  DTYPE_CASES["quick" if args.quick else "full"], budget)
        pool_rows = bench_max_pool(clock, monitor, device,
                                   POOL_SHAPES["quick" if args.quick else "full"], budget)
    except AbortBenchmark as error:
        log("")
        log("!" * 78)
        log(str(error))
        log("!" * 78)
        return 1
    elapsed = time.perf_counter() - start
    info["load"] = dict(
        load_average_start=load_start,
        load_average_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
        other_processes_share=monitor.other_share(run_start, monitor.snapshot()),
        busy_threshold=BUSY_SHARE,
    )

    targets = evaluate_targets(relax_rows, hebbian_rows, pool_rows)
    md = markdown(info, relax_rows, tol_rows, hebbian_rows, dtype_rows, pool_rows, targets,
                  elapsed, args.quick)
    record = dict(
        machine=info, quick=args.quick, elapsed_s=elapsed, grid=grid,
        check=dict(rtol=RTOL, atol=ATOL),
        targets=[dict(target=name, passed=ok, failing=fails) for name, ok, fails in targets],
        relax=relax_rows, steps_to_tolerance=tol_rows, hebbian=hebbian_rows,
        dtypes=dtype_rows, max_pool=pool_rows,
    )
    write_results(args.out, "bench_ops", record, md)
    log(f"wrote bench_ops.json and bench_ops.md into {args.out} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
