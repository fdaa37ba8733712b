"""A vision transformer trained by EqProp on MNIST patches (every transformer sublayer EqProp).

    python examples/vit_mnist.py                      # the full run (see --help)
    python examples/vit_mnist.py --quick              # a short check of the pipeline
    python examples/vit_mnist.py --compare-backprop   # also the backprop twin of the same shape

Trains :class:`toreq.nn.PatchTransformer` with ``eqprop="both"`` by a plain loop: AdamW on the
cross-entropy, ``loss.backward()`` running autograd for the embeddings, LayerNorms and readout
and the EqProp backward (nudged phases) of every equilibrium sublayer. Evaluates the official
10,000-image test set after each epoch and writes ``results.json`` and ``results.md`` (accuracy
per epoch, final accuracy, parameters, wall time, mean relaxation steps) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from toreq.cli import (BETA, LEARNING_RATE, POSITIVE_INT, SEED, THREADS, TOLERANCE,
                       number_type)
from toreq.data import ClassificationData, load_mnist
from toreq.nn import PatchTransformer, count_parameters


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 6,000 training and 1,000 test images, one epoch")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=2)
    parser.add_argument("--d-model", type=POSITIVE_INT, default=64)
    parser.add_argument("--d-ff", type=POSITIVE_INT, default=128)
    parser.add_argument("--layers", type=POSITIVE_INT, default=2)
    parser.add_argument("--heads", type=POSITIVE_INT, default=4)
    parser.add_argument("--patch-size", type=POSITIVE_INT, default=7)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=128)
    parser.add_argument("--lr", type=LEARNING_RATE, default=3e-3)
    parser.add_argument("--weight-decay", type=TOLERANCE, default=0.01)
    parser.add_argument("--beta", type=BETA, default=0.05, help="the EqProp nudge")
    parser.add_argument("--max-steps", type=POSITIVE_INT, default=30, help="relaxation steps at most")
    parser.add_argument("--tol", type=TOLERANCE, default=1e-3, help="relaxation tolerance")
    parser.add_argument("--recurrent-scale", type=number_type(float, 0, 10, low_open=True), default=0.5)
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--threads", type=THREADS, default=1)
    parser.add_argument("--data-dir", default=None,
                        help="the data root (default: $TOREQ_DATA, then ~/.cache/toreq)")
    parser.add_argument("--compare-backprop", action="store_true",
                        help="also train eqprop='none' of the same shape on the same batches")
    parser.add_argument("--out", default="results/vit_mnist")
    return parser.parse_args()


def mean_steps(model: PatchTransformer) -> float | None:
    """The mean free-phase steps per sample over the equilibrium sublayers' last forward."""
    steps = [b.last_steps.float().mean().item() for b in model.equilibrium_blocks()
             if b.last_steps is not None]
    return sum(steps) / len(steps) if steps else None


@torch.no_grad()
def evaluate(model: PatchTransformer, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000) -> tuple[float, float | None]:
    """Test accuracy and the mean relaxation steps per sublayer and sample (eval mode)."""
    model.eval()
    correct, steps = 0, []
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
        step = mean_steps(model)
        if step is not None:
            steps.append(step * len(x[i:i + batch_size]))
    model.train()
    return correct / len(x), (sum(steps) / len(x) if steps else None)


def train(data: ClassificationData, eqprop: str, args: argparse.Namespace,
          x_test: torch.Tensor, y_test: torch.Tensor) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = PatchTransformer(
        data.image_shape, data.num_classes, patch_size=args.patch_size, d_model=args.d_model,
        n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff, eqprop=eqprop,
        recurrent_scale=args.recurrent_scale,
        block_options=dict(beta=args.beta, max_steps=args.max_steps, tol=args.tol))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    x, y = data.x_train, data.y_train
    batches = math.ceil(len(x) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(  # warm-up, then cosine decay to ~0
        optimizer, max_lr=args.lr, total_steps=args.epochs * batches, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    history, started = [], time.perf_counter()
    print(f"eqprop={eqprop!r}: {count_parameters(model)} parameters, {model.num_patches} patches")
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        total, train_steps = 0.0, []
        for i in range(batches):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # autograd outside the equilibrium sublayers, EqProp inside
            optimizer.step()
            schedule.step()
            total += loss.item()
            step = mean_steps(model)
            if step is not None:
                train_steps.append(step)
        accuracy, test_steps = evaluate(model, x_test, y_test)
        row = dict(epoch=epoch, train_loss=total / batches, test_accuracy=accuracy,
                   wall_s=time.perf_counter() - started,
                   train_steps_mean=(sum(train_steps) / len(train_steps) if train_steps
                                     else None),
                   test_steps_mean=test_steps)
        history.append(row)
        print(f"  epoch {epoch}: loss {row['train_loss']:.4f}, test accuracy "
              f"{100 * accuracy:.2f}%, {row['wall_s']:.0f} s", flush=True)
    return dict(eqprop=eqprop, parameters=count_parameters(model), config=model.config,
                history=history, test_accuracy=history[-1]["test_accuracy"],
                wall_s=history[-1]["wall_s"])


def markdown(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    lines = ["# PatchTransformer on MNIST", "",
             f"`{' '.join(['python', 'examples/vit_mnist.py', *args.argv])}`", "",
             "| model | epoch | train loss | test accuracy | wall time (s) | "
             "free-phase steps (train / test) |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        name = f"eqprop={run['eqprop']!r} ({run['parameters']} parameters)"
        for row in run["history"]:
            steps = ("-" if row["train_steps_mean"] is None
                     else f"{row['train_steps_mean']:.1f} / {row['test_steps_mean']:.1f}")
            lines.append(f"| {name} | {row['epoch']} | {row['train_loss']:.4f} | "
                         f"{100 * row['test_accuracy']:.2f}% | {row['wall_s']:.0f} | {steps} |")
    lines += ["", "| model | final test accuracy | parameters | wall time (s) |",
              "|---|---|---|---|"]
    lines += [f"| eqprop={run['eqprop']!r} | {100 * run['test_accuracy']:.2f}% | "
              f"{run['parameters']} | {run['wall_s']:.0f} |" for run in runs]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    args.argv = sys.argv[1:]
    torch.set_num_threads(args.threads)
    data = load_mnist(args.data_dir, download=False)
    x_test, y_test = data.x_test, data.y_test
    if args.quick:
        data = ClassificationData("mnist", data.x_train[:6000], data.y_train[:6000],
                                  data.x_test[:1000], data.y_test[:1000], data.num_classes,
                                  data.image_shape)
        x_test, y_test, args.epochs = data.x_test, data.y_test, 1
    runs = [train(data, "both", args, x_test, y_test)]
    if args.compare_backprop:
        runs.append(train(data, "none", args, x_test, y_test))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "argv"}
    (out / "results.json").write_text(json.dumps(
        dict(command=["python", "examples/vit_mnist.py", *args.argv], settings=settings,
             test_set_size=len(x_test), runs=runs), indent=2) + "\n")
    (out / "results.md").write_text(markdown(args, runs))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
