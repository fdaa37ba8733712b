"""Data-parallel EqProp: two gloo processes on 127.0.0.1 against one process on the global batch."""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from toreq.distributed import average_over_ranks, leave, shard
from toreq.nn import LoopedMLP
from toreq.train import EqPropTrainer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "ddp_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, timeout: float = 120) -> str:
    """Runs ``script`` in two gloo processes on 127.0.0.1; returns their merged output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_processes_reach_the_weights_of_one_process_on_the_global_batch(tmp_path):
    # 136 samples in global batches of 45: shards of 23 and 22 samples, then a last batch of
    # one sample, which leaves rank 1 an empty shard. Averaging the ranks' means without
    # weighting them by shard size misses these weights by ~1e-3.
    args = ["--hidden", "32", "--epochs", "1", "--limit", "136", "--batch-size", "45"]
    torchrun(EXAMPLE, *args, "--save", str(tmp_path / "two.pt"))
    runpy.run_path(str(EXAMPLE))["main"]([*args, "--save", str(tmp_path / "one.pt")])
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert one["model"].keys() == two["model"].keys()
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, rtol=0, atol=2e-6, msg=name)
    torch.manual_seed(0)  # the example's seed: its initial weights
    initial = LoopedMLP(64, 32, 10).state_dict()
    assert (one["model"]["readout.weight"] - initial["readout.weight"]).abs().max() > 1e-3
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
        assert b["test_accuracy"] == a["test_accuracy"]


WORKER = """
    import sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from toreq.distributed import leave
    from toreq.nn import LoopedMLP
    from toreq.train import EqPropTrainer, TrainingDiverged

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = open(f"{sys.argv[1]}/rank{rank}.txt", "w")  # one file per rank: no interleaving
    torch.manual_seed(0)
    model = LoopedMLP(8, 6, 3)
    torch.manual_seed(1 + rank)  # different data on each rank
    x, y = torch.rand(4, 8), torch.randint(0, 3, (4,))

    # DDP's hooks are armed by its forward(), which an EqProp step never calls.
    DistributedDataParallel(model)
    EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0)).step(x, y)
    grads = [torch.empty_like(model.readout.weight.grad) for _ in range(2)]
    dist.all_gather(grads, model.readout.weight.grad)
    print(f"DDP averaged the gradients: {torch.equal(grads[0], grads[1])}", file=report)

    trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            process_group=dist.group.WORLD)
    before = model.readout.weight.detach().clone()
    if rank == 1:
        x[2, 5] = float("nan")
    try:
        trainer.step(x, y)
        print("no error", file=report)
    except TrainingDiverged as error:
        print(f"diverged, weights kept: {torch.equal(before, model.readout.weight)}: {error}",
              file=report)
    report.close()
    leave()
"""


def test_ddp_does_not_average_and_a_failure_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    torchrun(script, str(tmp_path), timeout=90)
    first, second = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert first[0] == second[0] == "DDP averaged the gradients: False"
    assert first[1].startswith("diverged, weights kept: True") and "on another rank" in first[1]
    assert "lower the learning rate" in first[1]
    assert second[1].startswith("diverged, weights kept: True")
    assert "drives[0] holds NaN" in second[1]


@pytest.fixture()
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_shard_and_average_with_one_process(single_process_group):
    indices = torch.arange(7)
    assert torch.equal(shard(indices, single_process_group), indices)
    t = torch.tensor([1.0, -2.0])
    average_over_ranks([t], 3, 4, single_process_group)  # this rank holds 3 of 4 samples
    torch.testing.assert_close(t, torch.tensor([0.75, -1.5]))


def test_leave_ends_the_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    leave()
    assert not dist.is_initialized()


def test_process_group_needs_an_initialised_backend():
    model = LoopedMLP(4, 3, 2)
    with pytest.raises(ValueError, match="init_process_group"):
        EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      process_group=object())


ESTIMATORS_WORKER = """
    import sys, torch, torch.distributed as dist
    from toreq.distributed import leave
    from toreq.estimators import estimator_names, get_estimator
    from toreq.nn import EPMLP
    from toreq.train import EqPropTrainer

    SETTINGS = {"eqprop": {"beta": 0.2}, "cpl": {"eta": 0.3}, "holomorphic": {"beta": 0.2},
                "bptt": {"truncation": 5}}
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = open(f"{sys.argv[1]}/rank{rank}.txt", "w")
    torch.manual_seed(0)
    x, y = torch.rand(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    for name in estimator_names():
        grads = {}
        for group in (None, dist.group.WORLD):
            torch.manual_seed(1)
            model = EPMLP(5, [6], 3, activation="sigmoid", schedule="sync", max_steps=200,
                          tol=1e-10).double()
            trainer = EqPropTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                    estimator=get_estimator(name, **SETTINGS.get(name, {})),
                                    process_group=group)
            shard = slice(None) if group is None else slice(4 * rank, 4 * rank + 4)
            trainer.step(x[shard], y[shard])
            grads[group is None] = torch.cat([p.grad.flatten() for p in model.parameters()])
        error = float((grads[True] - grads[False]).abs().max() / grads[True].abs().max())
        print(f"{name} {error:.3e}", file=report)
    report.close()
    leave()
"""


BUILT_IN_ESTIMATORS = {"bptt", "cl", "cpl", "eqprop", "holomorphic", "implicit"}


def test_every_estimator_trains_data_parallel_as_on_the_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(ESTIMATORS_WORKER))
    torchrun(script, str(tmp_path), timeout=180)
    for rank in (0, 1):
        rows = dict(line.split() for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines())
        assert set(rows) == BUILT_IN_ESTIMATORS
        for name, error in rows.items():
            assert float(error) < 1e-9, (rank, name, error)
