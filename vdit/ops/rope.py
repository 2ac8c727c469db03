"""rope_3d / rope_3d_qk: 3D (t, h, w) rotary position embedding, optionally with fused QK RMSNorm.

Kernels (declared in ``SPEC``): CUDA C++ (``cuda``), Triton (``triton``), C++ (``cpu``), reference
(``torch``). Operators per family: ``rope_3d``, ``rope_3d_qk`` (q and k in one pass), the in-place
``rope_3d_qk_`` and the backward operators ``rope_3d_backward`` / ``rope_3d_qk_backward``. The
out-of-place ops are differentiable: without a norm the backward is the inverse rotation (itself
differentiable, so any order works); with the fused RMSNorm it is a dedicated kernel that also
returns the weight gradient (first order only).

Strided inputs: any batch / token / head strides are read in place (e.g. q and k sliced from a
fused qkv projection); only a head dim with non-unit stride is copied first. Outputs are
contiguous. Positions are used as given: integer grids, or float grids scaled / offset for
resolution or length extrapolation (see :func:`vdit.packing.grid_positions`); they get no gradient.
Half / bfloat16 / float32 kernels evaluate sin / cos with a shared polynomial (csrc/rope/math.h)
that is accurate for |position| < 1e5; float64 uses the library functions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vdit.ops import _registry, reference
from vdit.ops._registry import ALL_FLOATS, MAX_GPU_HEAD_DIM, TRITON, Kernel
from vdit.ops._validation import check_like, check_tensor

SPEC = _registry.declare(
    "rope_3d",
    Kernel("cuda", devices=("cuda",), dtypes=ALL_FLOATS, max_head_dim=MAX_GPU_HEAD_DIM,
           note="angles in registers, q and k in one pass, optional fused RMSNorm"),
    Kernel("triton", devices=("cuda",), family=TRITON, interpreted=True, dtypes=ALL_FLOATS,
           max_head_dim=MAX_GPU_HEAD_DIM),
    Kernel("cpu", devices=("cpu",), dtypes=ALL_FLOATS, note="no head-dim limit"),
)
QK_SPEC = _registry.declare("rope_3d_qk", *SPEC.kernels)


# ---- Triton implementations ------------------------------------------------------------------

# {operator: "module:function" in vdit.kernels.triton}: the functions that implement the Triton
# operators, imported at their first call (triton is optional).
_registry.implement(TRITON, {
    "rope_3d": "rope:rope_3d",
    "rope_3d_qk": "rope:rope_3d_qk",
    "rope_3d_qk_": "rope:rope_3d_qk_",
    "rope_3d_backward": "rope:rope_3d_backward",
    "rope_3d_qk_backward": "rope:rope_3d_qk_backward",
})


def _contiguous_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _weight_grad_like(weight, x):
    return weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))


def _fake_rope(x, positions, dims, theta, interleaved, inverse, weight, eps):
    return _contiguous_like(x)


def _fake_rope_qk(q, k, positions, dims, theta, interleaved, inverse, q_weight, k_weight, eps):
    return _contiguous_like(q), _contiguous_like(k)


def _fake_rope_qk_inplace(q, k, positions, dims, theta, interleaved, q_weight, k_weight, eps):
    return None


def _fake_backward(grad, x, positions, dims, theta, interleaved, weight, eps):
    return _contiguous_like(x), _weight_grad_like(weight, x)


def _fake_qk_backward(grad_q, grad_k, q, k, positions, dims, theta, interleaved, q_weight, k_weight, eps):
    return _contiguous_like(q), _contiguous_like(k), _weight_grad_like(q_weight, q), _weight_grad_like(k_weight, k)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit-stride head dim; other strides are read as they are."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _autograd(family: _registry.Family) -> dict:
    """Without a norm weight the backward is the inverse rotation (itself differentiable); with one it
    is the family's dedicated backward operator (first order)."""
    rope, rope_qk = family.op("rope_3d"), family.op("rope_3d_qk")
    backward, qk_backward = family.op("rope_3d_backward"), family.op("rope_3d_qk_backward")

    def setup_rope(ctx, inputs, output):
        x, positions, dims, theta, interleaved, inverse, weight, eps = inputs
        ctx.args = (list(dims), theta, interleaved, eps)
        ctx.inverse, ctx.has_weight = inverse, weight is not None
        # Only the norm's backward needs the input itself.
        ctx.save_for_backward(positions, x if weight is not None else None, weight)

    def backward_rope(ctx, grad):
        positions, x, weight = ctx.saved_tensors
        dims, theta, interleaved, eps = ctx.args
        grad = _unit_stride(grad)
        if not ctx.has_weight:
            return rope(grad, positions, dims, theta, interleaved, not ctx.inverse, None, eps), *([None] * 7)
        if ctx.inverse:
            raise NotImplementedError("vdit: the backward of an inverse rotation with a norm weight is not implemented")
        gx, gw = backward(grad, x, positions, dims, theta, interleaved, weight, eps)
        return gx, None, None, None, None, None, gw, None

    def setup_rope_qk(ctx, inputs, output):
        q, k, positions, dims, theta, interleaved, inverse, q_weight, k_weight, eps = inputs
        ctx.args = (list(dims), theta, interleaved, eps)
        ctx.inverse = inverse
        ctx.has_weight = (q_weight is not None, k_weight is not None)
        norm = any(ctx.has_weight)
        # Only the norm's backward needs q and k; the shapes suffice to build missing gradients.
        ctx.save_for_backward(positions, q if norm else None, k if norm else None, q_weight, k_weight)
        ctx.meta = [(t.shape, t.dtype, t.device) for t in (q, k)]

    def backward_rope_qk(ctx, grad_q, grad_k):
        positions, q, k, q_weight, k_weight = ctx.saved_tensors
        dims, theta, interleaved, eps = ctx.args
        grads = []
        for g, (shape, dtype, device) in zip((grad_q, grad_k), ctx.meta):
            grads.append(torch.zeros(shape, dtype=dtype, device=device) if g is None else _unit_stride(g))
        if not any(ctx.has_weight):
            gq, gk = rope_qk(grads[0], grads[1], positions, dims, theta, interleaved, not ctx.inverse, None, None, eps)
            return gq, gk, *([None] * 8)
        if ctx.inverse:
            raise NotImplementedError("vdit: the backward of an inverse rotation with a norm weight is not implemented")
        gq, gk, gqw, gkw = qk_backward(grads[0], grads[1], q, k, positions, dims, theta, interleaved,
                                       q_weight, k_weight, eps)
        return (gq, gk, None, None, None, None, None, gqw if ctx.has_weight[0] else None,
                gkw if ctx.has_weight[1] else None, None)

    return {"rope_3d": (backward_rope, setup_rope), "rope_3d_qk": (backward_rope_qk, setup_rope_qk)}


_registry.register(fakes={"rope_3d": _fake_rope, "rope_3d_qk": _fake_rope_qk, "rope_3d_qk_": _fake_rope_qk_inplace,
                          "rope_3d_backward": _fake_backward, "rope_3d_qk_backward": _fake_qk_backward},
                   autograd=_autograd)


# ---- validation --------------------------------------------------------------------------------

def check_rope_args(name: str, x: torch.Tensor, positions: torch.Tensor, dims: Sequence[int]) -> tuple[int, int, int]:
    """Validate one rotated tensor, its positions and the axis split; returns dims as a tuple."""
    check_tensor(name, x, ndim=(3, 4), floating=True)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in (torch.int32, torch.int64, torch.float32, torch.float64):
        raise TypeError(f"positions must be int32, int64, float32 or float64, got {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(f"positions is on {positions.device} but {name} is on {x.device}")
    tokens = x.shape[:-2]  # (total,) or (B, L)
    if positions.shape not in ((*tokens, 3), (tokens[-1], 3)):
        want = f"({tokens[0]}, 3)" if len(tokens) == 1 else f"({tokens[1]}, 3) or ({tokens[0]}, {tokens[1]}, 3)"
        raise ValueError(f"positions must have shape {want} for {name} of shape {tuple(x.shape)}, "
                         f"got {tuple(positions.shape)}")
    try:
        dims = tuple(int(d) for d in dims)
    except TypeError:
        raise TypeError(f"dims must be a sequence of 3 ints, got {dims!r}") from None
    if len(dims) != 3 or any(d < 0 or d % 2 for d in dims):
        raise ValueError(f"dims must be 3 non-negative even ints (dt, dh, dw), got {dims}")
    if sum(dims) > x.shape[-1]:
        raise ValueError(f"dims {dims} sum to {sum(dims)}, more than the head dim {x.shape[-1]} of {name}")
    return dims


def _check_theta(theta) -> float:
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise TypeError(f"theta must be a float, got {type(theta).__name__}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta}")
    return float(theta)


def _check_norm_weight(name: str, w, x: torch.Tensor) -> None:
    if w is None:
        return
    check_tensor(name, w, ndim=1, floating=True)
    if w.shape[0] != x.shape[-1] or w.device != x.device:
        raise ValueError(f"{name} must be ({x.shape[-1]},) on {x.device}, got {tuple(w.shape)} on {w.device}")


# ---- public API ------------------------------------------------------------------------------

def rope_3d(x: torch.Tensor, positions: torch.Tensor, *, dims: Sequence[int], theta: float = 10000.0,
            interleaved: bool = True, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
            backend: str = "auto") -> torch.Tensor:
    """Rotate the channels of ``x`` by 3D positions (see :func:`vdit.ops.reference.rope_3d`).

    Args:
        x: (total, H, Dh) packed or (B, L, H, Dh) dense; float16/bfloat16/float32/float64. Any strides
            (a non-unit head-dim stride is copied first).
        positions: (total, 3) / (L, 3) or (B, L, 3), int32/int64/float32/float64 (t, h, w).
        dims: (dt, dh, dw), even, sum <= Dh; remaining channels pass through.
        theta: frequency base; interleaved: pairs (2j, 2j+1) if True else (j, j + d/2) per chunk.
        norm_weight: optional (Dh,) RMSNorm weight: each head is RMS-normalized first (same pass).
        eps: RMSNorm epsilon.
    Returns:
        Contiguous tensor like x; angles and math in float32 (float64 for float64 x). The CUDA and
        Triton kernels cover head dims up to 256 (auto falls back to the reference beyond).
    Raises:
        TypeError / ValueError naming the argument for bad input.
    """
    dims = check_rope_args("x", x, positions, dims)
    theta = _check_theta(theta)
    _check_norm_weight("norm_weight", norm_weight, x)
    chosen = _registry.select(SPEC, x.device, x.dtype, backend, head_dim=x.shape[-1])
    if chosen == "torch":
        return reference.rope_3d(x, positions, dims=dims, theta=theta, interleaved=interleaved,
                                 norm_weight=norm_weight, eps=eps)
    return SPEC.family(chosen).op("rope_3d")(_unit_stride(x), positions, list(dims), theta, bool(interleaved), False,
                                  norm_weight, float(eps))


def rope_3d_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, dims: Sequence[int],
               theta: float = 10000.0, interleaved: bool = True, q_norm_weight: torch.Tensor | None = None,
               k_norm_weight: torch.Tensor | None = None, norm: str = "rms", eps: float = 1e-6,
               inplace: bool = False, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k with the same positions in one pass, optionally RMS-normalizing each head first.

    Args:
        q: (total, Hq, Dh) or (B, L, Hq, Dh); k: (total, Hk, Dh) or (B, L, Hk, Dh), same dtype/device.
            Any strides (e.g. slices of a fused qkv projection output) are read in place.
        positions, dims, theta, interleaved: as :func:`rope_3d`.
        q_norm_weight, k_norm_weight: optional (Dh,) RMSNorm weights (QK-norm before rotating), each
            optional on its own; differentiable (the weight gets its gradient).
        norm: only ``"rms"`` is supported.
        inplace: write the results into q and k and return them (not differentiable: raises
            ValueError if autograd would need it). q and k must not share elements; they may be
            interleaved slices of one buffer (a fused qkv output).
    Returns:
        (q_rotated, k_rotated), contiguous (or q, k themselves with ``inplace``).
    """
    dims = check_rope_args("q", q, positions, dims)
    check_rope_args("k", k, positions, dims)
    check_like("k", k, "q", q)
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} except in the head count")
    if norm != "rms":
        raise ValueError(f"norm must be 'rms', got {norm!r}")
    theta = _check_theta(theta)
    _check_norm_weight("q_norm_weight", q_norm_weight, q)
    _check_norm_weight("k_norm_weight", k_norm_weight, k)
    chosen = _registry.select(QK_SPEC, q.device, q.dtype, backend, head_dim=q.shape[-1])
    if inplace:
        return _rope_3d_qk_inplace(chosen, q, k, positions, dims, theta, interleaved, q_norm_weight, k_norm_weight, eps)
    if chosen == "torch":
        return reference.rope_3d_qk(q, k, positions, dims=dims, theta=theta, interleaved=interleaved,
                                    q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps)
    return QK_SPEC.family(chosen).op("rope_3d_qk")(_unit_stride(q), _unit_stride(k), positions, list(dims), theta,
                                     bool(interleaved), False, q_norm_weight, k_norm_weight, float(eps))


def _rope_3d_qk_inplace(chosen, q, k, positions, dims, theta, interleaved, q_norm_weight, k_norm_weight, eps):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, q_norm_weight, k_norm_weight)):
        raise ValueError("inplace=True is not differentiable; use inplace=False when q, k or the norm weights "
                         "require grad")
    if not torch.compiler.is_compiling() and q.data_ptr() == k.data_ptr():
        raise ValueError("inplace=True needs q and k that do not share elements")
    if chosen == "torch" or q.stride(-1) != 1 or k.stride(-1) != 1:
        out_q, out_k = rope_3d_qk(q, k, positions, dims=dims, theta=theta, interleaved=interleaved,
                                  q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps, backend=chosen)
        q.copy_(out_q)
        k.copy_(out_k)
        return q, k
    QK_SPEC.family(chosen).op("rope_3d_qk_")(q, k, positions, list(dims), theta, bool(interleaved), q_norm_weight,
                                             k_norm_weight, float(eps))
    return q, k

