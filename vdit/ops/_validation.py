"""Input checks shared by the public ops. Each raises TypeError (wrong type / dtype) or ValueError
(wrong shape, value or device) naming the offending argument, before any kernel launch."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from vdit._cache import TensorCache

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


@dataclasses.dataclass(frozen=True)
class _Offsets:
    """What the checks need from a cu_seqlens tensor's values, read on the host once per tensor version."""

    first: int
    last: int
    longest: int
    decreasing_at: tuple | None  # the values, if they ever decrease (for the message)


def _summarize(cu: torch.Tensor) -> _Offsets:
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    return _Offsets(values[0], values[-1], max(lengths, default=0),
                    tuple(values) if any(n < 0 for n in lengths) else None)


# Eager calls that reuse a packing (every layer of a model, every sampling step) read each cu_seqlens
# tensor on the host once, not once per call.
_OFFSETS = TensorCache(size=64, per_offsets_pair=2)


def offsets_summary(cu: torch.Tensor) -> _Offsets:
    return _OFFSETS.get((cu,), "offsets", lambda: _summarize(cu))


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> int:
    """Validate packed-sequence offsets and return the batch size B.

    ``cu`` must be an int32 (B + 1,) tensor on ``device``, start at 0, never decrease and end at
    ``total``. In eager mode the values are read on the host once per tensor version (cached). Under
    torch.compile the graph must stay whole, so the same conditions become one device-side assertion
    (``torch._assert_async``): a bad tensor raises when the graph runs instead of reaching a kernel.
    """
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with B + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tensors it describes are on {device}")
    if torch.compiler.is_compiling():
        ok = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
        torch._assert_async(ok, f"{name} must start at 0, be non-decreasing and end at {total}")
        return cu.numel() - 1
    summary = offsets_summary(cu)
    if summary.first != 0:
        raise ValueError(f"{name} must start at 0, got {summary.first}")
    if summary.decreasing_at is not None:
        raise ValueError(f"{name} must be non-decreasing, got {list(summary.decreasing_at)}")
    if summary.last != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {summary.last}")
    return cu.numel() - 1


def max_seqlen_of(name: str, cu: torch.Tensor, max_seqlen) -> int:
    """``max_seqlen`` checked against ``cu`` (or computed from it when None).

    Under torch.compile a given ``max_seqlen`` is checked by a device-side assertion (kernels that size
    their launch from it would otherwise leave output rows unwritten); None there reads ``cu`` on the host.
    """
    if max_seqlen is not None and not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int or None, got {type(max_seqlen).__name__}")
    if torch.compiler.is_compiling():
        if max_seqlen is None:
            return int((cu[1:] - cu[:-1]).max())
        torch._assert_async((cu[1:] - cu[:-1]).max() <= max_seqlen,
                            f"{name} is smaller than the longest sequence")
        return max_seqlen
    longest = offsets_summary(cu).longest
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"{name} = {max_seqlen} is smaller than the longest sequence ({longest})")
    return max_seqlen


def check_qkv(q, k, v) -> None:
    """q (total_q, Hq, D), k and v (total_k, Hk, D) of one float dtype and device, Hq % Hk == 0, D >= 1."""
    check_tensor("q", q, ndim=3, floating=True, nonempty=False)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, floating=True, nonempty=False)
        check_like(name, t, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q has head dim {q.shape[2]} but k has {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError(f"q must have a head dim >= 1, got shape {tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` for None, else a positive finite float."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")
    return float(softmax_scale)
