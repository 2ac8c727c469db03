"""sequence_parallel_attention: varlen attention over a packed batch sharded across ranks."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from vdit._cache import TensorCache
from vdit.distributed.ring import BatchPlan, RingAttention
from vdit.distributed.sharding import check_consistent, check_shard_sizes, replicated, shard_bounds, shard_sizes, world
from vdit.distributed.ulysses import HeadsToTokens, TokensToHeads, head_chunk
from vdit.ops import varlen_attention

MODES = ("ulysses", "ring", "hybrid")


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How a model splits its packed tokens: the process group, the scheme and the Ulysses size (hybrid)."""

    group: object = None
    mode: str = "ulysses"
    ulysses_size: int | None = None
    subgroups: tuple | None = None  # hybrid: this rank's (Ulysses group, ring group), made up front
    layout: str = "tokens"  # how the tokens are split over the ranks (vdit.distributed.sharding)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, **kwargs):
        return sequence_parallel_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           group=self.group, mode=self.mode, ulysses_size=self.ulysses_size,
                                           subgroups=self.subgroups, layout=self.layout, **kwargs)

    def sparse_attention(self, pattern, q, k, v, cu_seqlens, grids, *, path=None, coarse=None):
        """Tile-sparse self-attention of this rank's shard (:func:`vdit.distributed.sparse.sparse_attention`):
        returns (out, coarse output or None), each (n_r, Hq, D)."""
        from vdit.distributed.sparse import sparse_attention  # sparse.py builds on this module

        return sparse_attention(self, pattern, q, k, v, cu_seqlens, grids, path=path, coarse=coarse)


def _hybrid_subgroups(subgroups) -> tuple:
    """The (Ulysses group, ring group) pair hybrid attention runs on; a ValueError without one."""
    if subgroups is None or len(subgroups) != 2:
        raise ValueError("hybrid sequence parallelism needs subgroups=(Ulysses group, ring group) made up front on "
                         "every rank: build them with vdit.distributed.build_mesh")
    return tuple(subgroups)


# One entry per batch: its checks ran and its host-side offsets were read once, not per layer.
_BATCHES = TensorCache(size=16)


def _batch_plan(q, k, cu_seqlens_q, cu_seqlens_k, group, causal: bool, kv_replicated: bool, layout: str) -> BatchPlan:
    """The batch's :class:`BatchPlan`, checked across ranks on its first call (raises ValueError on every rank
    for inputs that differ across ranks or break the sharding contract)."""
    Hq, Hk = q.shape[1], k.shape[1]

    def build() -> BatchPlan:
        check_consistent(group, q.device, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         heads=Hq * 1000 + Hk, causal=int(causal), kv_replicated=int(kv_replicated))
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # the batch's one host read
        size = world(group)[1]
        plan = BatchPlan(cu_q, cu_k, shard_bounds(cu_q, size, layout, causal), shard_bounds(cu_k, size, layout, causal))
        check_shard_sizes(q.shape[0], plan.total_q, group, q.device, plan.bounds(size))
        if kv_replicated and k.shape[0] != plan.total_k:
            raise ValueError(f"kv_replicated=True needs the full k/v ({plan.total_k} tokens), got {k.shape[0]}")
        if not kv_replicated:
            check_shard_sizes(k.shape[0], plan.total_k, group, q.device, plan.bounds(size, keys=True))
        if causal and (kv_replicated or plan.cu_q != plan.cu_k):
            raise ValueError("causal sequence-parallel attention needs self-attention (cu_seqlens_q == cu_seqlens_k)")
        return plan

    key = (id(group), q.shape[0], k.shape[0], Hq, Hk, causal, kv_replicated, layout, str(q.device))
    return _BATCHES.get((cu_seqlens_q, cu_seqlens_k), key, build)


def sequence_parallel_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                                group=None, mode: str = "ulysses", ulysses_size: int | None = None,
                                softmax_scale: float | None = None, causal: bool = False,
                                kv_replicated: bool = False, subgroups=None, layout: str = "tokens") -> torch.Tensor:
    """This rank's shard of ``vdit.ops.varlen_attention`` on the batch gathered over ``group``.

    Args:
        q: (n_r, Hq, D), this rank's contract range of the packed queries (see
            :mod:`vdit.distributed.sharding`); k, v: (m_r, Hk, D) shards likewise, or the full (total_k, Hk, D)
            tensors with ``kv_replicated=True`` (e.g. cross-attention to short text).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) offsets of the WHOLE batch, identical on every rank, on the
            data's device. They are read on the host once per batch (the first call with these tensors); the
            layers after it make no host synchronisation.
        mode: ``"ulysses"`` (all-to-all over heads; Hq and Hk divisible by the group size),
            ``"ring"`` (key/value shards travel around the ring; any head count), or ``"hybrid"``
            (Ulysses inside groups of ``ulysses_size`` ranks, ring across them).
        layout: how the shards split the tokens, ``"tokens"`` or ``"work"`` (:mod:`vdit.distributed.sharding`;
            the shards must follow ``shard_bounds(cu_seqlens, group size, layout, causal)``).
        subgroups: hybrid (required): this rank's (Ulysses group, ring group), created up front on every
            rank, in the same order (:func:`vdit.distributed.build_mesh`; ``new_group`` entered lazily by the
            ranks that need it hangs the others).
        causal: supported for self-attention (cu_seqlens_q == cu_seqlens_k, not kv_replicated).
    Returns:
        (n_r, Hq, D), this rank's range of the output. Differentiable with respect to the shards.
    Raises:
        ValueError on every rank for inputs that differ across ranks or break the sharding contract.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "hybrid":  # before any collective: every rank raises alike
        subgroups = _hybrid_subgroups(subgroups)
    rank, size = world(group)
    Hq, Hk, D = q.shape[1], k.shape[1], q.shape[2]
    plan = _batch_plan(q, k, cu_seqlens_q, cu_seqlens_k, group, causal, kv_replicated, layout)
    if kv_replicated:
        k, v = replicated(k, group), replicated(v, group)
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    if mode == "ring":
        return RingAttention.apply(q, k, v, plan, scale, causal, kv_replicated, group)
    u = size if mode == "ulysses" else (ulysses_size or 0)
    if u <= 0 or size % u:
        raise ValueError(f"ulysses_size must divide the group size {size}, got {ulysses_size}")
    if Hq % u or (Hk % u):
        raise ValueError(f"Ulysses over {u} ranks needs q heads ({Hq}) and k/v heads ({Hk}) divisible by {u}")
    ugroup, rgroup = (group, None) if mode == "ulysses" else subgroups
    first = rank - rank % u  # token counts of the ranks of this Ulysses group (adjacent contract ranges)
    sizes_q = shard_sizes(plan.total_q, size, plan.bounds(size))[first:first + u]
    qh = TokensToHeads.apply(q, sizes_q, ugroup)
    if kv_replicated:
        kh, vh = head_chunk(k, ugroup), head_chunk(v, ugroup)
    else:
        sizes_k = shard_sizes(plan.total_k, size, plan.bounds(size, keys=True))[first:first + u]
        kh, vh = TokensToHeads.apply(k, sizes_k, ugroup), TokensToHeads.apply(v, sizes_k, ugroup)
    if rgroup is None:
        out = varlen_attention(qh, kh, vh, cu_seqlens_q, cu_seqlens_k, max_seqlen_q or plan.max_q,
                               max_seqlen_k or plan.max_k, softmax_scale=scale, causal=causal)
    else:
        out = RingAttention.apply(qh, kh, vh, plan, scale, causal, kv_replicated, rgroup)
    return HeadsToTokens.apply(out, sizes_q, ugroup)
