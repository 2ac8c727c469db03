"""Block-sparse spacetime attention in Triton (sliding-tile windows, listed tiles): the entry points the
ops layer calls.

Files, by role (as the dense ``attention`` package):

* ``forward.py``   the forward kernel: per (query tile block, head), an online softmax over the key tiles
  of its list.
* ``backward.py``  the deterministic backward: dq per (query tile block, head) over its key tiles, dk / dv
  per (key tile block, kv head) over its transposed list; delta is the dense preprocess kernel.
* ``scheduler.py`` the (tile, row block) work list and the compacted key lists, built on the device, and
  the prologue that reads them.
* ``configs.py``   tile configurations per (kernel, arch, head dim, dtype, tile size).

The inner-loop steps are the dense attention's (``attention/forward.py``, ``attention/backward.py``) and
the prologue helpers its ``common.py`` (``head_rows``, ``load_rows``, ``load_lse2``, ``query_tile``), so
both operators share their numerics.

Semantics are those of ``vdit.ops.reference.block_sparse_attention_tiles``: tokens in tile order, tile t
the token range [tile_offsets[t], tile_offsets[t + 1]) (sizes differ: edge tiles are partial); query
tile t with query head h attends every key of the key tiles ``kv_tiles[t, h, :]`` (whole tiles, -1 an
unused slot anywhere in a row); query head h uses kv head h // (Hq / Hk); a query that sees no key gets
out 0, lse -inf and zero gradients.

Race-freedom: every output row is written by exactly one program. The work lists hold each (tile, row
block) once, so out, lse and dq rows of (tile, block, head) belong to the program (item, head), dk and dv
rows of (tile, block, kv head) to the program (item, kv head). With 4x4x4 tiles each kernel runs two
launches, 64-row blocks for the tiles of more than 16 tokens and 16-row blocks for the partial edge tiles
(``_launches``): their lists take disjoint classes of tiles, so this holds across the launches too. No kernel
reads memory another program of its launch writes (delta is written by an earlier launch). No atomics: the
backward is bitwise deterministic.

What the launchers guarantee the kernels: q, k, v, dout, out and every output contiguous (total, heads,
HEAD_DIM) with HEAD_DIM % 8 == 0 and 16-byte aligned data (copied otherwise), so each head row starts 16-byte
aligned (``head_rows``' hint); lse and delta (Hq, total) float32; the work lists sized from shapes only; the
key-tile lists compacted (``scheduler.compact_lists``: count, then the used entries). What they take from
``vdit.ops`` (validated there, once per tensor): tile_offsets int32 starting at 0, non-decreasing, ending at
total; ``max_tile`` at least every tile's token count (derived from the grids: it picks the row blocks and, at
most the key block, the flat key loop that reads one key block per tile); lists with in-range entries and no
tile twice in a row (a repeated tile would be counted twice). The kernels still treat entries outside [0,
num_tiles) (kv_tiles) or [0, num_tiles * Hq) (q_tiles), and q_tiles entries of a head outside the program's
group, as unused slots, so malformed lists give wrong numbers but never an out-of-bounds access. Rows past a
tile's end are masked on load and store. Token offsets are int32 (total < 2**31); row offsets of a head are
taken in int64.

Head dims: any up to 256. Multiples of 8 run as they are (padded to a power of two inside the kernels
with masked loads); others are zero-padded here to the next multiple of 8 (a copy, which changes no
score) and the outputs cut back. Above 256: ValueError. fp16 / bf16 use tensor cores with fp32
accumulation, fp32 exact fp32 dot products (no tf32).
"""
from __future__ import annotations

import contextlib

import torch

from vdit._memory import new_output
from vdit.kernels.triton._launch import aligned, pad_head_dim
from vdit.kernels.triton.attention import backward as dense_backward
from vdit.kernels.triton.attention.configs import MAX_HEAD_DIM, Config, block_d_of, supports_head_dim
from vdit.kernels.triton.sparse_attention import backward, forward
from vdit.kernels.triton.sparse_attention.configs import (
    CONFIGS,
    EDGE_TILE_CONFIGS,
    FP32_CONFIGS,
    INTERPRETER_CONFIG,
    SMALL_TILE_CONFIGS,
    flat_loop,
    program_rows,
    select_config,
    select_edge_config,
)
from vdit.kernels.triton.sparse_attention.scheduler import (
    cached_compact_lists,
    cached_work_items,
    compact_lists,
    work_items,
)

# What only a GPU can verify (the static report quotes this; the static check covers compilation,
# registers, spills, shared memory and wgmma pipelining of every shipped configuration).
GPU_ONLY = ("speed against dense attention at the same visible-key count (with tiles of at most a key block the "
            "forward and dq walk one flat pipelined loop, two 64-row CTAs per SM on sm_90; larger tiles walk each "
            "tile as a short pipelined loop with its own prologue and drain: docs/sparse-gpu-cost-model.md gives "
            "the static figures, only timing tells what they cost); bf16 tl.dot numerics (the interpreter's bf16 "
            "dot is wrong). Race-freedom is by construction: each out / lse / dq row belongs to one (query tile "
            "block, head) program and each dk / dv row to one (key tile block, kv head) program, and no kernel "
            "writes memory another program reads.")

__all__ = ["block_sparse_attention_forward", "block_sparse_attention_backward", "work_items", "compact_lists",
           "Config", "CONFIGS", "FP32_CONFIGS", "SMALL_TILE_CONFIGS", "EDGE_TILE_CONFIGS", "INTERPRETER_CONFIG",
           "select_config", "on_device", "aot_specs", "GPU_ONLY"]


def _check_head_dim(head_dim: int) -> None:
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the triton block-sparse attention kernels take head dims in [1, {MAX_HEAD_DIM}], "
                         f"got {head_dim}")




def on_device(t: torch.Tensor):
    """The context every launch runs in: ``t``'s CUDA device made current. Triton launches on the current
    device, not the tensors' (a cuda:1 tensor without torch.cuda.set_device(1) would fail to launch)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _index(t: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """An int32 index tensor with unit stride along its last dim (fully contiguous if asked); unchanged
    when it already is one, so the work-list cache, keyed by the tensor object, keeps hitting."""
    if t.dtype != torch.int32:
        t = t.to(torch.int32)
    if contiguous:
        return t.contiguous()
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _configs(kernel: str, q: torch.Tensor, max_tile: int, config: Config | None,
             edge_config: Config | None) -> tuple[Config, Config | None]:
    """The (table, edge) configurations of ``kernel`` for q's device, head dim and dtype: the tables' unless
    ``config`` overrides them (tests; then ``edge_config`` is the edge launch's, None for none)."""
    if config is not None:
        return config, edge_config
    head_dim = q.shape[2]
    return (select_config(kernel, q.device, head_dim, q.dtype, max_tile),
            select_edge_config(kernel, q.device, head_dim, q.dtype, max_tile))


def _launches(kernel: str, config: Config, edge: Config | None, tile_offsets: torch.Tensor, lists: torch.Tensor,
              total: int, entries_per_tile: int = 1, csr_heads: int | None = None) -> list[tuple[Config, torch.Tensor]]:
    """(configuration, work list) of each launch of ``kernel``: one over every tile, or, with an ``edge``
    configuration, one over the tiles of more than ``program_rows(edge)`` tokens and one over the others (the
    partial edge tiles), each in row blocks of its own size. The two classes partition the tiles."""
    rows = program_rows(kernel, config)
    if edge is None or program_rows(kernel, edge) >= rows:
        return [(config, cached_work_items(tile_offsets, lists, total, rows, entries_per_tile, csr_heads=csr_heads))]
    split = program_rows(kernel, edge)
    return [(config, cached_work_items(tile_offsets, lists, total, rows, entries_per_tile, (split, None), csr_heads)),
            (edge, cached_work_items(tile_offsets, lists, total, split, entries_per_tile, (0, split), csr_heads))]


def block_sparse_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_offsets: torch.Tensor,
                                   kv_tiles: torch.Tensor, max_tile: int, softmax_scale: float, *,
                                   config: Config | None = None, edge_config: Config | None = None):
    """Forward of block-sparse attention over a packed batch in tile order (inputs validated by vdit.ops).

    Args:
        q: (total, Hq, D) fp16/bf16/fp32; k, v: (total, Hk, D), Hq % Hk == 0, same dtype.
        tile_offsets: int32 (num_tiles + 1,) token offsets of the tiles, on q's device.
        kv_tiles: int32 (num_tiles, Hq or 1, K) global key tiles per query tile and head, -1 unused.
        max_tile: the largest tile's token count (vdit.ops derives it from the grids): picks the row block
            (``configs.table_config``) and, when it is at most the key block, the flat key loop
            (``configs.flat_loop``), which reads one key block per tile: it must bound every tile.
        softmax_scale: multiplier of q k^T (positive).
        config, edge_config: tile configuration overrides (tests): ``edge_config`` runs the tiles of at most
            its BLOCK_M tokens in a second launch (``_launches``). By default both come from the tables.
    Returns:
        out (total, Hq, D) like q; lse (Hq, total) float32 natural log, -inf where a query sees no key.
    """
    _check_head_dim(q.shape[2])
    if not supports_head_dim(q.shape[2]):
        q8, k8, v8 = (pad_head_dim(t) for t in (q, k, v))
        out, lse = block_sparse_attention_forward(q8, k8, v8, tile_offsets, kv_tiles, max_tile, softmax_scale,
                                                  config=config, edge_config=edge_config)
        return out[..., :q.shape[2]].contiguous(), lse
    with on_device(q):
        return _forward(q, k, v, tile_offsets, kv_tiles, max_tile, softmax_scale, config, edge_config)


def _forward(q, k, v, tile_offsets, kv_tiles, max_tile, softmax_scale, config, edge_config):
    total, num_heads_q, head_dim = q.shape
    q, k, v = aligned(q), aligned(k), aligned(v)
    tile_offsets, kv_tiles = _index(tile_offsets, contiguous=True), _index(kv_tiles)
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((num_heads_q, total), dtype=torch.float32, device=q.device)
    cfg, edge = _configs("fwd", q, max_tile, config, edge_config)
    lists = cached_compact_lists(kv_tiles, tile_offsets.numel() - 1)
    for launch_cfg, work in _launches("fwd", cfg, edge, tile_offsets, kv_tiles, total):
        forward.launch(q, k, v, out, lse, tile_offsets, lists, work, softmax_scale, launch_cfg,
                       flat_loop(max_tile, launch_cfg))
    return out, lse


def block_sparse_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    out: torch.Tensor, lse: torch.Tensor, tile_offsets: torch.Tensor,
                                    kv_tiles: torch.Tensor, q_tiles: torch.Tensor, max_tile: int,
                                    softmax_scale: float, *, dkdv_config: Config | None = None,
                                    dq_config: Config | None = None, edge_config: Config | None = None):
    """Backward of :func:`block_sparse_attention_forward`; deterministic (no atomics).

    Args:
        dout: (total, Hq, D) (any strides: made contiguous); out, lse: the forward's outputs.
        q_tiles: int32 1-D, the transposed lists in CSR form (``vdit.ops.tiles.query_lists``): per key tile
            and kv head, ``query_tile * Hq + query_head`` of every (query tile, head) that lists it.
        The rest as in the forward; dkdv_config / dq_config: tile configuration overrides (tests), and
        edge_config the second launch of both (the tiles of at most its BLOCK_N tokens for dk / dv, BLOCK_M
        for dq), as in the forward.
    Returns:
        dq (total, Hq, D), dk, dv (total, Hk, D) in the dtypes of q, k, v.
    """
    _check_head_dim(q.shape[2])
    if not supports_head_dim(q.shape[2]):
        padded = (pad_head_dim(t) for t in (dout, q, k, v, out))
        grads = block_sparse_attention_backward(*padded, lse, tile_offsets, kv_tiles, q_tiles, max_tile,
                                                softmax_scale, dkdv_config=dkdv_config, dq_config=dq_config,
                                                edge_config=edge_config)
        return tuple(g[..., :q.shape[2]].contiguous() for g in grads)
    with on_device(q):
        return _backward(dout, q, k, v, out, lse, tile_offsets, kv_tiles, q_tiles, max_tile, softmax_scale,
                         dkdv_config, dq_config, edge_config)


def _backward(dout, q, k, v, out, lse, tile_offsets, kv_tiles, q_tiles, max_tile, softmax_scale, dkdv_config,
              dq_config, edge_config):
    total, num_heads_q, head_dim = q.shape
    dout, q, k, v, out = (aligned(t) for t in (dout.to(q.dtype), q, k, v, out))
    lse = lse.contiguous()
    tile_offsets, kv_tiles, q_tiles = (_index(tile_offsets, contiguous=True), _index(kv_tiles),
                                       _index(q_tiles, contiguous=True))
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    delta = new_output((num_heads_q, total), dtype=torch.float32, device=q.device)
    dense_backward.launch_preprocess(dout, out, delta, block_d_of(head_dim))  # delta = rowsum(dout * out)

    cfg, edge = _configs("bwd_dkdv", q, max_tile, dkdv_config, edge_config)
    for launch_cfg, work in _launches("bwd_dkdv", cfg, edge, tile_offsets, q_tiles, total, num_heads_q, k.shape[1]):
        backward.launch_dkdv(dout, q, k, v, lse, delta, dk, dv, tile_offsets, q_tiles, work, softmax_scale,
                             launch_cfg)
    cfg, edge = _configs("bwd_dq", q, max_tile, dq_config, edge_config)
    lists = cached_compact_lists(kv_tiles, tile_offsets.numel() - 1)
    for launch_cfg, work in _launches("bwd_dq", cfg, edge, tile_offsets, kv_tiles, total):
        backward.launch_dq(dout, q, k, v, lse, delta, dq, tile_offsets, lists, work, softmax_scale, launch_cfg,
                           flat_loop(max_tile, launch_cfg))
    return dq, dk, dv


def aot_specs() -> list:
    """Every shipped configuration of the three kernels (fp16, bf16, fp32; head dims 64, 128, 256 and the
    padded 96; sm_90, and the sm_80 tiles on sm_80 and sm_86), for the static GPU check."""
    return forward.aot_specs() + backward.aot_specs()
