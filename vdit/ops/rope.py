"""rope_3d / rope_3d_qk: 3D (t, h, w) rotary position embedding, optionally with fused QK RMSNorm.

Kernels: none yet on this branch; every backend request resolves to the ``torch`` reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vdit.backends import select_backend
from vdit.ops import reference
from vdit.ops._validation import check_like, check_tensor

KERNELS: tuple[str, ...] = ()


def check_rope_args(name: str, x: torch.Tensor, positions: torch.Tensor, dims: Sequence[int]) -> tuple[int, int, int]:
    """Validate one rotated tensor, its positions and the axis split; returns dims as a tuple."""
    check_tensor(name, x, ndim=(3, 4), floating=True)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in (torch.int32, torch.int64, torch.float32, torch.float64):
        raise TypeError(f"positions must be int32, int64, float32 or float64, got {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(f"positions is on {positions.device} but {name} is on {x.device}")
    tokens = x.shape[:-2]  # (total,) or (B, L)
    if positions.shape not in ((*tokens, 3), (tokens[-1], 3)):
        want = f"({tokens[0]}, 3)" if len(tokens) == 1 else f"({tokens[1]}, 3) or ({tokens[0]}, {tokens[1]}, 3)"
        raise ValueError(f"positions must have shape {want} for {name} of shape {tuple(x.shape)}, "
                         f"got {tuple(positions.shape)}")
    try:
        dims = tuple(int(d) for d in dims)
    except TypeError:
        raise TypeError(f"dims must be a sequence of 3 ints, got {dims!r}") from None
    if len(dims) != 3 or any(d < 0 or d % 2 for d in dims):
        raise ValueError(f"dims must be 3 non-negative even ints (dt, dh, dw), got {dims}")
    if sum(dims) > x.shape[-1]:
        raise ValueError(f"dims {dims} sum to {sum(dims)}, more than the head dim {x.shape[-1]} of {name}")
    return dims


def rope_3d(x: torch.Tensor, positions: torch.Tensor, *, dims: Sequence[int], theta: float = 10000.0,
            interleaved: bool = True, backend: str = "auto") -> torch.Tensor:
    """Rotate the channels of ``x`` by 3D positions (see :func:`vdit.ops.reference.rope_3d`).

    Args:
        x: (total, H, Dh) packed or (B, L, H, Dh) dense, float.
        positions: (total, 3) / (L, 3) or (B, L, 3), int32/int64/float32/float64 (t, h, w).
        dims: (dt, dh, dw), even, sum <= Dh; remaining channels pass through.
        theta: frequency base; interleaved: pairs (2j, 2j+1) if True else (j, j + d/2) per chunk.
    Returns:
        Tensor like x.
    """
    dims = check_rope_args("x", x, positions, dims)
    select_backend("rope_3d", KERNELS, x.device, backend)
    return reference.rope_3d(x, positions, dims=dims, theta=theta, interleaved=interleaved)


def rope_3d_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, dims: Sequence[int],
               theta: float = 10000.0, interleaved: bool = True, q_norm_weight: torch.Tensor | None = None,
               k_norm_weight: torch.Tensor | None = None, norm: str = "rms", eps: float = 1e-6,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k with the same positions, optionally RMS-normalizing each head first.

    Args:
        q: (total, Hq, Dh) or (B, L, Hq, Dh); k: (total, Hk, Dh) or (B, L, Hk, Dh), same dtype/device.
        positions, dims, theta, interleaved: as :func:`rope_3d`.
        q_norm_weight, k_norm_weight: optional (Dh,) RMSNorm weights (QK-norm before rotating).
        norm: only ``"rms"`` is supported.
    Returns:
        (q_rotated, k_rotated).
    """
    dims = check_rope_args("q", q, positions, dims)
    check_rope_args("k", k, positions, dims)
    check_like("k", k, "q", q)
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} except in the head count")
    if norm != "rms":
        raise ValueError(f"norm must be 'rms', got {norm!r}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            check_tensor(name, w, ndim=1, floating=True)
            if w.shape[0] != q.shape[-1] or w.device != q.device:
                raise ValueError(f"{name} must be ({q.shape[-1]},) on {q.device}, got {tuple(w.shape)} on {w.device}")
    select_backend("rope_3d_qk", KERNELS, q.device, backend)
    return reference.rope_3d_qk(q, k, positions, dims=dims, theta=theta, interleaved=interleaved,
                                q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps)
