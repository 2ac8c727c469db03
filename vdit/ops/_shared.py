"""Small pure-PyTorch helpers that the oracle (:mod:`vdit.ops.reference`) and production code both use,
so that production code never imports the oracle: the compute dtype, packed-token segment ids and the
RoPE angles."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["compute_dtype", "rope_3d_angles", "segment_ids"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype vdit computes in for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64 index of the sequence each packed token belongs to, from int (B + 1,) ``cu_seqlens``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


def rope_3d_angles(positions: torch.Tensor, dims: Sequence[int], theta: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Rotation angles of each axis chunk.

    Args:
        positions: (..., 3) int or float (t, h, w) coordinates.
        dims: (dt, dh, dw) even channel counts.
    Returns:
        Three tensors (..., d/2) of ``pos[..., a] * theta ** (-2j / d)``, j = 0 .. d/2 - 1, in ``dtype``.
    """
    angles = []
    for axis, d in enumerate(dims):
        inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)
        angles.append(positions[..., axis].to(dtype)[..., None] * inv_freq.to(dtype))
    return angles
