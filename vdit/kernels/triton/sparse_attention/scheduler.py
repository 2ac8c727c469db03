"""Work lists of the block-sparse attention kernels: built on the device from tile_offsets, read by
every program's prologue.

A program's work item is (tile, row block): the rows [block * B, (block + 1) * B) of that tile, B the
kernel's row block (BLOCK_M for the forward and dq, BLOCK_N for dk / dv). Tiles have different sizes
(edge tiles are partial, a tile may span several blocks), so the launcher builds a flat list of items
with a few torch ops on the tensors' device (no host synchronisation), heaviest first so the tail of the
launch is made of short items; its length is a bound from shapes only, and the unused slots at its end
are padding items that exit at once. The list is the dense kernels' (``attention.scheduler.sorted_work_list``)
with tiles for sequences and a cost of its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vdit._cache import TensorCache
from vdit.kernels.triton.attention.scheduler import sorted_work_list

# The int arguments of the kernels that change with the packing of a batch (its token count, tile count, list
# lengths and strides): Triton would otherwise specialize each on == 1 and % 16 == 0 and compile a new
# variant mid-run when a batch of another shape arrives. Head counts are the model's and stay specialized.
# (A name a kernel does not take is ignored by triton.jit.)
PACKING_ARGS = ("total", "num_tiles", "list_len", "list_stride_t", "list_stride_h")


@triton.jit
def tile_span(OFFSETS, tile, valid):
    """(first token, token count) of tile ``tile``; count 0 (an empty loop) when not ``valid``, and then
    tile 0 is read instead, an in-bounds dummy."""
    t = tl.where(valid, tile, 0)
    start = tl.load(OFFSETS + t)
    return start, tl.where(valid, tl.load(OFFSETS + t + 1) - start, 0)


@triton.jit
def work_item(WORK, OFFSETS):
    """The prologue of every program: its work item (see :func:`work_items`) as (tile, row block, the
    tile's first token, its token count); tile is -1 for the padding items at the end of the list (the
    caller returns at once)."""
    pid = tl.program_id(0)
    tile = tl.load(WORK + 2 * pid)
    block = tl.load(WORK + 2 * pid + 1)
    start, length = tile_span(OFFSETS, tile, tile >= 0)
    return tile, block, start, length


def work_items(tile_offsets: torch.Tensor, lists: torch.Tensor, total: int, block_rows: int,
               entries_per_tile: int = 1, sizes: tuple[int, int | None] = (0, None),
               csr_heads: int | None = None) -> torch.Tensor:
    """Flat, cost-sorted list of (tile, row block) work items, built on tile_offsets' device.

    Args:
        tile_offsets: int32 (num_tiles + 1,) token offsets of the tiles.
        lists: what each tile visits; only the order of the items depends on it. int32 (num_tiles, heads, L)
            with -1 unused (kv_tiles for the forward and dq, whose entries are tiles), or, with ``csr_heads``,
            the transposed lists of dk / dv in their CSR buffer (``vdit.ops.tiles.query_lists``: num_tiles *
            csr_heads + 1 offsets, then entries tile * Hq + head).
        total: tile_offsets[-1] (a shape: no device synchronisation).
        block_rows: rows per item (BLOCK_M for the forward and dq, BLOCK_N for dk / dv).
        entries_per_tile: the divisor from an entry to its tile (1 for kv_tiles, Hq for q_tiles).
        sizes: (above, at_most): only the tiles of more than ``above`` and at most ``at_most`` (None: any)
            tokens get items. A launch split by tile size gives each launch one such class; the classes
            partition the tiles, so every (tile, row block) is in exactly one launch's list.
        csr_heads: the lists per tile of a CSR ``lists`` (Hk), None for padded lists.
    Returns:
        int32 (n, 2): (tile, block) per item, heaviest first (cost: the tokens of the listed tiles, over
        all heads), then unused slots (tile -1). n = (total + num_tiles * (block_rows - 1)) // block_rows
        bounds sum_t ceil(size_t / block_rows) for any tile sizes summing to total, so the list covers
        every row block whatever the sizes are (``max_tile`` plays no part: it is a hint vdit.ops cannot
        check under torch.compile); when ``at_most`` <= block_rows every tile of the class is one item and
        n = min(that, num_tiles).
    """
    num_tiles = tile_offsets.numel() - 1
    offsets = tile_offsets.long()
    tile_sizes = offsets[1:] - offsets[:-1]
    above, at_most = sizes
    in_class = tile_sizes > above
    if at_most is not None:
        in_class &= tile_sizes <= at_most
    if csr_heads is None:
        tile_cost = _listed_tokens(tile_sizes, lists.long(), entries_per_tile).sum((1, 2))
    else:
        lists_count = num_tiles * csr_heads
        bounds = lists[:lists_count + 1].long()
        entries = lists[lists_count + 1:].long()
        owner = torch.repeat_interleave(torch.arange(lists_count, device=lists.device), bounds[1:] - bounds[:-1],
                                        output_size=entries.numel())  # the list of each entry
        tile_cost = torch.zeros(num_tiles, dtype=torch.long, device=lists.device).index_add_(
            0, owner.div(csr_heads, rounding_mode="floor"), _listed_tokens(tile_sizes, entries, entries_per_tile))
    one_item_each = at_most is not None and at_most <= block_rows
    return sorted_work_list(torch.where(in_class, tile_sizes, 0), total, block_rows,
                            lambda tile, block: tile_cost[tile], num_tiles if one_item_each else None)


def _listed_tokens(tile_sizes: torch.Tensor, entries: torch.Tensor, entries_per_tile: int) -> torch.Tensor:
    """The token count of the tile each int64 entry names (entry // entries_per_tile), 0 for an unused one."""
    num_tiles = tile_sizes.numel()
    other = entries.div(entries_per_tile, rounding_mode="floor")
    listed = (entries >= 0) & (other < num_tiles)
    return torch.where(listed, tile_sizes[other.clamp(0, max(num_tiles - 1, 0))], 0)


# A model calls attention with the same tiles in every layer and sampling step: build each list once per
# (tile_offsets, lists) tensors and versions, block size and divisor.
_WORK = TensorCache(size=32)
_LISTS = TensorCache(size=32)


def cached_work_items(tile_offsets, lists, total, block_rows, entries_per_tile=1, sizes=(0, None),
                      csr_heads=None) -> torch.Tensor:
    """:func:`work_items`, cached per (tile_offsets, lists) tensor objects and versions (vdit._cache)."""
    return _WORK.get((tile_offsets, lists), (total, block_rows, entries_per_tile, sizes, csr_heads),
                     lambda: work_items(tile_offsets, lists, total, block_rows, entries_per_tile, sizes, csr_heads))


def compact_lists(kv_tiles: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """The key-tile lists as the forward and dq kernels walk them: per row its count of used entries, then
    those entries in their order, then -1 (never read). A row is walked in ``count`` steps whatever its
    unused slots were, and the walk is one loop the compiler can pipeline (no per-slot test).

    Args:
        kv_tiles: int (num_tiles, Hq or 1, K) key tiles per query tile and head, unused slots -1 (anything
            outside [0, num_tiles) is unused). A stride-0 head dim (one expanded list) stays one list.
        num_tiles: the number of tiles.
    Returns:
        int32 (num_tiles, 1 or Hq, 1 + K) contiguous, on kv_tiles' device (no host synchronisation).
    """
    if kv_tiles.shape[1] > 1 and kv_tiles.stride(1) == 0:
        kv_tiles = kv_tiles[:, :1]
    used = (kv_tiles >= 0) & (kv_tiles < num_tiles)
    order = torch.argsort((~used).to(torch.int8), dim=-1, stable=True)  # used entries first, in order
    entries = torch.where(used, kv_tiles, -1).gather(-1, order)
    count = used.sum(-1, keepdim=True)
    return torch.cat([count, entries], dim=-1).to(torch.int32).contiguous()


def cached_compact_lists(kv_tiles: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """:func:`compact_lists`, cached per kv_tiles tensor object and version (vdit._cache)."""
    return _LISTS.get((kv_tiles,), num_tiles, lambda: compact_lists(kv_tiles, num_tiles))
