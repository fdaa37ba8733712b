"""Argument validators shared by every layer: one message format, naming the argument.

Each returns the (normalised) value or raises `ValueError`/`TypeError` with
`"<name> must be <what is accepted>, got <value>"`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "check_batch", "check_batched_input", "check_choice", "check_class_labels", "check_finite_float",
    "check_fraction", "check_layer_sizes", "check_nonnegative_float", "check_optimizer_covers",
    "check_positive_float", "check_positive_int", "check_nonnegative_int", "refuse_unknown",
]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """An int >= 1 (or None when `allow_none`)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """An int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def check_finite_float(name: str, value: Any) -> float:
    """Any finite real number."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """A finite real number > 0."""
    if not _is_real(value) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def check_nonnegative_float(name: str, value: Any) -> float:
    """A finite real number >= 0."""
    if not _is_real(value) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A real number in `[0, 1)` (damping: the weight the old state keeps)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def refuse_unknown(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Raises `TypeError` naming every setting of `given` that is not in `known`: a
    misspelt setting is an error, never silently ignored."""
    known = set(known)
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{what}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                        f"accepted: {', '.join(sorted(known))}")


def check_layer_sizes(model: str, **sizes: Any) -> None:
    """Every size given is a positive int, or a non-empty sequence of positive ints (one per
    layer): a width of 0 or no hidden layer at all builds a model that trains to chance."""
    for name, value in sizes.items():
        if isinstance(value, (list, tuple)):
            if not value or not all(_is_int(v) and v >= 1 for v in value):
                raise ValueError(f"{model}: {name} must list at least one layer, each a "
                                 f"positive int, got {list(value)!r}")
        elif not _is_int(value) or value < 1:
            raise ValueError(f"{model}: {name} must be a positive int, got {value!r}")


def check_batched_input(model: str, x: Any, features: int | None = None) -> None:
    """`x` is a floating-point batch `(batch, ...)` (with `features` in its last dimension
    when given). A single unbatched sample would otherwise be read as a batch of scalars."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model}: x must be a torch.Tensor of shape (batch, ...), got "
                        f"{type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{model}: x must be a floating-point tensor, got {x.dtype}; convert it "
                        "with x.float()")
    if x.dim() < 2 or (features is not None and x.shape[-1] != features):
        expected = f"(batch, {features})" if features is not None else "(batch, ...)"
        hint = "; for one sample, pass x.unsqueeze(0)" if x.dim() == 1 else ""
        raise ValueError(f"{model}: x must be a batch of shape {expected}, got shape "
                         f"{tuple(x.shape)}{hint}")


def check_class_labels(y: Any, batch: int, num_classes: int | None = None) -> None:
    """`y` holds one integer class index per sample: shape `(batch,)`, an integer dtype,
    values in `[0, num_classes)` when given (float labels and one-hot targets are refused)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        kind = "one-hot targets" if y.dim() == 2 else f"{y.dtype} labels"
        raise TypeError(f"y must hold integer class indices (torch.long) of shape ({batch},), "
                        f"got {kind} of shape {tuple(y.shape)}; use y.argmax(1) for one-hot "
                        "targets, y.long() for whole-number floats")
    if y.shape != (batch,):
        raise ValueError(f"y must hold one class index per sample, shape ({batch},), got shape "
                         f"{tuple(y.shape)}")
    if num_classes is not None and y.numel() and not (0 <= int(y.min()) and
                                                      int(y.max()) < num_classes):
        raise ValueError(f"y must hold class indices in [0, {num_classes}), got values from "
                         f"{int(y.min())} to {int(y.max())}")


def check_optimizer_covers(optimizer: Any, model: torch.nn.Module) -> None:
    """`optimizer` updates at least one of `model`'s trainable parameters; otherwise training
    would compute gradients and change nothing."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
    if trainable and not trainable & held:
        raise ValueError(f"optimizer holds none of the {type(model).__name__}'s parameters, so "
                         "training would not change the model; build it from "
                         "model.parameters() of this model")


def check_batch(model: str, x: Any, y: Any) -> None:
    """A training or evaluation batch: `x` batched
    ([`check_batched_input`][toreq.validation.check_batched_input]) and `y` one class index per
    sample ([`check_class_labels`][toreq.validation.check_class_labels])."""
    check_batched_input(model, x)
    check_class_labels(y, x.shape[0])
