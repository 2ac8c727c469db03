"""Spacetime block-sparse self-attention inside an existing model's attention calls.

``vdit.swap(model, sparse=vdit.SparsePattern(...))`` routes the ``F.scaled_dot_product_attention`` calls of
the model's video self-attention modules (which ones, per model, is :mod:`vdit.swap.diffusers`' business)
through :meth:`vdit.SparsePattern.attend`. The model is not changed: each call permutes its video tokens to
tile order and back (:func:`vdit.ops.tiles.tile_permutation`), so the model's own token layout, RoPE and
projections are untouched.

A call's sequence is the video's T*H*W tokens in raster order, optionally followed by other tokens (the
text tokens of HunyuanVideo's joint attention). Those become *global tokens*: every video query sees them
and they see the whole sequence, as STA does. A key-padding mask may drop global tokens (padded text);
their queries are skipped (output 0, as for :func:`vdit.swap.swap`'s ``skip_padded_queries``), which is
safe where the host discards padded positions. Video tokens must all be valid.

The pattern validates its options and owns the mode-to-op dispatch and the per-head / per-module windows;
this module only reads the video grid of each forward and packs the calls.
"""
from __future__ import annotations

import functools
import math

import torch

from vdit._cache import TensorCache
from vdit.ops.sparse_pattern import SparsePattern
from vdit.ops.tiles import video_permutation
from vdit.swap.masks import key_padding


class SparseRouting:
    """The block-sparse routing of one swapped model: its ``pattern`` and the video's token ``grid`` (T, H, W)
    of the running forward (set by the host adapter before the blocks run; None when unknown).

    The packing of unmasked calls (tile-order indices, cu_seqlens, the grids tensor) depends only on the grid,
    the batch and the sequence length, so it is built once per (batch, length, device) and reused by every
    sparse call site until the grid changes; a masked call's packing is kept per mask tensor (the blocks of a
    forward share one). The grids tensor is one object per (grid, batch, device) value, so the ops' caches
    hit and repeated calls make no host read or host-to-device copy.
    """

    def __init__(self, pattern: SparsePattern):
        if not isinstance(pattern, SparsePattern):
            raise TypeError(f"sparse must be a vdit.SparsePattern, got {type(pattern).__name__}")
        self.pattern = pattern
        self._grid: tuple[int, int, int] | None = None
        self._packed: dict = {}  # (B, L, device) -> (index, cu_seqlens, global_tokens, grids)
        self._masked = TensorCache(size=8)  # attention mask -> its packing, or why it cannot run sparse

    @property
    def grid(self) -> tuple[int, int, int] | None:
        return self._grid

    @grid.setter
    def grid(self, grid) -> None:
        grid = None if grid is None else tuple(int(n) for n in grid)
        if grid != self._grid:
            self._grid = grid
            self._packed.clear()
            self._masked.clear()

    def describe(self) -> str:
        """What the report says a sparse site runs."""
        return f"vdit.SparsePattern.attend ({self.pattern.describe()})"

    def packing(self, keep_global: torch.Tensor | None, B: int, L: int, device):
        """Where the packed tile-order sequences take their tokens from: indices into the (B * L) flattened
        tokens, cu_seqlens int32 (B + 1,), the global-token counts (B,) and the grids int32 (B, 3).
        ``keep_global`` (B, L - N) bool marks the valid tokens after the video's N (None: all valid)."""
        key = (B, L, torch.device(device))
        if keep_global is None and key in self._packed:
            return self._packed[key]
        packed = _packing(self._grid, self.pattern.tile, keep_global, B, L, device)
        if keep_global is None:
            self._packed[key] = packed
        return packed

    def call_packing(self, attn_mask: torch.Tensor | None, B: int, Hq: int, L: int, device):
        """:meth:`packing` for a call with ``attn_mask`` (None, or a key-padding mask for SDPA shape
        (B, Hq, L, L)), or the reason (a string) the call cannot run block-sparse. A mask is read on the host
        once per tensor object and grid: the blocks of a forward share one, so only its first call reads it."""
        if attn_mask is None:
            return self.packing(None, B, L, device)
        return self._masked.get((attn_mask,), (self._grid, B, Hq, L, torch.device(device)),
                                lambda: self._masked_packing(attn_mask, B, Hq, L, device))

    def _masked_packing(self, attn_mask: torch.Tensor, B: int, Hq: int, L: int, device):
        keep = key_padding(attn_mask, B, Hq, L, L)
        if isinstance(keep, str):
            return keep
        N = math.prod(self._grid)
        video_kept, all_kept = torch.stack([keep[:, :N].all(), keep.all()]).tolist()  # one host read
        if not video_kept:
            return "mask hides video tokens"
        return self.packing(None if all_kept else keep[:, N:], B, L, device)


@functools.lru_cache(maxsize=32)
def _grids(grid: tuple, B: int, device: torch.device) -> torch.Tensor:
    """int32 (B, 3) on ``device``: one object per value, so the ops read it on the host once (and never modify it)."""
    return torch.tensor([grid] * B, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=32)
def _tile_order(grid: tuple, tile: tuple, device: torch.device) -> torch.Tensor:
    """int64 (N,) on ``device``: the raster index of each of a video's tokens in tile order, built once per value."""
    return video_permutation(grid, tile).to(device)


def _packing(grid: tuple, tile: tuple, keep_global: torch.Tensor | None, B: int, L: int, device):
    """:meth:`SparseRouting.packing`, uncached."""
    N = math.prod(grid)
    device = torch.device(device)
    video = _tile_order(grid, tile, device)
    starts = torch.arange(B, device=device) * L
    parts, lengths = [], []
    for b in range(B):
        extra = torch.arange(N, L, device=device)
        if keep_global is not None:
            extra = extra[keep_global[b]]
        parts += [starts[b] + video, starts[b] + extra]
        lengths.append(N + extra.numel())
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    return torch.cat(parts), cu, [n - N for n in lengths], _grids(grid, B, device)


def _declined(query, key, is_causal, routing: SparseRouting, path: str | None) -> str | None:
    """Why a self-attention call q (B, Hq, L, D), k (B, Hk, L, D) cannot run block-sparse, or None."""
    L, Hq = query.shape[2], query.shape[1]
    if key.shape[2] != L or is_causal:
        return "not self-attention over the video (Lq != Lk, or causal)"
    grid, pattern = routing.grid, routing.pattern
    if grid is None:
        return "video grid unknown"
    N = math.prod(grid)
    if L < N:
        return f"{L} tokens, fewer than the video's {N}"
    if all(t > n for t, n in zip(pattern.tile, grid)):
        return f"video grid {grid} smaller than one tile {pattern.tile}"
    if pattern.mode == "sliding_tile":
        try:
            pattern.window_for(path, Hq)
        except ValueError as exc:  # per-head windows for another head count, or no window for this module
            return str(exc)
    return None


def sparse_sdpa(query, key, value, attn_mask, is_causal, scale, routing: SparseRouting, path: str | None = None):
    """One SDPA call (q (B, Hq, L, D), k/v (B, Hk, L, D), self-attention) computed block-sparse.

    The first N = T*H*W of the L tokens are the video's, in raster order over ``routing.grid``; the rest are
    global tokens. ``attn_mask`` may only be a key-padding mask (see :mod:`vdit.swap.attention`) that keeps
    every video token; padded global tokens are dropped and their outputs are 0. ``path``: the attention
    module's path, for the pattern's per-module windows.
    Returns ``(out (B, Hq, L, D), "sparse")`` or ``(None, reason)`` when the call does not fit.
    """
    reason = _declined(query, key, is_causal, routing, path)
    if reason is not None:
        return None, reason
    B, Hq, L, D = query.shape
    N = math.prod(routing.grid)
    packed = routing.call_packing(attn_mask, B, Hq, L, query.device)
    if isinstance(packed, str):
        return None, packed
    index, cu, global_tokens, grids = packed
    q, k, v = (t.transpose(1, 2).reshape(B * L, t.shape[1], D)[index] for t in (query, key, value))
    out = routing.pattern.attend(q, k, v, cu, grids, path=path, global_tokens=global_tokens if L > N else None,
                                 softmax_scale=scale)
    full = out.new_zeros(B * L, Hq, D).index_copy(0, index, out)
    return full.view(B, L, Hq, D).transpose(1, 2), "sparse"


def install(model, state, modules, grid_of) -> None:
    """Route the self-attention SDPA calls of ``modules`` ((path, module) pairs) block-sparse, as
    ``state.sparse`` (a :class:`SparseRouting`) says, with the video grid ``grid_of(args, kwargs)`` of each call
    of ``model``'s forward ((T, H, W) tokens, or None when it cannot tell). Hooks only; :func:`vdit.unswap`
    removes them. Under torch.compile the hooks do nothing (the compiled graph keeps the host's SDPA)."""
    routing = state.sparse

    def read_grid(module, args, kwargs):
        if not torch.compiler.is_compiling():
            routing.grid = grid_of(args, kwargs)

    def enter(path):
        if state.mode is not None and not torch.compiler.is_compiling():
            state.mode.sparse_path = path

    handles = [model.register_forward_pre_hook(read_grid, with_kwargs=True)]
    for path, module in modules:
        handles.append(module.register_forward_pre_hook(lambda m, args, path=path: enter(path)))
        handles.append(module.register_forward_hook(lambda m, args, out: enter(None), always_call=True))
        state.report.add(path, "attention", "self-attention (F.scaled_dot_product_attention)", routing.describe())
    state.undo.extend(h.remove for h in handles)
