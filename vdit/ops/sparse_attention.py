"""Spacetime block-sparse attention over packed videos of any sizes: sliding-tile windows and listed
(top-k) tiles, forward and backward.

Every video's tokens are in tile order (:func:`vdit.ops.tiles.tile_permutation`; tiles of (tt, th, tw)
tokens, edge tiles partial, no padding). A query attends every key of the tiles its tile lists, whole
tiles, within its own video:

* ``sliding_tile_attention``: the tiles of a window of (wt, wh, ww) tiles centred on the query's tile and
  shifted inward at the grid's edges (on an axis with n tiles the window starts at
  ``min(max(a - (w - 1) // 2, 0), max(n - w, 0))``; where n <= w every tile is visible). One window for
  all heads, or one per head.
* ``block_sparse_attention``: explicit lists ``kv_tiles`` (e.g. from :func:`topk_tiles`).

``global_tokens`` (both ops): a number of tokens per sequence, after its video's tokens, that attend and
are attended densely, as STA does for the text tokens of a joint text-video attention (HunyuanVideo):
every video query sees its listed tiles and all its sequence's global tokens, and every global query
sees its whole sequence. No key list names them (the lists stay proportional to the visible video
tiles): the sparse kernel runs the video queries over their listed video tiles, the dense varlen kernel
of the same family (:mod:`vdit.ops.attention`) runs every query against its sequence's global keys and
the global queries against their whole sequence, and the video rows' two partial results merge through
their lse (as ring attention's blocks do). The backward hands each pass the merged output and lse, from
which each recomputes its exact share of the probabilities, so no kernel changes and no lse gradient is
needed.

Kernels (declared in ``SPEC``): Triton (``triton``) on CUDA, C++ (``cpu``) on CPU, and the reference
(``torch``): dense attention with the tile mask. Both kernels visit only the listed tiles, so their time
scales with the number of visible tiles. The backward recomputes from lse and is deterministic; it runs
in the forward's kernel family.

Repeated calls make no host synchronisation and no host-to-device copy: a tensor's values (grids,
cu_seqlens, a window or kv_tiles tensor) are read on the host once per tensor object and version
(:class:`vdit._cache.TensorCache`), and the layouts, tile lists and checks derived from them are cached by
value (grids, tile, window, global-token counts, device), so a new grids tensor with the same values costs
one read and reuses everything. Lists from :func:`topk_tiles` are valid by construction and never read
back. ``docs/sparse-gpu-cost-model.md`` (host overhead) has the measurements and the GPU checks.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from vdit._cache import TensorCache
from vdit.ops import _registry, reference
from vdit.ops._registry import ALL_FLOATS, GPU_FLOATS, MAX_GPU_HEAD_DIM, TRITON, Kernel
from vdit.ops._validation import check_cu_seqlens, check_qkv, check_softmax_scale, check_triple, offsets_summary
from vdit.ops.tiles import (
    TileLayout,
    grid_values,
    lists_with_global_rows,
    query_lists,
    sliding_window_tiles,
    tile_layout,
    to_global,
    with_global_segments,
    with_global_tiles,
)

SPEC = _registry.declare(
    "block_sparse_attention",
    Kernel("triton", devices=("cuda",), family=TRITON, interpreted=True, dtypes=GPU_FLOATS,
           max_head_dim=MAX_GPU_HEAD_DIM,
           note="FlashAttention-style loop over the listed key tiles only; deterministic backward"),
    Kernel("cpu", devices=("cpu",), dtypes=ALL_FLOATS, note="BLAS tile GEMMs over the listed key tiles only"),
)
SLIDING_SPEC = _registry.declare("sliding_tile_attention", *SPEC.kernels)


# ---- Triton implementations, fakes, autograd --------------------------------------------------

# {operator: "module:function" in vdit.kernels.triton}: the functions that implement the Triton
# operators, imported at their first call (triton is optional).
_registry.implement(TRITON, {
    "block_sparse_attention_fwd": "sparse_attention:block_sparse_attention_forward",
    "block_sparse_attention_bwd": "sparse_attention:block_sparse_attention_backward",
})


def _fakes(family: _registry.Family) -> dict:
    def fwd_fake(q, k, v, tile_offsets, kv_tiles, max_tile, softmax_scale):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=family.lse_dtype(q.dtype))

    def bwd_fake(dout, q, k, v, out, lse, tile_offsets, kv_tiles, q_tiles, max_tile, softmax_scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    return {"block_sparse_attention_fwd": fwd_fake, "block_sparse_attention_bwd": bwd_fake}


# The transposed lists the backward needs, built once per (global) list tensor.
_QUERY_LISTS = TensorCache(size=32)


def _setup(ctx, inputs, output):
    q, k, v, tile_offsets, kv_tiles, max_tile, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, tile_offsets, kv_tiles)
    ctx.params = (max_tile, scale)
    ctx.mark_non_differentiable(lse)


def _backward(family, ctx, grad_out, grad_lse):
    q, k, v, out, lse, tile_offsets, kv_tiles = ctx.saved_tensors
    num_tiles = tile_offsets.numel() - 1
    q_tiles = _QUERY_LISTS.get((kv_tiles,), (num_tiles, q.shape[1], k.shape[1]),
                               lambda: query_lists(kv_tiles, num_tiles, q.shape[1], k.shape[1]))
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    dq, dk, dv = family.op("block_sparse_attention_bwd")(grad_out, q, k, v, out, lse, tile_offsets, kv_tiles, q_tiles,
                                                         *ctx.params)
    return dq, dk, dv, None, None, None, None


_registry.register(fakes=_fakes, autograd=lambda family: {
    "block_sparse_attention_fwd": (functools.partial(_backward, family), _setup)})


# ---- validation and the tile lists -----------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _grids_error(grids: tuple, lengths: tuple, global_tokens: tuple) -> str | None:
    extra = global_tokens or (0,) * len(grids)
    for i, (row, n, g) in enumerate(zip(grids, lengths, extra)):
        if min(row) <= 0:
            return f"grids[{i}] = {tuple(row)} must be positive"
        if row[0] * row[1] * row[2] + g != n:
            plus = f" + {g} global tokens" if global_tokens else ""
            return (f"grids[{i}] = {tuple(row)} holds {row[0] * row[1] * row[2]} tokens{plus} but sequence {i} of "
                    f"cu_seqlens has {n}")
    return None


# Sequence lengths of a cu_seqlens tensor, read on the host once per tensor object and version; the grid
# checks are then cached by value (grids, lengths, global tokens).
_LENGTHS = TensorCache(size=64)


def _sequence_lengths(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    def read():
        values = cu_seqlens.tolist()
        return tuple(b - a for a, b in zip(values, values[1:]))

    return _LENGTHS.get((cu_seqlens,), "lengths", read)


# Global-token counts given as a tensor, read on the host once per tensor object and version.
_GLOBAL_COUNTS = TensorCache(size=32)


def _check_global_tokens(global_tokens, batch: int) -> tuple:
    """global_tokens: None, an int or an int tensor / sequence (B,), all >= 0 -> a tuple of B ints, () for None."""
    if global_tokens is None:
        return ()
    if isinstance(global_tokens, bool):
        raise TypeError(f"global_tokens must be an int or B ints, got {global_tokens!r}")
    if isinstance(global_tokens, int):
        values = (global_tokens,) * batch
    else:
        if isinstance(global_tokens, torch.Tensor) and (global_tokens.dtype.is_floating_point
                                                        or global_tokens.dtype == torch.bool):
            raise TypeError(f"global_tokens must hold ints, got {global_tokens.dtype}")
        try:
            if isinstance(global_tokens, torch.Tensor):
                values = _GLOBAL_COUNTS.get((global_tokens,), "counts",
                                            lambda: tuple(int(g) for g in global_tokens.tolist()))
            else:
                values = tuple(int(g) for g in global_tokens)
        except (TypeError, ValueError):
            raise TypeError(f"global_tokens must be an int or B ints, got {global_tokens!r}") from None
        if len(values) != batch:
            raise ValueError(f"global_tokens must have one entry per sequence ({batch}), got {len(values)}")
    if any(g < 0 for g in values):
        raise ValueError(f"global_tokens must be >= 0, got {list(values)}")
    return values


def _check_grids(grids, cu_seqlens, total: int, device, global_tokens: tuple = ()) -> int:
    """grids int (B, 3), positive, one per sequence of cu_seqlens with T*H*W tokens (plus its global tokens).
    grids may live on the host (no device read at all) or on the tokens' device (read once per tensor)."""
    batch = check_cu_seqlens("cu_seqlens", cu_seqlens, total, device)
    if not isinstance(grids, torch.Tensor):
        raise TypeError(f"grids must be a torch.Tensor, got {type(grids).__name__}")
    if grids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"grids must be int32 or int64, got {grids.dtype}")
    if grids.shape != (batch, 3):
        raise ValueError(f"grids must be ({batch}, 3) (one (T, H, W) per sequence of cu_seqlens), "
                         f"got {tuple(grids.shape)}")
    error = _grids_error(grid_values(grids), _sequence_lengths(cu_seqlens), global_tokens)
    if error:
        raise ValueError(error)
    return batch


def _check_packing(q, k, v, cu_seqlens, grids, tile, global_tokens) -> tuple[TileLayout, tuple]:
    """The checks both sparse ops share (q, k, v of one packing; grids, global tokens and tile against
    cu_seqlens); returns the batch's tile layout (offsets on q's device) and the global-token counts (() for
    none). Host values are read once per tensor object; everything after is cached by value."""
    check_qkv(q, k, v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens but k has {k.shape[0]} (self-attention over one packing)")
    global_tokens = _check_global_tokens(global_tokens, cu_seqlens.shape[0] - 1)
    _check_grids(grids, cu_seqlens, q.shape[0], q.device, global_tokens)
    return _layout_of(grids, tile, q.device), global_tokens


def _layout_of(grids: torch.Tensor, tile, device: torch.device) -> TileLayout:
    """The batch's tile layout, offsets on ``device``; a video smaller than one tile on every axis is refused."""
    tile = check_triple("tile", tile)
    layout = tile_layout(grids, tile, device)
    _check_tile_fits(layout.grids, tile)
    return layout


@functools.lru_cache(maxsize=256)
def _check_tile_fits(grids: tuple, tile: tuple) -> None:
    for i, row in enumerate(grids):
        if all(t > n for t, n in zip(tile, row)):
            raise ValueError(f"tile {tile} is larger than grids[{i}] = {row} on every axis: the video is less than "
                             f"one tile (tile sizes count tokens, not pixels)")


def _window_rows(rows, heads: int) -> tuple[tuple[int, int, int], ...]:
    """Window rows as ints: 3 entries each, all >= 1, one row or one per query head."""
    if len(rows) not in (1, heads) or any(len(r) != 3 for r in rows):
        raise ValueError(f"window must have 3 entries (tiles along t, h, w) or one row per query head ({heads}), "
                         f"got {[list(r) for r in rows]}")
    if any(w < 1 for r in rows for w in r):
        raise ValueError(f"window sizes must be >= 1 tile, got {[list(r) for r in rows]}")
    return tuple(tuple(r) for r in rows)


# Window tensors (one per head), read on the host once per tensor object and version.
_WINDOWS = TensorCache(size=32)


def _check_window(window, heads: int) -> tuple[tuple[int, int, int], ...]:
    """window: 3 ints, or an int tensor (heads or 1, 3), all >= 1 -> its rows as ints (1 or heads rows)."""
    if isinstance(window, torch.Tensor):
        if window.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"window must be 3 ints or an int32/int64 tensor (heads, 3), got {window.dtype}")
        if window.dim() != 2 or window.shape[0] not in (1, heads) or window.shape[1] != 3:
            raise ValueError(f"window must be ({heads}, 3) (one window per query head), got {tuple(window.shape)}")
        rows = _WINDOWS.get((window,), "window", window.tolist)
    else:
        try:
            rows = [[int(w) for w in window]]
        except (TypeError, ValueError):
            raise TypeError(f"window must be 3 ints or an int tensor (heads, 3), got {window!r}") from None
        if len(rows[0]) != 3:
            raise ValueError(f"window must have 3 entries (tiles along t, h, w), got {window!r}")
    return _window_rows(rows, heads)


@functools.lru_cache(maxsize=64)
def _kv_tiles_limit(first_tile: tuple, device: torch.device) -> torch.Tensor:
    """int64 (total_tiles, 1, 1): the tile count of each query tile's video."""
    counts = torch.tensor([b - a for a, b in zip(first_tile, first_tile[1:])])
    return torch.repeat_interleave(counts, counts)[:, None, None].to(device)


def _kv_tiles_error(kv_tiles: torch.Tensor, first_tile: tuple) -> str | None:
    """Why the values of kv_tiles are not lists of their videos' tiles, or None; one host read when they are."""
    limit = _kv_tiles_limit(first_tile, kv_tiles.device)
    bad = (kv_tiles < -1) | (kv_tiles >= limit)
    ordered = kv_tiles.sort(dim=2).values
    dup = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    any_bad, any_dup = torch.stack([bad.any(), dup.any()]).tolist()
    if any_bad:
        t, h, s = (int(i) for i in bad.nonzero()[0])
        return (f"kv_tiles[{t}, {h}, {s}] = {int(kv_tiles[t, h, s])} is not a tile of its video "
                f"(0 .. {int(limit[t, 0, 0]) - 1}, or -1 for an unused slot)")
    if any_dup:
        t, h, _ = (int(i) for i in dup.nonzero()[0])
        return f"kv_tiles[{t}, {h}] lists a key tile twice: {kv_tiles[t, h].tolist()}"
    return None


# Checked kv_tiles values: one read per (tensor object and version, layout); lists topk_tiles makes are
# entered as valid when made, so the top-k path reads none.
_KV_CHECKS = TensorCache(size=64)


def _check_kv_tiles(kv_tiles, layout: TileLayout, heads: int) -> None:
    if not isinstance(kv_tiles, torch.Tensor):
        raise TypeError(f"kv_tiles must be a torch.Tensor, got {type(kv_tiles).__name__}")
    if kv_tiles.dtype != torch.int32:
        raise TypeError(f"kv_tiles must be int32, got {kv_tiles.dtype}")
    if kv_tiles.dim() != 3 or kv_tiles.shape[0] != layout.num_tiles or kv_tiles.shape[1] not in (1, heads):
        raise ValueError(f"kv_tiles must be ({layout.num_tiles}, {heads} or 1, k) (query tiles of the batch, heads, "
                         f"slots), got {tuple(kv_tiles.shape)}")
    if kv_tiles.shape[2] == 0 or torch.compiler.is_compiling():
        return
    error = _KV_CHECKS.get((kv_tiles,), layout.first_tile, lambda: _kv_tiles_error(kv_tiles, layout.first_tile))
    if error:
        raise ValueError(error)


# Kernel-side lists: global tile indices, one row per query head, built once per tensor / window.
_GLOBAL_LISTS = TensorCache(size=32)


def _global_lists(layout: TileLayout, kv_tiles: torch.Tensor, heads: int) -> torch.Tensor:
    return _GLOBAL_LISTS.get((kv_tiles,), (layout, heads),
                             lambda: to_global(layout, kv_tiles).expand(-1, heads, -1).contiguous())


@functools.lru_cache(maxsize=64)
def _window_lists(layout: TileLayout, window: tuple, device: str) -> torch.Tensor:
    """The sliding-window lists of ``layout`` and window rows ``window``, built once per value."""
    return sliding_window_tiles(layout, torch.tensor(window)).to(device)


_WITH_GLOBALS = TensorCache(size=32)


def _lists_with_globals(layout: TileLayout, kv_tiles: torch.Tensor) -> torch.Tensor:
    return _WITH_GLOBALS.get((kv_tiles,), ("globals", layout), lambda: lists_with_global_rows(layout, kv_tiles))


def _run(spec, q, k, v, layout: TileLayout, kv_tiles, scale: float, backend: str, return_lse: bool,
         global_tokens: tuple = ()):
    chosen = _registry.select(spec, q.device, q.dtype, backend, head_dim=q.shape[2])
    if any(global_tokens):
        plan = _global_plan(layout, global_tokens)
        lists = _global_lists(plan.layout, _lists_with_globals(plan.layout, kv_tiles), q.shape[1])
        out, lse = _attend_with_globals(chosen, spec, q, k, v, plan, lists, scale)
        return (out, lse) if return_lse else out
    lists = _global_lists(layout, kv_tiles, q.shape[1])
    if chosen == "torch":
        return reference.block_sparse_attention_tiles(q, k, v, layout.offsets, lists, softmax_scale=scale,
                                                      return_lse=return_lse)
    out, lse = spec.family(chosen).op("block_sparse_attention_fwd")(
        q.contiguous(), k.contiguous(), v.contiguous(), layout.offsets, lists, layout.max_tile, scale)
    return (out, lse) if return_lse else out


# ---- global tokens: a dense segment beside the sparse kernel ---------------------------------------

@dataclasses.dataclass(frozen=True)
class _GlobalPlan:
    """Where a packed batch's global tokens are, for the sparse pass and the two dense passes.

    Attributes:
        layout: the video tiles plus tiles over the global tokens that no list names
            (:func:`vdit.ops.tiles.with_global_segments`); the sparse pass's offsets.
        rows: int64 (G,) packed positions of all global tokens, sequence by sequence.
        cu_seqlens: int32 (B + 1,) the whole sequences; cu_global: int32 (B + 1,) their global tokens.
        max_seqlen, max_global: the longest of each.
    """

    layout: TileLayout
    rows: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_global: torch.Tensor
    max_seqlen: int
    max_global: int


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def _global_plan(layout: TileLayout, global_tokens: tuple) -> _GlobalPlan:
    device = layout.offsets.device
    lengths = [t * h * w + g for (t, h, w), g in zip(layout.grids, global_tokens)]
    cu = _offsets(lengths)
    rows = torch.cat([torch.arange(int(end) - g, int(end)) for end, g in zip(cu[1:], global_tokens)])
    return _GlobalPlan(with_global_segments(layout, global_tokens), rows.to(device), cu.to(device),
                       _offsets(list(global_tokens)).to(device), max(lengths), max(global_tokens))


def _merge(out_a, lse_a, out_b, lse_b):
    """The attention of the same queries over two disjoint key sets from each set's result: out (total, Hq, Dh)
    and lse (Hq, total) each -> (out, lse) over both. A row that sees no key in either stays 0 / -inf."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)  # keeps exp() below finite
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    both = w_a + w_b
    norm = torch.where(both > 0, both, torch.ones_like(both))
    # Weights in the output dtype: an fp32 copy of a whole (total, Hq, Dh) output would double its memory.
    a, b = ((w / norm).t().unsqueeze(-1).to(out_a.dtype) for w in (w_a, w_b))
    out = out_a * a
    return out.addcmul_(out_b, b), top + torch.log(both)


def _forward_with_globals(sparse, dense, q, k, v, plan: _GlobalPlan):
    """(out, lse) from the three passes: ``sparse(q, k, v)`` over the listed video tiles (global rows 0 /
    -inf), ``dense(q, k, v, cu_q, cu_k, max_q, max_k)`` of every query against its sequence's global keys
    and of the global queries against their whole sequence; the global rows take the latter alone."""
    rows = plan.rows
    out_s, lse_s = sparse(q, k, v)
    out_g, lse_g = dense(q, k.index_select(0, rows), v.index_select(0, rows), plan.cu_seqlens, plan.cu_global,
                         plan.max_seqlen, plan.max_global)
    out, lse = _merge(out_s, lse_s, out_g, lse_g)
    out_q, lse_q = dense(q.index_select(0, rows), k, v, plan.cu_global, plan.cu_seqlens, plan.max_global,
                         plan.max_seqlen)
    return out.index_copy_(0, rows, out_q), lse.index_copy_(1, rows, lse_q.to(lse.dtype))


@dataclasses.dataclass(frozen=True)
class _GlobalCall:
    """One call's kernels (a vdit family: the sparse and the varlen operators), tiles and scale."""

    family: _registry.Family
    plan: _GlobalPlan
    lists: torch.Tensor
    scale: float

    def sparse(self, q, k, v):
        return self.family.op("block_sparse_attention_fwd")(q.contiguous(), k.contiguous(), v.contiguous(),
                                                            self.plan.layout.offsets, self.lists,
                                                            self.plan.layout.max_tile, self.scale)

    def dense(self, q, k, v, cu_q, cu_k, max_q, max_k):
        return self.family.op("varlen_attention_fwd")(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k,
                                                      max_q, max_k, self.scale, False)

    def backward(self, dout, q, k, v, out, lse):
        """(dq, dk, dv): each pass's backward from the merged out and lse, which give it its exact share of
        the probabilities (exp(s - lse)) and the softmax's row term (rowsum(dout * out))."""
        plan, rows, layout = self.plan, self.plan.rows, self.plan.layout
        dense_bwd = self.family.op("varlen_attention_bwd")
        q_tiles = _QUERY_LISTS.get((self.lists,), (layout.num_tiles, q.shape[1], k.shape[1]),
                                   lambda: query_lists(self.lists, layout.num_tiles, q.shape[1], k.shape[1]))
        dq, dk, dv = self.family.op("block_sparse_attention_bwd")(dout, q, k, v, out, lse, layout.offsets,
                                                                 self.lists, q_tiles, layout.max_tile, self.scale)
        # Global rows took no part in the video-to-global pass: lse -inf makes their probabilities 0 there.
        dq_g, dk_g, dv_g = dense_bwd(dout, q, k.index_select(0, rows), v.index_select(0, rows), out,
                                     lse.index_fill(1, rows, float("-inf")), plan.cu_seqlens, plan.cu_global,
                                     plan.max_seqlen, plan.max_global, self.scale, False)
        dq_q, dk_q, dv_q = dense_bwd(dout.index_select(0, rows), q.index_select(0, rows), k, v,
                                     out.index_select(0, rows), lse.index_select(1, rows).contiguous(),
                                     plan.cu_global, plan.cu_seqlens, plan.max_global, plan.max_seqlen,
                                     self.scale, False)
        dq = dq.add_(dq_g).index_add_(0, rows, dq_q)
        return dq, dk.add_(dk_q).index_add_(0, rows, dk_g), dv.add_(dv_q).index_add_(0, rows, dv_g)


class _WithGlobals(torch.autograd.Function):
    """Autograd of a kernel family's global-token call (:class:`_GlobalCall`); lse is not differentiable,
    as for the ops without global tokens."""

    @staticmethod
    def forward(ctx, q, k, v, call: _GlobalCall):
        out, lse = _forward_with_globals(call.sparse, call.dense, q, k, v, call.plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype).contiguous()
        return (*ctx.call.backward(dout, q.contiguous(), k.contiguous(), v.contiguous(), out, lse), None)


def _attend_with_globals(chosen: str, spec, q, k, v, plan: _GlobalPlan, lists: torch.Tensor, scale: float):
    """(out, lse) of a call with global tokens on the kernel ``chosen`` (the reference: autograd through
    its passes and the merge)."""
    if chosen == "torch":
        def sparse(q, k, v):
            return reference.block_sparse_attention_tiles(q, k, v, plan.layout.offsets, lists, softmax_scale=scale,
                                                          return_lse=True)

        def dense(q, k, v, cu_q, cu_k, max_q, max_k):
            return reference.varlen_attention(q, k, v, cu_q, cu_k, softmax_scale=scale, return_lse=True)

        return _forward_with_globals(sparse, dense, q, k, v, plan)
    return _WithGlobals.apply(q, k, v, _GlobalCall(spec.family(chosen), plan, lists, scale))


# ---- public API ------------------------------------------------------------------------------

def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           grids: torch.Tensor, tile: Sequence[int], kv_tiles: torch.Tensor, *,
                           global_tokens=None, softmax_scale: float | None = None, return_lse: bool = False,
                           backend: str = "auto"):
    """Attention of each query to the key tiles its tile lists, over packed videos in tile order.

    Args:
        q: (total, Hq, Dh); k, v: (total, Hk, Dh), Hq % Hk == 0 (grouped-query); each video's tokens in
            tile order (:func:`vdit.packing.tile_permutation`).
        cu_seqlens: int32 (B + 1,) offsets of the videos; grids: int (B, 3) their token grids (T, H, W), on
            the tokens' device or on the host (a CPU grids tensor is never read from the device).
        tile: (tt, th, tw) tokens per tile (edge tiles partial).
        kv_tiles: int32 (total_query_tiles, Hq or 1, k): rows are the query tiles (videos in batch order,
            each video's tiles row-major over (a, b, c)); each holds key tiles local to that video
            (row-major over (a, b, c)) or -1 for an unused slot; no tile twice in a row.
        global_tokens: None, an int, or B ints (a list or an int tensor): that many tokens follow each
            video's T*H*W tokens in its sequence (cu_seqlens counts them); they attend and are attended
            densely within their sequence (module docstring), by dense passes beside the sparse kernel.
            ``kv_tiles`` lists video tiles only.
        softmax_scale: positive, default Dh ** -0.5.
        return_lse: also return lse (Hq, total) float32 (float64 for float64 input on ``cpu`` / ``torch``)
            over every key a query sees (its listed tiles and its sequence's global tokens); not
            differentiable on the kernels.
        backend: see :mod:`vdit.backends`.
    Returns:
        out like q (0 for a query whose row lists no tile); with ``return_lse`` the pair (out, lse).
        Differentiable in q, k and v.
    Raises:
        TypeError / ValueError naming the argument, before any kernel runs.
    """
    layout, global_tokens = _check_packing(q, k, v, cu_seqlens, grids, tile, global_tokens)
    _check_kv_tiles(kv_tiles, layout, q.shape[1])
    scale = check_softmax_scale(softmax_scale, q.shape[2])
    return _run(SPEC, q, k, v, layout, kv_tiles, scale, backend, return_lse, global_tokens)


def block_sparse_attention_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_offsets: torch.Tensor,
                                 kv_tiles: torch.Tensor, *, softmax_scale: float | None = None,
                                 backend: str = "auto") -> torch.Tensor:
    """Tile-sparse attention over explicitly given tiles: for a caller holding a piece of a video rather than
    whole videos (a sequence-parallel rank's range and its halo, vdit.distributed.sparse).

    Args:
        q, k, v: (n, Hq, Dh), (n, Hk, Dh), (n, Hk, Dh), the same n rows cut into tiles.
        tile_offsets: int32 (num_tiles + 1,) on q's device: tile i is rows tile_offsets[i]:tile_offsets[i + 1]
            (from 0 to n, never decreasing).
        kv_tiles: int32 (num_tiles, Hq or 1, k): the key tiles (indices into the same tiles) each query tile
            attends, -1 for an unused slot, no tile twice in a row; a row of -1 gives that tile's queries 0.
        softmax_scale: positive, default Dh ** -0.5.
        backend: see :mod:`vdit.backends`.
    Returns:
        out like q; differentiable in q, k and v.
    Raises:
        TypeError / ValueError naming the argument, before any kernel runs.
    """
    check_qkv(q, k, v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same rows (one set of tiles), got {q.shape[0]} and {k.shape[0]}")
    num_tiles = check_cu_seqlens("tile_offsets", tile_offsets, q.shape[0], q.device)
    layout = _explicit_layout(tile_offsets, num_tiles)
    _check_kv_tiles(kv_tiles, layout, q.shape[1])
    scale = check_softmax_scale(softmax_scale, q.shape[2])
    return _run(SPEC, q, k, v, layout, kv_tiles, scale, backend, False)


def _explicit_layout(tile_offsets: torch.Tensor, num_tiles: int) -> TileLayout:
    """A TileLayout of given tiles: one pseudo-video of ``num_tiles`` tiles, so that list entries are plain tile
    indices. Only what the kernels read is meaningful (offsets, first_tile, max_tile)."""
    longest = max(1, offsets_summary(tile_offsets).longest)
    return TileLayout(grids=((num_tiles, 1, 1),), tile=(1, 1, 1), tile_grids=((num_tiles, 1, 1),),
                      first_tile=(0, num_tiles), offsets=tile_offsets, max_tile=longest)


def sliding_tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           grids: torch.Tensor, tile: Sequence[int], window, *, global_tokens=None,
                           softmax_scale: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Sliding-tile attention (STA) over packed videos of any sizes, in tile order.

    Args:
        q, k, v, cu_seqlens, grids, tile, global_tokens, softmax_scale, return_lse, backend: as
            :func:`block_sparse_attention`.
        window: (wt, wh, ww) tiles per axis, each >= 1, or an int tensor (Hq, 3) with one window per query
            head (or (1, 3): one for all heads). A query in tile (a, b, c) sees the keys of the tiles of its
            own video whose index on each axis lies in [s, s + w), s = min(max(a - (w - 1) // 2, 0),
            max(n - w, 0)) for an axis of n tiles; a window at least as large as the grid is dense attention.
    Returns:
        As :func:`block_sparse_attention`.
    """
    layout, global_tokens = _check_packing(q, k, v, cu_seqlens, grids, tile, global_tokens)
    windows = _check_window(window, q.shape[1])
    scale = check_softmax_scale(softmax_scale, q.shape[2])
    kv_tiles = _window_lists(layout, windows, str(q.device))
    return _run(SLIDING_SPEC, q, k, v, layout, kv_tiles, scale, backend, return_lse, global_tokens)


def pooled_tiles(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Mean of each tile's tokens: x (total, H, D) in tile order -> (total_tiles, H, D), in x's dtype."""
    offsets = layout.offsets.long()
    sizes = (offsets[1:] - offsets[:-1]).to(x.device)
    tile_of_token = torch.repeat_interleave(torch.arange(layout.num_tiles, device=x.device), sizes,
                                            output_size=x.shape[0])
    sums = torch.zeros((layout.num_tiles, *x.shape[1:]), dtype=torch.float32, device=x.device)
    sums.index_add_(0, tile_of_token, x.float())
    return (sums / sizes.clamp_min(1).to(torch.float32)[:, None, None]).to(x.dtype)


def topk_tiles(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, grids: torch.Tensor,
               tile: Sequence[int], topk: int, *, global_tokens=None) -> torch.Tensor:
    """The top-k key tiles of every query tile and head, from tile-pooled q and k (VSA's coarse stage).

    Args:
        q: (total, Hq, Dh); k: (total, Hk, Dh); in tile order; cu_seqlens, grids, tile as
            :func:`block_sparse_attention`.
        topk: key tiles kept per (query tile, head), >= 1; a video with fewer tiles keeps all of them and
            pads with -1.
        global_tokens: as :func:`block_sparse_attention`; they take no part in the selection (the attention
            adds them to every row).
    Returns:
        kv_tiles int32 (total_query_tiles, Hq, topk) for :func:`block_sparse_attention`, ascending per
        row. Not differentiable (a selection).
    """
    check_qkv(q, k, k)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    global_tokens = _check_global_tokens(global_tokens, cu_seqlens.shape[0] - 1)
    _check_grids(grids, cu_seqlens, q.shape[0], q.device, global_tokens)
    layout = _layout_of(grids, tile, q.device)
    pooled_layout = with_global_tiles(layout, global_tokens) if global_tokens else layout
    with torch.no_grad():
        pq = pooled_tiles(q, pooled_layout).float()
        pk = pooled_tiles(k, pooled_layout).float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        rows = []
        for video, a in enumerate(pooled_layout.first_tile[:-1]):
            b = a + layout.video_tiles(video)  # the video's own tiles: global tiles are not candidates
            scores = torch.einsum("ihd,jhd->hij", pq[a:b], pk[a:b])  # (Hq, n, n) within one video
            keep = min(topk, b - a)
            chosen = scores.topk(keep, dim=-1).indices.sort(dim=-1).values.permute(1, 0, 2)  # (n, Hq, keep)
            rows.append(torch.nn.functional.pad(chosen, (0, topk - keep), value=-1))
        kv_tiles = torch.cat(rows).to(torch.int32)
    _KV_CHECKS.get((kv_tiles,), layout.first_tile, lambda: None)  # valid by construction: never read back
    return kv_tiles
