"""TileSparseAttention: self-attention over packed videos in tile order that attends only the key tiles of a
:class:`vdit.ops.SparsePattern`: a sliding window of tiles (STA) or the top-k tiles of a pooled coarse pass (VSA)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from vdit.nn.attention import VarlenSelfAttention
from vdit.ops import varlen_attention
from vdit.ops.sparse_attention import pooled_tiles
from vdit.ops.sparse_pattern import SparsePattern
from vdit.ops.tiles import TileLayout, tile_layout


@functools.lru_cache(maxsize=64)
def _coarse_offsets(layout: TileLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse pass's cu_seqlens over tiles (int32 (B + 1,)) and token count per tile (total_tiles,), on the
    layout's device; kept per layout (layouts are cached by value), so repeated calls copy nothing to the device
    and the varlen op reads its cu_seqlens once."""
    offsets = layout.offsets
    cu_tiles = torch.tensor(layout.first_tile, dtype=torch.int32).to(offsets.device)
    return cu_tiles, offsets[1:] - offsets[:-1]


class TileSparseAttention(VarlenSelfAttention):
    """Multi-head self-attention within each video, over the key tiles a :class:`~vdit.ops.SparsePattern` selects.

    Args:
        dim, heads, kv_heads, qk_norm, bias: as :class:`~vdit.nn.VarlenSelfAttention`, whose parameters and
            state_dict it shares (dense weights load unchanged).
        pattern: the tiles and which key tiles each query tile sees. ``"sliding_tile"``: a window of tiles
            around it (one for every head, or one per head). ``"topk_tile"``: the ``topk`` key tiles whose
            pooled keys score highest against its pooled query, plus a coarse output (attention between the
            tiles' pooled q, k, v, broadcast back to the tile's tokens) added through a learned per-head gate
            (``coarse_gate``, zero at initialization: the module starts as pure block-sparse attention), which
            keeps the tile selection trainable end to end (VSA).
        path: this module's path in its model (as in ``named_modules()``), for a pattern whose window file
            names windows per module; None takes the file's ``"default"``.

    ``forward(x, cu_seqlens, max_seqlen=None, positions=None, rope=None, *, grids)``: x (total, dim) packed
    in tile order (:meth:`vdit.packing.PackedVideos.to_tile_order`), grids int (B, 3) the videos' token
    grids, positions (total, 3) in the same order -> (total, dim). With ``sequence_parallel`` (a
    :class:`vdit.distributed.SequenceParallel`), x and positions are this rank's range of the tile-ordered batch
    that cu_seqlens and grids describe in full (Ulysses, ring, hybrid: :mod:`vdit.distributed.sparse`).
    """

    def __init__(self, dim: int, heads: int, *, pattern: SparsePattern, kv_heads: int | None = None,
                 qk_norm: str | None = "rms", bias: bool = True, path: str | None = None):
        super().__init__(dim, heads, kv_heads=kv_heads, qk_norm=qk_norm, bias=bias)
        if not isinstance(pattern, SparsePattern):
            raise TypeError(f"pattern must be a vdit.ops.SparsePattern, got {type(pattern).__name__}")
        if pattern.mode == "sliding_tile":
            pattern.window_for(path, heads)  # a window file without this module, or per-head windows != heads
        self.pattern, self.path = pattern, path
        if pattern.mode == "topk_tile":
            self.coarse_gate = nn.Linear(dim, heads)
            nn.init.zeros_(self.coarse_gate.weight)
            nn.init.zeros_(self.coarse_gate.bias)

    @property
    def mode(self) -> str:
        return self.pattern.mode

    @property
    def tile(self) -> tuple[int, int, int]:
        return self.pattern.tile

    def forward(self, x, cu_seqlens=None, max_seqlen=None, positions=None, rope=None, *, grids=None,
                key_padding_mask=None, sequence_parallel=None):
        if x.dim() != 2 or grids is None or cu_seqlens is None:
            raise ValueError("TileSparseAttention takes packed x (total, dim) in tile order with cu_seqlens and grids")
        q, k, v = self.project(x, positions, rope)
        out, extra = self.attend(q, k, v, cu_seqlens, max_seqlen, grids=grids, sequence_parallel=sequence_parallel)
        return self.output(x, out, extra)

    def attend(self, q, k, v, cu_seqlens, max_seqlen=None, *, grids=None, sequence_parallel=None):
        """The pattern's attention on :meth:`project`'s q, k, v (tile order): ``(out, coarse)``, each (total,
        heads, head_dim), coarse None unless topk_tile (with ``sequence_parallel``: this rank's shards). All of
        sequence parallelism's collectives run here (see :meth:`VarlenSelfAttention.attend`)."""
        coarse = self.coarse if self.pattern.mode == "topk_tile" else None
        if sequence_parallel is not None:  # q: this rank's range of the tile-ordered batch that cu_seqlens describe
            return sequence_parallel.sparse_attention(self.pattern, q, k, v, cu_seqlens, grids, path=self.path,
                                                      coarse=coarse)
        out = self.pattern.attend(q, k, v, cu_seqlens, grids, path=self.path)
        return out, None if coarse is None else coarse(q, k, v, grids)

    def output(self, x: torch.Tensor, out: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(total, dim): ``out`` plus the gated coarse output ``extra`` (topk_tile; the gate reads the module's
        input ``x``), projected."""
        if extra is not None:
            out = out + self.coarse_gate(x)[..., None].to(out.dtype) * extra
        return self.proj(out.reshape(x.shape[0], -1))

    def coarse(self, q, k, v, grids) -> torch.Tensor:
        """(total, heads, head_dim): dense attention among each video's pooled tiles, at every token of a tile."""
        layout = tile_layout(grids, self.pattern.tile, q.device)
        cu_tiles, sizes = _coarse_offsets(layout)
        pooled = [pooled_tiles(t, layout) for t in (q, k, v)]
        out = varlen_attention(*pooled, cu_tiles, cu_tiles)  # (tiles, heads, head_dim)
        return torch.repeat_interleave(out, sizes, dim=0, output_size=q.shape[0])

    def extra_repr(self) -> str:
        where = "" if self.path is None else f", path={self.path!r}"
        return f"{self.pattern.describe()}{where}"
