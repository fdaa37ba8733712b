r"""A character-level transformer language model with EqProp sublayers, and its measures.

[`CharTransformerLM`][toreq.nn.lm.CharTransformerLM] maps token ids `idx` of shape `(B, T)` to
next-token logits

$$
x^{(0)}_t = E[\mathrm{idx}_t] + P[t], \qquad x^{(l)} = \mathrm{Block}_l(x^{(l-1)}),
\qquad \mathrm{logits}_t = R\, \mathrm{LN}(x^{(L)}_t) + r,
$$

with [`TransformerBlock`][toreq.nn.transformer.TransformerBlock] s whose sublayers are backprop or
EqProp (`eqprop`, per block). Train it with
`F.cross_entropy(logits.flatten(0, 1), targets.flatten()) .backward()`
([`train_lm`][toreq.lm_training.train_lm] runs that loop): the EqProp sublayers' gradients come from their
nudged phases, the rest from autograd.
[`CharTransformerLM.generate`][toreq.nn.lm.CharTransformerLM.generate] samples text from it; a model
built with its corpus's `vocab` keeps it in its `state_dict`, so a checkpoint
([`CharLM.from_checkpoint`][toreq.nn.lm.CharLM.from_checkpoint]) generates on its own.

[`LoopedMLPLM`][toreq.nn.lm.LoopedMLPLM] is the attention-free model: position `t`'s logits from the
embeddings of its last `context` characters through one looped EqProp layer.
[`build_lm`][toreq.nn.lm.build_lm] builds the prototype's language-model variants
([`LM_VARIANTS`][toreq.nn.lm.LM_VARIANTS]) at a given parameter count, for the scale study of
[`toreq.lm_study`][toreq.lm_study]; [`evaluate_lm`][toreq.nn.lm.evaluate_lm] measures perplexity,
next-character accuracy and bits per character.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toreq.data import CharCorpus
from toreq.nn.block import EquilibriumBlock
from toreq.nn.transformer import BLOCK_DEFAULTS, EQPROP_SUBLAYERS, HopfieldCell, TransformerBlock

__all__ = ["CharLM", "CharTransformerLM", "LM_VARIANTS", "LoopedMLPLM", "build_lm",
           "count_parameters", "evaluate_lm", "perplexity", "unigram_perplexity"]


class CharLM(nn.Module):
    """What every character-level language model here shares: token ids `(B, T)` in, next-token
    logits `(B, T, vocab_size)` out, for `T <= seq_len`; an optional vocabulary kept in the
    `state_dict`; `generate`; `config` (`type(lm)(**lm.config)` rebuilds the
    architecture) and `from_checkpoint`. Subclasses set `config` and implement
    `forward` (checking `idx` with `_check_ids`).
    """

    config: dict[str, Any]

    def __init__(self, vocab_size: int, seq_len: int, vocab: str | None) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len)):
            _check_positive(name, value)
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.set_extra_state({"vocab": vocab})

    def _check_ids(self, idx: Tensor) -> None:
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(f"idx must be an integer tensor of shape (batch, time), got "
                             f"{getattr(idx, 'dtype', type(idx))} "
                             f"{tuple(getattr(idx, 'shape', ()))}")
        t = idx.shape[1]
        if not 1 <= t <= self.seq_len:
            raise ValueError(f"idx must have 1..seq_len={self.seq_len} positions, got {t}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise ValueError(f"idx must hold token ids in 0..{self.vocab_size - 1}, got "
                             f"{int(idx.min())}..{int(idx.max())}")

    # -------------------------------------------------------------------- vocabulary
    @property
    def vocab(self) -> str | None:
        """The characters of the token ids, or `None` when the model was built without them."""
        return None if self._corpus is None else self._corpus.vocab

    def get_extra_state(self) -> dict[str, Any]:
        return {"vocab": self.vocab}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        vocab = state["vocab"]
        if vocab is not None and (not isinstance(vocab, str) or len(vocab) != self.vocab_size):
            raise ValueError(f"vocab must be None or a string of vocab_size={self.vocab_size} "
                             f"characters, got {vocab!r:.80}")
        empty = torch.empty(0, dtype=torch.int64)
        # a corpus without text: its encode/decode, and its check that vocab is sorted, distinct
        self._corpus = None if vocab is None else CharCorpus("", vocab, empty, empty)

    def encode(self, text: str) -> Tensor:
        """Token ids `(len(text),)` of a string; a `ValueError` names unknown characters."""
        return self._vocabulary().encode(text)

    def decode(self, ids: Tensor) -> str:
        """The string of a 1-D sequence of token ids."""
        return self._vocabulary().decode(ids)

    def _vocabulary(self) -> CharCorpus:
        if self._corpus is None:
            raise ValueError("this model has no vocabulary: build it with vocab=corpus.vocab, or "
                             "give token ids instead of a string")
        return self._corpus

    # -------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, prompt: str | Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None,
                 generator: torch.Generator | int | None = None) -> str | Tensor:
        r"""Samples `max_new_tokens` tokens after `prompt`, one at a time, in eval mode.

        Each new token is drawn from the model's next-token distribution given the last
        `seq_len` tokens (a sliding window over the prompt and what was sampled so far),

        $$
        p(i) \propto \exp(\mathrm{logits}_i / \tau) \ \text{over the}
        \ \mathrm{top\_k} \ \text{largest logits (all when None), 0 elsewhere,}
        $$

        so `top_k=1` is greedy (argmax) decoding and $\tau \to 0$ approaches it.

        Args:
            prompt: a non-empty string in the model's `vocab`, or token ids of shape
                `(T,)` or `(B, T)` with `T >= 1`.
            max_new_tokens: how many tokens to append (`>= 0`).
            temperature: `tau > 0`; lower is more conservative.
            top_k: sample only among the `top_k` most likely tokens (`1 .. vocab_size`).
            generator: a `torch.Generator` on the model's device, or an int seed: the same
                seed gives the same text.

        Returns:
            the prompt followed by the sampled text (a string for a string prompt), or the
                token ids with the new ones appended (the prompt's shape, longer by
                `max_new_tokens`). The model's training mode is restored.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= self.vocab_size):
            raise ValueError(f"top_k must be None or an int in 1..vocab_size={self.vocab_size}, "
                             f"got {top_k!r}")
        device = next(self.parameters()).device
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator(device).manual_seed(generator)
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, an int seed or None, got "
                             f"{type(generator).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must hold at least one character")
            ids = self.encode(prompt)[None]
        elif isinstance(prompt, Tensor) and prompt.dim() in (1, 2) \
                and not prompt.is_floating_point() and prompt.shape[-1] >= 1:
            ids = prompt.reshape(-1, prompt.shape[-1])
        else:
            raise ValueError(f"prompt must be a string or integer token ids of shape (T,) or "
                             f"(B, T) with T >= 1, got {getattr(prompt, 'dtype', type(prompt))} "
                             f"{tuple(getattr(prompt, 'shape', ()))}")
        ids = ids.to(device=device, dtype=torch.int64)
        training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self(ids[:, -self.seq_len:])[:, -1].float() / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                new = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                ids = torch.cat([ids, new], dim=1)
        finally:
            self.train(training)
        if isinstance(prompt, str):
            return self.decode(ids[0])
        return ids.reshape(*prompt.shape[:-1], -1)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"
                        ) -> CharLM:
        """The model of a checkpoint written by `toreq lm-train` (its `extra["lm_config"]`
        rebuilds the architecture of the class named by `extra["lm_class"]`, a
        [`CharTransformerLM`][toreq.nn.lm.CharTransformerLM] when absent; the weights and the
        vocabulary come from its `state_dict`). Called on a subclass, the checkpoint must hold that
        class.
        """
        from toreq.checkpoint import describe_checkpoint, read_checkpoint

        state = read_checkpoint(path)
        config = state["extra"].get("lm_config")
        if config is None:
            raise RuntimeError(f"not a language-model checkpoint: {describe_checkpoint(state, path)}"
                               "; write one with toreq lm-train")
        name = state["extra"].get("lm_class", CharTransformerLM.__name__)
        kind = {k.__name__: k for k in (CharTransformerLM, LoopedMLPLM)}.get(name)
        if kind is None or not issubclass(kind, cls):
            raise RuntimeError(f"{path} holds a {name}, not a {cls.__name__}")
        model = kind(**config)
        model.load_state_dict(state["model"])
        return model.to(map_location)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class CharTransformerLM(CharLM):
    """Token and position embeddings, `n_layers` transformer blocks, a LayerNorm and a readout.

    Args:
        vocab_size: the number of token ids.
        d_model: the model width.
        n_layers: the number of blocks (applications of the one block when `shared`).
        n_heads: attention heads per block.
        seq_len: the longest input (position embeddings).
        eqprop: which sublayers are EqProp (`"none"`, `"attention"`, `"ffn"`, `"both"`),
            one value for every block or a sequence of `n_layers` values (e.g. EqProp only in
            the last blocks).
        d_ff: the feed-forward width (default `4 d_model`).
        attention: the backprop attention, `"linear"` or `"softmax"`.
        attention_mode: the EqProp attention's mode, `"symmetric"` or `"nonsymmetric"`.
        recurrent_scale: `c` of the EqProp sublayers.
        block_options: passed to every [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock].
        shared: one [`TransformerBlock`][toreq.nn.transformer.TransformerBlock] applied
            `n_layers` times (`x^{(l)} = Block(x^{(l-1)})`, its parameters counted once; `eqprop`
            one value). Each application of an EqProp sublayer relaxes and is nudged on its own, and
            the gradients of the applications add up. Its spectral normalisation runs one power
            iteration per application in training mode, so the applications see weights that
            differ by that iteration's change (none once it has converged, none in eval mode).
        vocab: the characters of token ids `0 .. vocab_size - 1` (a corpus's
            `vocab`: sorted, distinct), for `generate` from a
            string; kept in the `state_dict` (extra state) so that a checkpoint knows it.

    `config` holds the constructor's arguments: `CharTransformerLM(**lm.config)` rebuilds the
    architecture.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, seq_len: int,
                 *, eqprop: str | Sequence[str] = "none", d_ff: int | None = None,
                 attention: str = "linear", attention_mode: str = "symmetric",
                 recurrent_scale: float = 0.5,
                 block_options: Mapping[str, Any] | None = None, shared: bool = False,
                 vocab: str | None = None) -> None:
        for name, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
            _check_positive(name, value)
        super().__init__(vocab_size, seq_len, vocab)
        per_block = [eqprop] * n_layers if isinstance(eqprop, str) else list(eqprop)
        if len(per_block) != n_layers or any(e not in EQPROP_SUBLAYERS for e in per_block):
            raise ValueError(f"eqprop must be one of {EQPROP_SUBLAYERS} or a sequence of "
                             f"n_layers={n_layers} of them, got {eqprop!r}")
        if not isinstance(shared, bool):
            raise ValueError(f"shared must be a bool, got {shared!r}")
        if shared and len(set(per_block)) > 1:
            raise ValueError(f"a shared block has one eqprop value, got {eqprop!r}")
        self.eqprop, self.shared = per_block, shared
        self.config = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                           n_heads=n_heads, seq_len=seq_len, eqprop=eqprop, d_ff=d_ff,
                           attention=attention, attention_mode=attention_mode,
                           recurrent_scale=recurrent_scale,
                           block_options=dict(block_options) if block_options else None,
                           shared=shared)
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, seq_len, d_ff=d_ff, eqprop=e, attention=attention,
                             attention_mode=attention_mode, recurrent_scale=recurrent_scale,
                             block_options=block_options)
            for e in per_block[:1 if shared else n_layers])
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits `(B, T, vocab_size)` for token ids `idx` of shape `(B, T)`."""
        self._check_ids(idx)
        x = self.token(idx) + self.position(torch.arange(idx.shape[1], device=idx.device))
        for layer in range(len(self.eqprop)):
            x = self.blocks[0 if self.shared else layer](x)
        return self.readout(self.norm(x))

    def extra_repr(self) -> str:
        return f"eqprop={self.eqprop}" + (", shared=True" if self.shared else "")


class LoopedMLPLM(CharLM):
    r"""An attention-free LM: each position's logits from its last `context` characters through
    one looped EqProp layer,

    $$
    x_t = [E[\mathrm{idx}_{t-K+1}], \dots, E[\mathrm{idx}_t]], \qquad
    s_t^* = \tanh(U x_t + c W s_t^* + b), \qquad \mathrm{logits}_t = R s_t^* + r,
    $$

    `K = context`, positions before the sequence's start read a learned padding embedding
    (so `logits_t` depends on `idx_{<=t}` only: causal), `W = W^T` (a
    [`HopfieldCell`][toreq.nn.transformer.HopfieldCell], exact EqProp for `U`, `W`, `b` and, through
    `x`, `E`); `R, r` by autograd. The prototype's `looped_mlp` variant. `seq_len` only
    bounds the input (there are no position embeddings).

    Args:
        vocab_size: the number of token ids.
        hidden: the width of the state `s_t`.
        seq_len: the longest input.
        context: `K`, the characters each prediction sees.
        embed_dim: the width of `E`.
        recurrent_scale: `c` in `(0, 1)`.
        block_options: passed to the [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] over
            `BLOCK_DEFAULTS` (not `activation`: the cell is
            tanh).
        vocab: as in [`CharTransformerLM`][toreq.nn.lm.CharTransformerLM].
    """

    def __init__(self, vocab_size: int, hidden: int, seq_len: int, *, context: int = 8,
                 embed_dim: int = 32, recurrent_scale: float = 0.5,
                 block_options: Mapping[str, Any] | None = None, vocab: str | None = None
                 ) -> None:
        for name, value in (("hidden", hidden), ("context", context), ("embed_dim", embed_dim)):
            _check_positive(name, value)
        super().__init__(vocab_size, seq_len, vocab)
        options = {**BLOCK_DEFAULTS, **(block_options or {})}
        if "activation" in options:
            raise ValueError("block_options must not set activation: the looped layer is a tanh "
                             "cell")
        self.context = context
        self.config = dict(vocab_size=vocab_size, hidden=hidden, seq_len=seq_len, context=context,
                           embed_dim=embed_dim, recurrent_scale=recurrent_scale,
                           block_options=dict(block_options) if block_options else None)
        self.token = nn.Embedding(vocab_size + 1, embed_dim)  # row vocab_size: before the text
        self.block = EquilibriumBlock(
            HopfieldCell(hidden, context * embed_dim, recurrent_scale=recurrent_scale), hidden,
            activation="tanh", **options)
        self.readout = nn.Linear(hidden, vocab_size)

    gradient_regime = "exact"

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits `(B, T, vocab_size)` for token ids `idx` of shape `(B, T)`."""
        self._check_ids(idx)
        b, t = idx.shape
        padded = F.pad(idx, (self.context - 1, 0), value=self.vocab_size)
        windows = padded.unfold(1, self.context, 1)  # (B, T, K): idx_{t-K+1..t}
        x = self.token(windows).reshape(b * t, -1)
        return self.readout(self.block(x).view(b, t, -1))

    def extra_repr(self) -> str:
        return f"context={self.context}"


def count_parameters(model: nn.Module) -> int:
    """The number of trainable scalars (each shared tensor once; a parametrized weight counts its
    underlying tensor, e.g. `A` of `W = (A + A^T)/2`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


LM_VARIANTS: dict[str, str] = {
    "backprop": "CharTransformerLM, every sublayer by backprop (the baseline)",
    "full": "CharTransformerLM, attention and feed-forward of every block by EqProp",
    "attention_only": "CharTransformerLM, the attention of every block by EqProp",
    "hybrid": "CharTransformerLM, EqProp in the last half of the blocks (at least one), "
              "backprop before",
    "recurrent_core": "CharTransformerLM, one weight-shared EqProp block applied n_layers times",
    "looped_mlp": "LoopedMLPLM, no attention: the last characters through a looped EqProp layer",
}
"""The prototype's language-model variants ([`build_lm`][toreq.nn.lm.build_lm]), and what each
is."""


def build_lm(variant: str, vocab_size: int, seq_len: int, *, params: int | None = None,
             width: int | None = None, n_layers: int = 3, n_heads: int = 4,
             tolerance: float = 0.05, vocab: str | None = None, **options: Any) -> CharLM:
    """The language model of a [`LM_VARIANTS`][toreq.nn.lm.LM_VARIANTS] variant, of a given width or
    of the trainable parameter count ([`count_parameters`][toreq.nn.lm.count_parameters]) closest to
    `params` that its width allows.

    The width is the transformers' `d_model` (a multiple of `n_heads`;
    `d_ff = 4 d_model`) or [`LoopedMLPLM`][toreq.nn.lm.LoopedMLPLM]'s `hidden` (its `context`
    and `embed_dim` fixed). The count grows with the width, so for `params` a bisection on the
    exact count (of models built and dropped, torch's global generator restored after each) finds
    the closest. Every variant thus gets the same budget: an EqProp sublayer's relaxed state adds a
    `d x d` recurrent weight (the feed-forward's `4d x 4d`), so an EqProp variant is narrower than
    the backprop one of the same count, and `recurrent_core`, whose one block is counted once, is
    wider.

    Args:
        variant: a key of [`LM_VARIANTS`][toreq.nn.lm.LM_VARIANTS].
        vocab_size: the number of token ids.
        seq_len: the longest input.
        params: the target number of trainable parameters (or give `width`).
        width: `d_model` or `hidden` itself (or give `params`).
        n_layers: transformer blocks (applications of the shared block for
            `recurrent_core`); `hybrid` makes the last `max(1, n_layers // 2)` EqProp.
        n_heads: attention heads per block.
        tolerance: the largest relative difference `|count / params - 1|` accepted; a
            `ValueError` when the variant cannot come that close (a budget too small for its
            embeddings, or too coarse a width step).
        vocab: the corpus's characters (see [`CharTransformerLM`][toreq.nn.lm.CharTransformerLM]).
        **options: passed to the model's constructor (`recurrent_scale`, `block_options`,
            `attention`, `attention_mode`; `context`, `embed_dim` for `looped_mlp`).

    Returns:
        the model on the CPU, initialised from torch's global generator.
    """
    if variant not in LM_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(LM_VARIANTS)}, got {variant!r}")
    if (params is None) == (width is None):
        raise ValueError(f"give one of params and width, got params={params!r}, width={width!r}")
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads)):
        _check_positive(name, value)
    if variant == "looped_mlp":
        step = 1

        def make(width: int) -> CharLM:
            return LoopedMLPLM(vocab_size, width, seq_len, vocab=vocab, **options)
    else:
        step = n_heads
        last = max(1, n_layers // 2)
        eqprop = {"backprop": "none", "full": "both", "attention_only": "attention",
                  "hybrid": ["none"] * (n_layers - last) + ["both"] * last,
                  "recurrent_core": "both"}[variant]

        def make(width: int) -> CharLM:
            return CharTransformerLM(vocab_size, width, n_layers, n_heads, seq_len,
                                     eqprop=eqprop, shared=variant == "recurrent_core",
                                     vocab=vocab, **options)

    if width is not None:
        return make(width)
    _check_positive("params", params)

    @functools.cache
    def count(k: int) -> int:
        with torch.random.fork_rng(devices=[]):  # the search leaves the generator as it was
            return count_parameters(make(k * step))

    low, high = 1, 2  # the smallest k with count(k) >= params lies in [low, high]
    while count(high) < params:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < params else (low, middle)
    best = min((low, high), key=lambda k: abs(count(k) - params))
    achieved = count(best)
    if abs(achieved / params - 1.0) > tolerance:
        raise ValueError(f"{variant} cannot have params={params:,} within tolerance={tolerance}: "
                         f"the closest width, {best * step}, gives {achieved:,}")
    return make(best * step)

def perplexity(model: nn.Module, ids: Tensor, seq_len: int, batch_size: int = 64) -> float:
    """`exp` of the mean next-token cross-entropy over consecutive non-overlapping windows of
    `ids` (1-D), in eval mode (the model's mode is restored):
    [`evaluate_lm`][toreq.nn.lm.evaluate_lm]'s `"perplexity"`."""
    return evaluate_lm(model, ids, seq_len, batch_size)["perplexity"]


@torch.no_grad()
def evaluate_lm(model: nn.Module, ids: Tensor, seq_len: int, batch_size: int = 64
                ) -> dict[str, float]:
    r"""A language model's measures on `ids` (1-D), over the `N` targets of its consecutive
    non-overlapping windows of `seq_len` tokens, in eval mode (the model's mode is restored):

    $$
    \mathrm{CE} = -\frac{1}{N} \sum_t \log p(y_t), \quad
    \mathrm{perplexity} = e^{\mathrm{CE}}, \quad
    \mathrm{bits\_per\_char} = \mathrm{CE} / \ln 2, \quad
    \mathrm{accuracy} = \frac{1}{N} \sum_t
    [\operatorname{argmax}_i \mathrm{logits}_{t,i} = y_t].
    $$

    """
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"ids must have more than seq_len={seq_len} tokens, got {ids.numel()}")
    inputs = ids[:n * seq_len].view(n, seq_len)
    targets = ids[1:n * seq_len + 1].view(n, seq_len)
    training = model.training
    model.eval()
    try:
        total, correct = 0.0, 0
        for i in range(0, n, batch_size):
            logits = model(inputs[i:i + batch_size]).flatten(0, 1)
            y = targets[i:i + batch_size].flatten()
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
    finally:
        model.train(training)
    mean = total / (n * seq_len)
    return {"perplexity": math.exp(mean), "accuracy": correct / (n * seq_len),
            "bits_per_char": mean / math.log(2)}


def unigram_perplexity(train_ids: Tensor, eval_ids: Tensor, vocab_size: int) -> float:
    """The perplexity on `eval_ids` of the character frequencies of `train_ids` (add-one
    smoothed): `exp(-mean_t log p(eval_t))`, the bar a language model must beat."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return math.exp(-float(log_p[eval_ids].mean()))
