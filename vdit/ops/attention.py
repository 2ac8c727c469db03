"""varlen_attention: attention over packed variable-length sequences (FlashAttention varlen API).

Kernels: Triton (``triton``, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), C++ (``cpu``),
reference (``torch``). The kernels are torch.library operators with fake implementations and
autograd formulas, so the op runs under ``torch.compile(fullgraph=True)``:

    vdit::varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal) -> (out, lse)   C++
    vdit::varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal)
        -> (dq, dk, dv)                                                                           C++
    vdit::varlen_attention_fwd_triton / vdit::varlen_attention_bwd_triton: same signatures, Triton.

``lse`` (Hq, total_q) is float32 (float64 for float64 inputs on the C++ kernel); it is returned for
inspection and for the backward and is not differentiable. Both backwards are deterministic.
"""
from __future__ import annotations

import math

import torch

from vdit._extension import HAS_CPU_KERNELS
from vdit.backends import select_backend
from vdit.ops import reference
from vdit.ops._validation import check_cu_seqlens, check_like, check_tensor, max_seqlen_of

KERNELS: tuple[str, ...] = ("triton", "cpu")  # auto preference: Triton on CUDA tensors, C++ on CPU
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


# ---- torch.library: Triton ops, fake implementations, autograd ------------------------------

@torch.library.custom_op("vdit::varlen_attention_fwd_triton", mutates_args=())
def _fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from vdit.kernels.triton import attention  # imported lazily: triton is optional

    return attention.varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              softmax_scale, causal)


@torch.library.custom_op("vdit::varlen_attention_bwd_triton", mutates_args=())
def _bwd_triton(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                max_seqlen_k: int, softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vdit.kernels.triton import attention

    return attention.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                               max_seqlen_k, softmax_scale, causal)


def _lse_dtype(q: torch.Tensor, triton: bool) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 and not triton else torch.float32


def _register(fwd_name: str, bwd_name: str, triton: bool) -> None:
    bwd_op = getattr(torch.ops.vdit, bwd_name.split("::")[1])

    def fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q, triton))

    def bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                 causal):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    torch.library.register_fake(fwd_name)(fwd_fake)
    torch.library.register_fake(bwd_name)(bwd_fake)

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.params = (max_q, max_k, scale, causal)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.params)
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


_register("vdit::varlen_attention_fwd_triton", "vdit::varlen_attention_bwd_triton", triton=True)
if HAS_CPU_KERNELS:
    _register("vdit::varlen_attention_fwd", "vdit::varlen_attention_bwd", triton=False)


# ---- public API ------------------------------------------------------------------------------

def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    check_tensor("q", q, ndim=3, floating=True, nonempty=False)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, floating=True, nonempty=False)
        check_like(name, t, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q has head dim {q.shape[2]} but k has {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError(f"q must have a head dim >= 1, got shape {tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    batch_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    batch_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if batch_q != batch_k:
        raise ValueError(f"cu_seqlens_q describes {batch_q} sequences but cu_seqlens_k describes {batch_k}")
    max_seqlen_q = max_seqlen_of("max_seqlen_q", cu_seqlens_q, max_seqlen_q)
    max_seqlen_k = max_seqlen_of("max_seqlen_k", cu_seqlens_k, max_seqlen_k)
    if softmax_scale is None:
        softmax_scale = q.shape[2] ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    elif not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return max_seqlen_q, max_seqlen_k, float(softmax_scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                     *, softmax_scale: float | None = None, causal: bool = False, backend: str = "auto",
                     return_lse: bool = False):
    """Attention of each packed query sequence to its own packed key/value sequence.

    Same argument order as ``flash_attn_varlen_func``.

    Args:
        q: (total_q, Hq, Dh); k, v: (total_k, Hk, Dh), Hq % Hk == 0 (grouped-query attention: query head
            h uses key/value head h // (Hq / Hk)). Same float dtype and device. Copied to contiguous if
            needed. The Triton backend takes float16/bfloat16/float32 and Dh <= 256.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) offsets on q's device; sequence i is
            q[cu_q[i]:cu_q[i+1]] against k, v[cu_k[i]:cu_k[i+1]]. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: longest sequence lengths (checked, or computed when None; pass them
            under torch.compile).
        softmax_scale: scale of q @ k^T, default Dh ** -0.5.
        causal: mask aligned to the bottom-right corner (query i sees keys j <= i + Lk - Lq); a query
            that sees no key outputs 0 (lse -inf).
        backend: see :mod:`vdit.backends`.
        return_lse: also return the log-sum-exp of the scaled scores (not differentiable).
    Returns:
        out (total_q, Hq, Dh) like q; with ``return_lse`` the pair (out, lse), lse (Hq, total_q) float32
        (float64 for float64 input on the ``cpu`` and ``torch`` backends).
    Raises:
        TypeError / ValueError naming the argument for bad input.
    """
    max_q, max_k, scale = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        softmax_scale, causal)
    chosen = select_backend("varlen_attention", KERNELS, q.device, backend)
    if chosen == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"q: backend 'triton' takes float16, bfloat16 or float32, got {q.dtype}")
        if q.shape[2] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"q: backend 'triton' takes head dim <= {TRITON_MAX_HEAD_DIM}, got {q.shape[2]}")
        if q.shape[0] == 0 or k.shape[0] == 0:
            chosen = "torch"  # nothing to launch; the reference handles empty batches
    if chosen == "torch":
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, softmax_scale=scale,
                                          causal=causal, return_lse=return_lse)
    op = torch.ops.vdit.varlen_attention_fwd_triton if chosen == "triton" else torch.ops.vdit.varlen_attention_fwd
    out, lse = op(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q.contiguous(),
                  cu_seqlens_k.contiguous(), max_q, max_k, scale, causal)
    return (out, lse) if return_lse else out


def varlen_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, max_seqlen_q: int | None = None,
                              max_seqlen_k: int | None = None, *, softmax_scale: float | None = None,
                              causal: bool = False, backend: str = "auto"):
    """Gradients (dq, dk, dv) of :func:`varlen_attention` from its output ``out`` and ``lse``.

    For building blocks such as ring attention, where ``out`` / ``lse`` (Hq, total_q) are the merged
    results over more keys than ``k``, ``v`` hold: each block's gradients follow exactly. Inputs as in
    :func:`varlen_attention` plus ``dout`` like q; not differentiable itself.
    Returns:
        (dq, dk, dv) like q, k, v (the ``torch`` backend returns float32, float64 for float64 input).
    """
    max_q, max_k, scale = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        softmax_scale, causal)
    chosen = select_backend("varlen_attention", KERNELS, q.device, backend)
    if chosen == "triton" and (q.dtype not in TRITON_DTYPES or q.shape[2] > TRITON_MAX_HEAD_DIM
                               or q.shape[0] == 0 or k.shape[0] == 0):
        chosen = "torch"
    if chosen == "torch":
        return reference.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                   softmax_scale=scale, causal=causal)
    op = torch.ops.vdit.varlen_attention_bwd_triton if chosen == "triton" else torch.ops.vdit.varlen_attention_bwd
    return op(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
              lse.to(_lse_dtype(q, chosen == "triton")).contiguous(), cu_seqlens_q.contiguous(),
              cu_seqlens_k.contiguous(), max_q, max_k, scale, causal)
