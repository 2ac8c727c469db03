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


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> int:
    """Validate packed-sequence offsets and return the batch size B.

    ``cu`` must be an int32 (B + 1,) tensor on ``device``, start at 0, never decrease and end at
    ``total``. The value checks read ``cu`` on the host (one small copy); under torch.compile they
    are skipped so the graph stays whole.
    """
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with B + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tensors it describes are on {device}")
    if not torch.compiler.is_compiling():
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must be non-decreasing, got {values}")
        if values[-1] != total:
            raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {values[-1]}")
    return cu.numel() - 1


def max_seqlen_of(name: str, cu: torch.Tensor, max_seqlen) -> int:
    """``max_seqlen`` checked against ``cu`` (or computed from it when None; that syncs)."""
    if max_seqlen is not None and torch.compiler.is_compiling():
        return max_seqlen
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if max_seqlen is None:
        return longest
    if not isinstance(max_seqlen, int):
        raise TypeError(f"{name} must be an int or None, got {type(max_seqlen).__name__}")
    if max_seqlen < longest:
        raise ValueError(f"{name} = {max_seqlen} is smaller than the longest sequence ({longest})")
    return max_seqlen
