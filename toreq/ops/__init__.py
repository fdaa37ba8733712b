"""toreq's operators: typed wrappers of `torch.ops.toreq.*` and their PyTorch references.

* [`relax`][toreq.ops.relax.relax] relaxes a layered equilibrium network (free or nudged phase);
* [`hebbian_update`][toreq.ops.hebbian.hebbian_update] turns two phases into weight and bias
  gradients;
* [`iterate`][toreq.ops.iteration.iterate] is the one Python fixed-point loop (the op's reference,
  every solver);
* [`max_pool2d`][toreq.ops.pool.max_pool2d] max-pools with the argmax (ConvEP's pooling).
"""

from toreq.ops.hebbian import hebbian_update, hebbian_update_reference
from toreq.ops.iteration import Accelerator, RelaxResult, iterate
from toreq.ops.pool import max_pool2d, max_pool2d_reference
from toreq.ops.relax import (
    Coupling,
    activate,
    iterate_per_sample,
    labels_to_rows,
    layered_couplings,
    relax,
    relax_reference,
    relax_step,
)

__all__ = [
    "Accelerator",
    "Coupling",
    "RelaxResult",
    "activate",
    "hebbian_update",
    "hebbian_update_reference",
    "iterate",
    "iterate_per_sample",
    "labels_to_rows",
    "layered_couplings",
    "max_pool2d",
    "max_pool2d_reference",
    "relax",
    "relax_reference",
    "relax_step",
]
