"""One EqProp training step, whole and by phase, against its arithmetic bound and plain PyTorch.

    python benchmarks/train_step.py [--quick] [--threads 1 2] [--out results/train_step]

For each configuration and batch size, in one process:

* **step**: ``EqPropTrainer.step`` (median over repeats after a warm-up). The step, the step
  with tolerance and the plain step are timed in turn, one call of each per round on every
  thread count, so that the machine's drift during the run reaches both sides of each ratio;
* **breakdown**: the same step's parts timed one by one with the library's public pieces —
  ``network`` (effective weights), ``free`` (free phase), ``nudged`` (the nudged phases),
  ``gradient`` (the contrast and the readout's backward), ``checks`` (the trainer's finite test
  of the gradients: one sum per tensor and one host sync; it runs it twice per step, on the
  gradients and on the parameters), ``optimizer``; ``other`` is the step minus their sum (the
  trainer's bookkeeping);
* **bound**: the step's GEMMs (every coupling at every relaxation step, the input projection
  and its gradient, the Hebbian products) each timed alone with ``torch.mm`` at its shape, summed:
  the time the step's arithmetic takes at this machine's GEMM rate. At tiny shapes (a 10-unit
  layer, batch 1) a Python ``torch.mm`` call's own cost is part of that rate, so the op, which
  calls its GEMMs from C++, can beat this "bound" (a ratio below 1);
* **floor**: the same GEMMs' FLOPs at the fastest rate ``torch.mm`` reaches in the run (one
  1024 x 1024 x 1024 product per thread count): no implementation of these dynamics runs its
  arithmetic faster. A step / plain target whose limit lies under the floor cannot be met by
  speed and says so;
* **step, tol**: the step with the configuration's tolerance, against the step with tol = 0:
  "never slower" is judged within the run's resolution, the difference between the tol = 0
  step and the same step timed a second time in turn (an A/A control), where that is at most 5%;
* **plain**: the same step written directly in PyTorch without toreq (a reference in this
  file: the loops, the contrast and the optimizer), checked to give toreq's gradients before
  it is timed.

Configurations: the MNIST MLP of Laborieux et al. 2021 (784-512-10 tied, hard sigmoid, MSE, 40
free steps, centered nudging with two 15-step phases, beta 0.2, SGD, synchronous) at batch 1,
20, 128 and 512; the digits and MNIST presets (looped tanh layers, AdamW); a three-hidden-layer
tied network; a convolutional network (no plain reference or bound: its step is convolutions,
not GEMMs). Relaxations run a fixed number of steps (tol = 0) so that every implementation does
the same work; the ``tol`` rows rerun the step with the preset's tolerance, to compare.
Targets (issue "A training step near its arithmetic bound") are judged PASS/FAIL. Writes
``train_step.json`` and ``train_step.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from machine import machine_info, write_results
from toreq.estimators import EqProp, apply_contrast
from toreq.nn import ConvEP, EPMLP, LoopedMLP
from toreq.solvers import PhaseSettings
from toreq.train import EqPropTrainer


@dataclass
class Config:
    name: str
    build: Callable[[], torch.nn.Module]
    input_dim: int
    batches: tuple[int, ...]
    beta: float
    free_steps: int
    nudged_steps: int
    optimizer: str  # "sgd" or "adamw"
    tol: float  # the configuration's own tolerance, for the tol rows
    plain: bool = True


def configs(quick: bool) -> list[Config]:
    out = [
        Config("laborieux-mlp 784-512-10", lambda: EPMLP(784, [512], 10, activation="hard_sigmoid",
                                                         loss="mse", schedule="sync", max_steps=40,
                                                         tol=0.0),
               784, (1, 20, 128) if quick else (1, 20, 128, 512), 0.2, 40, 15, "sgd", 1e-4),
        Config("digits-looped 64-256-10", lambda: LoopedMLP(64, 256, 10, max_steps=30, tol=0.0),
               64, (32,), 0.1, 30, 30, "adamw", 1e-4),
        Config("mnist-looped 784-512-10", lambda: LoopedMLP(784, 512, 10, max_steps=30, tol=0.0),
               784, (128,), 0.1, 30, 20, "adamw", 1e-4),
        Config("three-hidden 784-256x3-10", lambda: EPMLP(784, [256, 256, 256], 10,
                                                          loss="mse", schedule="sync",
                                                          max_steps=40, tol=0.0),
               784, (20,) if quick else (20, 128), 0.2, 40, 15, "sgd", 1e-4),
    ]
    if not quick:
        out.append(Config("conv 1x28x28-16-32-10", lambda: ConvEP((1, 28, 28), [16, 32], 10,
                                                                  max_steps=20, tol=0.0),
                          784, (20,), 0.2, 20, 8, "sgd", 1e-4, plain=False))
    return out


def optimizer_for(config: Config, params) -> torch.optim.Optimizer:
    return (torch.optim.SGD(params, lr=0.05) if config.optimizer == "sgd"
            else torch.optim.AdamW(params, lr=1e-3))


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed_in_turn(fns: dict[tuple[str, int], Callable[[], object]],
                  repeats: int) -> dict[tuple[str, int], float]:
    """Median seconds of each ``(name, threads)`` function, the functions called in turn (one
    timed call of each per round, on its number of torch threads), so that the machine's drift
    over the run touches the ratios' numerators and denominators alike. Each timed call follows
    an untimed one on the same thread count: the first parallel region after a change of thread
    count wakes the pool's threads, which a program that keeps its thread count does not pay."""
    times: dict[tuple[str, int], list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for (name, threads), fn in fns.items():
            torch.set_num_threads(threads)
            fn()
            started = time.perf_counter()
            fn()
            times[(name, threads)].append(time.perf_counter() - started)
    return {key: statistics.median(values) for key, values in times.items()}


# ------------------------------------------------------------------------ plain PyTorch
def plain_step(model, x: Tensor, y: Tensor, config: Config, optimizer) -> None:
    """The step written without toreq, for LoopedMLP and EPMLP (sync schedule, tol = 0)."""
    optimizer.zero_grad(set_to_none=True)
    # the parametrized weight (symmetry, spectral norm) computed once, with its graph
    w_param = model.recurrent.weight if isinstance(model, LoopedMLP) else None
    with torch.no_grad():
        if isinstance(model, LoopedMLP):
            w = model.recurrent_scale * w_param
            drive = x @ model.input.weight.T + model.input.bias
            r, c = model.readout.weight, model.readout.bias
            h = torch.zeros(x.shape[0], w.shape[0])
            for _ in range(config.free_steps):
                h = torch.tanh(drive + h @ w.T)
            target = torch.nn.functional.one_hot(y, r.shape[0]).to(h.dtype)

            def nudged(beta: float) -> Tensor:
                s = h
                for _ in range(config.nudged_steps):
                    error = (torch.softmax(s @ r.T + c, dim=1) - target) @ r
                    s = torch.tanh(drive + s @ w.T - beta * error)
                return s

            plus, minus = nudged(config.beta), nudged(-config.beta)
            v = (minus - plus) / (2 * config.beta * x.shape[0])
            grad_w, grad_u, grad_b = v.T @ h, v.T @ x, v.sum(0)
            logits = h @ r.T + c
            dlogits = (torch.softmax(logits, dim=1) - target) / x.shape[0]
            model.readout.weight.grad, model.readout.bias.grad = dlogits.T @ h, dlogits.sum(0)
            model.input.weight.grad, model.input.bias.grad = grad_u, grad_b
            recurrent_grad = grad_w
        else:
            ws = [layer.weight for layer in model.layers]
            drives = [x @ model.input.weight.T + model.input.bias] + [l.bias for l in model.layers]
            widths = model.widths
            target = torch.nn.functional.one_hot(y, widths[-1]).to(x.dtype)

            def run(states, beta: float, steps: int):
                s = list(states)
                for _ in range(steps):
                    new = []
                    for l in range(len(s)):
                        pre = drives[l] + (s[l - 1] @ ws[l - 1].T if l > 0 else 0)
                        if l + 1 < len(s):
                            pre = pre + s[l + 1] @ ws[l]
                        if l == len(s) - 1 and beta:
                            pre = pre - beta * (s[l] - target)
                        new.append(pre.clamp(0.0, 1.0))
                    s = new
                return s

            free = run([torch.zeros(x.shape[0], n) for n in widths], 0.0, config.free_steps)
            plus = run(free, config.beta, config.nudged_steps)
            minus = run(free, -config.beta, config.nudged_steps)
            scale = -1.0 / (2 * config.beta * x.shape[0])
            model.input.weight.grad = scale * (plus[0] - minus[0]).T @ x
            model.input.bias.grad = scale * (plus[0] - minus[0]).sum(0)
            for l, layer in enumerate(model.layers):
                layer.weight.grad = scale * (plus[l + 1].T @ plus[l] - minus[l + 1].T @ minus[l])
                layer.bias.grad = scale * (plus[l + 1] - minus[l + 1]).sum(0)
            recurrent_grad = None
    if recurrent_grad is not None:  # through the parametrizations (symmetry, spectral norm)
        w_param.backward(model.recurrent_scale * recurrent_grad)
    optimizer.step()


def plain_matches(config: Config, x: Tensor, y: Tensor) -> float:
    """The largest difference of the plain step's gradients from toreq's, relative to each
    tensor's largest entry (both in eval mode: the spectral norm's power iteration frozen, so
    that both see one weight)."""
    torch.manual_seed(0)
    a = config.build().eval()
    b = config.build().eval()
    b.load_state_dict(a.state_dict())
    EqProp(config.beta, "centered", config.nudged_steps).backward(
        a, x, y, a.network(x), free_settings=PhaseSettings(config.free_steps, 0.0))
    plain_step(b, x, y, config, torch.optim.SGD(b.parameters(), lr=0.0))
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        scale = float(p.grad.abs().max()) or 1.0
        worst = max(worst, float((p.grad - q.grad).abs().max()) / scale)
    return worst


# ------------------------------------------------------------------------ the bound
def gemm_shapes(model, config: Config, batch: int) -> list[tuple[int, int, int, int]]:
    """``(count, m, k, n)`` of every GEMM in one step (``m x k`` times ``k x n``)."""
    phases = config.free_steps + 2 * config.nudged_steps
    if isinstance(model, LoopedMLP):
        h, n_in, n_out = model.recurrent.in_features, model.input.in_features, model.readout.out_features
        return [(1, batch, n_in, h), (phases, batch, h, h), (2 * config.nudged_steps, batch, h, n_out),
                (2 * config.nudged_steps, batch, n_out, h), (1, h, batch, h), (1, h, batch, n_in),
                (2, n_out, batch, h), (1, batch, h, n_out)]
    widths, n_in = model.widths, model.input.in_features
    shapes = [(1, batch, n_in, widths[0]), (1, widths[0], batch, n_in)]
    for a, b in zip(widths[:-1], widths[1:]):
        shapes += [(2 * phases, batch, a, b), (2, b, batch, a)]  # up and down, then Hebbian
    return shapes


def gemm_flops(shapes) -> int:
    return sum(2 * count * m * k * n for count, m, k, n in shapes)


def peak_rate(repeats: int) -> float:
    """FLOP/s of ``torch.mm`` at 1024 x 1024 x 1024, this machine's GEMM rate at its best, on
    the current thread count."""
    a, b, out = torch.rand(1024, 1024), torch.rand(1024, 1024), torch.empty(1024, 1024)
    return 2 * 1024 ** 3 / timed(lambda: torch.mm(a, b, out=out), max(3, repeats // 3))


def bound_seconds(shapes, repeats: int) -> float:
    total = 0.0
    for count, m, k, n in shapes:
        a, b, out = torch.rand(m, k), torch.rand(k, n), torch.empty(m, n)
        total += count * timed(lambda: torch.mm(a, b, out=out), repeats)
    return total


# ------------------------------------------------------------------------ breakdown
def breakdown(model, x: Tensor, y: Tensor, config: Config, optimizer, repeats: int) -> dict:
    estimator = EqProp(config.beta, "centered", config.nudged_steps)
    settings = PhaseSettings(config.free_steps, model.tol)
    state = {}

    def network():
        state["net"] = model.network(x)

    def free():
        net = state["net"]
        state["free"] = model.solve(x, net, model.init_states(x, net), None, settings, phase="free")

    def nudged():
        net, f = state["net"], state["free"]
        state["phases"] = estimator.phases(model, x, net, f,
                                           lambda b: model.nudge(b, y, x, net, f.states))

    def gradient():  # the contrast needs a network with its graph: built again, subtracted
        optimizer.zero_grad(set_to_none=True)
        network()
        a, b, delta, _ = state["phases"]
        apply_contrast(model, x, y, state["net"], state["free"], a, b, delta)

    def checks():  # the trainer's test of the gradients (one sum per tensor, one sync)
        tensors = [p.grad for p in model.parameters() if p.grad is not None]
        bool(torch.isfinite(torch.stack([t.sum() for t in tensors])).all())

    parts = {}
    for name, fn in (("network", network), ("free", free), ("nudged", nudged),
                     ("gradient", gradient), ("checks", checks),
                     ("optimizer", optimizer.step)):
        parts[name] = timed(fn, repeats)
    parts["gradient"] = max(parts["gradient"] - parts["network"], 0.0)
    return parts


def measure(config: Config, batch: int, threads: list[int], repeats: int) -> list[dict]:
    """One row per thread count. The step, the step with tolerance and the plain step are timed
    in turn, on every thread count (:func:`timed_in_turn`); the breakdown and the bound, which
    no target compares across runs, one after the other."""
    torch.manual_seed(0)
    x = torch.rand(batch, config.input_dim)
    y = torch.randint(0, 10, (batch,))

    def trainer_for(tol: float) -> EqPropTrainer:
        torch.manual_seed(0)
        model = config.build()
        model.tol = tol
        return EqPropTrainer(model, optimizer_for(config, model.parameters()),
                             free_steps=config.free_steps,
                             estimator=EqProp(config.beta, "centered", config.nudged_steps))

    trainer, trainer_tol = trainer_for(0.0), trainer_for(config.tol)
    fns: dict[tuple[str, int], Callable[[], object]] = {}
    for n in threads:
        fns[("step", n)] = lambda: trainer.step(x, y)
        fns[("step_tol", n)] = lambda: trainer_tol.step(x, y)
        fns[("step_again", n)] = lambda: trainer.step(x, y)  # the A/A control of the tol ratio
    rows = [{"config": config.name, "batch": batch, "threads": n} for n in threads]
    if config.plain:
        difference = plain_matches(config, x, y)
        torch.manual_seed(0)
        reference = config.build()
        ref_optimizer = optimizer_for(config, reference.parameters())
        for n in threads:
            fns[("plain", n)] = lambda: plain_step(reference, x, y, config, ref_optimizer)
    times = timed_in_turn(fns, repeats)
    for row, n in zip(rows, threads):
        torch.set_num_threads(n)
        row["step"], row["step_tol"] = times[("step", n)], times[("step_tol", n)]
        row["step_again"] = times[("step_again", n)]
        row["parts"] = parts = breakdown(trainer.model, x, y, config, trainer.optimizer, repeats)
        # the trainer runs the finite test twice (gradients, parameters)
        parts["other"] = max(row["step"] - sum(parts.values()) - parts["checks"], 0.0)
        if config.plain:
            row["plain"], row["plain_max_relative_difference"] = times[("plain", n)], difference
            shapes = gemm_shapes(trainer.model, config, batch)
            row["bound"] = bound_seconds(shapes, repeats)
            row["peak_flops"] = peak_rate(repeats)
            row["floor"] = gemm_flops(shapes) / row["peak_flops"]
    return rows


def judge(rows: list[dict], threads: list[int]) -> list[tuple[bool, str]]:
    targets = []
    for row in rows:
        if "plain" not in row:
            continue
        where = f"{row['config']}, batch {row['batch']}, {row['threads']} thread(s)"
        ratio = row["step"] / row["plain"]
        limit = 0.5 if row["batch"] <= 32 else 0.8
        if row["batch"] <= 32 or row["batch"] >= 128:
            text = f"{where}: step / plain = {ratio:.2f} (target <= {limit})"
            if ratio > limit and limit * row["plain"] < row["floor"]:
                text += (f"; out of reach: the target's {1e3 * limit * row['plain']:.3g} ms is "
                         f"under the floor, the step's GEMMs at this run's peak torch.mm rate "
                         f"({row['peak_flops'] / 1e9:.0f} GFLOP/s): {1e3 * row['floor']:.3g} ms")
            targets.append((ratio <= limit, text))
        bound = row["step"] / row["bound"]
        if row["batch"] <= 32:
            targets.append((bound <= 3.0, f"{where}: step / bound = {bound:.2f} (target <= 3)"))
        elif "512" in row["config"] or "1024" in row["config"]:
            targets.append((bound <= 1.5, f"{where}: step / bound = {bound:.2f} (target <= 1.5)"))
        share = 2 * row["parts"]["checks"] / row["step"]
        targets.append((share <= 0.05, f"{where}: checks {100 * share:.1f}% of the step (target <= 5%)"))
        # "never slower", judged at the run's resolution: the same step, timed twice in turn,
        # differs by `noise`; a tol ratio above 1 within it is no measurable slowdown, where
        # the noise is small enough (5%) to tell one
        tol = row["step_tol"] / row["step"]
        noise = abs(row["step_again"] / row["step"] - 1.0)
        targets.append((tol <= 1.0 or (tol <= 1.0 + noise and noise <= 0.05),
                        f"{where}: step with tol / step with tol=0 = {tol:.3f} (target <= 1 "
                        f"within the A/A spread: the tol=0 step timed twice differs by "
                        f"{100 * noise:.1f}%)"))
    if len(threads) > 1:
        for row in rows:
            if row["threads"] != threads[0] or row["batch"] < 128:
                continue
            other = next((r for r in rows if r["config"] == row["config"]
                          and r["batch"] == row["batch"] and r["threads"] == threads[1]), None)
            if other:
                speedup = row["step"] / other["step"]
                targets.append((speedup >= 1.6, f"{row['config']}, batch {row['batch']}: "
                                                f"{threads[1]} threads {speedup:.2f}x faster than "
                                                f"{threads[0]} (target >= 1.6)"))
    return targets


def markdown(record: dict) -> str:
    info = record["machine"]
    out = [f"`{record['command']}` on {info['date']} ({record['mode']}, {record['seconds']:.0f} s). "
           f"CPU {info['cpu_model']} ({info['logical_cpus']} logical CPUs); torch {info['torch']}.",
           "", "#### Targets", ""]
    out += [f"- **{'PASS' if ok else 'FAIL'}** {text}" for ok, text in record["targets"]]
    out += ["", "#### Results", "",
            "Milliseconds per step (median); parts timed one by one (checks: one of the trainer's "
            "two finite tests); plain: the same step in plain PyTorch (its gradients' largest "
            "relative difference from toreq's in brackets); bound: the step's GEMMs alone at the "
            "`torch.mm` rate; floor: the same GEMMs' FLOPs at the run's peak `torch.mm` rate "
            "(1024 x 1024 x 1024).", "",
            "| config | batch | threads | step | network | free | nudged | gradient | checks | "
            "optimizer | other | step, tol | plain | bound | floor | step / plain | step / bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        p = r["parts"]

        def ms(v: float) -> str:
            return f"{1e3 * v:.3g}"

        cells = [r["config"], str(r["batch"]), str(r["threads"]), ms(r["step"])]
        cells += [ms(p[k]) for k in ("network", "free", "nudged", "gradient", "checks",
                                     "optimizer", "other")]
        cells.append(ms(r["step_tol"]))
        if "plain" in r:
            cells += [f"{ms(r['plain'])} ({r['plain_max_relative_difference']:.0e})",
                      ms(r["bound"]), ms(r["floor"]), f"{r['step'] / r['plain']:.2f}x",
                      f"{r['step'] / r['bound']:.2f}x"]
        else:
            cells += ["-"] * 5
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="results/train_step")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    repeats = 5 if args.quick else 15
    started = time.perf_counter()
    rows = []
    for config in configs(args.quick):
        for batch in config.batches:
            for row in measure(config, batch, args.threads, repeats):
                rows.append(row)
                print(f"{config.name} batch {batch} threads {row['threads']}: "
                      f"{1e3 * row['step']:.2f} ms", file=sys.stderr, flush=True)
    torch.set_num_threads(default_threads)
    rows.sort(key=lambda row: args.threads.index(row["threads"]))  # the table by thread count
    record = {"command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "mode": "quick" if args.quick else "full", "rows": rows,
              "machine": machine_info(torch.device("cpu"), args.threads[0], default_threads)}
    record["targets"] = judge(rows, args.threads)
    record["seconds"] = time.perf_counter() - started
    write_results(args.out, "train_step", record, markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
