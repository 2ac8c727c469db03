"""Triton forward kernel of variable-length attention (FlashAttention-2 style).

One program computes one (BLOCK_M queries x all head dims) output tile of one sequence and one query
head. The query tile stays in registers; keys and values stream through in BLOCK_N tiles with an
online softmax in base 2 (scores pre-multiplied by softmax_scale * log2(e), ``exp2``), fp32
accumulation, and no (Lq x Lk) matrix anywhere. Key tiles that need no score mask (fully inside the
sequence and, when causal, fully visible to every row of the tile) skip the mask arithmetic through
a runtime branch; only the tail tile and the causal diagonal take it.

Work scheduling: program_id(0) indexes a host-built list of (sequence, query tile) items (see
``attention.work_items``), program_id(1) the query head, so a 30k-token video next to 200-token
ones gives each program one real tile and no program idles on padding.

Layout: q, out (total_q, Hq, HEAD_DIM); k, v (total_k, Hk, HEAD_DIM), all contiguous; lse
(Hq, total_q) float32 natural-log units. HEAD_DIM is padded to BLOCK_D (a power of two) with
masked loads. Row offsets of a whole sequence are taken in int64; offsets inside a tile in int32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vdit.kernels.triton.attention_common import load_rows, sequence_bounds


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_base, v_base, kv_offs, d_mask, start_n, full, k_len, stride_k,
              rows, diag, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax. ``rows``: query rows of the tile (sequence-local);
    ``diag`` = Lk - Lq (query i sees key j <= i + diag when causal); tiles from ``full`` on need the
    score mask (sequence tail, causal diagonal)."""
    step = start_n * stride_k.to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + step, kv_offs, cols < k_len, d_mask, HEAD_DIM, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    # A runtime branch inside the one key loop, not a second (masked) loop: with two loops ptxas
    # serializes every wgmma of the kernel on sm_90 (warning C7515); with one it does not.
    if start_n >= full:
        valid = (cols < k_len)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + diag)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(v_base + step, kv_offs, cols < k_len, d_mask, HEAD_DIM, BLOCK_D)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, WORK,
    total_q, num_heads_q, num_heads_k, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(WORK + 2 * pid)
    if seq < 0:  # padding item of the work list (its length is an upper bound)
        return
    tile = tl.load(WORK + 2 * pid + 1)
    q_start, q_len, k_start, k_len = sequence_bounds(CU_Q, CU_K, seq)
    hk = h // (num_heads_q // num_heads_k)
    stride_q = num_heads_q * HEAD_DIM
    stride_k = num_heads_k * HEAD_DIM
    diag = k_len - q_len

    m0 = tile * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rows = m0 + offs_m
    row_mask = rows < q_len
    q_offs = offs_m[:, None] * stride_q + offs_d[None, :]
    # Launcher guarantee: every tensor is 16-byte aligned and HEAD_DIM % 8 == 0, so each row of
    # each head starts 16-byte aligned. The hints give vectorized (cp.async) loads even when the
    # compiler did not specialize the pointer arguments (ahead-of-time compilation).
    q_base = tl.multiple_of(Q + (q_start + m0).to(tl.int64) * stride_q + h * HEAD_DIM, 16)
    q = tl.load(q_base + q_offs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    kv_offs = offs_n[:, None] * stride_k + offs_d[None, :]
    k_base = tl.multiple_of(K + k_start.to(tl.int64) * stride_k + hk * HEAD_DIM, 16)
    v_base = tl.multiple_of(V + k_start.to(tl.int64) * stride_k + hk * HEAD_DIM, 16)
    if CAUSAL:
        # Keys [0, hi) are visible to some row of the tile, keys [0, full) to every row.
        hi = tl.minimum(k_len, tl.maximum(m0 + BLOCK_M + diag, 0))
        full = tl.minimum(hi, tl.maximum(m0 + diag + 1, 0))
    else:
        hi = k_len
        full = k_len
    full = (full // BLOCK_N) * BLOCK_N

    qk_scale = softmax_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, kv_offs, d_mask, start_n, full, k_len,
                                  stride_k, rows, diag, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                  PRECISION)

    # A row that sees no key (empty key sequence, or causal with Lq > Lk) has l = 0: out 0, lse -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_base = tl.multiple_of(O + (q_start + m0).to(tl.int64) * stride_q + h * HEAD_DIM, 16)
    tl.store(o_base + q_offs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    lse_base = LSE + h.to(tl.int64) * total_q + q_start + m0
    tl.store(lse_base + offs_m, lse, mask=row_mask)


def launch_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, work, softmax_scale, causal, config,
                   block_d, precision):
    """Launch :func:`attn_fwd_kernel` over ``work`` (n_items, 2) int32 x query heads."""
    total_q, num_heads_q, head_dim = q.shape
    grid = (work.shape[0], num_heads_q)
    attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, work,
        total_q, num_heads_q, k.shape[1], float(softmax_scale),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=bool(causal), PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
