"""Tile scheduler of the Triton attention kernels: the flat, cost-sorted work list.

Packed batches of videos are very uneven (one 30k-token video next to 200-token clips), so a
(batch, max_seqlen / BLOCK_M) grid would leave most programs idle. Instead the launcher builds a flat
list of (sequence, tile) work items with a few torch ops on the tensors' device (no host
synchronisation), sorted by decreasing cost (the number of tiles on the other side that the item
visits) so the heaviest items start first and the tail of the launch is made of short items.
Consecutive programs are tiles of the same sequence and head, which share their keys and values in L2.
The list's skeleton (:func:`sorted_work_list`) is shared with the block-sparse kernels, whose segments
are tiles.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from vdit._cache import TensorCache

# A model calls attention with the same packing in every layer and sampling step: build each work
# list once per (cu_seqlens tensors, their versions, tile sizes) instead of ~10 small launches a call.
_WORK = TensorCache(size=32, per_offsets_pair=3)  # forward, dq and dk / dv lists


def sorted_work_list(lengths: torch.Tensor, total: int, block_rows: int,
                     cost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     max_items: int | None = None) -> torch.Tensor:
    """The work list of every attention kernel (dense and block-sparse): one (segment, row block) item per
    ``block_rows`` rows of each segment (a sequence, or a tile), heaviest first, then padding items.

    Args:
        lengths: int64 (S,) rows per segment, on the device the list is built on.
        total: at least lengths.sum() (a shape: no device synchronisation).
        block_rows: rows per item.
        cost: maps (segment, block) int64 (n,) index tensors to each item's int64 (n,) cost (>= 0).
        max_items: a tighter bound on the items the caller knows from shapes (None: none).
    Returns:
        int32 (n, 2): (segment, block) per item by decreasing cost (stable: equal costs keep segment
        order, so consecutive programs share a segment's keys in L2), then unused slots (segment -1).
        n = (total + S * (block_rows - 1)) // block_rows bounds sum_s ceil(L_s / block_rows) for every
        split of total into S lengths, so the list covers every block whatever the lengths are.
    """
    device = lengths.device
    segments = lengths.numel()
    n = (total + segments * (block_rows - 1)) // block_rows if segments > 0 else 0
    if max_items is not None:
        n = min(n, max_items)
    if n <= 0:
        return torch.empty((0, 2), dtype=torch.int32, device=device)
    blocks = (lengths + block_rows - 1) // block_rows
    ends = blocks.cumsum(0)
    idx = torch.arange(n, device=device, dtype=torch.long)
    seg = torch.searchsorted(ends, idx, right=True)
    valid = seg < segments
    seg = seg.clamp_max(segments - 1)
    block = idx - (ends[seg] - blocks[seg])
    order = torch.argsort(torch.where(valid, cost(seg, block), -1), descending=True, stable=True)
    items = torch.stack([torch.where(valid, seg, -1), block], dim=1)[order]
    return items.to(torch.int32).contiguous()


def work_items(cu_rows: torch.Tensor, cu_cols: torch.Tensor, total_rows: int, block_rows: int, block_cols: int,
               causal: bool, rows_are_queries: bool) -> torch.Tensor:
    """Flat, cost-sorted list of (sequence, row tile) work items.

    Args:
        cu_rows: int32 (B + 1,) offsets of the side tiled by the programs (queries for the forward and
            dq kernels, keys for dk/dv); cu_cols: offsets of the side each program loops over.
        total_rows: cu_rows[-1] (the packed tensor's length, a shape: no device synchronisation).
        block_rows / block_cols: tile sizes along rows / cols.
        causal, rows_are_queries: define an item's cost (visible column tiles under the bottom-right
            causal mask).
    Returns:
        int32 (n, 2) on cu_rows' device: (sequence, tile) per item, heaviest first, then unused
        slots (sequence -1). n = (total_rows + B * (block_rows - 1)) // block_rows bounds
        sum_i ceil(L_i / block_rows) for every split of total_rows into B lengths, so the list covers
        every tile whatever the lengths are. It depends on shapes only: a max_seqlen hint, which can be
        wrong under torch.compile (where vdit.ops cannot check it), never decides what is computed.
    """
    cu_r, cu_c = cu_rows.long(), cu_cols.long()
    len_r, len_c = cu_r[1:] - cu_r[:-1], cu_c[1:] - cu_c[:-1]

    def cost(seq: torch.Tensor, tile: torch.Tensor) -> torch.Tensor:
        rows, cols = len_r[seq], len_c[seq]
        if not causal:
            span = cols
        elif rows_are_queries:  # keys visible to some query of the tile: j < min(Lk, (tile+1)*B + Lk - Lq)
            span = torch.minimum(cols, ((tile + 1) * block_rows + (cols - rows)).clamp_min(0))
        else:  # queries that see some key of the tile: i >= tile*B - (Lk - Lq)
            span = (cols - (tile * block_rows - (rows - cols)).clamp_min(0)).clamp_min(0)
        return (span + block_cols - 1) // block_cols

    return sorted_work_list(len_r, total_rows, block_rows, cost)


def cached_work_items(cu_rows: torch.Tensor, cu_cols: torch.Tensor, total_rows: int, block_rows: int,
                      block_cols: int, causal: bool, rows_are_queries: bool) -> torch.Tensor:
    """:func:`work_items`, cached per (cu_rows, cu_cols) tensor objects and versions (see vdit._cache)."""
    key = (total_rows, block_rows, block_cols, bool(causal), bool(rows_are_queries))
    return _WORK.get((cu_rows, cu_cols), key, lambda: work_items(cu_rows, cu_cols, total_rows, block_rows,
                                                                 block_cols, causal, rows_are_queries))
