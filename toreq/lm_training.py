"""Training a character language model: next-token cross-entropy on random windows.

The models are in [`toreq.nn.lm`][toreq.nn.lm]; this loop trains any of them (their EqProp
sublayers get their gradients from their own backward,
[`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock]).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toreq.nn.lm import perplexity

__all__ = ["random_windows", "train_lm"]


def random_windows(ids: Tensor, batch_size: int, seq_len: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """`batch_size` random windows of a 1-D id sequence: inputs `ids[i : i+T]` and targets
    `ids[i+1 : i+T+1]`, each `(batch_size, seq_len)`."""
    if ids.dim() != 1 or ids.numel() < seq_len + 1:
        raise ValueError(f"ids must be 1-D with more than seq_len={seq_len} tokens, got shape "
                         f"{tuple(ids.shape)}")
    start = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
    index = start[:, None] + torch.arange(seq_len + 1)
    windows = ids[index]
    return windows[:, :-1], windows[:, 1:]


def train_lm(model: nn.Module, optimizer: torch.optim.Optimizer, train_ids: Tensor, steps: int,
             *, batch_size: int = 32, seq_len: int | None = None,
             generator: torch.Generator | None = None, eval_ids: Tensor | None = None,
             eval_every: int = 0, on_step: Callable[[dict[str, float]], None] | None = None
             ) -> list[dict[str, float]]:
    r"""`steps` optimizer steps on the next-token cross-entropy of random windows of `train_ids`:

    $$
    L = -\frac{1}{B T} \sum_{b, t} \log \mathrm{softmax}(\mathrm{logits}_{b,t})
    [y_{b,t}],
    $$

    with windows from [`random_windows`][toreq.lm_training.random_windows] (`seq_len` defaults to
    `model.seq_len`). Returns one record per step, `{"step", "loss"}`; with `eval_ids`,
    `"val_perplexity"` ([`perplexity`][toreq.nn.lm.perplexity] on `eval_ids`) is added every
    `eval_every` steps and at the last (`eval_every=0`: only there), and a first record
    `{"step": 0, "val_perplexity"}` holds the untrained model's. `on_step` is called with each
    step's record (e.g. to show progress).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {eval_every}")
    seq_len = seq_len or model.seq_len
    history: list[dict[str, float]] = []
    if eval_ids is not None:
        history.append({"step": 0, "val_perplexity": perplexity(model, eval_ids, seq_len)})
    model.train()
    for step in range(1, steps + 1):
        x, y = random_windows(train_ids, batch_size, seq_len, generator)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at step {step}: the loss is {loss.item()}; "
                               "lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {"step": step, "loss": loss.item()}
        if eval_ids is not None and (step == steps or (eval_every and step % eval_every == 0)):
            record["val_perplexity"] = perplexity(model, eval_ids, seq_len)
        history.append(record)
        if on_step is not None:
            on_step(record)
    return history
