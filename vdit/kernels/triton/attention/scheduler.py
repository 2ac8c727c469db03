"""Tile scheduler of the Triton attention kernels: the flat, cost-sorted work list.

Packed batches of videos are very uneven (one 30k-token video next to 200-token clips), so a
(batch, max_seqlen / BLOCK_M) grid would leave most programs idle. Instead the launcher builds a flat
list of (sequence, tile) work items with a few torch ops on the tensors' device (no host
synchronisation), sorted by decreasing cost (the number of tiles on the other side that the item
visits) so the heaviest items start first and the tail of the launch is made of short items.
Consecutive programs are tiles of the same sequence and head, which share their keys and values in L2.
"""
from __future__ import annotations

import torch

from vdit._cache import TensorCache

# A model calls attention with the same packing in every layer and sampling step: build each work
# list once per (cu_seqlens tensors, their versions, tile sizes) instead of ~10 small launches a call.
_WORK = TensorCache(size=32)


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
    device = cu_rows.device
    batch = cu_rows.numel() - 1
    n = (total_rows + batch * (block_rows - 1)) // block_rows
    if n <= 0:
        return torch.empty((0, 2), dtype=torch.int32, device=device)
    cu_r, cu_c = cu_rows.long(), cu_cols.long()
    len_r, len_c = cu_r[1:] - cu_r[:-1], cu_c[1:] - cu_c[:-1]
    tiles = (len_r + block_rows - 1) // block_rows
    ends = tiles.cumsum(0)
    idx = torch.arange(n, device=device, dtype=torch.long)
    seq = torch.searchsorted(ends, idx, right=True)
    valid = seq < batch
    seq = seq.clamp_max(batch - 1)
    tile = idx - (ends[seq] - tiles[seq])
    rows, cols = len_r[seq], len_c[seq]
    if not causal:
        span = cols
    elif rows_are_queries:  # keys visible to some query of the tile: j < min(Lk, (tile+1)*B + Lk - Lq)
        span = torch.minimum(cols, ((tile + 1) * block_rows + (cols - rows)).clamp_min(0))
    else:  # queries that see some key of the tile: i >= tile*B - (Lk - Lq)
        span = (cols - (tile * block_rows - (rows - cols)).clamp_min(0)).clamp_min(0)
    cost = torch.where(valid, (span + block_cols - 1) // block_cols, -1)
    order = torch.argsort(cost, descending=True, stable=True)
    items = torch.stack([torch.where(valid, seq, -1), tile], dim=1)[order]
    return items.to(torch.int32).contiguous()


def cached_work_items(cu_rows: torch.Tensor, cu_cols: torch.Tensor, total_rows: int, block_rows: int,
                      block_cols: int, causal: bool, rows_are_queries: bool) -> torch.Tensor:
    """:func:`work_items`, cached per (cu_rows, cu_cols) tensor objects and versions (see vdit._cache)."""
    key = (total_rows, block_rows, block_cols, bool(causal), bool(rows_are_queries))
    return _WORK.get((cu_rows, cu_cols), key, lambda: work_items(cu_rows, cu_cols, total_rows, block_rows,
                                                                 block_cols, causal, rows_are_queries))
