"""Spacetime block-sparse self-attention inside an existing model's attention calls.

``vdit.swap(model, attention="sliding_tile" | "topk_tile", tile=..., window=..., topk=...)`` routes the
``F.scaled_dot_product_attention`` calls of the model's video self-attention modules (which ones, per
model, is :mod:`vdit.integrations.diffusers`' business) to :func:`vdit.ops.sliding_tile_attention` or
:func:`vdit.ops.block_sparse_attention`. The model is not changed: each call permutes its video tokens to
tile order and back (:func:`vdit.ops.tiles.tile_permutation`), so the model's own token layout, RoPE and
projections are untouched.

A call's sequence is the video's T*H*W tokens in raster order, optionally followed by other tokens (the
text tokens of HunyuanVideo's joint attention). Those become *global tokens*: every video query sees them
and they see the whole sequence, as STA does. A key-padding mask may drop global tokens (padded text);
their queries are skipped (output 0, as for :func:`vdit.swap.swap`'s ``skip_padded_queries``), which is
safe where the host discards padded positions. Video tokens must all be valid.

Windows: 3 ints for every head and layer, or a JSON file (:func:`load_windows`) with one window per head,
optionally per attention module.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import torch

from vdit.ops import block_sparse_attention, sliding_tile_attention, topk_tiles
from vdit.ops.tiles import tile_permutation
from vdit.swap.masks import key_padding

MODES = ("sliding_tile", "topk_tile")


def load_windows(path: str, heads: int | None = None) -> dict[str, torch.Tensor]:
    """Per-head windows from a JSON file.

    The file holds either a list of ``[t, h, w]`` (one per query head, every layer alike), or an object
    mapping attention-module paths (as in ``model.named_modules()``) to such lists or to one ``[t, h, w]``,
    with ``"default"`` for the modules it does not name. Returns {path or "default": int64 (heads or 1, 3)}.
    Raises ValueError naming the file and entry on bad content (and, with ``heads``, on a list of another
    length).
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"window file {path}: {exc}") from None
    entries = data if isinstance(data, dict) else {"default": data}

    def parse(name, value) -> torch.Tensor:
        rows = [value] if value and not isinstance(value[0], list) else value
        try:
            t = torch.tensor(rows, dtype=torch.int64)
        except (TypeError, ValueError):
            t = torch.zeros(0)
        if t.dim() != 2 or t.shape[1] != 3 or t.shape[0] == 0 or bool((t < 1).any()):
            raise ValueError(f"window file {path}: {name!r} must be [t, h, w] or a list of them (positive ints), "
                             f"got {value!r}")
        if heads is not None and t.shape[0] not in (1, heads):
            raise ValueError(f"window file {path}: {name!r} has {t.shape[0]} windows for {heads} heads")
        return t

    return {name: parse(name, value) for name, value in entries.items()}


@dataclasses.dataclass
class SparseAttention:
    """What the sparse routing does: ``mode``, ``tile`` (tokens per tile), ``windows`` ({module path or
    "default": int (heads or 1, 3)}, sliding_tile), ``topk`` (topk_tile). ``grid`` is the video's token grid
    (T, H, W) of the running forward, set by the host integration before the blocks run."""

    mode: str
    tile: tuple[int, int, int]
    windows: dict[str, torch.Tensor]
    topk: int = 8
    grid: tuple[int, int, int] | None = None

    @classmethod
    def from_options(cls, mode: str, tile, window, topk) -> "SparseAttention":
        """Validated options of :func:`vdit.swap.swap` (``window``: 3 ints, an int tensor (heads, 3), or a JSON
        path for :func:`load_windows`)."""
        if mode not in MODES:
            raise ValueError(f"sparse attention mode must be one of {MODES}, got {mode!r}")
        if tile is None or len(tuple(tile)) != 3 or min(int(t) for t in tile) < 1:
            raise ValueError(f"tile must be 3 positive ints (tokens per tile along t, h, w), got {tile!r}")
        if mode == "sliding_tile":
            if isinstance(window, (str, os.PathLike)):
                windows = load_windows(os.fspath(window))
            elif isinstance(window, torch.Tensor):
                windows = {"default": window.to(torch.int64)}
            elif window is not None and len(tuple(window)) == 3:
                windows = {"default": torch.tensor([[int(w) for w in window]])}
            else:
                raise ValueError(f"window must be 3 ints, an int tensor (heads, 3) or a JSON file, got {window!r}")
        else:
            windows = {}
            if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
                raise ValueError(f"topk must be an int >= 1, got {topk!r}")
        return cls(mode, tuple(int(t) for t in tile), windows, int(topk))

    def window_for(self, path: str) -> torch.Tensor | None:
        return self.windows.get(path, self.windows.get("default"))

    def describe(self) -> str:
        tile = "x".join(map(str, self.tile))
        if self.mode == "topk_tile":
            return f"vdit.ops.block_sparse_attention (top {self.topk} tiles of {tile} tokens)"
        shown = {k: v.tolist()[0] if v.shape[0] == 1 else f"{v.shape[0]} per-head windows"
                 for k, v in self.windows.items()}
        return f"vdit.ops.sliding_tile_attention (tile {tile}, window {shown.get('default', shown)})"


def _packing(grid: tuple, tile: tuple, keep_global: torch.Tensor | None, B: int, L: int, device):
    """Where the packed tile-order sequences take their tokens from: indices into the (B * L) flattened
    tokens, cu_seqlens int32 (B + 1,) and the global-token counts (B,). ``keep_global`` (B, L - N) bool marks
    the valid tokens after the video's N (None: all valid)."""
    N = math.prod(grid)
    grids = torch.tensor([grid], dtype=torch.int32)
    video = tile_permutation(grids, tile).to(device)  # (N,) raster index of each tile-order token
    starts = torch.arange(B, device=device) * L
    parts, lengths = [], []
    for b in range(B):
        extra = torch.arange(N, L, device=device)
        if keep_global is not None:
            extra = extra[keep_global[b]]
        parts += [starts[b] + video, starts[b] + extra]
        lengths.append(N + extra.numel())
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    return torch.cat(parts), cu, [n - N for n in lengths]


def sparse_sdpa(query, key, value, attn_mask, is_causal, scale, sparse: SparseAttention,
                window: torch.Tensor | None):
    """One SDPA call (q (B, Hq, L, D), k/v (B, Hk, L, D), self-attention) computed block-sparse.

    The first N = T*H*W of the L tokens are the video's, in raster order over ``sparse.grid``; the rest are
    global tokens. ``attn_mask`` may only be a key-padding mask (see :mod:`vdit.swap.attention`) that keeps
    every video token; padded global tokens are dropped and their outputs are 0. ``window``: int (heads or
    1, 3) for sliding_tile.
    Returns ``(out (B, Hq, L, D), "sparse")`` or ``(None, reason)`` when the call does not fit.
    """
    B, Hq, L, D = query.shape
    if key.shape[2] != L or is_causal:
        return None, "not self-attention over the video (Lq != Lk, or causal)"
    if sparse.grid is None:
        return None, "video grid unknown"
    N = math.prod(sparse.grid)
    if L < N:
        return None, f"{L} tokens, fewer than the video's {N}"
    if all(t > n for t, n in zip(sparse.tile, sparse.grid)):
        return None, f"video grid {sparse.grid} smaller than one tile {sparse.tile}"
    if window is not None and window.shape[0] not in (1, Hq):
        return None, f"{window.shape[0]} per-head windows for {Hq} heads"
    keep_global = None
    if attn_mask is not None:
        keep = key_padding(attn_mask, B, Hq, L, L)
        if isinstance(keep, str):
            return None, keep
        if not bool(keep[:, :N].all()):
            return None, "mask hides video tokens"
        keep_global = None if bool(keep[:, N:].all()) else keep[:, N:]
    index, cu, global_tokens = _packing(sparse.grid, sparse.tile, keep_global, B, L, query.device)
    q, k, v = (t.transpose(1, 2).reshape(B * L, t.shape[1], D)[index] for t in (query, key, value))
    grids = torch.tensor([sparse.grid] * B, dtype=torch.int32, device=query.device)
    options = dict(global_tokens=global_tokens if L > N else None, softmax_scale=scale)
    if sparse.mode == "sliding_tile":
        out = sliding_tile_attention(q, k, v, cu, grids, sparse.tile, window[0].tolist() if window.shape[0] == 1
                                     else window, **options)
    else:
        kv_tiles = topk_tiles(q, k, cu, grids, sparse.tile, sparse.topk, global_tokens=options["global_tokens"])
        out = block_sparse_attention(q, k, v, cu, grids, sparse.tile, kv_tiles, **options)
    full = out.new_zeros(B * L, Hq, D).index_copy(0, index, out)
    return full.view(B, L, Hq, D).transpose(1, 2), "sparse"


def install(model, state, modules, grid_of) -> None:
    """Route the self-attention SDPA calls of ``modules`` ((path, module) pairs) block-sparse, as
    ``state.sparse`` says, with the video grid ``grid_of(args, kwargs)`` of each call of ``model``'s forward
    ((T, H, W) tokens, or None when it cannot tell). Hooks only; :func:`vdit.unswap` removes them."""
    sparse = state.sparse

    def read_grid(module, args, kwargs):
        sparse.grid = grid_of(args, kwargs)

    def enter(path):
        if state.mode is not None:
            state.mode.sparse_path = path

    handles = [model.register_forward_pre_hook(read_grid, with_kwargs=True)]
    for path, module in modules:
        handles.append(module.register_forward_pre_hook(lambda m, args, path=path: enter(path)))
        handles.append(module.register_forward_hook(lambda m, args, out: enter(None), always_call=True))
        state.report.add(path, "attention", "self-attention (F.scaled_dot_product_attention)", sparse.describe())
    state.undo.extend(h.remove for h in handles)
