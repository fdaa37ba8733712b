"""A character-level transformer language model with EqProp sublayers, and its measures.

:class:`CharTransformerLM` maps token ids ``idx`` of shape ``(B, T)`` to next-token logits

.. math::  x^{(0)}_t = E[\\mathrm{idx}_t] + P[t], \\qquad x^{(l)} = \\mathrm{Block}_l(x^{(l-1)}),
           \\qquad \\mathrm{logits}_t = R\\, \\mathrm{LN}(x^{(L)}_t) + r,

with :class:`~toreq.nn.transformer.TransformerBlock` s whose sublayers are backprop or EqProp
(``eqprop``, per block). Train it with ``F.cross_entropy(logits.flatten(0, 1), targets.flatten())
.backward()``: the EqProp sublayers' gradients come from their nudged phases, the rest from
autograd.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toreq.nn.transformer import EQPROP_SUBLAYERS, TransformerBlock

__all__ = ["CharTransformerLM", "count_parameters", "perplexity", "random_windows",
           "unigram_perplexity"]


class CharTransformerLM(nn.Module):
    """Token and position embeddings, ``n_layers`` transformer blocks, a LayerNorm and a readout.

    Args:
        vocab_size: the number of token ids.
        d_model: the model width.
        n_layers: the number of blocks.
        n_heads: attention heads per block.
        seq_len: the longest input (position embeddings).
        eqprop: which sublayers are EqProp (``"none"``, ``"attention"``, ``"ffn"``, ``"both"``),
            one value for every block or a sequence of ``n_layers`` values (e.g. EqProp only in
            the last blocks).
        d_ff: the feed-forward width (default ``4 d_model``).
        attention: the backprop attention, ``"linear"`` or ``"softmax"``.
        attention_mode: the EqProp attention's mode, ``"symmetric"`` or ``"nonsymmetric"``.
        recurrent_scale: ``c`` of the EqProp sublayers.
        block_options: passed to every :class:`~toreq.nn.EquilibriumBlock`.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, seq_len: int,
                 *, eqprop: str | Sequence[str] = "none", d_ff: int | None = None,
                 attention: str = "linear", attention_mode: str = "symmetric",
                 recurrent_scale: float = 0.5,
                 block_options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("n_layers", n_layers), ("n_heads", n_heads), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        per_block = [eqprop] * n_layers if isinstance(eqprop, str) else list(eqprop)
        if len(per_block) != n_layers or any(e not in EQPROP_SUBLAYERS for e in per_block):
            raise ValueError(f"eqprop must be one of {EQPROP_SUBLAYERS} or a sequence of "
                             f"n_layers={n_layers} of them, got {eqprop!r}")
        self.vocab_size, self.seq_len, self.eqprop = vocab_size, seq_len, per_block
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, seq_len, d_ff=d_ff, eqprop=e, attention=attention,
                             attention_mode=attention_mode, recurrent_scale=recurrent_scale,
                             block_options=block_options)
            for e in per_block)
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits ``(B, T, vocab_size)`` for token ids ``idx`` of shape ``(B, T)``."""
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(f"idx must be an integer tensor of shape (batch, time), got "
                             f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
        t = idx.shape[1]
        if not 1 <= t <= self.seq_len:
            raise ValueError(f"idx must have 1..seq_len={self.seq_len} positions, got {t}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise ValueError(f"idx must hold token ids in 0..{self.vocab_size - 1}, got "
                             f"{int(idx.min())}..{int(idx.max())}")
        x = self.token(idx) + self.position(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.readout(self.norm(x))

    def extra_repr(self) -> str:
        return f"eqprop={self.eqprop}"


def count_parameters(model: nn.Module) -> int:
    """The number of trainable scalars (each shared tensor once; a parametrized weight counts its
    underlying tensor, e.g. ``A`` of ``W = (A + A^T)/2``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def random_windows(ids: Tensor, batch_size: int, seq_len: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows of a 1-D id sequence: inputs ``ids[i : i+T]`` and targets
    ``ids[i+1 : i+T+1]``, each ``(batch_size, seq_len)``."""
    if ids.dim() != 1 or ids.numel() < seq_len + 1:
        raise ValueError(f"ids must be 1-D with more than seq_len={seq_len} tokens, got shape "
                         f"{tuple(ids.shape)}")
    start = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
    index = start[:, None] + torch.arange(seq_len + 1)
    windows = ids[index]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seq_len: int, batch_size: int = 64) -> float:
    """``exp`` of the mean next-token cross-entropy over consecutive non-overlapping windows of
    ``ids`` (1-D), in eval mode (the model's mode is restored)."""
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"ids must have more than seq_len={seq_len} tokens, got {ids.numel()}")
    inputs = ids[:n * seq_len].view(n, seq_len)
    targets = ids[1:n * seq_len + 1].view(n, seq_len)
    training = model.training
    model.eval()
    try:
        total = 0.0
        for i in range(0, n, batch_size):
            logits = model(inputs[i:i + batch_size])
            total += float(F.cross_entropy(logits.flatten(0, 1), targets[i:i + batch_size].flatten(),
                                           reduction="sum"))
    finally:
        model.train(training)
    return math.exp(total / (n * seq_len))


def unigram_perplexity(train_ids: Tensor, eval_ids: Tensor, vocab_size: int) -> float:
    """The perplexity on ``eval_ids`` of the character frequencies of ``train_ids`` (add-one
    smoothed): ``exp(-mean_t log p(eval_t))``, the bar a language model must beat."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return math.exp(-float(log_p[eval_ids].mean()))
