"""varlen_attention: attention over packed variable-length sequences (FlashAttention varlen API).

Kernels, in auto's order (declared in ``SPEC``; ``vdit.plan`` shows the choice for a call):

* ``flash-attn``: flash-attn's varlen function, when FlashAttention-3 is installed and the GPU is sm_90
  (the fastest dense kernel there); FlashAttention-2 from the flash-attn package only when named,
  since torch-varlen runs the same kernel. The backward from a given output and lse (ring attention)
  runs flash-attn's private varlen backward where the installed release has a usable one
  (:func:`vdit.kernels.external.flash_attn_backward_missing`), FlashAttention-2's also in auto (no
  other external kernel has one), for head dims that are multiples of 8.
* ``torch-varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 in-tree, cuDNN on
  sm_90 / sm_100 for fp16 / bf16 without GQA): fp16 / bf16 on sm_80+, head dims that are multiples
  of 8, when the backward need not be deterministic; no backward from a given output and lse.
* ``triton``: vdit's kernel, for everything the others do not run: fp32, any head dim up to 256,
  deterministic backward, and the backward from a given output and lse (ring attention) where
  flash-attn's is not installed. CPU tensors only when named, under ``TRITON_INTERPRET=1``.
* ``cpu``: vdit's C++ kernel on CPU tensors (every float dtype).
* ``torch``: the reference, where no kernel covers the call (float64 on CUDA, no kernel installed).

The forward and the backward always run in one family: the external kernels carry their own
autograd, and vdit's compiled and Triton operators each register an autograd formula that calls
their own backward operator. :func:`varlen_attention_backward` is chosen on its own, since it takes
the output and lse of any forward (ring attention merges them over key blocks). All paths run under
``torch.compile(fullgraph=True)``.

``lse`` (Hq, total_q) is float32 (float64 for float64 inputs on the C++ kernel); it is returned for
inspection and for the backward and is not differentiable. A query that sees no key has lse -inf on
every kernel. vdit's backwards are deterministic.
"""
from __future__ import annotations

import torch

from vdit.kernels import external
from vdit.ops import _registry, reference
from vdit.ops._registry import ALL_FLOATS, GPU_FLOATS, MAX_GPU_HEAD_DIM, TRITON, Call, Kernel
from vdit.ops._validation import check_cu_seqlens, check_qkv, check_softmax_scale, max_seqlen_of

HALF_FLOATS = (torch.float16, torch.bfloat16)


def _external(rule):
    """A rule for a kernel vdit does not own: what both need (an sm_80+ GPU, something to launch), then
    the kernel's own ``rule``, which also says whether it runs the backward from a given output and lse."""
    def check(call: Call) -> str | None:
        if call.capability is None or tuple(call.capability) < (8, 0):
            return f"needs an sm_80 or newer GPU (capability {call.capability})"
        if call.empty:
            return "has nothing to launch for an empty batch"
        return rule(call)
    return check


@_external
def _flash_attn_rule(call: Call) -> str | None:
    version = external.flash_attn_version()
    if version == 3 and tuple(call.capability)[0] != 9:
        return "is FlashAttention-3, which runs on sm_90 only"
    if version == 3 and call.deterministic and call.head_dim is not None and call.head_dim > 192:
        return f"is FlashAttention-3, whose deterministic backward stops at head dim 192, got {call.head_dim}"
    if call.backward:
        missing = external.flash_attn_backward_missing()
        if missing:
            return f"has no backward from a given output and lse here: {missing}"
        if call.head_dim is not None and call.head_dim % 8:  # flash_attn_varlen_func pads it, this does not
            return f"runs the backward from a given output and lse for head dims that are multiples of 8, " \
                   f"got {call.head_dim}"
        return None  # FlashAttention-2's too: torch-varlen has no such backward
    if version == 2 and call.auto and external.torch_varlen_missing() is None:
        return "is FlashAttention-2, the kernel torch-varlen already runs (named explicitly, it runs)"
    return None


@_external
def _torch_varlen_rule(call: Call) -> str | None:
    if call.backward:
        return "has no backward from a given output and lse (vdit's kernels do)"
    if call.head_dim is not None and call.head_dim % 8:
        return f"takes head dims that are multiples of 8, got {call.head_dim}"
    if call.deterministic:
        return "has a non-deterministic backward (vdit's Triton backward is deterministic)"
    return None


SPEC = _registry.declare(
    "varlen_attention",
    Kernel("flash-attn", devices=("cuda",), family=None, dtypes=HALF_FLOATS, max_head_dim=MAX_GPU_HEAD_DIM,
           requires=_flash_attn_rule,
           missing=lambda: None if external.flash_attn_version() else external.flash_attn_missing() or "not installed",
           note="flash-attn varlen: FlashAttention-3 on sm_90 in auto; FlashAttention-2 only when named; "
                "the ring's backward from a given out / lse where the private backward is usable"),
    Kernel("torch-varlen", devices=("cuda",), family=None, dtypes=HALF_FLOATS, max_head_dim=MAX_GPU_HEAD_DIM,
           requires=_torch_varlen_rule, missing=external.torch_varlen_missing,
           note="torch.nn.attention.varlen.varlen_attn (FlashAttention-2 / cuDNN): sm_80+, head dim % 8 == 0, "
                "non-deterministic backward"),
    Kernel("triton", devices=("cuda",), family=TRITON, interpreted=True, dtypes=GPU_FLOATS,
           max_head_dim=MAX_GPU_HEAD_DIM,
           note="FlashAttention-2 style, cost-sorted work list, deterministic backward, any head dim"),
    Kernel("cpu", devices=("cpu",), dtypes=ALL_FLOATS, note="FlashAttention-2 style tiles on BLAS GEMMs"),
)


# ---- Triton implementations ------------------------------------------------------------------

# {operator: "module:function" in vdit.kernels.triton}: the functions that implement the Triton
# operators, imported at their first call (triton is optional).
_registry.implement(TRITON, {
    "varlen_attention_fwd": "attention:varlen_attention_forward",
    "varlen_attention_bwd": "attention:varlen_attention_backward",
})


# ---- fake implementations and autograd --------------------------------------------------------

def _fakes(family: _registry.Family) -> dict:
    def fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=family.lse_dtype(q.dtype))

    def bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                 causal):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    return {"varlen_attention_fwd": fwd_fake, "varlen_attention_bwd": bwd_fake}


def _autograd(family: _registry.Family) -> dict:
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
        dq, dk, dv = family.op("varlen_attention_bwd")(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                                       *ctx.params)
        return dq, dk, dv, None, None, None, None, None, None

    return {"varlen_attention_fwd": (backward, setup_context)}


_registry.register(fakes=_fakes, autograd=_autograd)


# ---- public API ------------------------------------------------------------------------------

def _select(q: torch.Tensor, k: torch.Tensor, causal: bool, backend: str, **features) -> str:
    """The kernel of one call: the device, dtype and head dim plus what the attention rules read."""
    return _registry.select(SPEC, q.device, q.dtype, backend, head_dim=q.shape[2], causal=causal,
                            gqa=q.shape[1] != k.shape[1], empty=q.shape[0] == 0 or k.shape[0] == 0,
                            deterministic=torch.are_deterministic_algorithms_enabled(), **features)


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    check_qkv(q, k, v)
    batch_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    batch_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if batch_q != batch_k:
        raise ValueError(f"cu_seqlens_q describes {batch_q} sequences but cu_seqlens_k describes {batch_k}")
    max_seqlen_q = max_seqlen_of("max_seqlen_q", cu_seqlens_q, max_seqlen_q)
    max_seqlen_k = max_seqlen_of("max_seqlen_k", cu_seqlens_k, max_seqlen_k)
    scale = check_softmax_scale(softmax_scale, q.shape[2])
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return max_seqlen_q, max_seqlen_k, scale


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
        softmax_scale: scale of q @ k^T, positive, default Dh ** -0.5.
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
    chosen = _select(q, k, causal, backend, lse=return_lse)
    if chosen == "torch":
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, softmax_scale=scale,
                                          causal=causal, return_lse=return_lse)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
            max_q, max_k, scale, causal)
    if chosen == "torch-varlen":
        out, lse = external.torch_varlen_attention(*args)
    elif chosen == "flash-attn":
        out, lse = external.flash_attention(*args, deterministic=torch.are_deterministic_algorithms_enabled())
    else:
        out, lse = SPEC.family(chosen).op("varlen_attention_fwd")(*args)
    if not return_lse:
        return out
    if chosen in ("torch-varlen", "flash-attn"):  # they mark queries that see no key with +inf
        lse = lse.masked_fill(lse == float("inf"), float("-inf"))
    return out, lse


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
    Raises:
        TypeError / ValueError naming the argument for bad input (``dout`` and ``out`` must be shaped like
        q, ``lse`` (Hq, total_q)).
    """
    max_q, max_k, scale = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        softmax_scale, causal)
    for name, t, shape in (("dout", dout, q.shape), ("out", out, q.shape), ("lse", lse, (q.shape[1], q.shape[0]))):
        if tuple(t.shape) != tuple(shape):  # FA3 reads lse by pointer, unchecked
            raise ValueError(f"{name} must have shape {tuple(shape)} for q of shape {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
    chosen = _select(q, k, causal, backend, backward=True)
    if chosen == "torch":
        return reference.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                   softmax_scale=scale, causal=causal)
    offsets = (cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_q, max_k, scale, causal)
    if chosen == "flash-attn":  # it takes dout and out in q's dtype only, lse in float32 only
        tensors = (t.to(q.dtype).contiguous() for t in (dout, q, k, v, out))
        return external.flash_attention_backward(*tensors, lse.float().contiguous(), *offsets,
                                                 deterministic=torch.are_deterministic_algorithms_enabled())
    family = SPEC.family(chosen)
    return family.op("varlen_attention_bwd")(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
        lse.to(family.lse_dtype(q.dtype)).contiguous(), *offsets)
