"""The ``toreq`` command line (also ``python -m toreq``)."""

from __future__ import annotations

import argparse
import json
import dataclasses
import sys
import time
from collections.abc import Sequence

import torch

DATASETS = ("digits", "mnist", "fashion_mnist")


def _channels(text: str) -> list[int]:
    try:
        channels = [int(c) for c in text.split(",")]
    except ValueError:
        channels = []
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, "
                                         f"e.g. 16,32; got {text!r}")
    return channels


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from toreq.presets import MODELS, PRESETS

    p = sub.add_parser(
        "train", help="train an EqProp model (and optionally a baseline) on a data set",
        description="Train an equilibrium model with Equilibrium Propagation and report its test "
                    "accuracy, optionally next to a baseline trained on the same data. The "
                    "hyper-parameters come from a preset (toreq.presets: by default the data "
                    "set's, whose measured accuracy the README reports); every option given "
                    "overrides the preset's value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits is embedded (scikit-learn); MNIST and Fashion-MNIST are read from "
                        "--data-dir or $TOREQ_DATA, or downloaded")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the configuration to start from (default: the data set's preset)")
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ and fashion-mnist/")
    p.add_argument("--compare", choices=("none", "backprop", "bptt"), default="none",
                   help="also train a baseline on the same data: a feedforward MLP of the same "
                        "width by backprop, or the same model by backprop through time")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights and the batch order of every model")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms while training: identical runs "
                        "for identical seeds, or an error naming the op that cannot be")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-dir", default=None, help="write metrics.jsonl and metrics.csv here")
    p.add_argument("--checkpoint", default=None, help="checkpoint file, written every epoch")
    p.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    p.add_argument("--json", action="store_true", help="print the final results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    h = p.add_argument_group("hyper-parameters (default: the preset's)")
    keep = argparse.SUPPRESS  # absent unless given, so the preset's value stands
    h.add_argument("--model", choices=MODELS, default=keep, help="the EqProp model")
    h.add_argument("--hidden", type=int, default=keep, help="units per hidden layer")
    h.add_argument("--layers", type=int, default=keep, help="hidden layers (ep_mlp, toroidal_mlp)")
    h.add_argument("--channels", type=_channels, default=keep,
                   help="conv_ep: output channels of each convolutional layer, comma-separated")
    h.add_argument("--activation", choices=("hard_sigmoid", "tanh", "sigmoid"), default=keep,
                   help="hidden activation")
    h.add_argument("--epochs", type=int, default=keep)
    h.add_argument("--batch-size", type=int, default=keep)
    h.add_argument("--lr", type=float, default=keep,
                   help="AdamW learning rate, annealed to 0 by a cosine schedule")
    h.add_argument("--beta", type=float, default=keep, help="nudging strength")
    h.add_argument("--free-steps", type=int, default=keep, help="step cap of the free phase")
    h.add_argument("--nudged-steps", type=int, default=keep, help="step cap of the nudged phase")
    h.add_argument("--one-sided", dest="symmetric_nudging", action="store_false", default=keep,
                   help="contrast +beta with the free phase instead of +beta with -beta")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from toreq.data import load_classification
    from toreq.presets import build_trainer
    from toreq.train import fit

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = _preset(args)
    data = load_classification(args.dataset, root=args.data_dir)
    common = dict(epochs=preset.epochs, batch_size=preset.batch_size, seed=args.seed,
                  progress=not args.no_progress, deterministic=args.deterministic)
    names = {"eqprop": f"{preset.model} (EqProp)", "backprop": "feedforward MLP (backprop)",
             "bptt": f"{preset.model} (BPTT)"}
    results = []
    for method in ["eqprop"] + ([args.compare] if args.compare != "none" else []):
        model, trainer, scheduler = build_trainer(preset, data.input_dim, data.num_classes,
                                                  method=method, seed=args.seed,
                                                  image_shape=data.image_shape)
        logging = dict(log_dir=args.log_dir, checkpoint=args.checkpoint,
                       resume=args.resume) if method == "eqprop" else {}
        results.append(_timed(names[method], model, lambda: fit(
            trainer, data.x_train, data.y_train, data.x_test, data.y_test, scheduler=scheduler,
            desc=method, **logging, **common)))

    if args.json:
        print(json.dumps({"dataset": args.dataset, "preset": preset.as_dict(),
                          "results": results}, indent=2))
    else:
        print(f"\n{data.name}: {data.x_train.shape[0]} training and {data.x_test.shape[0]} test "
              f"samples, {preset.epochs} epochs (preset {preset.name})")
        print(f"{'model':<32} {'params':>9} {'test acc':>9} {'train acc':>10} {'time (s)':>9}")
        for r in results:
            print(f"{r['model']:<32} {r['parameters']:>9,} {100 * r['test_accuracy']:>8.2f}% "
                  f"{100 * r['train_accuracy']:>9.2f}% {r['seconds']:>9.1f}")
    return 0


def _preset(args: argparse.Namespace):
    """``--preset`` (default: the data set's), with every hyper-parameter option given applied."""
    from toreq.presets import PRESETS, get_preset

    if args.preset is None:
        preset = next(p for p in PRESETS.values() if p.dataset == args.dataset)
    else:
        preset = get_preset(args.preset)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(preset)
                 if hasattr(args, f.name) and f.name not in ("name", "dataset")}
    if "model" in overrides and "activation" not in overrides:
        overrides["activation"] = None  # another model: its own activation
    return dataclasses.replace(preset, **overrides)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    from toreq.presets import MODELS, PRESETS

    p = sub.add_parser(
        "export", help="export a trained model's inference (torch.export .pt2 or ONNX)",
        description="Rebuild the model of a training run from its preset and options, load its "
                    "checkpoint, and export its inference x -> (output, steps) with the "
                    "relaxation written in ATen ops (toreq.export): a torch.export program "
                    "(.pt2, loaded by torch.export.load without toreq) or an ONNX file. Prints "
                    "the largest difference from the eager model on test samples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by toreq train")
    p.add_argument("--output", required=True, help="the file to write: .pt2 or .onnx")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="the data set the model was trained on (its input size and samples)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the configuration trained (default: the data set's preset)")
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ and fashion-mnist/")
    p.add_argument("--steps", type=int, default=None,
                   help="relaxation steps, or their cap with --tol > 0 (default: the model's)")
    p.add_argument("--tol", type=float, default=None,
                   help="per-sample tolerance; 0 runs exactly --steps steps (default: the model's)")
    h = p.add_argument_group("the model's options, as given to toreq train (default: the preset's)")
    keep = argparse.SUPPRESS
    h.add_argument("--model", choices=MODELS, default=keep)
    h.add_argument("--hidden", type=int, default=keep)
    h.add_argument("--layers", type=int, default=keep)
    h.add_argument("--channels", type=_channels, default=keep)
    h.add_argument("--activation", choices=("hard_sigmoid", "tanh", "sigmoid"), default=keep)
    h.add_argument("--free-steps", type=int, default=keep, help="the model's step cap")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toreq.data import load_classification
    from toreq.export import export_model, to_onnx
    from toreq.presets import build_trainer
    from toreq.train import load_checkpoint

    output = Path(args.output)
    if output.suffix not in (".pt2", ".onnx"):
        raise SystemExit(f"toreq export: --output must end in .pt2 or .onnx, got {output.name!r}")
    preset = _preset(args)
    data = load_classification(args.dataset, root=args.data_dir)
    model, trainer, _ = build_trainer(preset, data.input_dim, data.num_classes,
                                      image_shape=data.image_shape)
    load_checkpoint(args.checkpoint, trainer)
    model.eval()
    x = data.x_test[:256]
    output.parent.mkdir(parents=True, exist_ok=True)
    options = dict(steps=args.steps, tol=args.tol)
    if output.suffix == ".onnx":
        to_onnx(model, x[:2], output, **options)
        try:
            import onnxruntime
        except ImportError:
            print(f"wrote {output}; not checked against the eager model: onnxruntime is not "
                  "installed")
            return 0
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


def _lm_train_parser(sub: argparse._SubParsersAction) -> None:
    from toreq.nn.lm import LM_VARIANTS as STUDY_VARIANTS

    p = sub.add_parser(
        "lm-train", help="train a character-level transformer LM on Tiny Shakespeare",
        description="Train a CharTransformerLM, or a variant of the LM study "
                    "(toreq.nn.lm.build_lm), with toreq.nn.lm.train_lm (Adam on the next-token "
                    "cross-entropy of random windows) with backprop or EqProp sublayers, print "
                    "its validation perplexity against the unigram baseline, and write a "
                    "checkpoint holding the model's configuration and vocabulary, for toreq "
                    "generate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the checkpoint file to write")
    p.add_argument("--variant", choices=tuple(dict.fromkeys([*LM_VARIANTS, *STUDY_VARIANTS])),
                   default="both",
                   help="which sublayers are EqProp: none (backprop), attention, ffn or both; or "
                        "a variant of the LM study (toreq.nn.lm.build_lm; its width is --d-model: "
                        "the hidden width for looped_mlp)")
    p.add_argument("--params", type=int, default=None,
                   help="a study variant only: build it at this parameter count instead of at "
                        "--d-model (build_lm; the achieved count is printed)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--d-model", type=int, default=32, help="model width")
    p.add_argument("--layers", type=int, default=1, help="transformer blocks")
    p.add_argument("--heads", type=int, default=2, help="attention heads per block")
    p.add_argument("--seq-len", type=int, default=32, help="context length")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches")
    p.add_argument("--eval-chars", type=int, default=20_000,
                   help="validation characters the perplexity is measured on")
    p.add_argument("--data-dir", default=None, help="folder holding tinyshakespeare/")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(run=_run_lm_train)


def _run_lm_train(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from toreq.data import DataError, load_tiny_shakespeare
    from toreq.nn.lm import (LM_VARIANTS as STUDY_VARIANTS, CharTransformerLM, build_lm,
                             count_parameters, train_lm, unigram_perplexity)
    from toreq.train import save_checkpoint

    for name in ("steps", "d_model", "layers", "heads", "seq_len", "batch_size", "eval_chars"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise SystemExit(f"toreq lm-train: --{name.replace('_', '-')} must be "
                             f"{'>= 0' if name == 'steps' else 'positive'}, "
                             f"got {getattr(args, name)}")
    if args.params is not None and (args.variant not in STUDY_VARIANTS or args.params < 1):
        raise SystemExit(f"toreq lm-train: --params must be positive and needs a study variant "
                         f"({', '.join(STUDY_VARIANTS)}), got {args.params} with --variant "
                         f"{args.variant}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        corpus = load_tiny_shakespeare(args.data_dir)
    except DataError as error:
        raise SystemExit(f"toreq lm-train: {error}") from error
    val = corpus.val[:args.eval_chars]
    torch.manual_seed(args.seed)
    if args.variant in STUDY_VARIANTS:
        size = {"params": args.params} if args.params else {"width": args.d_model}
        try:
            model = build_lm(args.variant, corpus.vocab_size, args.seq_len, n_layers=args.layers,
                             n_heads=args.heads, vocab=corpus.vocab, **size)
        except ValueError as error:
            raise SystemExit(f"toreq lm-train: {error}") from error
    else:
        model = CharTransformerLM(corpus.vocab_size, args.d_model, args.layers, args.heads,
                                  args.seq_len, eqprop=LM_VARIANTS[args.variant],
                                  vocab=corpus.vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    started = time.perf_counter()
    history = train_lm(model, optimizer, corpus.train, args.steps, batch_size=args.batch_size,
                       generator=torch.Generator().manual_seed(args.seed), eval_ids=val)
    seconds = time.perf_counter() - started
    # save_checkpoint stores a trainer's model and optimizer; train_lm needs no trainer object
    save_checkpoint(args.checkpoint, SimpleNamespace(model=model, optimizer=optimizer),
                    epoch=0, history=history,
                    extra={"lm_config": model.config, "lm_class": type(model).__name__,
                           "variant": args.variant,
                           "steps": args.steps, "seed": args.seed})
    print(f"{args.variant} LM, {count_parameters(model):,} parameters, {args.steps} steps in "
          f"{seconds:.1f} s: validation perplexity {history[0]['val_perplexity']:.2f} -> "
          f"{history[-1]['val_perplexity']:.2f} (unigram "
          f"{unigram_perplexity(corpus.train, val, corpus.vocab_size):.2f}); wrote "
          f"{args.checkpoint}")
    return 0


def _lm_study_parser(sub: argparse._SubParsersAction) -> None:
    from toreq.lm_study import EXPERIMENTS

    p = sub.add_parser(
        "lm-study", help="the language-model study: EqProp variants against backprop",
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
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--data-dir", default=None, help="folder holding tinyshakespeare/")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(run=_run_lm_study)


def _run_lm_study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toreq.data import DataError, load_tiny_shakespeare
    from toreq.lm_study import FULL, QUICK, run_study

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        corpus = load_tiny_shakespeare(args.data_dir)
    except DataError as error:
        raise SystemExit(f"toreq lm-study: {error}") from error
    started = time.perf_counter()
    config = QUICK if args.quick else FULL
    try:
        if args.scales is not None:
            config = dataclasses.replace(config, scales=tuple(args.scales))
        run_study(corpus, args.out, config, experiments=args.experiments,
                  seed=args.seed, device=args.device, resume=args.resume,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    except (FileExistsError, ValueError) as error:
        raise SystemExit(f"toreq lm-study: {error}") from error
    print((Path(args.out) / "summary.md").read_text())
    print(f"wrote {args.out}/results.json, results.csv and summary.md in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="sample text from a language-model checkpoint of toreq lm-train",
        description="Load a checkpoint written by toreq lm-train (its configuration and "
                    "vocabulary travel with it) and print the prompt followed by sampled text "
                    "(CharTransformerLM.generate). The same --seed prints the same text.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by toreq lm-train")
    p.add_argument("--prompt", default="\n", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="characters to sample")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely characters only (default: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the sampling (default: a fresh random seed)")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from toreq.nn.lm import CharLM

    try:
        model = CharLM.from_checkpoint(args.checkpoint)
        text = model.generate(args.prompt, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, generator=args.seed)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        raise SystemExit(f"toreq generate: {error}") from error
    print(text)
    return 0


def _validate_parser(sub: argparse._SubParsersAction) -> None:
    from toreq.validate import CLAIMS

    p = sub.add_parser(
        "validate", help="measure every claim of toreq over seeds and judge it against its bar",
        description="Run each claim (accuracy against backprop on digits and Fashion-MNIST, "
                    "gradient equivalence, memory flat in T, speed against BPTT, beta stability "
                    "fixed against annealed) for seeds 0..N-1 and write validation.md and "
                    "validation.json: values per seed, mean, standard deviation, 95%% "
                    "confidence interval (Student t) and PASS/FAIL against each bar, with the "
                    "command and the environment (toreq.validate). Exits with 1 when a claim "
                    "fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per claim (default 5; with --quick 2)")
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, Fashion-MNIST for 4 epochs on 30,000 images, fewer timed repeats "
                        "(minutes; verdicts indicative)")
    p.add_argument("--claims", nargs="+", choices=list(CLAIMS), default=list(CLAIMS),
                   metavar="CLAIM", help=f"the claims to run, among {', '.join(CLAIMS)}")
    p.add_argument("--out", default="results/validation", help="output folder")
    p.add_argument("--data-dir", default=None, help="folder holding fashion-mnist/")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(run=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from toreq.validate import run_claims, write_report

    seeds = args.seeds if args.seeds is not None else 2 if args.quick else 5
    if seeds < 1:
        raise SystemExit(f"toreq validate: --seeds must be >= 1, got {seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_claims(args.claims, seeds, args.quick, data_dir=args.data_dir,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    path = write_report(report, args.out)
    print(path.read_text())
    print(f"wrote {path} and {path.with_suffix('.json')}")
    failed = [c["name"] for c in report["claims"] if not c["passed"]]
    return 1 if failed else 0


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
    _export_parser(sub)
    _lm_train_parser(sub)
    _lm_study_parser(sub)
    _generate_parser(sub)
    _validate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
