"""EqProp, backprop through time and feedforward backprop on the digits set, side by side.

    python examples/train_digits.py --epochs 20
    python examples/train_digits.py --quick      # 2 epochs of a narrower model: seconds

Trains a LoopedMLP by EqProp and by BPTT through the same dynamics, and a feedforward MLP of
the same width by backprop, on the same data and batches, then prints test accuracy, time and
the mean number of relaxation steps the EqProp model takes per test sample.
"""

from __future__ import annotations

import argparse
import time

import torch

from toreq.cli import BETA, LEARNING_RATE, POSITIVE_INT, SEED
from toreq.data import load_digits
from toreq.nn import FeedforwardMLP, LoopedMLP
from toreq.train import BackpropTrainer, BPTTTrainer, EqPropTrainer, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs with 64 hidden units: checks the pipeline in seconds")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=20, help="training epochs")
    parser.add_argument("--hidden", type=POSITIVE_INT, default=256, help="hidden units")
    parser.add_argument("--lr", type=LEARNING_RATE, default=1e-3, help="Adam learning rate")
    parser.add_argument("--beta", type=BETA, default=0.5, help="EqProp nudging strength")
    parser.add_argument("--seed", type=SEED, default=0, help="seeds weights and batches")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.hidden = 2, 64

    data = load_digits()
    runs = {}
    for name in ("EqProp", "BPTT", "backprop"):
        torch.manual_seed(args.seed)
        if name == "backprop":
            model = FeedforwardMLP(data.input_dim, [args.hidden], data.num_classes)
            trainer = BackpropTrainer(model, torch.optim.Adam(model.parameters(), lr=args.lr))
        else:
            model = LoopedMLP(data.input_dim, args.hidden, data.num_classes)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            trainer = (EqPropTrainer(model, optimizer, beta=args.beta) if name == "EqProp"
                       else BPTTTrainer(model, optimizer, steps=model.max_steps))
        started = time.perf_counter()
        history = fit(trainer, data.x_train, data.y_train, data.x_test, data.y_test,
                      epochs=args.epochs, batch_size=32, seed=args.seed, desc=name)
        runs[name] = (history[-1], time.perf_counter() - started)

    print(f"{'method':<10} {'test acc':>9} {'time (s)':>9} {'steps/sample':>13}")
    for name, (last, seconds) in runs.items():
        steps = f"{last['test_steps_mean']:.1f}" if "test_steps_mean" in last else "-"
        print(f"{name:<10} {100 * last['test_accuracy']:>8.2f}% {seconds:>9.1f} {steps:>13}")


if __name__ == "__main__":
    main()
