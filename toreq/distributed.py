r"""Data-parallel EqProp over `torch.distributed`: each rank relaxes its share of the batch.

Samples never interact during relaxation (every sample stops on its own tolerance), so a global
batch split across ranks relaxes to the states one process would find for it (up to rounding,
as the matrix products see fewer rows). Every
EqProp gradient is a batch mean, so the gradient of the global batch of size $B = \sum_r B_r$
(rank $r$ holding $B_r$ samples) is the weighted mean of the ranks' gradients $g_r$,

$$
g = \sum_r \frac{B_r}{B}\, g_r ,
$$

which [`average_over_ranks`][toreq.distributed.average_over_ranks] forms with one
`torch.distributed.all_reduce` (sum) per tensor after scaling each rank's tensor by $B_r / B$.
Weighting by $B_r$ keeps this exact when the shards differ in size (a batch that does not split
evenly, the last batch of an epoch); the plain mean of the ranks' means would not be.

Why not `DistributedDataParallel`: DDP averages gradients in autograd hooks that it arms in its
own `forward()`. An EqProp step never calls the model's `forward`: the phases run through
`model.relax` and `model.eqprop_backward` writes `.grad`, so under DDP the hooks stay
unarmed and every rank silently keeps its own gradients (tests/test_distributed.py shows it).
[`EqPropTrainer`][toreq.train.EqPropTrainer] therefore takes `process_group=` and all-reduces
`.grad` explicitly before the optimizer step; [`fit`][toreq.train.fit] then gives each rank its
shard ([`shard`][toreq.distributed.shard]) of every global batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor

__all__ = ["average_over_ranks", "is_main_process", "leave", "shard"]


def shard(indices: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's share of a global batch: `indices[rank::world_size]`.

    Every rank must pass the same `indices` (e.g. the same seeded permutation); the shards are
    disjoint, cover the batch and differ in size by at most one.
    """
    return indices[dist.get_rank(group)::dist.get_world_size(group)]


def is_main_process(group: dist.ProcessGroup | None) -> bool:
    """True without a process group, else on the group's rank 0 (which logs and saves)."""
    return group is None or dist.get_rank(group) == 0


def average_over_ranks(tensors: Sequence[Tensor], batch_size: int, total: int,
                       group: dist.ProcessGroup | None = None) -> None:
    r"""Replaces, in place, each rank's batch mean by the mean over the global batch.

    `tensors` hold this rank's means over its `batch_size` samples (every rank passes tensors
    of the same shapes in the same order); `total` is the global batch size, the sum of the
    ranks' `batch_size`. Afterwards every rank holds $\sum_r (B_r / \mathrm{total})\, t_r$.
    """
    weight = batch_size / total
    works = []
    for t in tensors:
        t.mul_(weight)
        works.append(dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True))
    for work in works:
        work.wait()


def leave() -> None:
    """Ends data-parallel work on this rank: a barrier, then `destroy_process_group`.

    Call it on every rank as the program's last collective step. Between the two it releases
    the GIL for 50 ms, because of how gloo ends a collective: its worker thread drops its
    references to the collective's tensors after the caller has been told the collective
    completed, and dropping a tensor that Python created takes the GIL. If the main thread
    reaches interpreter shutdown first, the worker thread cannot take the GIL any more, is
    terminated inside a destructor, and the process aborts at exit ("terminate called without
    an active exception"; a core dump showed the barrier's work releasing an all-reduce's
    tensors). The pause lets the worker threads finish while the interpreter is alive.
    """
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()
