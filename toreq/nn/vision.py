r"""A vision transformer over image patches whose transformer sublayers are trained by EqProp.

[`PatchTransformer`][toreq.nn.vision.PatchTransformer] classifies images `x` of shape `(B, C, H, W)`
(or flattened to `(B, C*H*W)`, as [`ClassificationData`][toreq.data.ClassificationData] holds them).
With the patch size `p` the image is cut into `T = (H/p) (W/p)` non-overlapping patches `x_t` of
`C p^2` pixels each (row-major over the patch grid), and

$$
z^{(0)}_t = E\, x_t + e + P_t, \qquad z^{(l)} = \mathrm{Block}_l(z^{(l-1)}),
\qquad \mathrm{logits} = R\, \frac{1}{T} \sum_t \mathrm{LN}(z^{(L)}_t) + r,
$$

with `n_layers` pre-LayerNorm [`TransformerBlock`][toreq.nn.transformer.TransformerBlock] s whose
attention is bidirectional (`causal=False`: every patch attends to every patch).

What is EqProp and what is autograd. With `eqprop="both"` (the default) every sublayer of
every block is an [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock]: the attention sublayer (a
Hopfield state per patch driven by linear attention, or the non-symmetric cell) and the feed-forward
sublayer (a looped tanh Hopfield layer per patch). Their parameters' gradients, and the gradients
they pass down to their inputs, come from their nudged phases (`EQPROP-MATH.md` section 5), never
from backprop through the relaxation: each block's EqProp vector `v` (the pre-activation's
adjoint) is pushed through one step of its cell, $v^\top \partial h / \partial(\cdot)$. In the
symmetric attention the block's input is the drive `a = Attn(u)`, computed once outside the
relaxation, so its projections `Q, K, V, O` get the block's input gradient `v` carried by autograd
through that one (non-iterative) attention. The patch embedding `E, e`, the position embedding `P`,
the LayerNorms, the residual additions, the feed-forward read-out `R_ffn` and the classifier
`R, r` are ordinary autograd. `loss.backward()` therefore runs both: autograd
carries `dL/dz` down through the readout, pooling and residuals, and each equilibrium
sublayer turns the `dL/ds*` it receives into gradients by EqProp. With
`attention_mode="symmetric"` (default) every EqProp sublayer is exact as $\beta \to 0$.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from toreq.nn.block import EquilibriumBlock
from toreq.nn.transformer import EQPROP_SUBLAYERS, TransformerBlock

__all__ = ["PatchTransformer"]


class PatchTransformer(nn.Module):
    """Patch embedding, `n_layers` bidirectional transformer blocks, LayerNorm, mean over the
    patches and a linear classifier (module docstring for the equations).

    Args:
        image_shape: `(C, H, W)` of the images; `H` and `W` divisible by `patch_size`.
        num_classes: the number of classes (logits).
        patch_size: `p`, the side of the square non-overlapping patches.
        d_model: the model width.
        n_layers: the number of blocks.
        n_heads: attention heads per block (dividing `d_model`).
        eqprop: which sublayers are EqProp, `"none"`, `"attention"`, `"ffn"` or
            `"both"` (default: every sublayer), one value for every block or a sequence of
            `n_layers` values.
        d_ff: the feed-forward width (default `4 d_model`).
        attention: the backprop attention, `"linear"` or `"softmax"`.
        attention_mode: the EqProp attention's mode, `"symmetric"` (exact) or
            `"nonsymmetric"` (approximate).
        recurrent_scale: `c` of the EqProp sublayers, in `(0, 1)`.
        block_options: passed to every [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock]
            (`max_steps`, `tol`, `beta`, ...; defaults `BLOCK_DEFAULTS`).

    `config` holds the constructor's arguments: `PatchTransformer(**model.config)` rebuilds
    the architecture.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, patch_size: int,
                 d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 eqprop: str | Sequence[str] = "both", d_ff: int | None = None,
                 attention: str = "linear", attention_mode: str = "symmetric",
                 recurrent_scale: float = 0.5,
                 block_options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        shape = tuple(image_shape) if isinstance(image_shape, Sequence) else ()
        if len(shape) != 3 or not all(_positive_int(n) for n in shape):
            raise ValueError(f"image_shape must be (C, H, W) of positive ints, got "
                             f"{image_shape!r}")
        for name, value in (("num_classes", num_classes), ("patch_size", patch_size),
                            ("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
            if not _positive_int(value):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        c, h, w = shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide the image's height {h} and "
                             f"width {w}")
        per_block = [eqprop] * n_layers if isinstance(eqprop, str) else list(eqprop)
        if len(per_block) != n_layers or any(e not in EQPROP_SUBLAYERS for e in per_block):
            raise ValueError(f"eqprop must be one of {EQPROP_SUBLAYERS} or a sequence of "
                             f"n_layers={n_layers} of them, got {eqprop!r}")
        self.image_shape, self.patch_size, self.eqprop = shape, patch_size, per_block
        self.num_patches = (h // patch_size) * (w // patch_size)
        self.config = dict(image_shape=shape, num_classes=num_classes, patch_size=patch_size,
                           d_model=d_model, n_layers=n_layers, n_heads=n_heads, eqprop=eqprop,
                           d_ff=d_ff, attention=attention, attention_mode=attention_mode,
                           recurrent_scale=recurrent_scale,
                           block_options=dict(block_options) if block_options else None)
        self.embed = nn.Linear(c * patch_size * patch_size, d_model)
        self.position = nn.Parameter(torch.randn(self.num_patches, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, self.num_patches, d_ff=d_ff, eqprop=e,
                             attention=attention, attention_mode=attention_mode,
                             recurrent_scale=recurrent_scale, block_options=block_options,
                             causal=False)
            for e in per_block)
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, num_classes)

    def patches(self, x: Tensor) -> Tensor:
        """The patches `(B, T, C p^2)` of images `(B, C, H, W)` or `(B, C*H*W)`, in
        row-major order over the patch grid, each flattened in `(C, p, p)` order."""
        c, h, w = self.image_shape
        flat = math.prod(self.image_shape)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor of images, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if not ((x.dim() == 4 and tuple(x.shape[1:]) == self.image_shape)
                or (x.dim() == 2 and x.shape[1] == flat)):
            raise ValueError(f"x must have shape (batch, {c}, {h}, {w}) or (batch, {flat}), "
                             f"got {tuple(x.shape)}")
        p = self.patch_size
        grid = x.reshape(x.shape[0], c, h // p, p, w // p, p)
        return grid.permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], self.num_patches, c * p * p)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits `(B, num_classes)` for images `(B, C, H, W)` or `(B, C*H*W)`."""
        z = self.embed(self.patches(x)) + self.position
        for block in self.blocks:
            z = block(z)
        return self.readout(self.norm(z).mean(dim=1))

    def equilibrium_blocks(self) -> list[EquilibriumBlock]:
        """The EqProp sublayers' [`EquilibriumBlock`][toreq.nn.block.EquilibriumBlock] s (their
        `last_steps`, `last_converged` describe the latest relaxation)."""
        return [m for m in self.modules() if isinstance(m, EquilibriumBlock)]

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, patch_size={self.patch_size}, "
                f"num_patches={self.num_patches}, eqprop={self.eqprop}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
