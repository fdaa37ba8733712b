"""The ``toreq`` command line (also ``python -m toreq``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

MODELS = ("looped_mlp", "toroidal_mlp", "ep_mlp")
DATASETS = ("digits", "mnist", "fashion_mnist")


def build_model(name: str, input_dim: int, output_dim: int, hidden: int, *, layers: int = 1,
                activation: str | None = None, max_steps: int | None = None) -> torch.nn.Module:
    """An equilibrium model by its command-line name."""
    from toreq.nn import EPMLP, LoopedMLP, ToroidalMLP

    options = {k: v for k, v in dict(activation=activation, max_steps=max_steps).items()
               if v is not None}
    if name == "looped_mlp":
        return LoopedMLP(input_dim, hidden, output_dim, **options)
    if name == "toroidal_mlp":
        return ToroidalMLP(input_dim, hidden, output_dim, num_layers=max(layers, 2), **options)
    if name == "ep_mlp":
        return EPMLP(input_dim, [hidden] * layers, output_dim, **options)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train an EqProp model (and optionally a baseline) on a data set",
        description="Train an equilibrium model with Equilibrium Propagation and report its test "
                    "accuracy, optionally next to a baseline trained on the same data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="looped_mlp", help="the EqProp model")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits is embedded (scikit-learn); MNIST and Fashion-MNIST are read from "
                        "--data-dir or $TOREQ_DATA, or downloaded")
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ and fashion-mnist/")
    p.add_argument("--hidden", type=int, default=256, help="units per hidden layer")
    p.add_argument("--layers", type=int, default=1, help="hidden layers (ep_mlp, toroidal_mlp)")
    p.add_argument("--activation", choices=("hard_sigmoid", "tanh", "sigmoid"), default=None,
                   help="hidden activation (default: the model's own)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--beta", type=float, default=0.5, help="nudging strength")
    p.add_argument("--free-steps", type=int, default=30, help="step cap of the free phase")
    p.add_argument("--nudged-steps", type=int, default=10, help="step cap of the nudged phase")
    p.add_argument("--one-sided", action="store_true",
                   help="contrast +beta with the free phase instead of +beta with -beta")
    p.add_argument("--compare", choices=("none", "backprop", "bptt"), default="none",
                   help="also train a baseline on the same data: a feedforward MLP of the same "
                        "size by backprop, or the same model by backprop through time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-dir", default=None, help="write metrics.jsonl and metrics.csv here")
    p.add_argument("--checkpoint", default=None, help="checkpoint file, written every epoch")
    p.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    p.add_argument("--json", action="store_true", help="print the final results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from toreq.data import load_classification
    from toreq.nn import FeedforwardMLP
    from toreq.train import BackpropTrainer, BPTTTrainer, EqPropTrainer, fit

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_classification(args.dataset, root=args.data_dir)
    in_dim, classes = data.x_train.shape[1], data.num_classes
    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                  progress=not args.no_progress)
    results = []

    torch.manual_seed(args.seed)
    model = build_model(args.model, in_dim, classes, args.hidden, layers=args.layers,
                        activation=args.activation, max_steps=args.free_steps)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=args.lr),
                            beta=args.beta, free_steps=args.free_steps,
                            nudged_steps=args.nudged_steps, symmetric=not args.one_sided)
    results.append(_timed(f"{args.model} (EqProp)", model, lambda: fit(
        trainer, data.x_train, data.y_train, data.x_test, data.y_test, log_dir=args.log_dir,
        checkpoint=args.checkpoint, resume=args.resume, desc="EqProp", **common)))

    if args.compare != "none":
        torch.manual_seed(args.seed)
        if args.compare == "backprop":
            baseline = FeedforwardMLP(in_dim, [args.hidden] * args.layers, classes,
                                      activation=args.activation or "tanh")
            base_trainer = BackpropTrainer(baseline, torch.optim.Adam(baseline.parameters(), lr=args.lr))
            name = "feedforward MLP (backprop)"
        else:
            baseline = build_model(args.model, in_dim, classes, args.hidden, layers=args.layers,
                                   activation=args.activation, max_steps=args.free_steps)
            base_trainer = BPTTTrainer(baseline, torch.optim.Adam(baseline.parameters(), lr=args.lr),
                                       steps=args.free_steps)
            name = f"{args.model} (BPTT)"
        results.append(_timed(name, baseline, lambda: fit(
            base_trainer, data.x_train, data.y_train, data.x_test, data.y_test,
            desc=args.compare, **common)))

    if args.json:
        print(json.dumps({"dataset": args.dataset, "results": results}, indent=2))
    else:
        print(f"\n{data.name}: {data.x_train.shape[0]} training and {data.x_test.shape[0]} test "
              f"samples, {args.epochs} epochs")
        print(f"{'model':<32} {'params':>9} {'test acc':>9} {'train acc':>10} {'time (s)':>9}")
        for r in results:
            print(f"{r['model']:<32} {r['parameters']:>9,} {100 * r['test_accuracy']:>8.2f}% "
                  f"{100 * r['train_accuracy']:>9.2f}% {r['seconds']:>9.1f}")
    return 0


def _timed(name: str, model: torch.nn.Module, run) -> dict:
    started = time.perf_counter()
    history = run()
    last = history[-1]
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
            "seconds": time.perf_counter() - started, "history": history}


def make_parser() -> argparse.ArgumentParser:
    import toreq

    parser = argparse.ArgumentParser(
        prog="toreq", description="Equilibrium Propagation for PyTorch: train and compare "
                                  "equilibrium models trained by EqProp.")
    parser.add_argument("--version", action="version", version=f"toreq {toreq.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
