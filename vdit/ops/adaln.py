"""adaln_modulate (LayerNorm + per-sample shift/scale) and gated_residual (x + gate * y), over packed
or dense tokens.

Kernels: none yet on this branch; every backend request resolves to the ``torch`` reference.
"""
from __future__ import annotations

import torch

from vdit.backends import select_backend
from vdit.ops import reference
from vdit.ops._validation import check_cu_seqlens, check_like, check_tensor

KERNELS: tuple[str, ...] = ()


def _check_tokens_and_params(x, cu_seqlens, params: dict) -> None:
    check_tensor("x", x, ndim=2 if cu_seqlens is not None else 3, floating=True, nonempty=False)
    batch = (check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device) if cu_seqlens is not None
             else x.shape[0])
    for name, p in params.items():
        check_tensor(name, p, ndim=2, floating=True)
        check_like(name, p, "x", x)
        if p.shape != (batch, x.shape[-1]):
            raise ValueError(f"{name} must be ({batch}, {x.shape[-1]}) (one row per sample), got {tuple(p.shape)}")


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                   *, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[s]) + shift[s]`` (LayerNorm without affine, statistics in fp32).

    Args:
        x: (total, C) packed with ``cu_seqlens`` int32 (B + 1,), or (B, N, C) with cu_seqlens None.
        shift, scale: (B, C), same dtype and device as x; s is the sample of each token.
    Returns:
        Tensor like x.
    """
    _check_tokens_and_params(x, cu_seqlens, {"shift": shift, "scale": scale})
    select_backend("adaln_modulate", KERNELS, x.device, backend)
    return reference.adaln_modulate(x, shift, scale, cu_seqlens, eps=eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                   *, backend: str = "auto") -> torch.Tensor:
    """``x + gate[s] * y``.

    Args:
        x, y: (total, C) packed with ``cu_seqlens`` or (B, N, C); gate: (B, C).
    Returns:
        Tensor like x.
    """
    _check_tokens_and_params(x, cu_seqlens, {"gate": gate})
    check_like("y", y, "x", x)
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    select_backend("gated_residual", KERNELS, x.device, backend)
    return reference.gated_residual(x, y, gate, cu_seqlens)
