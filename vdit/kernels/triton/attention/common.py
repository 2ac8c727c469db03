"""Device functions shared by the forward (``forward.py``) and backward (``backward.py``) kernels: the
prologue every program runs (its work item and its sequence's bounds, its tile's offsets, the key range
it must visit) and the score mask. Written once so the three kernels cannot disagree on geometry."""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def program_item(WORK, CU_Q, CU_K, num_heads_q, num_heads_k, HEAD_DIM: tl.constexpr):
    """The prologue of every program: its work item (see ``scheduler.work_items``) and that sequence's
    geometry, as (seq, tile, q_start, q_len, k_start, k_len, stride_q, stride_k, diag).

    ``seq`` is -1 for the padding items at the end of the work list; the caller returns at once for
    those (the geometry is then read for sequence 0, an in-bounds dummy). stride_q / stride_k are the
    row strides of q and k (elements per token) and diag = k_len - q_len, the offset of the bottom-right
    causal diagonal.
    """
    pid = tl.program_id(0)
    seq = tl.load(WORK + 2 * pid)
    tile = tl.load(WORK + 2 * pid + 1)
    s = tl.maximum(seq, 0)
    q_start = tl.load(CU_Q + s)
    q_len = tl.load(CU_Q + s + 1) - q_start
    k_start = tl.load(CU_K + s)
    k_len = tl.load(CU_K + s + 1) - k_start
    return (seq, tile, q_start, q_len, k_start, k_len, num_heads_q * HEAD_DIM, num_heads_k * HEAD_DIM,
            k_len - q_len)


@triton.jit
def query_tile(tile, q_len, stride_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Geometry of query tile ``tile``: (m0, rows, row_ok, d_mask, q_offs), with ``rows`` the
    sequence-local query rows, ``row_ok`` those inside the sequence, ``d_mask`` the real head-dim
    columns and ``q_offs`` the (BLOCK_M, BLOCK_D) element offsets from the tile's first row."""
    m0 = tile * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    q_offs = offs_m[:, None] * stride_q + offs_d[None, :]
    return m0, rows, rows < q_len, offs_d < HEAD_DIM, q_offs


@triton.jit
def head_rows(X, start, stride, head, HEAD_DIM: tl.constexpr):
    """Pointer to row ``start`` of head ``head`` in a (total, heads, HEAD_DIM) tensor. Launcher
    guarantee: every tensor is 16-byte aligned and HEAD_DIM % 8 == 0, so each head row starts 16-byte
    aligned; the hint gives vectorized loads even when the pointer argument was not specialized."""
    return tl.multiple_of(X + start.to(tl.int64) * stride + head * HEAD_DIM, 16)


@triton.jit
def visible_keys(m0, k_len, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(hi, full) for the query rows [m0, m0 + BLOCK_M): keys [0, hi) are visible to some row of the
    tile, keys [0, full) to every row; ``full`` is rounded down to a key tile so that only tiles from
    ``full`` on need the score mask. ``diag`` = Lk - Lq (query i sees key j <= i + diag when causal)."""
    if CAUSAL:
        hi = tl.minimum(k_len, tl.maximum(m0 + BLOCK_M + diag, 0))
        full = tl.minimum(hi, tl.maximum(m0 + diag + 1, 0))
    else:
        hi = k_len
        full = k_len
    return hi, (full // BLOCK_N) * BLOCK_N


@triton.jit
def mask_scores(s, rows, cols, k_len, diag, fill, CAUSAL: tl.constexpr):
    """``s`` (rows x cols) with ``fill`` where the key is past the sequence or, when causal, in the future."""
    valid = (cols < k_len)[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None] + diag)
    return tl.where(valid, s, fill)


@triton.jit
def load_rows(base, offs, row_ok, d_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile at ``base + offs``; rows where ``row_ok`` is false and the head-dim padding
    (when BLOCK_D > HEAD_DIM) read 0. Without padding the column mask is dropped at compile time."""
    if BLOCK_D != HEAD_DIM:
        return tl.load(base + offs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    return tl.load(base + offs, mask=row_ok[:, None], other=0.0)


@triton.jit
def load_lse2(LSE, rows, row_ok):
    """lse in base 2 for the backward; rows that saw no key (lse -inf) and padding rows get +inf, which
    makes their p = exp2(s - lse2), and every gradient they contribute, exactly 0."""
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
