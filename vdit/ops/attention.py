"""varlen_attention: attention over packed variable-length sequences (FlashAttention varlen API).

Kernels: none yet on this branch; every backend request resolves to the ``torch`` reference.
"""
from __future__ import annotations

import torch

from vdit.backends import select_backend
from vdit.ops import reference
from vdit.ops._validation import check_cu_seqlens, check_like, check_tensor, max_seqlen_of

KERNELS: tuple[str, ...] = ()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                     *, softmax_scale: float | None = None, causal: bool = False,
                     backend: str = "auto") -> torch.Tensor:
    """Attention of each packed query sequence to its own packed key/value sequence.

    Same argument order as ``flash_attn_varlen_func``.

    Args:
        q: (total_q, Hq, Dh); k, v: (total_k, Hk, Dh), Hq % Hk == 0 (grouped-query attention: query head
            h uses key/value head h // (Hq / Hk)). Same float dtype and device.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) offsets; sequence i is q[cu_q[i]:cu_q[i+1]] against
            k, v[cu_k[i]:cu_k[i+1]]. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: longest sequence lengths (computed when None).
        softmax_scale: scale of q @ k^T, default Dh ** -0.5.
        causal: mask aligned to the bottom-right corner; a query that sees no key outputs 0.
    Returns:
        (total_q, Hq, Dh) like q.
    """
    check_tensor("q", q, ndim=3, floating=True, nonempty=False)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, floating=True, nonempty=False)
        check_like(name, t, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q has head dim {q.shape[2]} but k has {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    batch_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    batch_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if batch_q != batch_k:
        raise ValueError(f"cu_seqlens_q describes {batch_q} sequences but cu_seqlens_k describes {batch_k}")
    max_seqlen_q = max_seqlen_of("max_seqlen_q", cu_seqlens_q, max_seqlen_q)
    max_seqlen_k = max_seqlen_of("max_seqlen_k", cu_seqlens_k, max_seqlen_k)
    select_backend("varlen_attention", KERNELS, q.device, backend)
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale=softmax_scale, causal=causal)
