r"""The contrastive Hebbian update: `torch.ops.toreq.hebbian_update`.

From the activities of two phases, a nudged one (strength $\beta_a$) and a reference one
(the free phase, $\beta_b = 0$, or the $-\beta$ phase of symmetric nudging), with
$\beta = \beta_a - \beta_b$ and batch size $B$:

$$
\nabla W = -\frac{1}{\beta B} \left( \rho(S_{post}^{a})^\top \rho(S_{pre}^{a})
                                    - \rho(S_{post}^{b})^\top \rho(S_{pre}^{b}) \right),
\qquad
\nabla b = -\frac{1}{\beta B} \sum_{batch} \left( \rho(s_{post}^{a})
                                                  - \rho(s_{post}^{b}) \right),
$$

the rows of `S` being the batch's activities. The sign is that of `.grad` (descent), so any
`torch.optim` optimizer steps on it. This is:

* the energy-based (tied) update of Scellier & Bengio 2017 for a weight between two layers of
  states: `post`/`pre` are the two layers in each phase. It holds both directions of a tied
  weight (the product rule of the difference); with symmetric nudging pass the $+\beta$ and
  $-\beta$ phases and $2\beta$ as `beta`;
* the vector-field update of a looped or untied layer, $\nabla W = v^\top s_{pre} / B$ with
  $v = -(s^a - s^b)/\beta$: pass the *same* tensor (the free equilibrium) as `pre_nudged`
  and `pre_free`; the op then uses one GEMM over `B` rows instead of `2B`.

`rho` is chosen per side (`post_activation`, `pre_activation`): `"identity"` (the
default, for states that are already activities), `"hard_sigmoid"`, `"tanh"` or
`"sigmoid"` (for states kept as pre-activations). Both products are formed in a single GEMM.

Dtypes: float32, float64, float16 and bfloat16 (activations in float32, the GEMM with float32
accumulation). Under `torch.autocast` the update is computed in float32 (in `grad_weight`'s
dtype when accumulating), as the gradient of float32 parameters. The update is itself a
gradient and records no graph: the wrapper detaches its inputs, and the ops called directly
with an input that requires grad (grad mode on) raise `RuntimeError: ... hebbian_update builds
no graph; use toreq.ops.hebbian_update or an estimator`.
"""

from __future__ import annotations


import torch
from torch import Tensor

from toreq.ops._dispatch import has_kernel
from toreq.ops.relax import activate

__all__ = ["hebbian_update", "hebbian_update_reference"]


def hebbian_update(
    post_nudged: Tensor,
    pre_nudged: Tensor,
    post_free: Tensor,
    pre_free: Tensor,
    beta: float,
    *,
    post_activation: str = "identity",
    pre_activation: str = "identity",
    grad_weight: Tensor | None = None,
    grad_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Weight and bias gradients of one coupling from two phases (see the module docstring).

    Args:
        post_nudged: `(batch, n_post)` activities of the nudged phase.
        pre_nudged: `(batch, n_pre)` activities of the nudged phase.
        post_free: `(batch, n_post)` activities of the reference phase (free, or `-beta`).
        pre_free: `(batch, n_pre)` activities of the reference phase.
        beta: the nudging strength of the nudged phase minus that of the reference phase;
            `1 / (beta * batch)` must fit the inputs' dtype (a ValueError says so).
        post_activation: the activation applied to the post side.
        pre_activation: the activation applied to the pre side.
        grad_weight: when given, the update is *added* to it in place, e.g. into
            `weight.grad`. NaN or Inf in the activities propagate into the update, as in any
            matrix product.
        grad_bias: with `grad_weight`, the bias update is added to it in place.

    Returns:
        `(grad_weight, grad_bias)`: new tensors of shapes `(n_post, n_pre)` and
            `(n_post,)`, or the accumulated ones that were passed in.
    """
    tensors = [t.detach() for t in (post_nudged, pre_nudged, post_free, pre_free)]
    if grad_bias is not None and grad_weight is None:
        raise ValueError("toreq.hebbian_update: grad_bias was given without grad_weight; pass "
                         "both to accumulate in place, or neither for new tensors")
    if pre_free is pre_nudged:  # keep the identity the single-GEMM path looks for
        tensors[3] = tensors[1]
    use_kernel = has_kernel("hebbian_update", tensors[0].device.type)
    if grad_weight is None:
        if not use_kernel:
            return hebbian_update_reference(*tensors, beta, post_activation=post_activation,
                                            pre_activation=pre_activation)
        return torch.ops.toreq.hebbian_update(*tensors, beta, post_activation, pre_activation)
    if use_kernel:
        torch.ops.toreq.hebbian_update_(*tensors, beta, post_activation, pre_activation,
                                        grad_weight, grad_bias)
    else:
        update_w, update_b = hebbian_update_reference(
            *tensors, beta, post_activation=post_activation, pre_activation=pre_activation)
        grad_weight.add_(update_w)
        if grad_bias is not None:
            grad_bias.add_(update_b)
    return grad_weight, grad_bias


def hebbian_update_reference(
    post_nudged: Tensor,
    pre_nudged: Tensor,
    post_free: Tensor,
    pre_free: Tensor,
    beta: float,
    *,
    post_activation: str = "identity",
    pre_activation: str = "identity",
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch reference of [`hebbian_update`][toreq.ops.hebbian.hebbian_update] (two products,
    as written)."""
    with torch.no_grad():
        scale = -1.0 / (beta * post_nudged.shape[0])
        post_a = activate(post_activation, post_nudged)
        post_b = activate(post_activation, post_free)
        product_a = post_a.T @ activate(pre_activation, pre_nudged)
        product_b = post_b.T @ activate(pre_activation, pre_free)
        return scale * (product_a - product_b), scale * (post_a - post_b).sum(dim=0)


@torch.library.register_fake("toreq::hebbian_update")
def _hebbian_update_fake(post_nudged, pre_nudged, post_free, pre_free, beta,
                         post_activation="identity", pre_activation="identity"):
    torch._check(post_nudged.dim() == 2 and pre_nudged.dim() == 2,
                 lambda: "toreq.hebbian_update: inputs must be 2-D (batch, features)")
    n_post, n_pre = post_nudged.shape[1], pre_nudged.shape[1]
    return post_nudged.new_empty((n_post, n_pre)), post_nudged.new_empty((n_post,))


@torch.library.register_fake("toreq::hebbian_update_")
def _hebbian_update_inplace_fake(post_nudged, pre_nudged, post_free, pre_free, beta,
                                 post_activation, pre_activation, grad_weight, grad_bias):
    return None
