"""Triton forward kernel of block-sparse attention.

One program per (query tile, block of BLOCK_M rows of that tile) work item (``scheduler``) and query
head. Its query block stays in registers; it walks the ``count`` key tiles of its compacted list
(``scheduler.compact_lists``: count, then the used entries of kv_tiles[tile, head, :]), with the dense
forward's online-softmax step (``attention.forward.fwd_step``: base 2, fp32 accumulation). Only a key
tile's partial last block takes the score mask (a runtime branch).

Two loop shapes (constexpr FLAT): when every tile holds at most BLOCK_N tokens (4x4x4 tiles), one flat
loop over the listed key blocks, one per tile, which Triton pipelines across tiles; otherwise a loop over
the tiles around a loop over each tile's blocks of BLOCK_N rows (tile (6, 8, 8) is 384 tokens), whose
inner loop is pipelined per tile (a load prologue and a full drain per tile).

Race-free: the work list holds each (tile, row block) once, so the out rows and lse entries of (tile,
block, head) are written by exactly one program, and the kernel writes nothing it reads.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vdit.kernels.triton.attention.common import LOG2E, head_rows, load_rows, query_tile
from vdit.kernels.triton.attention.configs import block_d_of, precision_of
from vdit.kernels.triton.attention.forward import fwd_epilogue, fwd_step
from vdit.kernels.triton.sparse_attention.configs import shipped
from vdit.kernels.triton.sparse_attention.scheduler import PACKING_ARGS, tile_span, work_item


@triton.jit(do_not_specialize=PACKING_ARGS)
def sparse_fwd_kernel(
    Q, K, V, O, LSE, OFFSETS, KV_TILES, WORK,
    total, num_tiles, num_heads_q, num_heads_k, list_stride_t, list_stride_h, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, FLAT: tl.constexpr,
):
    h = tl.program_id(1)
    tile, block, q_start, q_len = work_item(WORK, OFFSETS)
    if tile < 0:  # padding item of the work list (its length is an upper bound)
        return
    hk = h // (num_heads_q // num_heads_k)
    stride_q = num_heads_q * HEAD_DIM
    stride_k = num_heads_k * HEAD_DIM
    # rows: tile-local query rows of the block; row_ok: those inside the tile (the others read 0 and
    # are never stored).
    m0, rows, row_ok, d_mask, q_offs = query_tile(block, q_len, stride_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = load_rows(head_rows(Q, q_start + m0, stride_q, h, HEAD_DIM), q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    kv_offs = tl.arange(0, BLOCK_N)[:, None] * stride_k + tl.arange(0, BLOCK_D)[None, :]
    lists = KV_TILES + tile.to(tl.int64) * list_stride_t + h * list_stride_h  # count, then the key tiles
    count = tl.load(lists)

    qk_scale = softmax_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if FLAT:
        # Every tile is one key block: one loop over the listed key blocks, which the compiler pipelines
        # across tiles (one load prologue before it, one drain after it).
        for i in range(0, count):
            k_start, k_len = tile_span(OFFSETS, tl.load(lists + 1 + i), True)
            acc, l_i, m_i = fwd_step(acc, l_i, m_i, q, head_rows(K, k_start, stride_k, hk, HEAD_DIM),
                                      head_rows(V, k_start, stride_k, hk, HEAD_DIM), kv_offs, d_mask, 0,
                                      (k_len // BLOCK_N) * BLOCK_N, k_len, stride_k, rows, 0, qk_scale, HEAD_DIM,
                                      BLOCK_D, BLOCK_N, False, PRECISION, False)
    else:
        for slot in range(0, count):
            j = tl.load(lists + 1 + slot)
            # The compacted lists hold tiles in [0, num_tiles) only; the check keeps a malformed list in bounds.
            k_start, k_len = tile_span(OFFSETS, j, (j >= 0) & (j < num_tiles))
            k_base = head_rows(K, k_start, stride_k, hk, HEAD_DIM)
            v_base = head_rows(V, k_start, stride_k, hk, HEAD_DIM)
            full = (k_len // BLOCK_N) * BLOCK_N  # the block from here on is partial: its padding keys are masked
            for start_n in range(0, k_len, BLOCK_N):
                acc, l_i, m_i = fwd_step(acc, l_i, m_i, q, k_base, v_base, kv_offs, d_mask, start_n, full, k_len,
                                          stride_k, rows, 0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION,
                                          False)

    # A row that sees no key (an all -1 row, or only empty tiles) gets out 0, lse -inf.
    fwd_epilogue(O, LSE, acc, l_i, m_i, h, q_start, m0, rows, row_ok, d_mask, q_offs, stride_q, total, HEAD_DIM)


def launch(q, k, v, out, lse, tile_offsets, lists, work, softmax_scale, config, flat):
    """:func:`sparse_fwd_kernel` over ``work`` (n, 2) int32 items x query heads. lists: the compacted key
    tiles (``scheduler.compact_lists``, (num_tiles, Hq or 1, 1 + K) contiguous); ``flat``: every tile holds
    at most config.block_n tokens (``configs.flat_loop``), one key block each."""
    total, num_heads_q, head_dim = q.shape
    if work.shape[0] and num_heads_q:
        sparse_fwd_kernel[(work.shape[0], num_heads_q)](
            q, k, v, out, lse, tile_offsets, lists, work,
            total, tile_offsets.numel() - 1, num_heads_q, k.shape[1], lists.stride(0),
            lists.stride(1) if lists.shape[1] > 1 else 0, float(softmax_scale),
            HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            PRECISION=precision_of(q.dtype), FLAT=flat, num_warps=config.num_warps, num_stages=config.num_stages)


def aot_specs() -> list:
    """The forward's shipped configurations (``configs.shipped``)."""
    from vdit.kernels.triton.aot import KernelSpec, signature

    specs = []
    for archs, head_dim, dtype, cfg, flat in shipped("fwd"):
        sig = signature(sparse_fwd_kernel, dtype, LSE="*fp32", OFFSETS="*i32", KV_TILES="*i32", WORK="*i32",
                        softmax_scale="fp32")
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          PRECISION=precision_of(dtype), FLAT=flat)
        # wgmma takes M tiles of 64 rows per warpgroup; the M tile here is BLOCK_M.
        specs.append(KernelSpec(sparse_fwd_kernel, sig, constexprs, cfg.num_warps, cfg.num_stages,
                                f"sparse_fwd d{head_dim} {dtype} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps}"
                                f"{' flat' * flat}",
                                matmul=dtype != "fp32" and cfg.block_m >= 64, archs=archs))
    return specs
