"""Varlen self- and cross-attention modules over packed tokens (dense input with a padding mask too)."""
from __future__ import annotations

import torch
from torch import nn

from vdit.ops import varlen_attention
from vdit.packing import cu_seqlens_from_lengths


def _qk_norm(kind: str | None, head_dim: int) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    raise ValueError(f"qk_norm must be 'rms', 'layer' or None, got {kind!r}")


def _pack_dense(x: torch.Tensor, mask: torch.Tensor | None, name: str = "key_padding_mask"):
    """(B, N, C) + optional (B, N) keep-mask -> packed (total, C), cu_seqlens, max_seqlen, keep index."""
    B, N, _ = x.shape
    if mask is None:
        return x.reshape(B * N, -1), cu_seqlens_from_lengths([N] * B, x.device), N, None
    if mask.shape != (B, N) or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool ({B}, {N}) tensor (True = real token), got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    lengths = mask.sum(1).tolist()
    keep = mask.reshape(-1).nonzero().squeeze(1)
    return x.reshape(B * N, -1)[keep], cu_seqlens_from_lengths(lengths, x.device), max(lengths), keep


def _unpack_dense(y: torch.Tensor, shape, keep):
    """Scatter packed outputs back to (B, N, C); padded positions get zeros."""
    B, N = shape[:2]
    if keep is None:
        return y.reshape(B, N, -1)
    out = y.new_zeros(B * N, y.shape[-1])
    out[keep] = y
    return out.reshape(B, N, -1)


class VarlenSelfAttention(nn.Module):
    """Multi-head self-attention within each packed sequence, with optional QK-norm and 3D RoPE.

    Args:
        dim: model width; heads: query heads; kv_heads: key/value heads (grouped-query; default heads).
        qk_norm: ``"rms"``, ``"layer"`` or None, per head before RoPE; bias: on the projections.

    ``forward(x, cu_seqlens, max_seqlen=None, positions=None, rope=None)``: x (total, dim) packed, cu_seqlens
    int32 (B + 1,), positions (total, 3) and a :class:`~vdit.nn.RotaryEmbedding3d` -> (total, dim).
    ``forward(x, key_padding_mask=mask)`` with x (B, N, dim) and mask bool (B, N) (True = real token)
    packs internally and returns (B, N, dim) with zeros at padded positions.
    With ``sequence_parallel=SequenceParallel(group, mode)``, x and positions are this rank's contract
    shard of the packed batch while cu_seqlens describe the whole batch (see :mod:`vdit.distributed`).
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, qk_norm: str | None = "rms",
                 bias: bool = True):
        super().__init__()
        kv_heads = kv_heads or heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim ({dim}) must divide by heads ({heads}) and heads by kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=bias)
        self.q_norm, self.k_norm = _qk_norm(qk_norm, self.head_dim), _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, cu_seqlens=None, max_seqlen=None, positions=None, rope=None, *, key_padding_mask=None,
                sequence_parallel=None):
        if x.dim() == 3:
            if positions is not None or rope is not None:
                raise ValueError("dense input takes no positions/rope; pack it first")
            packed, cu, max_len, keep = _pack_dense(x, key_padding_mask)
            return _unpack_dense(self.forward(packed, cu, max_len), x.shape, keep)
        q, k, v = self.project(x, positions, rope)
        out, extra = self.attend(q, k, v, cu_seqlens, max_seqlen, sequence_parallel=sequence_parallel)
        return self.output(x, out, extra)

    def attend(self, q, k, v, cu_seqlens, max_seqlen=None, *, grids=None, sequence_parallel=None):
        """The attention core of :meth:`forward` on :meth:`project`'s q, k, v: ``(out, None)``, out (total,
        heads, head_dim) (this rank's shard with ``sequence_parallel``; ``grids`` is for tile-sparse subclasses).
        Every collective of sequence parallelism runs here, none in :meth:`project` or :meth:`output`, so a
        caller can recompute those two in the backward without repeating communication."""
        attend = varlen_attention if sequence_parallel is None else sequence_parallel.attention
        return attend(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen), None

    def output(self, x: torch.Tensor, out: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(total, dim): the output projection of :meth:`attend`'s ``out`` (total, heads, head_dim); ``x`` is the
        module's input and ``extra`` the second value :meth:`attend` returned (both unused here)."""
        return self.proj(out.reshape(out.shape[0], -1))

    def project(self, x: torch.Tensor, positions=None, rope=None):
        """q (total, heads, head_dim), k and v (total, kv_heads, head_dim) of packed x (total, dim):
        projections, QK-norm and RoPE (the norm fused into the rotation when it is an RMSNorm)."""
        total = x.shape[0]
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = q.reshape(total, self.heads, self.head_dim)
        k = k.reshape(total, self.kv_heads, self.head_dim)
        v = v.reshape(total, self.kv_heads, self.head_dim)
        fuse_norm = rope is not None and isinstance(self.q_norm, nn.RMSNorm)
        if not fuse_norm:
            q = self.q_norm(q) if self.q_norm is not None else q
            k = self.k_norm(k) if self.k_norm is not None else k
        if rope is not None:
            if positions is None:
                raise ValueError("rope needs positions (total, 3)")
            norms = (self.q_norm.weight, self.k_norm.weight) if fuse_norm else (None, None)
            q, k = rope(q, k, positions, *norms, eps=self.q_norm.eps if fuse_norm else 1e-6)
        return q, k, v


class VarlenCrossAttention(nn.Module):
    """Multi-head attention from each packed sequence to its own packed context (e.g. text tokens).

    Args:
        dim: model width; context_dim: width of the context tokens; heads: attention heads.

    ``forward(x, cu_seqlens, context, cu_seqlens_context, max_seqlen=None, max_seqlen_context=None)``:
    x (total, dim), context (total_ctx, context_dim), both int32 (B + 1,) offsets -> (total, dim).
    ``forward(x, context=context, key_padding_mask=None, context_mask=None)`` with dense x (B, N, dim)
    and context (B, M, context_dim), masks bool (B, N) / (B, M) (True = real token), packs internally
    and returns (B, N, dim) with zeros at padded positions of x.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, *, qk_norm: str | None = "rms", bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must divide by heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.q_norm, self.k_norm = _qk_norm(qk_norm, self.head_dim), _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, cu_seqlens=None, context=None, cu_seqlens_context=None, max_seqlen=None,
                max_seqlen_context=None, *, key_padding_mask=None, context_mask=None):
        if x.dim() == 3:
            if context is None or context.dim() != 3 or context.shape[0] != x.shape[0]:
                raise ValueError("dense x (B, N, dim) needs a dense context (B, M, context_dim)")
            packed, cu, max_len, keep = _pack_dense(x, key_padding_mask)
            ctx, cu_ctx, max_ctx, _ = _pack_dense(context, context_mask, "context_mask")
            return _unpack_dense(self.forward(packed, cu, ctx, cu_ctx, max_len, max_ctx), x.shape, keep)
        if cu_seqlens is None or context is None or cu_seqlens_context is None:
            raise ValueError("packed x needs cu_seqlens, context and cu_seqlens_context")
        q = self.q(x).reshape(x.shape[0], self.heads, self.head_dim)
        k, v = self.kv(context).reshape(context.shape[0], 2, self.heads, self.head_dim).unbind(1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens_context, max_seqlen, max_seqlen_context)
        return self.proj(out.reshape(x.shape[0], -1))
