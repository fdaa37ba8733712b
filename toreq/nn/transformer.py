r"""Transformer blocks whose attention and/or feed-forward sublayers are equilibrium blocks.

Every block is pre-LayerNorm with residuals, for an input `x` of shape `(B, T, d)`:

$$
x \leftarrow x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad
x \leftarrow x + \mathrm{FFN}(\mathrm{LN}_2(x)),
$$

and [`TransformerBlock`][toreq.nn.transformer.TransformerBlock] chooses, per sublayer, the backprop
version or the EqProp one (`eqprop="none" | "attention" | "ffn" | "both"`). The EqProp sublayers are
[`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] s: relaxed without a graph, their gradients
from the nudged phases (`EQPROP-MATH.md` section 5), never by backprop through the relaxation; the
rest of the network (embeddings, LayerNorms, residuals, readout) is ordinary autograd, so
`loss.backward()` works on any mix.

Linear attention (Katharopoulos et al. 2020), per head, with the feature map
`phi(z) = elu(z) + 1 > 0`; causal (`causal=True`, for language models: `J_t = {j <= t}`)
or bidirectional (`causal=False`, e.g. over image patches: `J_t = {1..T}`):

$$
a_t = \frac{\sum_{j \in J_t} (\phi(q_t)^\top \phi(k_j))\, v_j}
           {\sum_{j \in J_t} \phi(q_t)^\top \phi(k_j)}
    = \frac{\phi(q_t)^\top S_t}{\phi(q_t)^\top z_t}, \quad
S_t = \sum_{j \in J_t} \phi(k_j) v_j^\top, \ z_t = \sum_{j \in J_t} \phi(k_j).
$$

Without the mask `S_t = S` and `z_t = z` are the same for every position. Softmax attention
(`kind="softmax"`) is available to the backprop sublayers, with the same `causal` switch.

The two EqProp attention modes ([`EqPropAttention`][toreq.nn.transformer.EqPropAttention]):

* `"symmetric"` (energy-based, tied; EqProp exact as beta -> 0). A causal coupling between
    positions is lower-triangular in time and can never be symmetric, and attention's Jacobian is
    not symmetric even without the mask, so the token mixing enters as a *drive*: `a = Attn(u)`
    is computed once from the sublayer input `u`, and a Hopfield state per position relaxes
    under it,

    $$
    s_t \leftarrow \tanh(h_t), \qquad h_t = a_t + c\, W s_t + b, \qquad
    W = W^\top,
    $$

    the fixed point of the energy `E(s) = sum_t [ sum_i int_0^{s_ti} atanh - c/2 s_t^T W s_t
    - (a_t + b)^T s_t ]`. `dh/ds = I_T (x) c W` is symmetric, so the nudged phases give the exact
    adjoint `v` of the pre-activation, and every gradient below it (`W`, `b`, and through
    `a` the attention's projections, and the input) is $v^\top \partial h / \partial(\cdot)$: exact
    up to $O(\beta^2)$ with symmetric nudging. The positions are independent given `a`, so the
    block's state is one position's `s_t` (the sequence is flattened to `(B*T, d)`) and each
    converges on its own.
* `"nonsymmetric"` (vector-field EqProp, approximate). The attention reads the state itself,
    so the positions are mixed inside the dynamics:

    $$
    s \leftarrow \tanh(h), \qquad h = \mathrm{Attn}(u + c\, s) + b,
    $$

    with the whole sequence `s` of shape `(T, d)` as the block's state. Causal: inputs shorter
    than `seq_len` are padded at the end with zeros, which causality keeps from reaching the real
    positions; bidirectional: every position reads every other, so the input must have exactly
    `seq_len` positions. `dh/ds` is untied (and block lower-triangular when causal), so EqProp
    replaces the adjoint's $(I - J^\top)^{-1}$ by $(I - J)^{-1}$: an approximation, which in the
  causal case sends the error signal of a position forward in time as well as back.
  Contraction is not guaranteed either (`c` and damping keep it in practice;
  `last_converged` reports it). Since a sequence stops relaxing only when all its positions
  have converged, in the causal case an earlier position's state depends on later tokens up to
  the tolerance `tol` (exactly causal with `tol=0`).

The EqProp feed-forward sublayer ([`EqPropFeedForward`][toreq.nn.transformer.EqPropFeedForward]) is
the looped MLP per position, $s_t \leftarrow \tanh(U u_t + c W s_t + b)$ with $W = W^\top$ and the
output `R s_t* + r`: exact as in the symmetric attention. Both symmetric cells are
[`HopfieldCell`][toreq.nn.transformer.HopfieldCell]; their $W$ is $(A + A^\top)/2$ normalised to
spectral norm 1 ([`symmetric`][toreq.utils.symmetric], [`spectral_norm`][toreq.utils.spectral_norm])
and scaled by `c = recurrent_scale < 1`, so with tanh (slope <= 1) the relaxation contracts with
rate at most `c`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toreq import utils
from toreq.nn.block import EquilibriumBlock

__all__ = [
    "EqPropAttention", "EqPropFeedForward", "FeedForward", "HopfieldCell", "SelfAttention",
    "TransformerBlock", "linear_attention",
]

EQPROP_SUBLAYERS = ("none", "attention", "ffn", "both")
ATTENTION_MODES = ("symmetric", "nonsymmetric")
ATTENTION_KINDS = ("linear", "softmax")
# what the EqProp sublayers pass to EquilibriumBlock unless block_options say otherwise
BLOCK_DEFAULTS: dict[str, Any] = dict(max_steps=30, tol=1e-4, beta=0.05)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """Linear attention of `(..., T, d_head)` queries, keys and values (module docstring),
    causal or bidirectional.

    Causal: the masked product `tril(phi(q) phi(k)^T) v` normalised by its row sums, the same
    numbers as the cumulative-sum recurrence `S_t, z_t`, in O(T^2 d) time and O(T^2) memory,
    cheaper than the recurrence's O(T d^2) memory for the sequence lengths used here.
    Bidirectional: `phi(q) S / (phi(q) z)` with the shared `S = phi(k)^T v`, `z = sum_j
    phi(k_j)`, in O(T d^2) time.
    """
    fq, fk = F.elu(q) + 1.0, F.elu(k) + 1.0
    if not causal:
        return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(dim=-2).unsqueeze(-1))
    t = q.shape[-2]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = (fq @ fk.transpose(-1, -2)).masked_fill(~mask, 0.0)
    return (scores @ v) / scores.sum(dim=-1, keepdim=True)


class SelfAttention(nn.Module):
    """Multi-head self-attention `O concat_h attend(Q_h u, K_h u, V_h u)`, `u` of shape
    `(B, T, d_model)`: `kind="linear"` ([`linear_attention`][toreq.nn.transformer.linear_attention])
    or `"softmax"` (scaled dot-product); causal (position `t` reads `j <= t`) or, with
    `causal=False`, bidirectional (every position reads every position)."""

    def __init__(self, d_model: int, n_heads: int, kind: str = "linear",
                 causal: bool = True) -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.kind, self.causal = n_heads, kind, bool(causal)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, u: Tensor) -> Tensor:
        b, t, d = u.shape
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in self.qkv(u).chunk(3, dim=-1))
        if self.kind == "linear":
            heads = linear_attention(q, k, v, self.causal)
        else:
            heads = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(heads.transpose(1, 2).reshape(b, t, d))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, kind={self.kind!r}, causal={self.causal}"


class FeedForward(nn.Module):
    """The backprop feed-forward sublayer `R gelu(U u + b) + r` per position."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)

    def forward(self, u: Tensor) -> Tensor:
        return self.out(F.gelu(self.hidden(u)))


class HopfieldCell(nn.Module):
    r"""The pre-activation `h(x, s) = U x + c W s + b` (`U = I` when `input_dim` is None),
    $W = (A + A^\top)/2$ at spectral norm 1, $c$ = `recurrent_scale`. Use it with
    `activation="tanh"`: `dh/ds = c W` is symmetric and EqProp is exact."""

    def __init__(self, state_dim: int, input_dim: int | None = None, *,
                 recurrent_scale: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < recurrent_scale < 1.0:
            raise ValueError(f"recurrent_scale must be in (0, 1), got {recurrent_scale!r}")
        self.input = None if input_dim is None else nn.Linear(input_dim, state_dim, bias=False)
        self.recurrent = utils.spectral_norm(utils.symmetric(
            nn.Linear(state_dim, state_dim, bias=False)))
        self.bias = nn.Parameter(torch.zeros(state_dim))
        self.recurrent_scale = recurrent_scale

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        drive = x if self.input is None else self.input(x)
        return drive + self.recurrent_scale * self.recurrent(s) + self.bias


def _equilibrium(cell: nn.Module, state_shape: int | tuple[int, ...],
                 block_options: Mapping[str, Any] | None) -> EquilibriumBlock:
    options = {**BLOCK_DEFAULTS, **(block_options or {})}
    if "activation" in options:
        raise ValueError("block_options must not set activation: the transformer's EqProp "
                         "sublayers are tanh cells")
    return EquilibriumBlock(cell, state_shape, activation="tanh", **options)


class _AttentionCell(nn.Module):
    """The non-symmetric attention cell `h(u, s) = Attn(u + c s) + b` on whole sequences."""

    def __init__(self, d_model: int, n_heads: int, recurrent_scale: float, causal: bool) -> None:
        super().__init__()
        self.attention = SelfAttention(d_model, n_heads, "linear", causal)
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.recurrent_scale = recurrent_scale

    def forward(self, u: Tensor, s: Tensor) -> Tensor:
        return self.attention(u + self.recurrent_scale * s) + self.bias


class EqPropAttention(nn.Module):
    """The linear-attention sublayer (causal or bidirectional) as an equilibrium block trained by
    EqProp.

    `mode="symmetric"`: `s* = fixed point of s_t <- tanh(a_t + c W s_t + b)` with the drive
    `a = Attn(u)` (exact EqProp); `mode="nonsymmetric"`: `s* = fixed point of
    s <- tanh(Attn(u + c s) + b)` over the whole sequence (approximate). The output is `s*`
    of shape `(B, T, d_model)`. See the module docstring for the equations and what is exact.

    Args:
        d_model: the width of `u` and of the state.
        n_heads: attention heads.
        seq_len: the longest sequence (the non-symmetric mode's state is `(seq_len, d_model)`).
        mode: `"symmetric"` or `"nonsymmetric"`.
        recurrent_scale: `c`, in `(0, 1)`.
        block_options: passed to [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock]
            (`max_steps`, `tol`, `beta`, `symmetric`, `damping`, `solver`, `gradient`, ...).
        causal: position `t` attends to `j <= t` only; `False`: to every position (the
            non-symmetric mode then needs inputs of exactly `seq_len` positions).
    """

    def __init__(self, d_model: int, n_heads: int, seq_len: int, *, mode: str = "symmetric",
                 recurrent_scale: float = 0.5,
                 block_options: Mapping[str, Any] | None = None, causal: bool = True) -> None:
        super().__init__()
        if mode not in ATTENTION_MODES:
            raise ValueError(f"mode must be one of {ATTENTION_MODES}, got {mode!r}")
        self.mode, self.seq_len, self.causal = mode, seq_len, bool(causal)
        if mode == "symmetric":
            self.drive = SelfAttention(d_model, n_heads, "linear", causal)
            self.block = _equilibrium(HopfieldCell(d_model, recurrent_scale=recurrent_scale),
                                      d_model, block_options)
        else:
            if not 0.0 < recurrent_scale < 1.0:
                raise ValueError(f"recurrent_scale must be in (0, 1), got {recurrent_scale!r}")
            self.drive = None
            self.block = _equilibrium(_AttentionCell(d_model, n_heads, recurrent_scale, causal),
                                      (seq_len, d_model), block_options)

    @property
    def gradient_regime(self) -> str:
        r"""`"exact"` where EqProp's gradient equals backprop's as $\beta \to 0$, else
        `"approximate"`."""
        return "exact" if self.mode == "symmetric" else "approximate"

    def forward(self, u: Tensor) -> Tensor:
        b, t, d = u.shape
        if self.drive is not None:
            return self.block(self.drive(u).reshape(b * t, d)).view(b, t, d)
        if t > self.seq_len:
            raise ValueError(f"the sequence has {t} positions, more than seq_len={self.seq_len}")
        if not self.causal and t != self.seq_len:
            # bidirectional attention would read the padding: no padding trick here
            raise ValueError(f"the non-symmetric bidirectional (causal=False) attention needs "
                             f"exactly seq_len={self.seq_len} positions, got {t}")
        padded = F.pad(u, (0, 0, 0, self.seq_len - t))  # future positions: causality ignores them
        return self.block(padded)[:, :t]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, seq_len={self.seq_len}, causal={self.causal}"


class EqPropFeedForward(nn.Module):
    r"""The feed-forward sublayer as a looped equilibrium block per position, trained by EqProp:

    $$
    s_t^* = \tanh(U u_t + c W s_t^* + b), \qquad \mathrm{out}_t = R s_t^* + r,
    $$

    `W = W^T` (exact EqProp for `U`, `W`, `b` and the input); `R, r` by autograd.
    `block_options` as in [`EqPropAttention`][toreq.nn.transformer.EqPropAttention].
    """

    def __init__(self, d_model: int, d_ff: int, *, recurrent_scale: float = 0.5,
                 block_options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.block = _equilibrium(HopfieldCell(d_ff, d_model, recurrent_scale=recurrent_scale),
                                  d_ff, block_options)
        self.out = nn.Linear(d_ff, d_model)

    gradient_regime = "exact"

    def forward(self, u: Tensor) -> Tensor:
        b, t, d = u.shape
        return self.out(self.block(u.reshape(b * t, d)).view(b, t, -1))


class TransformerBlock(nn.Module):
    r"""A pre-LayerNorm transformer block whose sublayers are backprop or EqProp.

    $$
    x \leftarrow x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad
    x \leftarrow x + \mathrm{FFN}(\mathrm{LN}_2(x))
    $$

    Args:
        d_model: the model width.
        n_heads: attention heads.
        seq_len: the longest sequence.
        d_ff: the feed-forward width (default `4 d_model`).
        eqprop: which sublayers are EqProp: `"none"`, `"attention"`, `"ffn"` or `"both"`.
        attention: the backprop attention, `"linear"` or `"softmax"`.
        attention_mode: the EqProp attention's mode, `"symmetric"` or `"nonsymmetric"`.
        recurrent_scale: `c` of the EqProp sublayers.
        block_options: passed to every [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock].
        causal: causal attention (language models); `False`: bidirectional (e.g. patches).
    """

    def __init__(self, d_model: int, n_heads: int, seq_len: int, *, d_ff: int | None = None,
                 eqprop: str = "none", attention: str = "linear",
                 attention_mode: str = "symmetric", recurrent_scale: float = 0.5,
                 block_options: Mapping[str, Any] | None = None, causal: bool = True) -> None:
        super().__init__()
        if eqprop not in EQPROP_SUBLAYERS:
            raise ValueError(f"eqprop must be one of {EQPROP_SUBLAYERS}, got {eqprop!r}")
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.eqprop = eqprop
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        if eqprop in ("attention", "both"):
            self.attention: nn.Module = EqPropAttention(
                d_model, n_heads, seq_len, mode=attention_mode, recurrent_scale=recurrent_scale,
                block_options=block_options, causal=causal)
        else:
            self.attention = SelfAttention(d_model, n_heads, attention, causal)
        if eqprop in ("ffn", "both"):
            self.ffn: nn.Module = EqPropFeedForward(
                d_model, d_ff, recurrent_scale=recurrent_scale, block_options=block_options)
        else:
            self.ffn = FeedForward(d_model, d_ff)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))

    def extra_repr(self) -> str:
        return f"eqprop={self.eqprop!r}"
