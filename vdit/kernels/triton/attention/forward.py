"""Triton forward kernel of variable-length attention (FlashAttention-2 style).

One program computes one (BLOCK_M queries x all head dims) output tile of one sequence and one query
head. The query tile stays in registers; keys and values stream through in BLOCK_N tiles with an
online softmax in base 2 (scores pre-multiplied by softmax_scale * log2(e), ``exp2``), fp32
accumulation, and no (Lq x Lk) matrix anywhere. Key tiles that need no score mask (fully inside the
sequence and, when causal, fully visible to every row of the tile) skip the mask arithmetic through
a runtime branch; only the tail tile and the causal diagonal take it.

Work scheduling: program_id(0) indexes a list of (sequence, query tile) items built on the device
(``scheduler.work_items``), program_id(1) the query head, so a 30k-token video next to 200-token
ones gives each program one real tile and no program idles on padding.

Shapes: q, out (total_q, Hq, HEAD_DIM); k, v (total_k, Hk, HEAD_DIM), all contiguous; lse
(Hq, total_q) float32 natural-log units. HEAD_DIM is padded to BLOCK_D (a power of two) with
masked loads. Row offsets of a whole sequence are taken in int64; offsets inside a tile in int32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vdit.kernels.triton.attention.common import (
    LN2,
    LOG2E,
    head_rows,
    load_rows,
    mask_scores,
    program_item,
    query_tile,
    visible_keys,
)
from vdit.kernels.triton.attention.configs import TMA_ARCH, block_d_of, ensure_allocator, precision_of, shipped, use_tma


@triton.jit
def _load_kv(src, kv_offs, start_n, cols, k_len, stride_k, d_mask,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) key or value tile at key ``start_n``: through a TMA descriptor bounded by
    the sequence (rows past it and the head-dim padding arrive as zeros, no masks), or with masked loads."""
    if USE_TMA:
        return src.load([start_n, 0])
    else:
        return load_rows(src + start_n * stride_k.to(tl.int64), kv_offs, cols < k_len, d_mask, HEAD_DIM, BLOCK_D)


@triton.jit
def fwd_step(acc, l_i, m_i, q, k_src, v_src, kv_offs, d_mask, start_n, full, k_len, stride_k,
              rows, diag, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """One key tile of the online softmax. ``rows``: query rows of the tile (sequence-local);
    ``diag`` = Lk - Lq (query i sees key j <= i + diag when causal); tiles from ``full`` on need the
    score mask (sequence tail, causal diagonal)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_kv(k_src, kv_offs, start_n, cols, k_len, stride_k, d_mask, HEAD_DIM, BLOCK_D, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    # The score mask is a runtime branch inside the one key loop, not a second (masked) loop: with two
    # loops ptxas serializes every wgmma of the kernel on sm_90 (warning C7515). Without TMA the K/V
    # loads keep their row mask on every tile for the same reason (unmasked interior loads need two loops,
    # or a branch around the loads, which stops Triton from pipelining them with cp.async); with TMA the
    # descriptor's bounds do the masking.
    if start_n >= full:
        s = mask_scores(s, rows, cols, k_len, diag, float("-inf"), CAUSAL)
    # The scale is applied inside the exponent (one FMA per score, s * scale - m) rather than to the
    # whole tile first; softmax_scale > 0 (checked by vdit.ops), so max(s) * scale = max(s * scale).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(v_src, kv_offs, start_n, cols, k_len, stride_k, d_mask, HEAD_DIM, BLOCK_D, USE_TMA)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def fwd_epilogue(O, LSE, acc, l_i, m_i, h, q_start, m0, rows, row_ok, d_mask, q_offs, stride_q, total,
                 HEAD_DIM: tl.constexpr):
    """The end of every forward program (dense and block-sparse): out = acc / l and the natural-log
    lse = (m + log2 l) * ln 2 of its (BLOCK_M, BLOCK_D) query tile, written for query head ``h``.

    ``acc`` (BLOCK_M, BLOCK_D), ``l_i`` / ``m_i`` (BLOCK_M,): the online softmax's state (base 2);
    ``rows``: the tile's query rows, local to ``q_start`` (the first token of the sequence or tile);
    ``row_ok``: those to store; ``q_offs``: element offsets from the tile's first row (``query_tile``);
    lse is (Hq, total). A row that saw no key has l = 0 and gets out 0, lse -inf (no division by 0).
    """
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    o_base = head_rows(O, q_start + m0, stride_q, h, HEAD_DIM)
    tl.store(o_base + q_offs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    tl.store(LSE + h.to(tl.int64) * total + q_start + rows, lse, mask=row_ok)


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, WORK,
    total_q, num_heads_q, num_heads_k, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    h = tl.program_id(1)
    seq, tile, q_start, q_len, k_start, k_len, stride_q, stride_k, diag = program_item(
        WORK, CU_Q, CU_K, num_heads_q, num_heads_k, HEAD_DIM)
    if seq < 0:  # padding item of the work list (its length is an upper bound)
        return
    hk = h // (num_heads_q // num_heads_k)
    m0, rows, row_ok, d_mask, q_offs = query_tile(tile, q_len, stride_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q_base = head_rows(Q, q_start + m0, stride_q, h, HEAD_DIM)
    q = tl.load(q_base + q_offs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    offs_n = tl.arange(0, BLOCK_N)
    kv_offs = offs_n[:, None] * stride_k + tl.arange(0, BLOCK_D)[None, :]
    if USE_TMA:
        # One descriptor per program over this sequence's rows of this kv head: 16-byte aligned base and
        # row stride (HEAD_DIM % 8 == 0 and aligned tensors, the launcher's guarantees).
        k_src = tl.make_tensor_descriptor(head_rows(K, k_start, stride_k, hk, HEAD_DIM), shape=[k_len, HEAD_DIM],
                                          strides=[stride_k, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(head_rows(V, k_start, stride_k, hk, HEAD_DIM), shape=[k_len, HEAD_DIM],
                                          strides=[stride_k, 1], block_shape=[BLOCK_N, BLOCK_D])
    else:
        k_src = head_rows(K, k_start, stride_k, hk, HEAD_DIM)
        v_src = head_rows(V, k_start, stride_k, hk, HEAD_DIM)
    hi, full = visible_keys(m0, k_len, diag, BLOCK_M, BLOCK_N, CAUSAL)

    qk_scale = softmax_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        acc, l_i, m_i = fwd_step(acc, l_i, m_i, q, k_src, v_src, kv_offs, d_mask, start_n, full, k_len,
                                  stride_k, rows, diag, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                  PRECISION, USE_TMA)

    # A row that sees no key (empty key sequence, or causal with Lq > Lk) gets out 0, lse -inf.
    fwd_epilogue(O, LSE, acc, l_i, m_i, h, q_start, m0, rows, row_ok, d_mask, q_offs, stride_q, total_q, HEAD_DIM)


def launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, work, softmax_scale, causal, config, block_d,
           precision):
    """Launch :func:`attn_fwd_kernel` over ``work`` (n_items, 2) int32 x query heads."""
    total_q, num_heads_q, head_dim = q.shape
    if not (work.shape[0] and num_heads_q):
        return
    tma = use_tma(q.device, q.dtype)
    if tma and q.device.type == "cuda":
        ensure_allocator()
    grid = (work.shape[0], num_heads_q)
    attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, work,
        total_q, num_heads_q, k.shape[1], float(softmax_scale),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=bool(causal), PRECISION=precision, USE_TMA=tma,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def aot_specs() -> list:
    """The forward's shipped configurations (``configs.shipped``), causal and not, as the runtime compiles
    them (with TMA descriptors on sm_90, without elsewhere)."""
    from vdit.kernels.triton.aot import KernelSpec, signature

    specs = []
    for arch, head_dim, dtype, cfg in shipped("fwd"):
        sig = signature(attn_fwd_kernel, dtype, LSE="*fp32", CU_Q="*i32", CU_K="*i32", WORK="*i32",
                        softmax_scale="fp32")
        for causal in (True, False):
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), BLOCK_M=cfg.block_m,
                              BLOCK_N=cfg.block_n, CAUSAL=causal, PRECISION=precision_of(dtype),
                              USE_TMA=arch == TMA_ARCH and dtype != "fp32")
            label = f"fwd d{head_dim} {dtype} {cfg.block_m}x{cfg.block_n}{' causal' if causal else ''}"
            specs.append(KernelSpec(attn_fwd_kernel, sig, constexprs, cfg.num_warps, cfg.num_stages, label,
                                    matmul=dtype != "fp32", archs=(arch,)))
    return specs
