r"""Max pooling with its argmax: `torch.ops.toreq.max_pool2d`.

For `z` of shape `(B, C, H, W)` and windows of `p x p` pixels at stride `p` (no padding; the rows
and columns past the last whole window are dropped):

$$
v_{bc,ij} = \max_{(u, w) \in \mathrm{window}(i, j)} z_{bc,uw}, \qquad
k_{bc,ij} = u^* W + w^*,
$$

`(u*, w*)` the window's largest element: the first in row-major order on ties, a NaN wherever
the window holds one. These are `F.max_pool2d(z, p, return_indices=True)`'s values and indices
(the reference), so `F.max_unpool2d` puts a layer's feedback at the argmax. It is ConvEP's
pooling: the relaxation pools every convolutional layer at every step, and on the CPU ATen's
general kernel (padding, dilation, ceil mode) spent about half of a ConvEP training step there.

On the CPU the kernel beats ATen's at ConvEP's shapes on one and two threads (1.3x to 3.5x at
batch 128, 16 to 128 channels; `benchmarks/bench_ops.py`, its section 5).

Autograd: the values' gradient goes to the argmax (`F.max_unpool2d`), as `F.max_pool2d`'s does.
The wrapper calls the reference instead while `torch.compile` or `torch.export` traces, so that
exported programs stay plain ATen (ONNX has no `toreq::max_pool2d`), and under `torch.func`
transforms (`jvp`, `vmap`: the Lipschitz diagnostics), which an op's registered autograd does
not support.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toreq.ops._dispatch import has_kernel

__all__ = ["max_pool2d", "max_pool2d_reference"]


def max_pool2d(z: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """`(values, indices)` of `size x size` max pooling at stride `size` (see the module
    docstring); `z` is `(B, C, H, W)` with `H, W >= size`."""
    if (has_kernel("max_pool2d", z.device.type) and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(z)):
        return torch.ops.toreq.max_pool2d(z, size)
    return max_pool2d_reference(z, size)


def max_pool2d_reference(z: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch reference of [`max_pool2d`][toreq.ops.pool.max_pool2d]."""
    return F.max_pool2d(z, size, return_indices=True)


@torch.library.register_fake("toreq::max_pool2d")
def _max_pool2d_fake(input, size):
    torch._check(input.dim() == 4, lambda: "toreq.max_pool2d: input must be 4-D")
    shape = (input.shape[0], input.shape[1], input.shape[2] // size, input.shape[3] // size)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.long)


def _setup_context(ctx, inputs, output):
    z, size = inputs
    ctx.size, ctx.shape = size, z.shape[-2:]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_values, grad_indices):
    (indices,) = ctx.saved_tensors
    return F.max_unpool2d(grad_values, indices, ctx.size, output_size=ctx.shape), None


torch.library.register_autograd("toreq::max_pool2d", _backward, setup_context=_setup_context)
