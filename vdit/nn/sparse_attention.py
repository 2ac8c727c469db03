"""TileSparseAttention: self-attention over packed videos in tile order that attends only some key tiles:
a sliding window of tiles (STA) or the top-k tiles of a pooled coarse pass (VSA)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vdit.nn.attention import VarlenSelfAttention
from vdit.ops import block_sparse_attention, sliding_tile_attention, topk_tiles, varlen_attention
from vdit.ops.sparse_attention import pooled_tiles
from vdit.ops.tiles import tile_layout

MODES = ("sliding_tile", "topk_tile")


class TileSparseAttention(VarlenSelfAttention):
    """Multi-head self-attention within each video, over the key tiles a mode selects.

    Args:
        dim, heads, kv_heads, qk_norm, bias: as :class:`~vdit.nn.VarlenSelfAttention`, whose parameters and
            state_dict it shares (dense weights load unchanged).
        mode: ``"sliding_tile"``: each query tile sees a window of ``window`` tiles (3 ints, or an int
            tensor (heads, 3) per head) around it. ``"topk_tile"``: each query tile and head sees the
            ``topk`` key tiles whose pooled keys score highest against its pooled query, plus a coarse
            output (attention between the tiles' pooled q, k, v, broadcast back to the tile's tokens) added
            through a learned per-head gate (``coarse_gate``, zero at initialization: the module starts as
            pure block-sparse attention), which keeps the tile selection trainable end to end (VSA).
        tile: (tt, th, tw) tokens per tile.

    ``forward(x, cu_seqlens, max_seqlen=None, positions=None, rope=None, *, grids)``: x (total, dim) packed
    in tile order (:meth:`vdit.packing.PackedVideos.to_tile_order`), grids int (B, 3) the videos' token
    grids, positions (total, 3) in the same order -> (total, dim).
    """

    def __init__(self, dim: int, heads: int, *, mode: str, tile: Sequence[int], window=(3, 3, 3), topk: int = 8,
                 kv_heads: int | None = None, qk_norm: str | None = "rms", bias: bool = True):
        super().__init__(dim, heads, kv_heads=kv_heads, qk_norm=qk_norm, bias=bias)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.tile, self.window, self.topk = mode, tuple(int(t) for t in tile), window, int(topk)
        if mode == "topk_tile":
            self.coarse_gate = nn.Linear(dim, heads)
            nn.init.zeros_(self.coarse_gate.weight)
            nn.init.zeros_(self.coarse_gate.bias)

    def forward(self, x, cu_seqlens=None, max_seqlen=None, positions=None, rope=None, *, grids=None,
                key_padding_mask=None, sequence_parallel=None):
        if sequence_parallel is not None:
            raise NotImplementedError("TileSparseAttention does not run sequence-parallel yet")
        if x.dim() != 2 or grids is None or cu_seqlens is None:
            raise ValueError("TileSparseAttention takes packed x (total, dim) in tile order with cu_seqlens and grids")
        q, k, v = self.project(x, positions, rope)
        if self.mode == "sliding_tile":
            out = sliding_tile_attention(q, k, v, cu_seqlens, grids, self.tile, self.window)
        else:
            kv_tiles = topk_tiles(q, k, cu_seqlens, grids, self.tile, self.topk)
            out = block_sparse_attention(q, k, v, cu_seqlens, grids, self.tile, kv_tiles)
            out = out + self.coarse_gate(x)[..., None].to(out.dtype) * self.coarse(q, k, v, grids)
        return self.proj(out.reshape(x.shape[0], -1))

    def coarse(self, q, k, v, grids) -> torch.Tensor:
        """(total, heads, head_dim): dense attention among each video's pooled tiles, at every token of a tile."""
        layout = tile_layout(grids, self.tile)
        cu_tiles = torch.tensor(layout.first_tile, dtype=torch.int32, device=q.device)
        pooled = [pooled_tiles(t, layout) for t in (q, k, v)]
        out = varlen_attention(*pooled, cu_tiles, cu_tiles)  # (tiles, heads, head_dim)
        sizes = (layout.offsets[1:] - layout.offsets[:-1]).to(q.device)
        return torch.repeat_interleave(out, sizes, dim=0, output_size=q.shape[0])

    def extra_repr(self) -> str:
        detail = f"window={self.window}" if self.mode == "sliding_tile" else f"topk={self.topk}"
        return f"mode={self.mode}, tile={self.tile}, {detail}"
