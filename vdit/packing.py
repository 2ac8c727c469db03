"""Packing of variable-size videos into one token sequence (NaViT-style Patch n' Pack).

A batch of B videos with token grids (Tp_i, Hp_i, Wp_i) becomes ``total = sum(Tp_i * Hp_i * Wp_i)``
tokens, with ``cu_seqlens`` int32 (B + 1,) marking where each video's tokens start. Each video's tokens
are in raster order (row-major over (t, h, w)) or, for block-sparse attention, in tile order
(:func:`tile_permutation`, :meth:`PackedVideos.to_tile_order`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from vdit.ops import patchify_3d, unpatchify_3d
from vdit.ops._shared import segment_ids
from vdit.ops.tiles import TileLayout, tile_layout, tile_permutation

__all__ = ["PackedVideos", "TileLayout", "cu_seqlens_from_lengths", "dense_positions", "grid_fractions",
           "grid_positions", "pack_videos", "segment_ids", "tile_layout", "tile_permutation", "unpack"]


@dataclasses.dataclass
class PackedVideos:
    """A packed batch.

    Attributes:
        tokens: (total, F) token features.
        cu_seqlens: int32 (B + 1,) offsets of each video's tokens.
        max_seqlen: longest video, in tokens.
        grids: int32 (B, 3) token grid (Tp, Hp, Wp) of each video.
        positions: int32 (total, 3) (t, h, w) grid coordinates of each token.
        tile: the (tt, th, tw) tile whose order the tokens are in, or None for raster order.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    grids: torch.Tensor
    positions: torch.Tensor
    tile: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return self.grids.shape[0]

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def to_tile_order(self, tile) -> PackedVideos:
        """The same batch with each video's tokens (and positions, which travel with them) in tile order
        for ``tile`` (tt, th, tw); differentiable in ``tokens`` (a gather)."""
        batch = self.to_raster_order()
        perm = tile_permutation(batch.grids, tile)
        return dataclasses.replace(batch, tokens=batch.tokens[perm], positions=batch.positions[perm],
                                   tile=tuple(int(t) for t in tile))

    def to_raster_order(self) -> PackedVideos:
        """The same batch with each video's tokens in raster order again (itself if it already is)."""
        if self.tile is None:
            return self
        inverse = tile_permutation(self.grids, self.tile).argsort()
        return dataclasses.replace(self, tokens=self.tokens[inverse], positions=self.positions[inverse], tile=None)


def cu_seqlens_from_lengths(lengths: Sequence[int], device=None) -> torch.Tensor:
    """int32 (B + 1,) offsets from per-sequence lengths."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    if len(lengths):
        cu[1:] = torch.as_tensor(list(lengths), dtype=torch.int32, device=device).cumsum(0)
    return cu


def grid_positions(grids: torch.Tensor, *, offset: Sequence[float] | None = None,
                   scale: Sequence[float] | None = None) -> torch.Tensor:
    """(t, h, w) coordinates of every token of a packed batch, in packing order.

    Args:
        grids: int (B, 3) token grids (Tp, Hp, Wp).
        offset, scale: optional per-axis affine map ``pos * scale + offset`` (e.g. to interpolate RoPE
            positions to a training resolution); when given the result is float32.
    Returns:
        (total, 3) int32 (float32 with offset/scale), tokens of each grid in (t, h, w) row-major order.
    """
    out = []
    for tp, hp, wp in grids.tolist():
        t, h, w = torch.meshgrid(torch.arange(tp), torch.arange(hp), torch.arange(wp), indexing="ij")
        out.append(torch.stack((t, h, w), -1).reshape(-1, 3))
    pos = torch.cat(out).to(device=grids.device, dtype=torch.int32) if out else torch.zeros(0, 3, dtype=torch.int32)
    if offset is None and scale is None:
        return pos
    pos = pos.float()
    if scale is not None:
        pos = pos * torch.tensor(scale, dtype=torch.float32, device=pos.device)
    if offset is not None:
        pos = pos + torch.tensor(offset, dtype=torch.float32, device=pos.device)
    return pos


def grid_fractions(grids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Where every token of a packed batch lies within its own grid: (total, 3) float32 ``(pos + 0.5) / extent``
    per (t, h, w) axis, in (0, 1) and in packing order (the same for a clip at any size or duration).
    ``positions``: the integer :func:`grid_positions` of ``grids``, if the caller has them already."""
    pos = (grid_positions(grids) if positions is None else positions).float()
    extents = torch.repeat_interleave(grids.to(pos.device).float(), grids.prod(1).to(pos.device), dim=0)
    return (pos + 0.5) / extents


def dense_positions(grid: Sequence[int], *, batch: int | None = None, offset: Sequence[float] | None = None,
                    scale: Sequence[float] | None = None, device=None) -> torch.Tensor:
    """(t, h, w) coordinates of the tokens of one (Tp, Hp, Wp) grid, for dense (B, L, H, D) batches.

    Args:
        grid: (Tp, Hp, Wp) token grid shared by the batch.
        batch: if given, expand to (batch, L, 3) (a view); else (L, 3), which the rope ops broadcast.
        offset, scale: optional per-axis ``pos * scale + offset`` (float32 result), as in
            :func:`grid_positions`: e.g. scale < 1 interpolates a larger grid into the range seen in
            training, an offset shifts a continuation clip in time. Any float positions work with
            the rope ops (the angle is pos * frequency); nothing else is assumed.
    Returns:
        int32 (L, 3) or (batch, L, 3), L = Tp * Hp * Wp in (t, h, w) row-major order (w fastest);
        float32 with offset / scale.
    """
    grids = torch.tensor([list(grid)], dtype=torch.int32)
    pos = grid_positions(grids, offset=offset, scale=scale)
    if device is not None:
        pos = pos.to(device)
    return pos if batch is None else pos.expand(batch, *pos.shape)


def pack_videos(videos: Sequence[torch.Tensor], patch_size: Sequence[int]) -> PackedVideos:
    """Patchify videos of different sizes (same channel count) and pack their tokens.

    Args:
        videos: list of (C, Ti, Hi, Wi) tensors; ``patch_size`` (pt, ph, pw) divides each (Ti, Hi, Wi).
    Returns:
        :class:`PackedVideos` with tokens (total, C*pt*ph*pw).
    """
    if len(videos) == 0:
        raise ValueError("videos must be a non-empty list of (C, T, H, W) tensors")
    tokens = [patchify_3d(v.unsqueeze(0), patch_size)[0] for v in videos]
    grids = torch.tensor([[s // p for s, p in zip(v.shape[1:], patch_size)] for v in videos], dtype=torch.int32,
                         device=videos[0].device)
    lengths = [t.shape[0] for t in tokens]
    return PackedVideos(torch.cat(tokens), cu_seqlens_from_lengths(lengths, videos[0].device), max(lengths), grids,
                        grid_positions(grids))


def unpack(tokens: torch.Tensor, cu_seqlens: torch.Tensor, grids: torch.Tensor,
           patch_size: Sequence[int]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_videos`: (total, C*pt*ph*pw) tokens -> list of (C, Ti, Hi, Wi) videos."""
    cu = cu_seqlens.tolist()
    return [unpatchify_3d(tokens[cu[i]:cu[i + 1]].unsqueeze(0), grid, patch_size)[0]
            for i, grid in enumerate(grids.tolist())]
