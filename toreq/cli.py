"""The `toreq` command line (also `python -m toreq`).

Every numeric option is checked when it is parsed ([`number_type`][toreq.cli.number_type]): a
bad value stops with one line naming the option, the value and what is accepted, and exit code
2. An error of the library
while a command runs (a diverged training, a corrupt checkpoint, a missing file) is printed as
one line with exit code 1; `--debug` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CONTROL_DATASETS = ("cartpole", "acrobot")  # judged by closed-loop return too (toreq.control)
FALLBACK_PRESET = "mnist-looped"  # the start of a data set that has no measured preset (CIFAR)
SEED_MAX = 2**32 - 1


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `prog: error: message (see prog --help)`, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number_type(kind: type, low: float | None = None, high: float | None = None, *,
            low_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type=`: an int (`kind=int`) or a finite float in `[low, high]`
    (`(low, high]` with `low_open`); argparse names the option in its message."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    accepted = (("an integer" if kind is int else "a finite number")
                + (f" {' and '.join(bounds)}" if bounds else ""))

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or (
                low is not None and (value <= low if low_open else value < low)) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    parse.__name__ = accepted  # what argparse would print for an unconvertible value
    return parse


POSITIVE_INT = number_type(int, 1)
NONNEGATIVE_INT = number_type(int, 0)
SEED = number_type(int, 0, SEED_MAX)
THREADS = number_type(int, 1, 1024)
LEARNING_RATE = number_type(float, 0, 10, low_open=True)
BETA = number_type(float, 0, 100, low_open=True)
TOLERANCE = number_type(float, 0)


def parse_channels(text: str) -> list[int]:
    """`--channels`: positive integers separated by commas (also the accuracy benchmark's)."""
    try:
        channels = [int(c) for c in text.split(",")]
    except ValueError:
        channels = []
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, "
                                         f"e.g. 16,32; got {text!r}")
    return channels


def _memory(text: str) -> tuple[int, int]:
    """`LAYER:M` of `--memories`: a layer index and its number of stored patterns."""
    layer, sep, count = text.partition(":")
    if not (sep and layer.isdigit() and count.isdigit() and int(count) >= 1):
        raise argparse.ArgumentTypeError(f"expected LAYER:PATTERNS, e.g. 0:256; got {text!r}")
    return int(layer), int(count)


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


THREADS_HELP = ("torch CPU threads (default: torch's). Float sums are split by thread, so the "
                "same seed can give slightly different numbers with another thread count; the "
                "count used is recorded with the results")


def _train_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from toreq.data import classification_names
    from toreq.estimators import estimator_names
    from toreq.ops.relax import ACTIVATIONS
    from toreq.presets import MODELS, PRESETS

    p = sub.add_parser(
        "train", help="train an EqProp model (and optionally a baseline) on a data set",
        parents=[common],
        description="Train an equilibrium model with Equilibrium Propagation and report its test "
                    "accuracy, optionally next to a baseline trained on the same data. The "
                    "hyper-parameters come from a preset (toreq.presets: by default the data "
                    "set's, whose measured accuracy the README reports); every option given "
                    "overrides the preset's value. Prints a line per epoch to stderr. The "
                    "checkpoint describes the run (preset, data set, seed), so --resume needs "
                    "only --checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=classification_names(), default=None,
                   help="digits is embedded (scikit-learn); MNIST, Fashion-MNIST, CIFAR-10 and "
                        "CIFAR-100 are read from --data-dir or $TOREQ_DATA, or downloaded; "
                        "cartpole and acrobot are behaviour cloning of a scripted expert in "
                        "Gymnasium (the control extra), generated and cached there, and also "
                        "judged by the trained policy's closed-loop return (default: the "
                        "preset's, digits without a preset; with --resume, the checkpoint's). "
                        "A data set without a preset of its own (cifar10, cifar100) starts from "
                        f"{FALLBACK_PRESET} (measured on MNIST only)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the configuration to start from (default: the data set's preset)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding mnist/, fashion-mnist/, cifar-10/, cifar-100/ (and "
                        "the control data cache)")
    p.add_argument("--compare", choices=("none", "backprop", "bptt"), default="none",
                   help="also train a baseline on the same data: a feedforward MLP of the same "
                        "width by backprop (for conv_ep its FeedforwardCNN twin: the same layers "
                        "and initial weights), or the same model by backprop through time")
    p.add_argument("--seed", type=SEED, default=None,
                   help="seeds the initial weights and the batch order of every model "
                        "(default 0; with --resume, the checkpoint's)")
    p.add_argument("--deterministic", action="store_true",
                   help="train on one thread under torch.use_deterministic_algorithms: the same "
                        "seed gives the same result whatever --threads (without it, another "
                        "thread count can change the result: 97.22%% with one thread and 96.94%% "
                        "with two on digits), "
                        "or an error naming the op that cannot be deterministic")
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.add_argument("--log-dir", default=None, help="write metrics.jsonl and metrics.csv here")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to --log-dir (the tensorboard extra)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file, written every epoch")
    p.add_argument("--resume", action="store_true",
                   help="continue the run of --checkpoint if it exists, with its settings")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --checkpoint instead of refusing")
    p.add_argument("--json", action="store_true", help="print the final results as JSON")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar, only a line per epoch")
    h = p.add_argument_group("hyper-parameters (default: the preset's)")
    keep = argparse.SUPPRESS  # absent unless given, so the preset's value stands
    h.add_argument("--model", choices=MODELS, default=keep, help="the EqProp model")
    h.add_argument("--hidden", type=POSITIVE_INT, default=keep, help="units per hidden layer")
    h.add_argument("--layers", type=POSITIVE_INT, default=keep,
                   help="hidden layers (ep_mlp, toroidal_mlp)")
    h.add_argument("--channels", type=parse_channels, default=keep,
                   help="conv_ep: output channels of each convolutional layer, comma-separated")
    h.add_argument("--activation", choices=ACTIVATIONS, default=keep,
                   help="hidden activation (steep_sigmoid: sigmoid(4(x - 1/2)), the papers')")
    h.add_argument("--memories", type=_memory, nargs="+", default=keep, metavar="LAYER:M",
                   help="ep_mlp, conv_ep: a modern Hopfield interaction with M learned patterns "
                        "on each named layer (0: the first above the input)")
    h.add_argument("--epochs", type=POSITIVE_INT, default=keep)
    h.add_argument("--batch-size", type=POSITIVE_INT, default=keep)
    h.add_argument("--lr", type=LEARNING_RATE, default=keep,
                   help="learning rate (AdamW: annealed to 0 by a cosine schedule; SGD: constant)")
    h.add_argument("--optimizer", choices=("adamw", "sgd"), default=keep,
                   help="adamw (cosine schedule) or sgd (constant rates, as the papers ran it)")
    h.add_argument("--layer-lrs", dest="layer_lrs", type=LEARNING_RATE, nargs="+",
                   default=keep, metavar="LR",
                   help="one learning rate per weight layer (ep_mlp), in --layer-order")
    h.add_argument("--layer-order", choices=("input_first", "output_first"), default=keep,
                   help="the order of --layer-lrs: from the input layer up (default) or from "
                        "the output layer down (Ernoult et al.'s --lr_tab)")
    h.add_argument("--beta", type=BETA, default=keep, help="nudging strength")
    h.add_argument("--free-steps", type=POSITIVE_INT, default=keep,
                   help="step cap of the free phase")
    h.add_argument("--nudged-steps", type=POSITIVE_INT, default=keep,
                   help="step cap of the nudged phase")
    h.add_argument("--one-sided", dest="symmetric_nudging", action="store_false", default=keep,
                   help="contrast +beta with the free phase instead of +beta with -beta")
    h.add_argument("--crop-padding", type=NONNEGATIVE_INT, default=keep, metavar="PIXELS",
                   help="augment the training images: pad PIXELS zeros on each side and crop "
                        "back at a random offset (0: no crop)")
    h.add_argument("--flip", action=argparse.BooleanOptionalAction, default=keep,
                   help="augment the training images: mirror half of them left to right")
    h.add_argument("--algorithm", choices=estimator_names(), default=keep,
                   help="the gradient estimator (toreq.estimators): eqprop, holomorphic "
                        "(holomorphic EqProp), cl (contrastive learning), cpl (coupled "
                        "learning), implicit (recurrent backprop), bptt (truncated with "
                        "truncation=K)")
    h.add_argument("--algorithm-setting", dest="algorithm_settings", action="append",
                   type=_setting, default=keep, metavar="NAME=VALUE",
                   help="a setting of the estimator, e.g. nudging=negative, eta=0.2, points=8, "
                        "truncation=16 (repeatable; an unknown one is refused)")
    p.set_defaults(run=_run_train)


def _setting(text: str) -> tuple[str, int | float | str]:
    """`NAME=VALUE` of `--algorithm-setting`: the value as an int, a float or a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. eta=0.2; got {text!r}")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def _run_train(args: argparse.Namespace) -> int:
    from toreq.checkpoint import read_checkpoint
    from toreq.control import evaluate_policy, expert_policy, model_policy
    from toreq.data import load_classification
    from toreq.presets import build_trainer, run_description
    from toreq.train import fit

    _set_threads(args.threads)
    saved = None
    if args.checkpoint is not None and Path(args.checkpoint).exists():
        if args.resume:
            saved = _train_run_of(read_checkpoint(args.checkpoint), args.checkpoint,
                                  "toreq train --resume")
        elif not args.overwrite:
            _refuse_to_overwrite(args.checkpoint)
    if args.tensorboard and args.log_dir is None:
        raise ValueError("--tensorboard writes into --log-dir: give --log-dir too")
    preset, dataset = _preset(args, saved)
    preset.estimator()  # an unknown algorithm or setting is refused before anything runs
    seed = args.seed if args.seed is not None else saved["seed"] if saved else 0
    if saved and seed != saved["seed"]:
        raise ValueError(f"--seed {seed} differs from the checkpoint's seed {saved['seed']}: "
                         "resume without --seed, or start a new run")
    threads = 1 if args.deterministic else torch.get_num_threads()
    print(f"toreq train: training {preset.model} (preset {preset.name}) on {dataset}: "
          f"{preset.epochs} epochs, seed {seed}, {threads} torch thread(s)"
          + (f", resuming {args.checkpoint}" if saved else ""), file=sys.stderr, flush=True)
    data = load_classification(dataset, root=args.data_dir)
    common = dict(epochs=preset.epochs, batch_size=preset.batch_size, seed=seed,
                  progress="epochs" if args.no_progress else True,
                  deterministic=args.deterministic)
    twin = "feedforward CNN twin" if preset.model == "conv_ep" else "feedforward MLP"
    names = {"eqprop": f"{preset.model} (EqProp)", "backprop": f"{twin} (backprop)",
             "bptt": f"{preset.model} (BPTT)"}
    results = []
    for method in ["eqprop"] + ([args.compare] if args.compare != "none" else []):
        model, trainer, scheduler = build_trainer(preset, data.input_dim, data.num_classes,
                                                  method=method, seed=seed,
                                                  image_shape=data.image_shape)
        logging = dict(log_dir=args.log_dir, checkpoint=args.checkpoint, resume=args.resume,
                       overwrite=args.overwrite, tensorboard=args.tensorboard,
                       about=run_description(preset, dataset, model, seed, data.image_shape)
                       ) if method == "eqprop" else {}
        history = fit(trainer, data.x_train, data.y_train, data.x_test, data.y_test,
                      scheduler=scheduler, desc=method,
                      augment=preset.augmentation(data.image_shape), **logging, **common)
        results.append(_summary(names[method], model, history))
        if dataset in CONTROL_DATASETS:
            results[-1]["closed_loop"] = evaluate_policy(model_policy(model, dataset), dataset)
    expert = None
    if dataset in CONTROL_DATASETS:
        expert = evaluate_policy(expert_policy(dataset), dataset)

    if args.json:
        print(json.dumps({"dataset": dataset, "preset": preset.as_dict(), "seed": seed,
                          "threads": threads, "deterministic": args.deterministic,
                          "results": results, **({"expert": expert} if expert else {})},
                         indent=2))
    else:
        print(f"\n{data.name}: {data.x_train.shape[0]} training and {data.x_test.shape[0]} test "
              f"samples, {preset.epochs} epochs (preset {preset.name}), seed {seed}, {threads} "
              f"torch thread(s)")
        returns = (f" {'return (' + str(expert['episodes']) + ' episodes)':>22}"
                   if expert else "")
        print(f"{'model':<32} {'params':>9} {'test acc':>9} {'train acc':>10} "
              f"{'train time (s)':>15}{returns}")
        for r in results:
            closed_loop = (f" {r['closed_loop']['mean']:>13.1f} ± {r['closed_loop']['std']:>6.1f}"
                           if expert else "")
            print(f"{r['model']:<32} {r['parameters']:>9,} {100 * r['test_accuracy']:>8.2f}% "
                  f"{100 * r['train_accuracy']:>9.2f}% {r['seconds']:>15.1f}{closed_loop}")
        if expert:
            print(f"{'scripted expert':<32} {'':>9} {'':>9} {'':>10} {'':>15} "
                  f"{expert['mean']:>13.1f} ± {expert['std']:>6.1f}")
    return 0


def _refuse_to_overwrite(path: str) -> None:
    from toreq.checkpoint import describe_checkpoint, read_checkpoint

    try:
        what = describe_checkpoint(read_checkpoint(path), path)
    except (OSError, RuntimeError):
        what = f"{path} exists"
    raise FileExistsError(f"--checkpoint {what}; add --resume to continue it (toreq train) or "
                          "--overwrite to replace it")


def _train_run_of(state: dict, path: str, command: str) -> dict:
    """The `about` of a checkpoint of `toreq train`; one line saying what it holds else."""
    from toreq.checkpoint import describe_checkpoint

    about = state.get("about", {})
    if about.get("command") != "toreq train" or "preset" not in about:
        hint = (" (sample text from it with toreq generate)"
                if about.get("command") == "toreq lm-train" else "")
        raise ValueError(f"{command} needs a checkpoint written by toreq train, but "
                         f"{describe_checkpoint(state, path)}{hint}")
    return about


# The Preset fields that command-line options set (its name, data set, result and command are
# not options; args.command is the subcommand).
HYPERPARAMETERS = ("model", "hidden", "layers", "channels", "activation", "epochs", "batch_size",
                   "lr", "optimizer", "layer_lrs", "layer_order", "beta", "free_steps",
                   "nudged_steps", "symmetric_nudging", "algorithm", "algorithm_settings",
                   "crop_padding", "flip")


def _preset(args: argparse.Namespace, saved: dict | None = None):
    """The run's preset and data set: `--preset` (default: the data set's), or the one a
    resumed checkpoint was trained with, with every hyper-parameter option given applied (on
    resume, an option that differs from the checkpoint's value is refused)."""
    from toreq.presets import PRESETS, Preset, dataset_preset, get_preset

    if saved is not None:
        preset = Preset.from_dict(saved["preset"])
        dataset = saved["dataset"]
        if args.dataset is not None and args.dataset != dataset:
            raise ValueError(f"--dataset {args.dataset} differs from the checkpoint's "
                             f"{dataset}: resume without --dataset, or start a new run")
    elif args.preset is not None:
        preset = get_preset(args.preset)
        dataset = args.dataset or preset.dataset
    else:
        dataset = args.dataset or "digits"
        preset = dataset_preset(dataset) or PRESETS[FALLBACK_PRESET]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(preset)
                 if hasattr(args, f.name) and f.name in HYPERPARAMETERS}
    if "channels" in overrides:
        overrides["channels"] = tuple(overrides["channels"])
    for name in ("algorithm_settings", "layer_lrs"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    if hasattr(args, "memories"):
        if (overrides.get("model") or preset.model) not in ("ep_mlp", "conv_ep"):
            raise ValueError(f"--memories applies to --model ep_mlp or conv_ep, not "
                             f"{overrides.get('model') or preset.model}")
        options = dict(preset.model_options)
        options["memories"] = tuple(dict(args.memories).items())
        overrides["model_options"] = tuple(options.items())
    if saved is not None:
        for name, value in overrides.items():
            if value != getattr(preset, name):
                raise ValueError(f"--{name.replace('_', '-')} {value} differs from the "
                                 f"checkpoint's {getattr(preset, name)}: resume with the "
                                 "checkpoint's settings, or start a new run")
        return preset, dataset
    if "model" in overrides and "activation" not in overrides:
        overrides["activation"] = None  # another model: its own activation
    return dataclasses.replace(preset, **overrides), dataset


def _export_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export", help="export a trained model: its inference (.pt2, ONNX) or its weights",
        parents=[common],
        description="Rebuild the model of a toreq train checkpoint from the description it "
                    "holds, load its weights, and write --output by its suffix: .pt2 (a "
                    "torch.export program of the inference x -> (output, steps) with the "
                    "relaxation in ATen ops, loaded by torch.export.load without toreq), .onnx "
                    "(the same graph as ONNX: the onnx extra) or .safetensors (the weights and "
                    "the run's description only). Prints the largest difference of the exported "
                    "program from the eager model on test samples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by toreq train")
    p.add_argument("--output", required=True, type=_export_path,
                   help="the file to write: .pt2, .onnx or .safetensors")
    p.add_argument("--data-dir", default=None,
                   help="folder holding mnist/ and fashion-mnist/ (the test samples compared)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help="relaxation steps, or their cap with --tol > 0 (default: the model's)")
    p.add_argument("--tol", type=TOLERANCE, default=None,
                   help="per-sample tolerance; 0 runs exactly --steps steps (default: the model's)")
    p.set_defaults(run=_run_export)


def _export_path(text: str) -> Path:
    path = Path(text)
    if path.suffix not in (".pt2", ".onnx", ".safetensors"):
        raise argparse.ArgumentTypeError(f"expected a file name ending in .pt2, .onnx or "
                                         f".safetensors, got {text!r}")
    return path


def _run_export(args: argparse.Namespace) -> int:
    import importlib.util

    from toreq.checkpoint import (describe_checkpoint, load_checkpoint, read_checkpoint,
                                  save_safetensors)
    from toreq.data import load_classification
    from toreq.presets import Preset, build_trainer

    output = args.output
    state = read_checkpoint(args.checkpoint)
    about = _train_run_of(state, args.checkpoint, "toreq export")
    if output.suffix == ".onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"writing ONNX needs {' and '.join(missing)}: "
                              'pip install "toreq[onnx]"')
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"toreq export: {describe_checkpoint(state, args.checkpoint)}; writing {output}",
          file=sys.stderr, flush=True)
    if output.suffix == ".safetensors":
        save_safetensors(output, state)
        print(f"wrote {output}: the weights of {about['model']['class']} from {args.checkpoint}")
        return 0
    from toreq.export import export_model, to_onnx

    preset = Preset.from_dict(about["preset"])
    data = load_classification(about["dataset"], root=args.data_dir)
    model, trainer, _ = build_trainer(preset, data.input_dim, data.num_classes,
                                      image_shape=data.image_shape)
    load_checkpoint(args.checkpoint, trainer)
    model.eval()
    x = data.x_test[:256]
    options = dict(steps=args.steps, tol=args.tol)
    if output.suffix == ".onnx":
        to_onnx(model, x[:2], output, **options)
        if importlib.util.find_spec("onnxruntime") is None:
            print(f"wrote {output}; not checked against the eager model: onnxruntime is not "
                  "installed")
            return 0
        import onnxruntime

        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        exported = torch.from_numpy(session.run(["output"], {"x": x.numpy()})[0])
    else:
        program = export_model(model, x[:2], **options)
        torch.export.save(program, output)
        exported = program.module()(x)[0].detach()
    with torch.no_grad():
        net = model.network(x)
        eager = model.output(model.relax(x, net, max_steps=args.steps, tol=args.tol).states, net)
    print(f"wrote {output}: {preset.model} from {args.checkpoint}; largest |exported - eager| "
          f"on {x.shape[0]} test samples: {float((exported - eager).abs().max()):.3g}")
    return 0


LM_VARIANTS = {"backprop": "none", "attention": "attention", "ffn": "ffn", "both": "both"}


def _lm_train_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from toreq.nn.lm import LM_VARIANTS as STUDY_VARIANTS

    p = sub.add_parser(
        "lm-train", help="train a character-level transformer LM on Tiny Shakespeare",
        parents=[common],
        description="Train a CharTransformerLM, or a variant of the LM study "
                    "(toreq.nn.lm.build_lm), with toreq.lm_training.train_lm (Adam on the next-token "
                    "cross-entropy of random windows) with backprop or EqProp sublayers, print "
                    "its validation perplexity against the unigram baseline, and write a "
                    "checkpoint holding the model's configuration and vocabulary, for toreq "
                    "generate. Prints its progress to stderr every few seconds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the checkpoint file to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --checkpoint instead of refusing")
    p.add_argument("--variant", choices=tuple(dict.fromkeys([*LM_VARIANTS, *STUDY_VARIANTS])),
                   default="both",
                   help="which sublayers are EqProp: none (backprop), attention, ffn or both; or "
                        "a variant of the LM study (toreq.nn.lm.build_lm; its width is --d-model: "
                        "the hidden width for looped_mlp)")
    p.add_argument("--params", type=POSITIVE_INT, default=None,
                   help="a study variant only: build it at this parameter count instead of at "
                        "--d-model (build_lm; the achieved count is printed)")
    p.add_argument("--steps", type=NONNEGATIVE_INT, default=300, help="optimizer steps")
    p.add_argument("--d-model", type=POSITIVE_INT, default=32, help="model width")
    p.add_argument("--layers", type=POSITIVE_INT, default=1, help="transformer blocks")
    p.add_argument("--heads", type=POSITIVE_INT, default=2, help="attention heads per block")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=32, help="context length")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--lr", type=LEARNING_RATE, default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=SEED, default=0, help="seeds the weights and the batches")
    p.add_argument("--eval-chars", type=POSITIVE_INT, default=20_000,
                   help="validation characters the perplexity is measured on")
    p.add_argument("--data-dir", default=None, help="folder holding tinyshakespeare/")
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.set_defaults(run=_run_lm_train)


def _run_lm_train(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from toreq.checkpoint import save_checkpoint
    from toreq.data import load_tiny_shakespeare
    from toreq.lm_training import train_lm
    from toreq.nn.lm import (LM_VARIANTS as STUDY_VARIANTS, CharTransformerLM, build_lm,
                             count_parameters, unigram_perplexity)

    if args.params is not None and args.variant not in STUDY_VARIANTS:
        raise ValueError(f"--params needs a study variant ({', '.join(STUDY_VARIANTS)}), got "
                         f"--variant {args.variant}")
    if Path(args.checkpoint).exists() and not args.overwrite:
        _refuse_to_overwrite(args.checkpoint)
    _set_threads(args.threads)
    corpus = load_tiny_shakespeare(args.data_dir)
    val = corpus.val[:args.eval_chars]
    torch.manual_seed(args.seed)
    if args.variant in STUDY_VARIANTS:
        size = {"params": args.params} if args.params else {"width": args.d_model}
        model = build_lm(args.variant, corpus.vocab_size, args.seq_len, n_layers=args.layers,
                         n_heads=args.heads, vocab=corpus.vocab, **size)
    else:
        model = CharTransformerLM(corpus.vocab_size, args.d_model, args.layers, args.heads,
                                  args.seq_len, eqprop=LM_VARIANTS[args.variant],
                                  vocab=corpus.vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    say = _Heartbeat("lm-train")
    say(f"{args.variant} LM, {count_parameters(model):,} parameters: {args.steps} steps of "
        f"{args.batch_size} windows of {args.seq_len} characters, after measuring the untrained "
        f"model's validation perplexity on {val.numel():,} characters", force=True)
    started = time.perf_counter()
    history = train_lm(model, optimizer, corpus.train, args.steps, batch_size=args.batch_size,
                       generator=torch.Generator().manual_seed(args.seed), eval_ids=val,
                       on_step=lambda r: say(f"step {r['step']}/{args.steps}, loss "
                                             f"{r['loss']:.3f}, {time.perf_counter() - started:.0f} s",
                                             force=r["step"] == args.steps))
    seconds = time.perf_counter() - started
    about = {"command": "toreq lm-train", "dataset": "tiny_shakespeare",
             "model": {"class": type(model).__name__, "arguments": model.config},
             "algorithm": {"variant": args.variant, "optimizer": "Adam", "lr": args.lr,
                           "steps": args.steps, "batch_size": args.batch_size},
             "seed": args.seed}
    # save_checkpoint stores a trainer's model and optimizer; train_lm needs no trainer object
    save_checkpoint(args.checkpoint, SimpleNamespace(model=model, optimizer=optimizer),
                    epoch=0, history=history, about=about,
                    extra={"lm_config": model.config, "lm_class": type(model).__name__,
                           "variant": args.variant, "steps": args.steps, "seed": args.seed})
    print(f"{args.variant} LM, {count_parameters(model):,} parameters, {args.steps} steps in "
          f"{seconds:.1f} s on {torch.get_num_threads()} torch thread(s): validation perplexity "
          f"{history[0]['val_perplexity']:.2f} -> {history[-1]['val_perplexity']:.2f} (unigram "
          f"{unigram_perplexity(corpus.train, val, corpus.vocab_size):.2f}); wrote "
          f"{args.checkpoint}")
    return 0


class _Heartbeat:
    """Prints `prog: text` to stderr, at most one line every `every_s` seconds unless forced."""

    def __init__(self, prog: str, every_s: float = 5.0) -> None:
        self.prog, self.every_s, self.last = prog, every_s, -math.inf

    def __call__(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.every_s:
            self.last = now
            print(f"{self.prog}: {text}", file=sys.stderr, flush=True)


def _lm_study_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from toreq.lm_study import EXPERIMENTS

    p = sub.add_parser(
        "lm-study", help="the language-model study: EqProp variants against backprop",
        parents=[common],
        description="Train the prototype's character-level LM variants (toreq.nn.lm.build_lm: "
                    "backprop, full, attention_only, hybrid, recurrent_core, looped_mlp) on Tiny "
                    "Shakespeare at matched parameter counts (toreq.lm_study): variant x scale, "
                    "training-text size and sequence length. Each run's results are saved as it "
                    "finishes (results.jsonl; --resume skips finished runs); at the end "
                    "results.json, results.csv and summary.md (tables, crossover point).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small models and few steps (toreq.lm_study.QUICK: about 15 minutes on "
                        "two CPU cores) instead of the ~2.2M-parameter base (FULL, for a GPU)")
    p.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                   metavar="EXPERIMENT",
                   help=f"the experiments to run, among {', '.join(EXPERIMENTS)}")
    p.add_argument("--scales", nargs="+", type=float, default=None, metavar="FRACTION",
                   help="the fractions of the base parameter count that the variants experiment "
                        "compares (default: the configuration's, 0.5 0.75 0.9 1.0)")
    p.add_argument("--out", default="results/lm_study", help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="skip the runs already in <out>/results.jsonl")
    p.add_argument("--seed", type=SEED, default=0, help="seeds the weights and the batches")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--data-dir", default=None, help="folder holding tinyshakespeare/")
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.set_defaults(run=_run_lm_study)


def _run_lm_study(args: argparse.Namespace) -> int:
    from toreq.data import load_tiny_shakespeare
    from toreq.lm_study import FULL, QUICK, run_study

    _set_threads(args.threads)
    corpus = load_tiny_shakespeare(args.data_dir)
    started = time.perf_counter()
    config = QUICK if args.quick else FULL
    if args.scales is not None:
        config = dataclasses.replace(config, scales=tuple(args.scales))
    run_study(corpus, args.out, config, experiments=args.experiments,
              seed=args.seed, device=args.device, resume=args.resume,
              log=lambda line: print(line, file=sys.stderr, flush=True))
    print((Path(args.out) / "summary.md").read_text())
    print(f"wrote {args.out}/results.json, results.csv and summary.md in "
          f"{time.perf_counter() - started:.0f} s on {torch.get_num_threads()} torch thread(s)")
    return 0


def _generate_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate", help="sample text from a language-model checkpoint of toreq lm-train",
        parents=[common],
        description="Load a checkpoint written by toreq lm-train (its configuration and "
                    "vocabulary travel with it) and print the prompt followed by sampled text "
                    "(CharTransformerLM.generate). The same --seed prints the same text.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by toreq lm-train")
    p.add_argument("--prompt", default="\n", help="the text to continue")
    p.add_argument("--max-new-tokens", type=NONNEGATIVE_INT, default=200,
                   help="characters to sample")
    p.add_argument("--temperature", type=number_type(float, 0, 100, low_open=True), default=1.0,
                   help="softmax temperature")
    p.add_argument("--top-k", type=POSITIVE_INT, default=None,
                   help="sample among the k most likely characters only (default: all)")
    p.add_argument("--seed", type=SEED, default=None,
                   help="seeds the sampling (default: a fresh random seed)")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from toreq.nn.lm import CharLM

    model = CharLM.from_checkpoint(args.checkpoint)
    print(model.generate(args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, generator=args.seed))
    return 0


def _validate_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from toreq.estimators import estimator_names
    from toreq.validate import CLAIMS

    p = sub.add_parser(
        "validate", help="measure every claim of toreq over seeds and judge it against its bar",
        parents=[common],
        description="Run each claim (accuracy against backprop on digits and Fashion-MNIST, "
                    "gradient equivalence, memory flat in T, speed against BPTT, beta stability "
                    "fixed against annealed) for seeds 0..N-1 and write validation.md and "
                    "validation.json: values per seed, mean, standard deviation, 95%% "
                    "confidence interval (Student t) and PASS/FAIL against each bar, with the "
                    "command and the environment (toreq.validate). Exits with 1 when a claim "
                    "fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=number_type(int, 1, 100), default=None,
                   help="seeds per claim (default 5; with --quick 2)")
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, Fashion-MNIST for 4 epochs on 30,000 images, fewer timed repeats "
                        "(minutes; verdicts indicative)")
    p.add_argument("--claims", nargs="+", choices=list(CLAIMS), default=list(CLAIMS),
                   metavar="CLAIM", help=f"the claims to run, among {', '.join(CLAIMS)}")
    p.add_argument("--out", default="results/validation", help="output folder")
    p.add_argument("--data-dir", default=None, help="folder holding fashion-mnist/")
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.add_argument("--algorithm", choices=estimator_names(), default=None,
                   help="train the accuracy claims' EqProp model by this gradient estimator "
                        "instead of its preset's (toreq.estimators)")
    p.add_argument("--algorithm-setting", dest="algorithm_settings", action="append",
                   type=_setting, default=[], metavar="NAME=VALUE",
                   help="a setting of --algorithm's estimator, e.g. nudging=negative "
                        "(repeatable; an unknown one is refused)")
    p.set_defaults(run=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from toreq.validate import run_claims, write_report

    seeds = args.seeds if args.seeds is not None else 2 if args.quick else 5
    _set_threads(args.threads)
    if args.algorithm_settings and args.algorithm is None:
        raise ValueError("--algorithm-setting needs --algorithm")
    report = run_claims(args.claims, seeds, args.quick, data_dir=args.data_dir,
                        log=lambda line: print(line, file=sys.stderr, flush=True),
                        algorithm=args.algorithm, algorithm_settings=args.algorithm_settings)
    path = write_report(report, args.out)
    print(path.read_text())
    print(f"wrote {path} and {path.with_suffix('.json')}")
    failed = [c["name"] for c in report["claims"] if not c["passed"]]
    return 1 if failed else 0


def _summary(name: str, model: torch.nn.Module, history: list[dict]) -> dict:
    """A trained model's row: its last epoch, and the training time of every epoch (a resumed
    run's included)."""
    last = history[-1]
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
            "seconds": sum(r["seconds"] for r in history), "history": history}


#: A running command that has printed nothing for this long (seconds) prints that it is still
#: working: a slow step on a busy machine or a long export never leaves a log silent for long
#: (the watch polls every second).
QUIET_S = 5.0


class _Watched:
    """A text stream that notes when it was last written to."""

    def __init__(self, stream: object, clock: list[float]) -> None:
        self._stream, self._clock = stream, clock

    def write(self, text: str) -> int:
        self._clock[0] = time.monotonic()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


class _StillWorking:
    """While a command runs, `prog: still working (N s)` on stderr after every QUIET_S seconds
    in which neither stdout nor stderr was written to."""

    def __init__(self, prog: str) -> None:
        import threading

        self.prog, self.clock, self.stop = prog, [time.monotonic()], threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> None:
        self.started, self.streams = time.monotonic(), (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = (_Watched(s, self.clock) for s in self.streams)
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        sys.stdout, sys.stderr = self.streams

    def _watch(self) -> None:
        while not self.stop.wait(min(1.0, QUIET_S / 4)):
            now = time.monotonic()
            if now - self.clock[0] >= QUIET_S:
                print(f"{self.prog}: still working ({now - self.started:.0f} s)",
                      file=self.streams[1], flush=True)
                self.clock[0] = now


def make_parser() -> argparse.ArgumentParser:
    """The `toreq` argument parser, with every subcommand and its options (the
    [command-line reference](../cli.md) of these pages is generated from it)."""
    import toreq

    parser = _Parser(
        prog="toreq", description="Equilibrium Propagation for PyTorch: train and compare "
                                  "equilibrium models trained by EqProp.")
    parser.add_argument("--version", action="version", version=f"toreq {toreq.__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="on an error, show its traceback instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_train_parser, _export_parser, _lm_train_parser, _lm_study_parser,
                _generate_parser, _validate_parser):
        add(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit code (an error: one line on stderr, 1).

    Args:
        argv: the arguments after `toreq` (None: `sys.argv[1:]`).
    """
    args = make_parser().parse_args(argv)
    try:
        with _StillWorking(f"toreq {args.command}"):
            return args.run(args)
    except KeyboardInterrupt:
        print(f"toreq {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line; --debug shows where it came from
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, (OSError, RuntimeError, ValueError, TypeError, ImportError)):
            message = f"{type(error).__name__}: {message}"
        print(f"toreq {args.command}: error: {message} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
