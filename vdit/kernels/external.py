"""Attention kernels vdit does not own, behind vdit's varlen call: PyTorch's ``varlen_attn`` and
flash-attn's ``flash_attn_varlen_func`` (FlashAttention-3 from ``flash_attn_interface`` if installed,
else FlashAttention-2 from ``flash_attn``).

Both take vdit's packed layout as it is: q (total_q, Hq, D), k / v (total_k, Hk, D), int32 cu_seqlens,
bottom-right aligned causal masks, grouped-query heads, and return lse (Hq, total_q) in float32. Both
are differentiable on their own (their backward is their own kernel), so a forward run here is never
paired with another family's backward. Both size their launch grids from ``max_seqlen``; the ops layer
checks it (eagerly, or with a device-side assertion under torch.compile) before calling them.

Nothing here is importable without CUDA builds of the packages, and nothing runs on a CPU; the
availability functions say why a kernel cannot be used, for :func:`vdit.plan`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch


@functools.lru_cache(maxsize=None)
def torch_varlen_missing() -> str | None:
    """Why ``torch.nn.attention.varlen.varlen_attn`` cannot be used, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (added in 2.9)"
    return None


@functools.lru_cache(maxsize=None)
def flash_attn_version() -> int | None:
    """3 when FlashAttention-3 (``flash_attn_interface``) imports, 2 for ``flash_attn``, else None."""
    for module, version in (("flash_attn_interface", 3), ("flash_attn", 2)):
        if importlib.util.find_spec(module) is None:
            continue
        try:
            importlib.import_module(module)
        except Exception:  # installed but built for another torch / CUDA: not usable
            continue
        return version
    return None


def torch_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float, causal: bool):
    """(out, lse) of :func:`torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 in-tree, cuDNN on
    sm_90 / sm_100 for fp16 / bf16 without GQA)."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       return_aux=AuxRequest(lse=True), scale=softmax_scale,
                       window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])


def flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float, causal: bool, deterministic: bool):
    """(out, lse) of flash-attn's ``flash_attn_varlen_func`` (version :func:`flash_attn_version`)."""
    module = importlib.import_module("flash_attn_interface" if flash_attn_version() == 3 else "flash_attn")
    result = module.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                                           return_attn_probs=True)
    # FA2 returns (out, lse, probs); FA3 releases return (out, lse) or (out, lse, ...).
    return result[0], result[1]
