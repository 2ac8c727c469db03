"""Triton backward kernels of block-sparse attention (deterministic: no atomics).

After the dense backward's preprocess (delta = rowsum(dout * out), ``attention.backward``):

* ``sparse_bwd_dkdv_kernel``: one program per (key tile, block of BLOCK_N rows of that tile) work item
  and kv head. It keeps its k, v block and the fp32 dk, dv accumulators in registers and walks the
  entries ``query_tile * Hq + query_head`` of its transposed list (``vdit.ops.tiles.query_lists``: one
  CSR buffer, list ``tile * Hk + hk`` between two offsets), each query tile in blocks of BLOCK_M rows,
  with the dense kernel's step (``attention.backward.dkdv_step``). Every query head of the group is summed
  inside the one program, which is what makes grouped-query dk / dv deterministic.
* ``sparse_bwd_dq_kernel``: one program per (query tile, block of BLOCK_M rows) item and query head,
  over the key tiles of its compacted list as in the forward (the same two loop shapes), with the dense
  ``dq_step``.

Race-free: the work lists hold each (tile, row block) once, so each dq row of (tile, block, head) and
each dk / dv row of (tile, block, kv head) is written by exactly one program; the kernels read only the
inputs and delta, written by an earlier launch.

Rows that saw no key have lse -inf, read as +inf (``load_lse2``): their p, and every gradient they
contribute, is exactly 0. Query rows past their tile's end read q = dout = 0 and lse +inf, so they add
nothing; key rows past the program's tile end read k = v = 0 and only produce dk / dv rows that are
never stored; in dq the partial last block of a key tile is masked because its rows reach dq.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vdit.kernels.triton.attention.backward import dkdv_step, dq_step
from vdit.kernels.triton.attention.common import LOG2E, head_rows, load_lse2, load_rows, query_tile
from vdit.kernels.triton.attention.configs import block_d_of, precision_of
from vdit.kernels.triton.sparse_attention.configs import shipped
from vdit.kernels.triton.sparse_attention.scheduler import PACKING_ARGS, tile_span, work_item


@triton.jit(do_not_specialize=PACKING_ARGS)
def sparse_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, OFFSETS, KV_TILES, WORK,
    total, num_tiles, num_heads_q, num_heads_k, list_stride_t, list_stride_h, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, FLAT: tl.constexpr,
):
    h = tl.program_id(1)
    tile, block, q_start, q_len = work_item(WORK, OFFSETS)
    if tile < 0:  # padding item of the work list
        return
    hk = h // (num_heads_q // num_heads_k)
    stride_q = num_heads_q * HEAD_DIM
    stride_k = num_heads_k * HEAD_DIM
    m0, rows, row_ok, d_mask, q_offs = query_tile(block, q_len, stride_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = load_rows(head_rows(Q, q_start + m0, stride_q, h, HEAD_DIM), q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    do = load_rows(head_rows(DO, q_start + m0, stride_q, h, HEAD_DIM), q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    lse_off = h.to(tl.int64) * total + q_start
    lse2 = load_lse2(LSE + lse_off, rows, row_ok)
    delta = tl.load(DELTA + lse_off + rows, mask=row_ok, other=0.0)
    kv_offs = tl.arange(0, BLOCK_N)[:, None] * stride_k + tl.arange(0, BLOCK_D)[None, :]
    lists = KV_TILES + tile.to(tl.int64) * list_stride_t + h * list_stride_h  # count, then the key tiles
    count = tl.load(lists)

    qk_scale = softmax_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if FLAT:  # every tile is one key block: one loop over the listed key blocks, as in the forward
        for i in range(0, count):
            k_start, k_len = tile_span(OFFSETS, tl.load(lists + 1 + i), True)
            dq = dq_step(dq, q, do, lse2, delta, head_rows(K, k_start, stride_k, hk, HEAD_DIM),
                          head_rows(V, k_start, stride_k, hk, HEAD_DIM), kv_offs, d_mask, 0,
                          (k_len // BLOCK_N) * BLOCK_N, k_len, stride_k, rows, 0, qk_scale, HEAD_DIM, BLOCK_D,
                          BLOCK_N, False, PRECISION)
    else:
        for slot in range(0, count):
            j = tl.load(lists + 1 + slot)
            k_start, k_len = tile_span(OFFSETS, j, (j >= 0) & (j < num_tiles))  # in bounds even if malformed
            k_base = head_rows(K, k_start, stride_k, hk, HEAD_DIM)
            v_base = head_rows(V, k_start, stride_k, hk, HEAD_DIM)
            full = (k_len // BLOCK_N) * BLOCK_N  # the partial last block masks p (its padding keys read 0)
            for start_n in range(0, k_len, BLOCK_N):
                dq = dq_step(dq, q, do, lse2, delta, k_base, v_base, kv_offs, d_mask, start_n, full, k_len,
                              stride_k, rows, 0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION)
    dq = dq * softmax_scale
    tl.store(head_rows(DQ, q_start + m0, stride_q, h, HEAD_DIM) + q_offs, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=PACKING_ARGS)
def sparse_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, OFFSETS, Q_TILES, WORK,
    total, num_tiles, num_heads_q, num_heads_k, list_len, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    hk = tl.program_id(1)
    tile, block, k_start, k_len = work_item(WORK, OFFSETS)
    if tile < 0:
        return
    group = num_heads_q // num_heads_k
    stride_q = num_heads_q * HEAD_DIM
    stride_k = num_heads_k * HEAD_DIM
    # The program's key block plays the role the query block plays in the forward.
    n0, cols, col_ok, d_mask, kv_offs = query_tile(block, k_len, stride_k, HEAD_DIM, BLOCK_N, BLOCK_D)
    k = load_rows(head_rows(K, k_start + n0, stride_k, hk, HEAD_DIM), kv_offs, col_ok, d_mask, HEAD_DIM, BLOCK_D)
    v = load_rows(head_rows(V, k_start + n0, stride_k, hk, HEAD_DIM), kv_offs, col_ok, d_mask, HEAD_DIM, BLOCK_D)
    q_offs = tl.arange(0, BLOCK_M)[:, None] * stride_q + tl.arange(0, BLOCK_D)[None, :]
    # The list's bounds, clamped to the entries (a malformed list stays in bounds).
    lists = num_tiles * num_heads_k
    first = tl.maximum(tl.load(Q_TILES + tile * num_heads_k + hk), lists + 1)
    last = tl.minimum(tl.load(Q_TILES + tile * num_heads_k + hk + 1), list_len)

    qk_scale = softmax_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for slot in range(first, last):
        e = tl.load(Q_TILES + slot)  # query_tile * Hq + query_head
        # Out of range, or a head outside this program's group: skipped (never out of bounds).
        ok = (e >= 0) & (e < num_tiles * num_heads_q)
        e = tl.where(ok, e, 0)
        h = e % num_heads_q
        ok = ok & (h // group == hk)
        q_start, q_len = tile_span(OFFSETS, e // num_heads_q, ok)
        q_base = head_rows(Q, q_start, stride_q, h, HEAD_DIM)
        do_base = head_rows(DO, q_start, stride_q, h, HEAD_DIM)
        lse_base = LSE + h.to(tl.int64) * total + q_start
        delta_base = DELTA + h.to(tl.int64) * total + q_start
        for start_m in range(0, q_len, BLOCK_M):
            dk, dv = dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_offs, d_mask, start_m, q_len,
                                stride_q, cols, 0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, PRECISION)

    dk = dk * softmax_scale
    store_mask = col_ok[:, None] & d_mask[None, :]
    tl.store(head_rows(DK, k_start + n0, stride_k, hk, HEAD_DIM) + kv_offs, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(head_rows(DV, k_start + n0, stride_k, hk, HEAD_DIM) + kv_offs, dv.to(DV.dtype.element_ty), mask=store_mask)


def launch_dq(dout, q, k, v, lse, delta, dq, tile_offsets, lists, work, softmax_scale, config, flat):
    """dq over ``work``: (n, 2) int32 (query tile, block of config.block_m) items x query heads; lists and
    ``flat`` as in ``forward.launch``."""
    total, num_heads_q, head_dim = q.shape
    if work.shape[0] and num_heads_q:
        sparse_bwd_dq_kernel[(work.shape[0], num_heads_q)](
            q, k, v, dout, lse, delta, dq, tile_offsets, lists, work,
            total, tile_offsets.numel() - 1, num_heads_q, k.shape[1], lists.stride(0),
            lists.stride(1) if lists.shape[1] > 1 else 0, float(softmax_scale),
            HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            PRECISION=precision_of(q.dtype), FLAT=flat, num_warps=config.num_warps, num_stages=config.num_stages)


def launch_dkdv(dout, q, k, v, lse, delta, dk, dv, tile_offsets, q_tiles, work, softmax_scale, config):
    """dk, dv over ``work``: (n, 2) int32 (key tile, block of config.block_n) items x kv heads; q_tiles the
    transposed lists (``vdit.ops.tiles.query_lists``: int32 1-D, offsets then entries)."""
    total, num_heads_q, head_dim = q.shape
    num_heads_k = k.shape[1]
    if work.shape[0] and num_heads_k:
        sparse_bwd_dkdv_kernel[(work.shape[0], num_heads_k)](
            q, k, v, dout, lse, delta, dk, dv, tile_offsets, q_tiles, work,
            total, tile_offsets.numel() - 1, num_heads_q, num_heads_k, q_tiles.numel(), float(softmax_scale),
            HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            PRECISION=precision_of(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages)


_TYPES = dict(LSE="*fp32", DELTA="*fp32", OFFSETS="*i32", WORK="*i32", softmax_scale="fp32")


def aot_specs() -> list:
    """The backward's shipped configurations (``configs.shipped``); the preprocess kernel is the dense
    attention's, compiled by its own specs."""
    from vdit.kernels.triton.aot import KernelSpec, signature

    specs = []
    for name, kernel, lists in (("bwd_dq", sparse_bwd_dq_kernel, "KV_TILES"),
                                ("bwd_dkdv", sparse_bwd_dkdv_kernel, "Q_TILES")):
        for archs, head_dim, dtype, cfg, flat in shipped(name):
            sig = signature(kernel, dtype, **_TYPES, **{lists: "*i32"})
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), BLOCK_M=cfg.block_m,
                              BLOCK_N=cfg.block_n, PRECISION=precision_of(dtype))
            if name == "bwd_dq":
                constexprs["FLAT"] = flat
            # wgmma takes M tiles of 64 rows per warpgroup: BLOCK_M for dq, the key block BLOCK_N for dk / dv.
            m_tile = cfg.block_n if name == "bwd_dkdv" else cfg.block_m
            specs.append(KernelSpec(kernel, sig, constexprs, cfg.num_warps, cfg.num_stages,
                                    f"sparse_{name} d{head_dim} {dtype} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps}"
                                    f"{' flat' * flat}",
                                    matmul=dtype != "fp32" and m_tile >= 64, archs=archs))
    return specs
