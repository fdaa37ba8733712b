"""Which device types have a compiled kernel for each op (the rest use the references)."""

from __future__ import annotations

import torch

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# Asked of the dispatcher once, at import, rather than from torch.cuda.is_available(): a CUDA
# machine can run a CPU-only build of toreq, and then CUDA tensors take the reference path.
# A plain table also keeps the wrappers traceable by torch.compile.
_KERNELS = {
    (op, device_type): torch._C._dispatch_has_kernel_for_dispatch_key(f"toreq::{op}", key)
    for op in ("relax", "hebbian_update", "hebbian_update_", "max_pool2d")
    for device_type, key in _DISPATCH_KEYS.items()
}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.toreq.<op>`` has a compiled kernel for ``device_type``."""
    return _KERNELS.get((op, device_type), False)
