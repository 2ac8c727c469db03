"""Tile-sparse self-attention (:class:`vdit.ops.SparsePattern`) over a packed batch sharded across ranks.

The tokens are in tile order (each video's tiles contiguous) and every rank holds one contiguous range of them,
as for dense attention (:mod:`vdit.distributed.attention`).

* Ulysses: after the all-to-all each rank holds every token, in tile order, for its share of the heads, so
  the single-device op runs unchanged on them: a per-head window (sliding_tile) and the top-k selection
  (topk_tile, per head) are sliced to those heads; the coarse output (pooled tiles, topk_tile) too.
* Ring, sliding tiles: a halo exchange (:mod:`vdit.distributed.halo`): each rank receives only the key/value
  rows its window reaches beyond its own range, from their owners, and attends its own queries.
* Ring with top-k tiles, and hybrid: q, k and v of the sequence-parallel group are all-gathered (top-k needs
  the pooled query of a tile that a range boundary cuts, so q is gathered as well), the op runs locally on
  the videos this rank's range touches, and this rank keeps its range of the output. The backward of the
  all-gather sums every rank's gradient of each range back to its owner. Compute: a rank attends every query
  of the videos it touches, not only its own (a video spread over all W ranks is attended W times).
"""
from __future__ import annotations

import torch

from vdit.distributed.attention import _batch_plan
from vdit.distributed.halo import halo_attention, halo_plan
from vdit.distributed.sharding import gather_packed, shard_sizes, world
from vdit.distributed.ulysses import HeadsToTokens, TokensToHeads
from vdit.ops.sparse_attention import sliding_tile_attention


def _attend(pattern, q, k, v, cu_seqlens, grids, path, heads: slice | None):
    """The pattern's attention on whole videos, for the query heads ``heads`` of the module (None: all)."""
    if pattern.mode == "sliding_tile" and heads is not None:
        rows = pattern.window_for(path, None)
        window = rows[0].tolist() if rows.shape[0] == 1 else rows[heads]
        return sliding_tile_attention(q, k, v, cu_seqlens, grids, pattern.tile, window)
    return pattern.attend(q, k, v, cu_seqlens, grids, path=path)


def _ulysses(pattern, q, k, v, cu_seqlens, grids, plan, group, path, coarse):
    rank, size = world(group)
    Hq, Hk = q.shape[1], k.shape[1]
    if Hq % size or Hk % size:
        raise ValueError(f"Ulysses over {size} ranks needs q heads ({Hq}) and k/v heads ({Hk}) divisible by {size}")
    if pattern.mode == "sliding_tile":
        pattern.window_for(path, Hq)  # per-head windows of another length raise here, on every rank
    sizes = shard_sizes(plan.total_q, size, plan.bounds(size))
    qh, kh, vh = (TokensToHeads.apply(t, sizes, group) for t in (q, k, v))
    chunk = Hq // size
    out = _attend(pattern, qh, kh, vh, cu_seqlens, grids, path, slice(rank * chunk, (rank + 1) * chunk))
    out = HeadsToTokens.apply(out, sizes, group)
    extra = None if coarse is None else HeadsToTokens.apply(coarse(qh, kh, vh, grids), sizes, group)
    return out, extra


def _touched(cu: list[int], start: int, end: int) -> tuple[int, int]:
    """Indices [first, last) of the videos with a token in [start, end) (an empty range touches none)."""
    videos = [i for i in range(len(cu) - 1) if cu[i] < end and cu[i + 1] > start and start < end]
    return (videos[0], videos[-1] + 1) if videos else (0, 0)


def _gathered(pattern, q, k, v, cu_seqlens, grids, plan, group, path, coarse):
    rank, size = world(group)
    bounds = plan.bounds(size)
    start, end = bounds[rank], bounds[rank + 1]
    first, last = _touched(plan.cu_q, start, end)
    qf, kf, vf = (gather_packed(t, plan.total_q, group, bounds) for t in (q, k, v))
    if first == last:  # no token here; the gathers above still ran, so every rank joined them
        empty = q[:0] * 0 + (qf.sum() + kf.sum() + vf.sum()) * 0
        return empty, (None if coarse is None else empty)
    lo, hi = plan.cu_q[first], plan.cu_q[last]
    cu = cu_seqlens[first:last + 1] - cu_seqlens[first]
    sub_grids = grids[first:last]
    qs, ks, vs = qf[lo:hi], kf[lo:hi], vf[lo:hi]
    out = _attend(pattern, qs, ks, vs, cu, sub_grids, path, None)[start - lo:end - lo]
    extra = None if coarse is None else coarse(qs, ks, vs, sub_grids)[start - lo:end - lo]
    return out, extra


def sparse_attention(sp, pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     grids: torch.Tensor, *, path: str | None = None, coarse=None):
    """This rank's shard of ``pattern.attend`` (and of the coarse output) on the batch gathered over ``sp``.

    Args:
        sp: the :class:`vdit.distributed.SequenceParallel` the tokens are sharded over.
        pattern: a :class:`vdit.ops.SparsePattern`.
        q: (n_r, Hq, D), k, v: (n_r, Hk, D): this rank's contract range of the packed tokens, in tile order.
        cu_seqlens: int32 (B + 1,) offsets of the WHOLE batch; grids: int (B, 3) token grids of every video.
        path: the attention module's path (per-module windows).
        coarse: topk_tile: ``coarse(q, k, v, grids) -> (total, Hq', D)`` on whole videos, or None.
    Returns:
        (out, coarse_out): (n_r, Hq, D) each; coarse_out is None without ``coarse``. Differentiable in q, k, v.
    """
    group = sp.group
    plan = _batch_plan(q, k, cu_seqlens, cu_seqlens, group, False, False, sp.layout)
    if sp.mode == "ulysses":
        return _ulysses(pattern, q, k, v, cu_seqlens, grids, plan, group, path, coarse)
    if sp.mode == "ring" and pattern.mode == "sliding_tile" and coarse is None:
        return _halo(pattern, q, k, v, grids, plan, group, path), None
    return _gathered(pattern, q, k, v, cu_seqlens, grids, plan, group, path, coarse)


def _halo(pattern, q, k, v, grids, plan, group, path):
    rank, size = world(group)
    window = pattern.window_for(path, q.shape[1])
    # Keyed by the window's values (a few host ints), not the tensor's id: the batch plan outlives a pattern that
    # is replaced, and a new window tensor may reuse a freed one's id.
    key = ("halo", tuple(pattern.tile), tuple(map(tuple, window.tolist())), size, rank, str(q.device))
    if key not in plan.extras:
        plan.extras[key] = halo_plan(plan.cu_q, grids, tuple(pattern.tile), window, plan.bounds(size), rank,
                                     q.device)
    return halo_attention(q, k, v, plan.extras[key], group)
