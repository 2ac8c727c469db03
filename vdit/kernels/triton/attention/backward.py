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

from vdit.kernels.triton.attention.common import (
    LOG2E,
    head_rows,
    load_lse2,
    load_rows,
    mask_scores,
    program_item,
    query_tile,
    visible_keys,
)
from vdit.kernels.triton.attention.configs import block_d_of, precision_of, shipped


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
def dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_offs, d_mask, start_m, q_len,
               stride_q, cols, diag, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile [start_m, start_m + BLOCK_M) against the program's key tile (``cols``)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    step = start_m * stride_q.to(tl.int64)
    q = load_rows(q_base + step, q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    do = load_rows(do_base + step, q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    lse2 = load_lse2(lse_base, rows, row_ok)
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
    hk = tl.program_id(1)
    seq, tile, q_start, q_len, k_start, k_len, stride_q, stride_k, diag = program_item(
        WORK, CU_Q, CU_K, num_heads_q, num_heads_k, HEAD_DIM)
    if seq < 0:  # padding item of the work list (its length is an upper bound)
        return
    group = num_heads_q // num_heads_k
    # The program's key tile plays the role the query tile plays in the forward.
    n0, cols, col_ok, d_mask, kv_offs = query_tile(tile, k_len, stride_k, HEAD_DIM, BLOCK_N, BLOCK_D)
    k = load_rows(head_rows(K, k_start + n0, stride_k, hk, HEAD_DIM), kv_offs, col_ok, d_mask, HEAD_DIM, BLOCK_D)
    v = load_rows(head_rows(V, k_start + n0, stride_k, hk, HEAD_DIM), kv_offs, col_ok, d_mask, HEAD_DIM, BLOCK_D)
    q_offs = tl.arange(0, BLOCK_M)[:, None] * stride_q + tl.arange(0, BLOCK_D)[None, :]

    if CAUSAL:
        # Query rows >= n0 - diag see some key of the tile; rows >= n0 + BLOCK_N - 1 - diag see all of
        # them, so only the first ceil(BLOCK_N / BLOCK_M) query tiles need the mask.
        # (If m_begin > q_len, m_full = q_len and both loops are empty.)
        m_begin = tl.maximum(n0 - diag, 0)
        m_full = tl.minimum(m_begin + ((BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, q_len)
    else:
        m_begin = 0
        m_full = 0

    qk_scale = softmax_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        q_base = head_rows(Q, q_start, stride_q, h, HEAD_DIM)
        do_base = head_rows(DO, q_start, stride_q, h, HEAD_DIM)
        lse_base = LSE + h.to(tl.int64) * total_q + q_start
        delta_base = DELTA + h.to(tl.int64) * total_q + q_start
        for start_m in range(m_begin, m_full, BLOCK_M):
            dk, dv = dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_offs, d_mask,
                                start_m, q_len, stride_q, cols, diag, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_M, True, PRECISION)
        for start_m in range(m_full, q_len, BLOCK_M):
            dk, dv = dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_offs, d_mask,
                                start_m, q_len, stride_q, cols, diag, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_M, False, PRECISION)

    dk = dk * softmax_scale
    store_mask = col_ok[:, None] & d_mask[None, :]
    tl.store(head_rows(DK, k_start + n0, stride_k, hk, HEAD_DIM) + kv_offs, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(head_rows(DV, k_start + n0, stride_k, hk, HEAD_DIM) + kv_offs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def dq_step(dq, q, do, lse2, delta, k_base, v_base, kv_offs, d_mask, start_n, full, k_len, stride_k,
             rows, diag, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile for dq; tiles from ``full`` on need the mask (as in the forward's fwd_step,
    a runtime branch in one loop keeps ptxas from serializing the wgmma on sm_90)."""
    step = start_n * stride_k.to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + step, kv_offs, cols < k_len, d_mask, HEAD_DIM, BLOCK_D)
    v = load_rows(v_base + step, kv_offs, cols < k_len, d_mask, HEAD_DIM, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if start_n >= full:
        p = mask_scores(p, rows, cols, k_len, diag, 0.0, CAUSAL)
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
    h = tl.program_id(1)
    seq, tile, q_start, q_len, k_start, k_len, stride_q, stride_k, diag = program_item(
        WORK, CU_Q, CU_K, num_heads_q, num_heads_k, HEAD_DIM)
    if seq < 0:  # padding item of the work list (its length is an upper bound)
        return
    hk = h // (num_heads_q // num_heads_k)
    m0, rows, row_ok, d_mask, q_offs = query_tile(tile, q_len, stride_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = load_rows(head_rows(Q, q_start + m0, stride_q, h, HEAD_DIM), q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    do = load_rows(head_rows(DO, q_start + m0, stride_q, h, HEAD_DIM), q_offs, row_ok, d_mask, HEAD_DIM, BLOCK_D)
    lse_off = h.to(tl.int64) * total_q + q_start
    lse2 = load_lse2(LSE + lse_off, rows, row_ok)
    delta = tl.load(DELTA + lse_off + rows, mask=row_ok, other=0.0)

    kv_offs = tl.arange(0, BLOCK_N)[:, None] * stride_k + tl.arange(0, BLOCK_D)[None, :]
    k_base = head_rows(K, k_start, stride_k, hk, HEAD_DIM)
    v_base = head_rows(V, k_start, stride_k, hk, HEAD_DIM)
    hi, full = visible_keys(m0, k_len, diag, BLOCK_M, BLOCK_N, CAUSAL)

    qk_scale = softmax_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        dq = dq_step(dq, q, do, lse2, delta, k_base, v_base, kv_offs, d_mask, start_n, full, k_len,
                      stride_k, rows, diag, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, PRECISION)
    dq = dq * softmax_scale
    tl.store(head_rows(DQ, q_start + m0, stride_q, h, HEAD_DIM) + q_offs, dq.to(DQ.dtype.element_ty),
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
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=4, num_stages=1)


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


_TENSOR_TYPES = dict(LSE="*fp32", DELTA="*fp32", CU_Q="*i32", CU_K="*i32", WORK="*i32", softmax_scale="fp32")


def aot_specs() -> list:
    """The backward's shipped configurations (``configs.shipped``), causal and not, as the runtime
    compiles them, and the preprocess kernel at every BLOCK_D it uses."""
    from vdit.kernels.triton.aot import KernelSpec, signature

    specs = []
    for name, kernel in (("bwd_dkdv", attn_bwd_dkdv_kernel), ("bwd_dq", attn_bwd_dq_kernel)):
        for arch, head_dim, dtype, cfg in shipped(name):
            sig = signature(kernel, dtype, **_TENSOR_TYPES)
            for causal in (True, False):
                constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), BLOCK_M=cfg.block_m,
                                  BLOCK_N=cfg.block_n, CAUSAL=causal, PRECISION=precision_of(dtype))
                label = f"{name} d{head_dim} {dtype} {cfg.block_m}x{cfg.block_n}{' causal' if causal else ''}"
                specs.append(KernelSpec(kernel, sig, constexprs, cfg.num_warps, cfg.num_stages, label,
                                        matmul=dtype != "fp32", archs=(arch,)))
    for block_d in (16, 32, 64, 128, 256):
        for dtype in ("bf16", "fp32"):
            constexprs = dict(HEAD_DIM=block_d, BLOCK_D=block_d, BLOCK_T=preprocess_block_t(block_d))
            sig = signature(attn_bwd_preprocess_kernel, dtype, DELTA="*fp32")
            label = f"bwd_preprocess d{block_d} {dtype}"
            specs.append(KernelSpec(attn_bwd_preprocess_kernel, sig, constexprs, 4, 1, label))
    return specs
