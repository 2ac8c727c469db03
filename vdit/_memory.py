"""Allocation of kernel outputs, with optional NaN poisoning for tests.

When poisoning is on, every output a vdit kernel allocates starts filled with NaN (integers: the
int32 maximum), so an element the kernel forgets to write fails the comparison with the reference.
The flag is shared with the compiled kernels.
"""
from __future__ import annotations

import contextlib

import torch

from vdit._extension import _C

_poison = False


def set_poison_outputs(on: bool) -> None:
    """Turn NaN-poisoning of new kernel outputs on or off (all backends)."""
    global _poison
    _poison = bool(on)
    if _C is not None:
        _C.set_poison_outputs(_poison)


@contextlib.contextmanager
def poison_outputs(on: bool = True):
    """Context manager form of :func:`set_poison_outputs`."""
    previous = _poison
    set_poison_outputs(on)
    try:
        yield
    finally:
        set_poison_outputs(previous)


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor while poisoning is on."""
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(torch.int32).max
    return torch.full(shape, fill, dtype=dtype, device=device)
