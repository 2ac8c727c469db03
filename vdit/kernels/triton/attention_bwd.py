"""Triton backward kernels of variable-length attention (FlashAttention-2 style, deterministic).

Three launches, none with atomics, so the gradients are bitwise reproducible:

1. ``attn_bwd_preprocess_kernel``: delta = rowsum(dout * out) in fp32, (Hq, total_q).
2. ``attn_bwd_dkdv_kernel``: one program per (sequence, key tile) work item and key/value head. It
   keeps its k, v tile and the fp32 dk, dv accumulators in registers and loops over the query heads
   of its group and over the query tiles that see the key tile, recomputing
   p^T = exp2(k q^T * scale * log2 e - lse * log2 e). dv += p^T dout, dk += (p^T * (v dout^T - delta)) q.
   Summing the group's heads inside one program is what makes grouped-query dk/dv deterministic.
3. ``attn_bwd_dq_kernel``: one program per (sequence, query tile) item and query head, looping over
   the visible key tiles: dq += (p * (dout v^T - delta)) k.

Rows that see no key have lse = -inf; the kernels replace it by +inf, which makes their p (and so
every gradient they contribute) exactly 0. Padding rows past the end of a sequence load lse = +inf
for the same effect. Padding key rows of a tile only produce dk/dv rows that are never stored; in
the dq kernel the key tail tile is masked because its rows reach dq.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vdit.kernels.triton.attention_common import load_rows, sequence_bounds


@triton.jit
def attn_bwd_preprocess_kernel(O, DO, DELTA, total_q, num_heads,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    stride = num_heads * HEAD_DIM
    offs = (pid * BLOCK_T).to(tl.int64) * stride + h * HEAD_DIM \
        + tl.arange(0, BLOCK_T)[:, None] * stride + offs_d[None, :]
    mask = (rows < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(tl.multiple_of(O, 16) + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(tl.multiple_of(DO, 16) + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h.to(tl.int64) * total_q + rows, tl.sum(o * do, 1), mask=rows < total_q)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_offs, d_mask, start_m, q_len,
               stride_q, cols, diag, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile [start_m, start_m + BLOCK_M) against the program's key tile (``cols``)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    step = start_m * stride_q.to(tl.int64)
    q = load_rows(q_base + step, q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    do = load_rows(do_base + step, q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    p_t = tl.math.exp2(qk_t - lse2[None, :])
    if MASKED:
        p_t = tl.where(cols[:, None] <= rows[None, :] + diag, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, WORK,
    total_q, num_heads_q, num_heads_k, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    seq = tl.load(WORK + 2 * pid)
    if seq < 0:
        return
    tile = tl.load(WORK + 2 * pid + 1)
    q_start, q_len, k_start, k_len = sequence_bounds(CU_Q, CU_K, seq)
    group = num_heads_q // num_heads_k
    stride_q = num_heads_q * HEAD_DIM
    stride_k = num_heads_k * HEAD_DIM
    diag = k_len - q_len

    n0 = tile * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    cols = n0 + offs_n
    col_ok = cols < k_len
    kv_offs = offs_n[:, None] * stride_k + offs_d[None, :]
    kv_start = (k_start + n0).to(tl.int64) * stride_k + hk * HEAD_DIM
    # Launcher guarantee: 16-byte aligned tensors and HEAD_DIM % 8 == 0 (see attention_fwd.py).
    k = load_rows(tl.multiple_of(K + kv_start, 16), kv_offs, col_ok, d_mask, HEAD_DIM, BLOCK_D)
    v = load_rows(tl.multiple_of(V + kv_start, 16), kv_offs, col_ok, d_mask, HEAD_DIM, BLOCK_D)
    q_offs = offs_m[:, None] * stride_q + offs_d[None, :]

    if CAUSAL:
        # Query rows >= n0 - diag see some key of the tile; rows >= n0 + BLOCK_N - 1 - diag see all of
        # them, so only the first ceil(BLOCK_N / BLOCK_M) query tiles need the mask.
        # (If m_begin > q_len, m_full = q_len and both loops are empty.)
        m_begin = tl.maximum(n0 - diag, 0)
        m_full = tl.minimum(m_begin + ((BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, q_len)
    else:
        m_begin = 0
        m_full = 0

    qk_scale = softmax_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        q_base = tl.multiple_of(Q + q_start.to(tl.int64) * stride_q + h * HEAD_DIM, 16)
        do_base = tl.multiple_of(DO + q_start.to(tl.int64) * stride_q + h * HEAD_DIM, 16)
        lse_base = LSE + h.to(tl.int64) * total_q + q_start
        delta_base = DELTA + h.to(tl.int64) * total_q + q_start
        for start_m in range(m_begin, m_full, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_offs, d_mask,
                                start_m, q_len, stride_q, cols, diag, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_M, True, PRECISION)
        for start_m in range(m_full, q_len, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_offs, d_mask,
                                start_m, q_len, stride_q, cols, diag, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_M, False, PRECISION)

    dk = dk * softmax_scale
    store_mask = col_ok[:, None] & d_mask[None, :]
    tl.store(tl.multiple_of(DK + kv_start, 16) + kv_offs, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(tl.multiple_of(DV + kv_start, 16) + kv_offs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, kv_offs, d_mask, start_n, full, k_len, stride_k,
             rows, diag, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile for dq; tiles from ``full`` on need the mask (as in the forward's _fwd_step,
    a runtime branch in one loop keeps ptxas from serializing the wgmma on sm_90)."""
    step = start_n * stride_k.to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + step, kv_offs, cols < k_len, d_mask, HEAD_DIM, BLOCK_D)
    v = load_rows(v_base + step, kv_offs, cols < k_len, d_mask, HEAD_DIM, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if start_n >= full:
        valid = (cols < k_len)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + diag)
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, WORK,
    total_q, num_heads_q, num_heads_k, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(WORK + 2 * pid)
    if seq < 0:
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
    row_ok = rows < q_len
    q_offs = offs_m[:, None] * stride_q + offs_d[None, :]
    q_start_off = (q_start + m0).to(tl.int64) * stride_q + h * HEAD_DIM
    # Launcher guarantee: 16-byte aligned tensors and HEAD_DIM % 8 == 0 (see attention_fwd.py).
    q = load_rows(tl.multiple_of(Q + q_start_off, 16), q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    do = load_rows(tl.multiple_of(DO + q_start_off, 16), q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    lse_off = h.to(tl.int64) * total_q + q_start
    lse = tl.load(LSE + lse_off + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + lse_off + rows, mask=row_ok, other=0.0)

    kv_offs = offs_n[:, None] * stride_k + offs_d[None, :]
    k_base = tl.multiple_of(K + k_start.to(tl.int64) * stride_k + hk * HEAD_DIM, 16)
    v_base = tl.multiple_of(V + k_start.to(tl.int64) * stride_k + hk * HEAD_DIM, 16)
    if CAUSAL:
        hi = tl.minimum(k_len, tl.maximum(m0 + BLOCK_M + diag, 0))
        full = tl.minimum(hi, tl.maximum(m0 + diag + 1, 0))
    else:
        hi = k_len
        full = k_len
    full = (full // BLOCK_N) * BLOCK_N

    qk_scale = softmax_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, kv_offs, d_mask, start_n, full, k_len,
                      stride_k, rows, diag, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, PRECISION)
    dq = dq * softmax_scale
    tl.store(tl.multiple_of(DQ + q_start_off, 16) + q_offs, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])


def preprocess_block_t(block_d: int) -> int:
    """Rows per program of the preprocess kernel: 4096 elements of each operand per program."""
    return max(16, min(64, 4096 // block_d))


def launch_preprocess(dout, out, delta, block_d):
    """delta (Hq, total_q) fp32 = rowsum(dout * out)."""
    total_q, num_heads_q, head_dim = out.shape
    if total_q and num_heads_q:
        block_t = preprocess_block_t(block_d)
        attn_bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), num_heads_q)](
            out, dout, delta, total_q, num_heads_q,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=4)


def launch_dkdv(dout, q, k, v, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, work_k, softmax_scale,
                causal, config, block_d, precision):
    """dk, dv over ``work_k``: (n, 2) int32 (sequence, key tile of config.block_n) items x kv heads."""
    total_q, num_heads_q, head_dim = q.shape
    num_heads_k = k.shape[1]
    if work_k.shape[0] and num_heads_k:
        attn_bwd_dkdv_kernel[(work_k.shape[0], num_heads_k)](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, work_k,
            total_q, num_heads_q, num_heads_k, float(softmax_scale),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            CAUSAL=bool(causal), PRECISION=precision, num_warps=config.num_warps,
            num_stages=config.num_stages)


def launch_dq(dout, q, k, v, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, work_q, softmax_scale, causal,
              config, block_d, precision):
    """dq over ``work_q``: (n, 2) int32 (sequence, query tile of config.block_m) items x query heads."""
    total_q, num_heads_q, head_dim = q.shape
    if work_q.shape[0] and num_heads_q:
        attn_bwd_dq_kernel[(work_q.shape[0], num_heads_q)](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, work_q,
            total_q, num_heads_q, k.shape[1], float(softmax_scale),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            CAUSAL=bool(causal), PRECISION=precision, num_warps=config.num_warps,
            num_stages=config.num_stages)
