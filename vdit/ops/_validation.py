"""Input checks shared by the public ops. Each raises TypeError (wrong type / dtype) or ValueError
(wrong shape, value or device) naming the offending argument, before any kernel launch."""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, floating: bool = False,
                 nonempty: bool = True) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank(s), optionally floating point and non-empty."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must share ``ref``'s dtype and device."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_triple(name: str, value) -> tuple[int, int, int]:
    """A sequence of 3 positive ints (a patch size or a grid)."""
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 ints, got {value!r}") from None
    if len(items) != 3 or not all(isinstance(v, int) or (isinstance(v, torch.SymInt)) for v in items):
        raise TypeError(f"{name} must be a sequence of 3 ints, got {value!r}")
    if any(v <= 0 for v in items):
        raise ValueError(f"{name} must be positive, got {items}")
    return items


def check_divides(patch_name: str, patch: Sequence[int], sizes_name: str, sizes: Sequence[int]) -> None:
    """Each patch entry must divide the matching size."""
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"{patch_name} {tuple(patch)} must divide {sizes_name} {tuple(sizes)}")
