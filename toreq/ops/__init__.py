"""toreq's operators: typed wrappers of ``torch.ops.toreq.*`` and their PyTorch references.

* :func:`relax` relaxes a layered equilibrium network (free or nudged phase);
* :func:`hebbian_update` turns two phases into weight and bias gradients.
"""

from toreq.ops.hebbian import hebbian_update, hebbian_update_reference
from toreq.ops.relax import (
    Coupling,
    RelaxResult,
    iterate_per_sample,
    layered_couplings,
    relax,
    relax_reference,
    relax_step,
)

__all__ = [
    "Coupling",
    "RelaxResult",
    "hebbian_update",
    "hebbian_update_reference",
    "iterate_per_sample",
    "layered_couplings",
    "relax",
    "relax_reference",
    "relax_step",
]
