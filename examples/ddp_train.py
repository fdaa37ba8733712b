"""Data-parallel EqProp on the digits set with torch.distributed.

    torchrun --nproc_per_node 2 examples/ddp_train.py --epochs 5
    python examples/ddp_train.py --quick     # one process, one epoch on 256 samples

Every process draws the same global batches and relaxes its shard of each; the EqProp gradients
are averaged over the global batch (an all-reduce of ``.grad``) before every optimizer step, so
the run matches one process training on the same batches. The backend is gloo on the CPU and
NCCL with one GPU per process (``--backend`` overrides). Started without torchrun, the script
trains in one process. Rank 0 prints the metrics and, with ``--save``, writes the final weights
and the history.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from toreq.cli import BETA, LEARNING_RATE, POSITIVE_INT, SEED
from toreq.data import load_digits
from toreq.distributed import leave
from toreq.nn import EPMLP, LoopedMLP
from toreq.train import EqPropTrainer, fit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one epoch on the first 256 samples: checks the pipeline in seconds")
    parser.add_argument("--model", choices=["looped_mlp", "ep_mlp"], default="looped_mlp",
                        help="the EqProp model")
    parser.add_argument("--hidden", type=POSITIVE_INT, default=128, help="hidden units")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=5, help="training epochs")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=64,
                        help="the global batch size")
    parser.add_argument("--lr", type=LEARNING_RATE, default=1e-3, help="Adam learning rate")
    parser.add_argument("--beta", type=BETA, default=0.5, help="EqProp nudging strength")
    parser.add_argument("--seed", type=SEED, default=0, help="seeds weights and batches")
    parser.add_argument("--limit", type=POSITIVE_INT, default=None,
                        help="train on the first N samples")
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: by device)")
    parser.add_argument("--save", default=None, help="file for the final weights and history")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.limit = 1, 256

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    device = torch.device("cpu")
    group = None
    if distributed:
        use_cuda = torch.cuda.is_available() and args.backend != "gloo"
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(args.backend or ("nccl" if use_cuda else "gloo"))
        group = dist.group.WORLD

    data = load_digits().to(device)
    x_train, y_train = data.x_train[:args.limit], data.y_train[:args.limit]
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.model == "looped_mlp":
        model = LoopedMLP(data.input_dim, args.hidden, data.num_classes)
    else:
        model = EPMLP(data.input_dim, [args.hidden], data.num_classes)
    model.to(device)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=args.lr),
                            beta=args.beta, process_group=group)
    history = fit(trainer, x_train, y_train, data.x_test, data.y_test, epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed, desc="EqProp")

    if not distributed or dist.get_rank() == 0:
        world = dist.get_world_size() if distributed else 1
        print(f"{world} process(es), global batch {args.batch_size}")
        for record in history:
            print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
                  f"test accuracy {100 * record['test_accuracy']:.2f}%")
        if args.save:
            torch.save({"model": model.state_dict(), "history": history}, args.save)
    if distributed:
        leave()  # together, and so that gloo's threads are done before the interpreter exits


if __name__ == "__main__":
    main()
