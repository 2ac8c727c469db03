"""SparsePattern: which key tiles each query tile of a video attends, in one validated value.

The one place that knows the block-sparse modes and their options. The model config, the nn module, the
swap, the CLIs and the benchmarks build a pattern and call :meth:`SparsePattern.attend`; the window rule
itself lives in :mod:`vdit.ops.tiles` (``sliding_window_tiles``) and the attention in
:mod:`vdit.ops.sparse_attention`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import torch

from vdit.ops.sparse_attention import block_sparse_attention, sliding_tile_attention, topk_tiles
from vdit.ops.tiles import sliding_window_tiles, tile_layout

MODES = ("sliding_tile", "topk_tile")


def _check_tile(tile) -> tuple[int, int, int]:
    try:
        out = tuple(int(t) for t in tile)
    except (TypeError, ValueError):
        raise TypeError(f"SparsePattern.tile must be 3 ints (tokens per tile along t, h, w), got {tile!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"SparsePattern.tile must be 3 positive ints (tokens per tile along t, h, w), got {tile!r}")
    return out


def _window_rows(value, where: str) -> torch.Tensor:
    """[t, h, w] or a list of them (one per query head) -> int64 (n, 3), all >= 1."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{where} must be an int32/int64 tensor (heads, 3), got {value.dtype}")
        rows = value.detach().to("cpu", torch.int64)
        rows = rows[None] if rows.dim() == 1 else rows
    else:
        nested = isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], (list, tuple))
        try:
            rows = torch.tensor(value if nested else [value], dtype=torch.int64, device="cpu")  # host data, also
            # when a model is built under torch.device("meta")
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{where} must be [t, h, w] or a list of them (positive ints), got {value!r}") from None
    if rows.dim() != 2 or rows.shape[1] != 3 or rows.shape[0] == 0:
        raise ValueError(f"{where} must be [t, h, w] or a list of them (tiles along t, h, w), got {value!r}")
    if bool((rows < 1).any()):
        raise ValueError(f"{where} sizes must be >= 1 tile, got {rows.tolist()}")
    return rows


def load_windows(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Per-head windows from a JSON file.

    The file holds either a list of ``[t, h, w]`` (one per query head, every layer alike), or an object
    mapping attention-module paths (as in ``model.named_modules()``) to such lists or to one ``[t, h, w]``,
    with ``"default"`` for the modules it does not name. Returns {path or "default": int64 (heads or 1, 3)}.
    Raises ValueError naming the file and the entry on bad content.
    """
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"window file {path}: {exc}") from None
    entries = data if isinstance(data, dict) else {"default": data}
    out = {}
    for name, value in entries.items():
        try:
            out[name] = _window_rows(value, f"window file {path}: {name!r}")
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class SparsePattern:
    """Spacetime block-sparse attention: tiles of ``tile`` tokens, and which key tiles each query tile sees.

    Args:
        mode: ``"sliding_tile"`` (STA: a window of tiles around the query's tile, shifted inward at the grid's
            edges, :func:`vdit.ops.sliding_tile_attention`) or ``"topk_tile"`` (VSA: the ``topk`` key tiles
            whose pooled keys score highest against the tile's pooled query, :func:`vdit.ops.topk_tiles`).
        tile: (tt, th, tw) tokens per tile, each >= 1 (edge tiles partial).
        window: sliding_tile only: (wt, wh, ww) tiles, each >= 1; or an int tensor (heads, 3), one window per
            query head; or the path of a JSON file of per-head windows, optionally per attention module
            (:func:`load_windows`). Default (3, 3, 3).
        topk: topk_tile only: key tiles per (query tile, head), >= 1. Default 8.

    Validation happens here, once; errors name the field. ``windows`` holds the parsed windows:
    {module path or ``"default"``: int64 (heads or 1, 3)}.
    """

    mode: str
    tile: tuple[int, int, int]
    window: object = None
    topk: int | None = None
    windows: dict = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"SparsePattern.mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "tile", _check_tile(self.tile))
        windows: dict[str, torch.Tensor] = {}
        if self.mode == "sliding_tile":
            if self.topk is not None:
                raise ValueError("SparsePattern.topk is for mode 'topk_tile'; sliding_tile takes a window")
            window = (3, 3, 3) if self.window is None else self.window
            if isinstance(window, (str, os.PathLike)):
                window = os.fspath(window)
                windows = load_windows(window)
            else:  # normalized: one window as a tuple, per-head windows as an int64 (heads, 3) tensor
                rows = _window_rows(window, "SparsePattern.window")
                windows = {"default": rows}
                one = rows.shape[0] == 1 and not isinstance(window, torch.Tensor)
                window = tuple(rows[0].tolist()) if one else rows
            object.__setattr__(self, "window", window)
        else:
            if self.window is not None:
                raise ValueError("SparsePattern.window is for mode 'sliding_tile'; topk_tile takes topk")
            topk = 8 if self.topk is None else self.topk
            if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
                raise ValueError(f"SparsePattern.topk must be an int >= 1, got {self.topk!r}")
            object.__setattr__(self, "topk", topk)
        object.__setattr__(self, "windows", windows)

    @classmethod
    def of(cls, mode: str, tile: Sequence[int], window=None, topk: int | None = None) -> SparsePattern:
        """A pattern from options that carry both a window and a top-k (a model config, CLI flags): each mode
        keeps its own and ignores the other's."""
        if mode == "sliding_tile":
            return cls(mode, tile, window=window)
        return cls(mode, tile, topk=topk)

    def window_for(self, path: str | None = None, heads: int | None = None) -> torch.Tensor:
        """The window of the attention module at ``path`` (the file's entry for it, else ``"default"``):
        int64 (heads or 1, 3). With ``heads``, a per-head list of another length raises ValueError."""
        if self.mode != "sliding_tile":
            raise ValueError(f"a {self.mode} pattern has no window")
        rows = self.windows.get(path, self.windows.get("default")) if path is not None else self.windows.get("default")
        if rows is None:
            raise ValueError(f"the window file names no window for {path!r} and has no 'default'")
        if heads is not None and rows.shape[0] not in (1, heads):
            raise ValueError(f"SparsePattern.window: {rows.shape[0]} per-head windows for {heads} heads"
                             + (f" at {path!r}" if path else ""))
        return rows

    def window_tiles(self, grids: torch.Tensor, *, path: str | None = None, heads: int | None = None) -> torch.Tensor:
        """sliding_tile: the key tiles each query tile sees, as the op computes them
        (:func:`vdit.ops.tiles.sliding_window_tiles`), for baselines that need the same pattern as a mask.

        Args:
            grids: int (B, 3) token grids; path, heads: as :meth:`window_for`.
        Returns:
            int32 (total_tiles, Hw, K) key-tile indices local to each video (row-major over the video's tile
            grid), -1 in unused slots; Hw = 1 for one window, else one row per head.
        """
        return sliding_window_tiles(tile_layout(grids, self.tile), self.window_for(path, heads))

    def key_tiles(self, q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, grids: torch.Tensor, *,
                  global_tokens=None) -> torch.Tensor:
        """topk_tile: the listed key tiles, int32 (total_query_tiles, Hq, topk) (:func:`vdit.ops.topk_tiles`)."""
        if self.mode != "topk_tile":
            raise ValueError(f"a {self.mode} pattern lists no top-k tiles")
        return topk_tiles(q, k, cu_seqlens, grids, self.tile, self.topk, global_tokens=global_tokens)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               grids: torch.Tensor, *, path: str | None = None, global_tokens=None,
               softmax_scale: float | None = None, backend: str = "auto") -> torch.Tensor:
        """Block-sparse attention of packed videos in tile order.

        Args:
            q: (total, Hq, Dh); k, v: (total, Hk, Dh); each video's tokens in tile order
                (:func:`vdit.packing.tile_permutation` of this pattern's ``tile``).
            cu_seqlens: int32 (B + 1,); grids: int (B, 3) token grids; global_tokens: as
                :func:`vdit.ops.block_sparse_attention`.
            path: the attention module's path, for per-module windows from a file.
        Returns:
            (total, Hq, Dh), differentiable in q, k and v.
        """
        options = dict(global_tokens=global_tokens, softmax_scale=softmax_scale, backend=backend)
        if self.mode == "sliding_tile":
            # The pattern's own rows tensor: the op reads a window tensor once per object, so calls read none.
            return sliding_tile_attention(q, k, v, cu_seqlens, grids, self.tile, self.window_for(path, q.shape[1]),
                                          **options)
        kv_tiles = self.key_tiles(q, k, cu_seqlens, grids, global_tokens=global_tokens)
        return block_sparse_attention(q, k, v, cu_seqlens, grids, self.tile, kv_tiles, **options)

    def describe(self) -> str:
        """One line for reports and CLIs, e.g. ``sliding_tile, tile 2x4x4, window 3x3x3``."""
        tile = "x".join(map(str, self.tile))
        if self.mode == "topk_tile":
            return f"topk_tile, tile {tile}, top {self.topk}"
        if isinstance(self.window, tuple):
            return f"sliding_tile, tile {tile}, window {'x'.join(map(str, self.window))}"
        return f"sliding_tile, tile {tile}, per-head windows ({', '.join(sorted(self.windows))})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, SparsePattern):
            return NotImplemented
        same_windows = self.windows.keys() == other.windows.keys() and all(
            torch.equal(self.windows[n], other.windows[n]) for n in self.windows)
        return (self.mode, self.tile, self.topk) == (other.mode, other.tile, other.topk) and same_windows

    __hash__ = None
