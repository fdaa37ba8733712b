"""Which device types have a compiled kernel for an op (the rest use the references)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.toreq.<op>`` has a kernel for ``device_type`` ("cpu", "cuda", ...).

    Asks the dispatcher rather than ``torch.cuda.is_available()``: a CUDA machine can run a
    CPU-only build of toreq, and then the CUDA tensors take the reference path.
    """
    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type, device_type.upper())
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"toreq::{op}", key)
    except RuntimeError:  # an unknown dispatch key name
        return False
