"""Device functions shared by the Triton attention kernels (attention_fwd.py, attention_bwd.py)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sequence_bounds(CU_Q, CU_K, seq):
    """(q_start, q_len, k_start, k_len) of packed sequence ``seq``, from the int32 cumulative lengths."""
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    return q_start, q_len, k_start, k_len


@triton.jit
def load_rows(base, offs, row_ok, d_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile at ``base + offs``; rows where ``row_ok`` is false and the head-dim padding
    (when BLOCK_D > HEAD_DIM) read 0. Without padding the column mask is dropped at compile time."""
    if BLOCK_D != HEAD_DIM:
        return tl.load(base + offs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    return tl.load(base + offs, mask=row_ok[:, None], other=0.0)
