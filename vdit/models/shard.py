"""The two ends of a sequence-parallel VideoDiT forward, on this rank's tokens only.

With sequence parallelism every rank gets the whole batch but runs the transformer blocks on one contiguous range
of its tokens (in the blocks' order: raster, or tile order for tile-sparse attention). The work before and after
the blocks is per token too, so it is done on that range alone:

* the patch embedding projects only the range's patches (a rank patchifies the videos its range touches, a
  copy, and multiplies only its own rows), and the position embedding runs on its rows;
* the final layer (adaLN, linear to patch pixels) runs on the rank's rows, so what the ranks exchange, if
  anything, is C x pt x ph x pw values per token (the velocity) instead of the hidden width;
* for training, :class:`ShardedVelocity` holds the rank's velocity tokens and which patches they are, so the
  loss compares them with the same patches of the target and the ranks reduce one scalar.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vdit.distributed import SequenceParallel, local_offsets, shard_bounds
from vdit.ops import adaln_modulate, patchify_3d
from vdit.packing import grid_fractions, grid_positions, tile_permutation


@dataclasses.dataclass
class ShardPlan:
    """Which tokens of a packed batch this rank holds.

    Attributes:
        cu_host: the batch's offsets (B + 1 ints); cu: the same, int32 on the data's device.
        grid_host: the B token grids (T, H, W) as ints; grids: the same, int32 (B, 3) on the data's device.
        bounds: every rank's range boundaries; start, end: this rank's range (in the blocks' order).
        first, last: the videos [first, last) the range touches.
        rows: int64 (n_r,) raster index of each of the rank's tokens, relative to video ``first``'s first token.
        perm: int64 (total,) the blocks' order as raster indices (tile order), or None (raster order).
        cu_local: int32 (B + 1,) offsets of each video's tokens within the range.
    """

    cu_host: list[int]
    cu: torch.Tensor
    grid_host: list[tuple[int, int, int]]
    grids: torch.Tensor
    bounds: list[int]
    start: int
    end: int
    first: int
    last: int
    rows: torch.Tensor
    perm: torch.Tensor | None
    cu_local: torch.Tensor

    @property
    def total(self) -> int:
        return self.cu_host[-1]


@dataclasses.dataclass
class ShardedVelocity:
    """A sequence-parallel forward's output on this rank: ``tokens`` (n_r, C * pt * ph * pw), the predicted
    velocity of the patches ``plan.rows`` of videos ``plan.first..plan.last``, as :func:`vdit.ops.patchify_3d`
    lays a patch out."""

    tokens: torch.Tensor
    plan: ShardPlan
    patch_size: tuple[int, int, int]

    def target_tokens(self, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """The same patches of ``targets`` (B tensors (C, T, H, W), the batch's videos): (n_r, C * pt * ph * pw)."""
        return _patches(targets, self.plan, self.patch_size)


def grids_of(videos: Sequence[torch.Tensor], channels: int, patch: Sequence[int]) -> list[tuple[int, int, int]]:
    """Token grids of ``videos`` (each (channels, T, H, W) with T, H, W divisible by ``patch``); ValueError naming
    the first video that is not."""
    grids = []
    for i, v in enumerate(videos):
        if v.dim() != 4 or v.shape[0] != channels:
            raise ValueError(f"videos[{i}] must be ({channels}, T, H, W), got shape {tuple(v.shape)}")
        if any(s % p for s, p in zip(v.shape[1:], patch)):
            raise ValueError(f"videos[{i}]: (T, H, W) = {tuple(v.shape[1:])} is not divisible by the patch size "
                             f"{tuple(patch)}")
        grids.append(tuple(s // p for s, p in zip(v.shape[1:], patch)))
    return grids


def plan_shard(videos: Sequence[torch.Tensor], channels: int, patch: Sequence[int], tile: Sequence[int] | None,
               sp: SequenceParallel) -> ShardPlan:
    """The :class:`ShardPlan` of ``videos`` on this rank of ``sp`` (``tile``: the tile order of tile-sparse
    attention, or None for raster order). Reads only shapes: no device synchronisation."""
    device = videos[0].device
    grid_list = grids_of(videos, channels, patch)
    cu_host = [0]
    for g in grid_list:
        cu_host.append(cu_host[-1] + math.prod(g))
    grids = torch.tensor(grid_list, dtype=torch.int32, device=device).reshape(-1, 3)
    cu = torch.tensor(cu_host, dtype=torch.int32, device=device)
    bounds = shard_bounds(cu_host, sp.size, sp.layout)
    start, end = bounds[sp.rank], bounds[sp.rank + 1]
    touched = [i for i in range(len(grid_list)) if cu_host[i] < end and cu_host[i + 1] > start]
    first, last = (touched[0], touched[-1] + 1) if touched else (0, 0)
    perm = tile_permutation(grids, tuple(tile)).long() if tile is not None else None
    order = perm[start:end] if perm is not None else torch.arange(start, end, device=device)
    return ShardPlan(cu_host, cu, grid_list, grids, bounds, start, end, first, last, order - cu_host[first], perm,
                     local_offsets(cu_host, start, end, device))


def _patches(videos: Sequence[torch.Tensor], plan: ShardPlan, patch: Sequence[int]) -> torch.Tensor:
    """(n_r, C * pt * ph * pw) patches of ``videos`` at the plan's rows (patchifies only the touched videos)."""
    touched = [patchify_3d(v[None], tuple(patch))[0] for v in videos[plan.first:plan.last]]
    if not touched:
        c = videos[0].shape[0] * math.prod(patch)
        return videos[0].new_zeros((0, c))
    return torch.cat(touched)[plan.rows]


def embed_shard(model, videos: Sequence[torch.Tensor], plan: ShardPlan, pooled: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, positions): the patch and position embedding (n_r, hidden) of this rank's tokens and their (n_r, 3)
    grid positions, as the single-device forward computes them for those tokens. ``model``: a VideoDiT."""
    weight, bias = model.patch_embed.weight, model.patch_embed.bias
    x = F.linear(_patches(videos, plan, model.config.patch_size), weight.reshape(weight.shape[0], -1), bias)
    positions = grid_positions(plan.grids)  # (total, 3): cheap, and the fractions below need every token's clip
    raster = plan.rows + plan.cu_host[plan.first]
    if model.position_embed is not None:
        fractions = grid_fractions(plan.grids, positions)
        if model.prompt_velocity is not None:
            fractions = model.prompt_velocity(fractions, pooled, plan.grids.prod(1).to(fractions.device).long())
        x = x + model.position_embed(fractions[raster]).to(x.dtype)
    return x, positions[raster]


def final_tokens(model, h: torch.Tensor, c: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    """The final layer on this rank's tokens: (n_r, hidden) block output -> (n_r, C * pt * ph * pw) velocity."""
    shift, scale = model.final_modulation(c)
    return F.linear(adaln_modulate(h, shift, scale, plan.cu_local), model.unembed.weight, model.unembed.bias)
