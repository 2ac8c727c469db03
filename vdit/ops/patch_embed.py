"""patch_embed_3d (Conv3d with stride = kernel as one fused op) and patch_unembed_3d (final linear +
unpatchify), dense and packed.

Kernels: none yet on this branch; every backend request resolves to the ``torch`` reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vdit.backends import select_backend
from vdit.ops import reference
from vdit.ops._validation import check_cu_seqlens, check_divides, check_like, check_tensor, check_triple

KERNELS: tuple[str, ...] = ()


def _check_weight(weight, bias, ref_name, ref, *, embed: bool):
    check_tensor("weight", weight, ndim=5 if embed else 2, floating=True)
    check_like("weight", weight, ref_name, ref)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        check_like("bias", bias, ref_name, ref)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} output features")


def patch_embed_3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str = "auto") -> torch.Tensor:
    """Fused 3D patch embedding.

    Args:
        x: (B, C, T, H, W) float.
        weight: (D, C, pt, ph, pw), an ``nn.Conv3d`` weight; the patch size is ``weight.shape[2:]`` and
            must divide (T, H, W).
        bias: (D,) or None; same dtype and device as x.
    Returns:
        (B, N, D) == ``F.conv3d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)``.
    """
    check_tensor("x", x, ndim=5, floating=True)
    _check_weight(weight, bias, "x", x, embed=True)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels but x has {x.shape[1]}")
    check_divides("patch size weight.shape[2:]", weight.shape[2:], "(T, H, W) of x", x.shape[2:])
    select_backend("patch_embed_3d", KERNELS, x.device, backend)
    return reference.patch_embed_3d(x, weight, bias)


def patch_embed_3d_varlen(videos: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None,
                          *, backend: str = "auto"):
    """Patch embedding of videos of different sizes into one packed token sequence.

    Args:
        videos: non-empty list of B tensors (C, Ti, Hi, Wi), same C, dtype and device; the patch size
            ``weight.shape[2:]`` must divide each (Ti, Hi, Wi).
        weight: (D, C, pt, ph, pw); bias: (D,) or None.
    Returns:
        tokens (total, D), cu_seqlens int32 (B + 1,), grids int32 (B, 3) of (Ti/pt, Hi/ph, Wi/pw).
    """
    if not isinstance(videos, (list, tuple)) or len(videos) == 0:
        raise ValueError("videos must be a non-empty list of (C, T, H, W) tensors")
    for i, v in enumerate(videos):
        check_tensor(f"videos[{i}]", v, ndim=4, floating=True)
        check_like(f"videos[{i}]", v, "videos[0]", videos[0])
        if v.shape[0] != videos[0].shape[0]:
            raise ValueError(f"videos[{i}] has {v.shape[0]} channels but videos[0] has {videos[0].shape[0]}")
        check_divides("patch size weight.shape[2:]", weight.shape[2:], f"(T, H, W) of videos[{i}]", v.shape[1:])
    _check_weight(weight, bias, "videos[0]", videos[0], embed=True)
    if weight.shape[1] != videos[0].shape[0]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels but the videos have {videos[0].shape[0]}")
    select_backend("patch_embed_3d_varlen", KERNELS, videos[0].device, backend)
    return reference.patch_embed_3d_varlen(videos, weight, bias)


def patch_unembed_3d(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     grid: Sequence[int], patch_size: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """Final projection + unpatchify for dense tokens.

    Args:
        tokens: (B, N, D) float, N = Tp*Hp*Wp.
        weight: (C*pt*ph*pw, D), an ``nn.Linear(D, C*pt*ph*pw)`` weight; bias: (C*pt*ph*pw,) or None.
        grid: (Tp, Hp, Wp); patch_size: (pt, ph, pw).
    Returns:
        (B, C, Tp*pt, Hp*ph, Wp*pw).
    """
    check_tensor("tokens", tokens, ndim=3, floating=True)
    grid, patch = check_triple("grid", grid), check_triple("patch_size", patch_size)
    _check_unembed(tokens, weight, bias, patch)
    if tokens.shape[1] != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"tokens has N = {tokens.shape[1]} tokens but grid {grid} holds {grid[0] * grid[1] * grid[2]}")
    select_backend("patch_unembed_3d", KERNELS, tokens.device, backend)
    return reference.patch_unembed_3d(tokens, weight, bias, grid, patch)


def patch_unembed_3d_varlen(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            cu_seqlens: torch.Tensor, grids: torch.Tensor, patch_size: Sequence[int], *,
                            backend: str = "auto") -> list[torch.Tensor]:
    """Final projection + unpatchify for packed tokens.

    Args:
        tokens: (total, D); cu_seqlens: int32 (B + 1,); grids: int (B, 3) with Tp*Hp*Wp = each length.
        weight, bias, patch_size: as :func:`patch_unembed_3d`.
    Returns:
        list of B videos (C, Ti, Hi, Wi).
    """
    check_tensor("tokens", tokens, ndim=2, floating=True)
    patch = check_triple("patch_size", patch_size)
    _check_unembed(tokens, weight, bias, patch)
    B = check_cu_seqlens("cu_seqlens", cu_seqlens, tokens.shape[0], tokens.device)
    if not isinstance(grids, torch.Tensor) or grids.shape != (B, 3):
        raise ValueError(f"grids must be a ({B}, 3) tensor matching cu_seqlens")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    for i, ((tp, hp, wp), n) in enumerate(zip(grids.tolist(), lengths)):
        if tp * hp * wp != n:
            raise ValueError(f"grids[{i}] = {(tp, hp, wp)} holds {tp * hp * wp} tokens but sequence {i} has {n}")
    select_backend("patch_unembed_3d_varlen", KERNELS, tokens.device, backend)
    return reference.patch_unembed_3d_varlen(tokens, weight, bias, cu_seqlens, grids, patch)


def _check_unembed(tokens, weight, bias, patch):
    _check_weight(weight, bias, "tokens", tokens, embed=False)
    if weight.shape[1] != tokens.shape[-1]:
        raise ValueError(f"weight expects {weight.shape[1]} input features but tokens have {tokens.shape[-1]}")
    volume = patch[0] * patch[1] * patch[2]
    if weight.shape[0] % volume:
        raise ValueError(f"weight has {weight.shape[0]} output features, not a multiple of the patch volume {volume}")
