"""Spacetime tiles of a packed batch: the tile layout and the key-tile lists of block-sparse attention.

A video with token grid (T, H, W) and tile (tt, th, tw) has ceil(T/tt) x ceil(H/th) x ceil(W/tw) tiles,
ordered row-major over their (a, b, c) index; inside a tile, tokens are row-major over (t, h, w). Edge
tiles are partial: no padding token is ever added, and each video keeps its own token count. A packed
batch in *tile order* holds each video's tokens in that order, videos one after another, so every tile
is a contiguous run of tokens: ``offsets`` (int32, total tiles + 1) marks where each starts.

*Global tokens* (e.g. the text tokens of a joint text-video attention) follow a video's tokens in its
sequence. The ops run them as a dense segment beside the sparse kernel: :func:`with_global_segments`
covers them with tiles that no key list names and :func:`lists_with_global_rows` gives those tiles empty
rows, so the lists hold video-to-video entries only. The one-tile formulation, :func:`with_global_tiles`
with :func:`lists_with_global_tiles` (every video tile lists its video's global tile, which lists every
tile of its video), states the same rule as tile lists: the reference and the tests use it.

Everything here is host-side index bookkeeping on small tensors (one entry per tile, not per token,
except the permutation), computed once per (grids, tile[, window]) and cached.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from vdit._cache import TensorCache


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """The tiles of a packed batch.

    Attributes:
        grids: token grid (T, H, W) of each video.
        tile: (tt, th, tw).
        tile_grids: tile grid (ceil(T/tt), ceil(H/th), ceil(W/tw)) of each video.
        first_tile: (B + 1,) index of each video's first tile (global tile indices); the last is the total.
        offsets: int32 (total_tiles + 1,) token offset of each tile in tile order (on the grids' device).
        max_tile: the largest tile's token count.
        global_tokens: with :func:`with_global_tiles` or :func:`with_global_segments`, the global token
            count of each video, held by its last tile(s) (:meth:`global_tiles`); () without.
    """

    grids: tuple[tuple[int, int, int], ...]
    tile: tuple[int, int, int]
    tile_grids: tuple[tuple[int, int, int], ...]
    first_tile: tuple[int, ...]
    offsets: torch.Tensor
    max_tile: int
    global_tokens: tuple[int, ...] = ()

    @property
    def num_tiles(self) -> int:
        return self.first_tile[-1]

    def video_tiles(self, b: int) -> int:
        """Tiles of video ``b``'s own tokens (its global tile, if any, not counted)."""
        na, nb, nc = self.tile_grids[b]
        return na * nb * nc

    def global_tiles(self, b: int) -> int:
        """Tiles of video ``b``'s global tokens, after its video tiles (0 without global tiles)."""
        return self.first_tile[b + 1] - self.first_tile[b] - self.video_tiles(b)


def _edges(n: int, t: int) -> list[int]:
    """Extents of the ceil(n / t) tiles along an axis of n tokens (the last one partial)."""
    return [min(t, n - i) for i in range(0, n, t)]


def _video_tile_sizes(grid, tile) -> torch.Tensor:
    """(na * nb * nc,) token counts of one video's tiles, in tile order."""
    et, eh, ew = (torch.tensor(_edges(n, t)) for n, t in zip(grid, tile))
    return (et[:, None, None] * eh[None, :, None] * ew[None, None, :]).reshape(-1)


@functools.lru_cache(maxsize=256)
def _layout(grids: tuple, tile: tuple, device: str) -> TileLayout:
    sizes = [_video_tile_sizes(g, tile) for g in grids]
    counts = [len(s) for s in sizes]
    first = [0]
    for n in counts:
        first.append(first[-1] + n)
    all_sizes = torch.cat(sizes) if sizes else torch.zeros(0, dtype=torch.long)
    offsets = torch.zeros(len(all_sizes) + 1, dtype=torch.int32)
    offsets[1:] = all_sizes.cumsum(0)
    tile_grids = tuple(tuple(-(-n // t) for n, t in zip(g, tile)) for g in grids)
    return TileLayout(grids, tile, tile_grids, tuple(first), offsets.to(device),
                      int(all_sizes.max()) if len(all_sizes) else 0)


# The values of a grids tensor, read on the host once per tensor object and version; everything derived
# from them (layouts, lists, permutations) is cached by value, so a new tensor with the same grids costs
# one read and a CPU grids tensor none on the device.
_GRID_VALUES = TensorCache(size=64)


def grid_values(grids: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """The rows of ``grids`` (int (B, 3)) as Python ints, read once per tensor object and version."""
    return _GRID_VALUES.get((grids,), "grids", lambda: tuple(tuple(int(v) for v in g) for g in grids.tolist()))


def tile_layout(grids: torch.Tensor, tile: Sequence[int], device: torch.device | str | None = None) -> TileLayout:
    """The :class:`TileLayout` of a packed batch with token grids ``grids`` (int (B, 3)) and ``tile``, its
    ``offsets`` on ``device`` (default: the grids' device). Cached by value: the grids are read on the host
    once per tensor object (:func:`grid_values`), and equal grids, tile and device give the same layout object."""
    tile = tuple(int(t) for t in tile)
    return _layout(grid_values(grids), tile, str(grids.device if device is None else torch.device(device)))


@functools.lru_cache(maxsize=64)
def _with_global_tiles(layout: TileLayout, global_tokens: tuple) -> TileLayout:
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).cpu().long()
    parts, first = [], [0]
    for b, g in enumerate(global_tokens):
        parts += [sizes[layout.first_tile[b]:layout.first_tile[b + 1]], torch.tensor([g])]
        first.append(first[-1] + layout.video_tiles(b) + 1)
    all_sizes = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    offsets = torch.zeros(len(all_sizes) + 1, dtype=torch.int32)
    offsets[1:] = all_sizes.cumsum(0)
    return dataclasses.replace(layout, first_tile=tuple(first), offsets=offsets.to(layout.offsets.device),
                               max_tile=max([layout.max_tile, *global_tokens]), global_tokens=global_tokens)


def _global_counts(layout: TileLayout, global_tokens: Sequence[int]) -> tuple[int, ...]:
    """``global_tokens`` as one int per video of ``layout``, which must have no global tiles yet."""
    if layout.global_tokens:
        raise ValueError("the layout has global tiles already")
    counts = tuple(int(g) for g in global_tokens)
    if len(counts) != len(layout.grids):
        raise ValueError(f"global_tokens has {len(counts)} entries for {len(layout.grids)} videos")
    return counts


def with_global_tiles(layout: TileLayout, global_tokens: Sequence[int]) -> TileLayout:
    """``layout`` (of videos only) with one more tile per video, after its video tiles: the
    ``global_tokens[b]`` (>= 0, an empty tile for 0) tokens that follow video b's tokens in its sequence.
    Its ``offsets`` then cover sequences of T*H*W + global_tokens[b] tokens."""
    return _with_global_tiles(layout, _global_counts(layout, global_tokens))


def lists_with_global_tiles(layout: TileLayout, kv_tiles: torch.Tensor) -> torch.Tensor:
    """Key-tile lists over a layout with global tiles (:func:`with_global_tiles`).

    Args:
        layout: with global tiles.
        kv_tiles: int (video tiles of the batch, Hw, K) local key tiles of each video tile, -1 unused (as
            for a layout without global tiles).
    Returns:
        int32 (layout.num_tiles, Hw, K') local key tiles: each video tile's row is its ``kv_tiles`` row plus
        its video's global tile; a global tile's row lists every tile of its video (its queries attend
        densely); -1 pads.
    """
    hw = kv_tiles.shape[1]
    rows, start = [], 0
    for b in range(len(layout.grids)):
        n = layout.video_tiles(b)
        video = kv_tiles[start:start + n].long()
        start += n
        own_global = torch.full((n, hw, 1), n, dtype=torch.long, device=kv_tiles.device)
        everything = torch.arange(n + 1, device=kv_tiles.device).expand(1, hw, n + 1)
        rows += [torch.cat([video, own_global], 2), everything]
    width = max(r.shape[2] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[2]), value=-1) for r in rows]).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _with_global_segments(layout: TileLayout, global_tokens: tuple) -> TileLayout:
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).cpu().long()
    chunk = max(layout.max_tile, 1)
    parts, first = [], [0]
    for b, g in enumerate(global_tokens):
        pieces = [chunk] * (g // chunk) + ([g % chunk] if g % chunk else [])
        parts += [sizes[layout.first_tile[b]:layout.first_tile[b + 1]], torch.tensor(pieces, dtype=torch.long)]
        first.append(first[-1] + layout.video_tiles(b) + len(pieces))
    all_sizes = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    offsets = torch.zeros(len(all_sizes) + 1, dtype=torch.int32)
    offsets[1:] = all_sizes.cumsum(0)
    return dataclasses.replace(layout, first_tile=tuple(first), offsets=offsets.to(layout.offsets.device),
                               global_tokens=global_tokens)


def with_global_segments(layout: TileLayout, global_tokens: Sequence[int]) -> TileLayout:
    """``layout`` (of videos only) with video b's ``global_tokens[b]`` (>= 0) following tokens covered by
    ceil(global_tokens[b] / max_tile) tiles after its video tiles (none for 0), each of at most
    ``layout.max_tile`` tokens, so ``max_tile`` (which picks the kernels' row blocks) is unchanged. No key
    list names these tiles (:func:`lists_with_global_rows`): the sparse kernel leaves their rows to a dense
    pass. Its ``offsets`` cover sequences of T*H*W + global_tokens[b] tokens."""
    return _with_global_segments(layout, _global_counts(layout, global_tokens))


def lists_with_global_rows(layout: TileLayout, kv_tiles: torch.Tensor) -> torch.Tensor:
    """Key-tile lists over a layout with global segments (:func:`with_global_segments`).

    Args:
        layout: with global segments.
        kv_tiles: int (video tiles of the batch, Hw, K) local key tiles of each video tile, -1 unused.
    Returns:
        int32 (layout.num_tiles, Hw, K): each video tile's ``kv_tiles`` row (local indices, which stay valid:
        a video's tiles come first in its range), and an all -1 row for each global tile.
    """
    video_tiles = sum(layout.video_tiles(b) for b in range(len(layout.grids)))
    if video_tiles != kv_tiles.shape[0]:
        raise ValueError(f"kv_tiles has {kv_tiles.shape[0]} rows for {video_tiles} video tiles")
    row = _global_row_sources(layout, str(kv_tiles.device))
    rows = kv_tiles.index_select(0, row.clamp_min(0))
    return torch.where((row >= 0)[:, None, None], rows, -1).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _global_row_sources(layout: TileLayout, device: str) -> torch.Tensor:
    """int64 (layout.num_tiles,): the ``kv_tiles`` row of each tile of a layout with global segments, -1 for a
    global tile; built once per layout, since top-k lists are new tensors on every call."""
    source, start = [], 0
    for b in range(len(layout.grids)):
        n = layout.video_tiles(b)
        source += list(range(start, start + n)) + [-1] * layout.global_tiles(b)
        start += n
    return torch.tensor(source, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def video_permutation(grid: tuple, tile: tuple) -> torch.Tensor:
    """int64 (N,) on the CPU: raster index of each token of one video (grid (T, H, W)) in tile order.
    Cached by value and shared: do not modify it in place."""
    T, H, W = grid
    tt, th, tw = tile
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    t, h, w = t.reshape(-1), h.reshape(-1), w.reshape(-1)
    nb, nc = -(-H // th), -(-W // tw)  # tile counts; along t none is needed (outermost index)
    a, b, c = t // tt, h // th, w // tw
    eh = torch.clamp(H - b * th, max=th)  # extents of each token's tile along h and w
    ew = torch.clamp(W - c * tw, max=tw)
    sizes = _video_tile_sizes(grid, tile)
    starts = torch.zeros_like(sizes)
    starts[1:] = sizes.cumsum(0)[:-1]
    tile_index = (a * nb + b) * nc + c
    local = ((t - a * tt) * eh + (h - b * th)) * ew + (w - c * tw)
    tiled_position = starts[tile_index] + local  # where raster token r goes
    perm = torch.empty_like(tiled_position)
    perm[tiled_position] = torch.arange(T * H * W)
    return perm


@functools.lru_cache(maxsize=16)
def _permutation(grids: tuple, tile: tuple, device: str) -> torch.Tensor:
    parts, start = [], 0
    for g in grids:
        parts.append(video_permutation(g, tile) + start)
        start += g[0] * g[1] * g[2]
    perm = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return perm.to(device)


def tile_permutation(grids: torch.Tensor, tile: Sequence[int]) -> torch.Tensor:
    """Permutation from raster order to tile order of a packed batch.

    Args:
        grids: int32 (B, 3) token grids (as ``PackedVideos.grids``), videos packed one after another,
            each video's tokens row-major over (t, h, w).
        tile: (tt, th, tw) positive.
    Returns:
        int64 (total,) ``perm`` on the grids' device: ``x_tiled = x_raster[perm]``; the inverse is
        ``perm.argsort()``. Cached by value (grids, tile, device) and shared: do not modify it in place.
    """
    tile = tuple(int(t) for t in tile)
    return _permutation(grid_values(grids), tile, str(grids.device))


def window_starts(n: int, w: int) -> torch.Tensor:
    """First visible tile of every query tile along an axis of n tiles, window w (centred, shifted inward)."""
    a = torch.arange(n)
    return torch.clamp(torch.clamp(a - (w - 1) // 2, min=0), max=max(n - w, 0))


def sliding_window_tiles(layout: TileLayout, window: torch.Tensor) -> torch.Tensor:
    """Key tiles of a sliding-tile window, per query tile and head.

    Args:
        layout: the batch's :class:`TileLayout`.
        window: int (Hw, 3) tiles per axis (Hw = 1: every head alike).
    Returns:
        int32 (total_tiles, Hw, K) key-tile indices local to each video (row-major over (a, b, c)),
        -1 in unused slots (heads with smaller windows); K the largest visible count.
    """
    windows = [tuple(int(v) for v in row) for row in window.tolist()]
    per_video = []
    for (na, nb, nc) in layout.tile_grids:
        heads = []
        for wa, wb, wc in windows:
            sa, sb, sc = (window_starts(n, w) for n, w in ((na, wa), (nb, wb), (nc, wc)))
            ma, mb, mc = min(wa, na), min(wb, nb), min(wc, nc)
            ka = sa[:, None] + torch.arange(ma)  # (na, ma)
            kb = sb[:, None] + torch.arange(mb)
            kc = sc[:, None] + torch.arange(mc)
            keys = ((ka[:, None, None, :, None, None] * nb + kb[None, :, None, None, :, None]) * nc
                    + kc[None, None, :, None, None, :])  # (na, nb, nc, ma, mb, mc)
            heads.append(keys.reshape(na * nb * nc, -1))
        width = max(h.shape[1] for h in heads)
        padded = [torch.nn.functional.pad(h, (0, width - h.shape[1]), value=-1) for h in heads]
        per_video.append(torch.stack(padded, 1))  # (tiles, Hw, K_video)
    width = max(v.shape[2] for v in per_video)
    lists = [torch.nn.functional.pad(v, (0, width - v.shape[2]), value=-1) for v in per_video]
    return torch.cat(lists).to(torch.int32)


def to_global(layout: TileLayout, kv_tiles: torch.Tensor) -> torch.Tensor:
    """Local key-tile indices (per video) -> global ones (into ``layout.offsets``); -1 stays -1."""
    video_first = _video_first_tiles(layout.first_tile, kv_tiles.device)
    return torch.where(kv_tiles >= 0, kv_tiles + video_first[:, None, None], -1).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _video_first_tiles(first_tile: tuple, device: torch.device) -> torch.Tensor:
    """int32 (total_tiles,) on ``device``: the first tile of each tile's video. Built once per value, so
    converting new lists (top-k, every call) copies nothing to the device."""
    first = torch.tensor(first_tile[:-1], dtype=torch.int32)
    counts = torch.tensor([b - a for a, b in zip(first_tile, first_tile[1:])])
    return torch.repeat_interleave(first, counts).to(device)


def query_lists(kv_tiles: torch.Tensor, num_tiles: int, heads_q: int, heads_k: int) -> torch.Tensor:
    """The transposed lists the backward's dk / dv pass needs, in one buffer (CSR): exactly the visible
    entries, however unevenly the key tiles are listed (an edge key tile of a sliding window is in up to 64
    windows, an interior one in 27).

    Args:
        kv_tiles: int32 (total_tiles, Hq, K) global key-tile indices, -1 unused.
    Returns:
        int32 (n + 1 + E,) with n = num_tiles * Hk lists and E the used entries of kv_tiles: list i = j * Hk +
        hk, that of key tile j and kv head hk, is ``q_tiles[q_tiles[i]:q_tiles[i + 1]]`` (so q_tiles[0] = n + 1
        and q_tiles[n] = n + 1 + E), the entries ``query_tile * Hq + query_head`` of every (query tile, query
        head) whose list holds j, ascending. :func:`query_list_of` reads one list.
    """
    device = kv_tiles.device
    tiles, hq, k = kv_tiles.shape
    q_tile = torch.arange(tiles, device=device)[:, None, None].expand(tiles, hq, k)
    q_head = torch.arange(hq, device=device)[None, :, None].expand(tiles, hq, k)
    used = kv_tiles >= 0
    key = kv_tiles[used].long() * heads_k + q_head[used] // (heads_q // heads_k)
    value = q_tile[used] * heads_q + q_head[used]
    order = torch.argsort(key * (tiles * heads_q) + value)  # by (key tile, kv head), then query entry
    lists = num_tiles * heads_k
    counts = torch.bincount(key, minlength=lists)
    offsets = torch.zeros(lists + 1, dtype=torch.int64, device=device)
    offsets[1:] = counts.cumsum(0)
    return torch.cat([offsets + lists + 1, value[order]]).to(torch.int32)


def query_list_of(q_tiles: torch.Tensor, key_tile: int, kv_head: int, heads_k: int) -> list[int]:
    """The entries of one transposed list of :func:`query_lists` (key tile, kv head), as Python ints."""
    i = key_tile * heads_k + kv_head
    return q_tiles[int(q_tiles[i]):int(q_tiles[i + 1])].tolist()
