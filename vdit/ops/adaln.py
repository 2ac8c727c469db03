"""adaln_modulate (LayerNorm + per-sample shift/scale) and gated_residual (x + gate * y), over packed
or dense tokens.

Kernels (declared in ``SPEC``): CUDA C++ (``cuda``) and C++ (``cpu``), sharing their per-element math,
and the reference (``torch``). The kernels find each token's sample from ``cu_seqlens`` (no per-token
index tensor) and are differentiable through their backward operators (first order).
"""
from __future__ import annotations

import math

import torch

from vdit.ops import _registry, reference
from vdit.ops._registry import ALL_FLOATS, Kernel
from vdit.ops._shared import compute_dtype
from vdit.ops._validation import check_cu_seqlens, check_like, check_tensor

SPEC = _registry.declare(
    "adaln_modulate",
    Kernel("cuda", devices=("cuda",), dtypes=ALL_FLOATS, note="one warp per row, statistics in fp32"),
    Kernel("cpu", devices=("cpu",), dtypes=ALL_FLOATS, note="OpenMP over rows"),
)
GATED_SPEC = _registry.declare("gated_residual", *SPEC.kernels)


# ---- fake implementations and autograd --------------------------------------------------------

def _adaln_fake(x, shift, scale, cu_seqlens, eps):
    stats = x.new_empty(x.shape[:-1], dtype=compute_dtype(x.dtype))
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


def _adaln_backward_fake(grad_out, x, scale, mean, rstd, cu_seqlens):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _gated_fake(x, y, gate, cu_seqlens):
    return x.new_empty(x.shape)


def _gated_backward_fake(grad_out, y, gate, cu_seqlens):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _autograd(family: _registry.Family) -> dict:
    def adaln_setup(ctx, inputs, output):
        x, _, scale, cu_seqlens, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd, cu_seqlens)

    def adaln_backward(ctx, grad_out, grad_mean, grad_rstd):
        # mean and rstd are internal outputs (never returned by the public op): their grads are unused.
        x, scale, mean, rstd, cu_seqlens = ctx.saved_tensors
        gx, gshift, gscale = family.op("adaln_modulate_backward")(grad_out.contiguous(), x, scale, mean, rstd,
                                                                   cu_seqlens)
        return gx, gshift, gscale, None, None

    def gated_setup(ctx, inputs, output):
        _, y, gate, cu_seqlens = inputs
        ctx.save_for_backward(y, gate, cu_seqlens)

    def gated_backward(ctx, grad_out):
        y, gate, cu_seqlens = ctx.saved_tensors
        grad_y, grad_gate = family.op("gated_residual_backward")(grad_out.contiguous(), y, gate, cu_seqlens)
        return grad_out, grad_y, grad_gate, None

    return {"adaln_modulate": (adaln_backward, adaln_setup), "gated_residual": (gated_backward, gated_setup)}


_registry.register(fakes={"adaln_modulate": _adaln_fake, "adaln_modulate_backward": _adaln_backward_fake,
                          "gated_residual": _gated_fake, "gated_residual_backward": _gated_backward_fake},
                   autograd=_autograd)


# ---- validation ------------------------------------------------------------------------------

def _check_tokens_and_params(x, cu_seqlens, params: dict) -> None:
    check_tensor("x", x, ndim=2 if cu_seqlens is not None else 3, floating=True, nonempty=False)
    batch = (check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device) if cu_seqlens is not None
             else x.shape[0])
    for name, p in params.items():
        check_tensor(name, p, ndim=2, floating=True)
        check_like(name, p, "x", x)
        if p.shape != (batch, x.shape[-1]):
            raise ValueError(f"{name} must be ({batch}, {x.shape[-1]}) (one row per sample), got {tuple(p.shape)}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return float(eps)


def _cu(cu_seqlens):
    return None if cu_seqlens is None else cu_seqlens.contiguous()


# ---- public API ------------------------------------------------------------------------------

def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                   *, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[s]) + shift[s]`` (LayerNorm without affine, statistics in fp32).

    Args:
        x: (total, C) packed with ``cu_seqlens`` int32 (B + 1,), or (B, N, C) with cu_seqlens None;
            float16, bfloat16, float32 or float64 (statistics and math in float32, float64 for float64).
        shift, scale: (B, C), same dtype and device as x; s is the sample of each token.
        eps: added to the variance, finite and >= 0.
        backend: see :mod:`vdit.backends`.
    Returns:
        Tensor like x. Differentiable in x, shift and scale.
    Raises:
        TypeError (non-tensor, non-float dtype, dtype mismatch, int64 cu_seqlens, non-float eps) or
        ValueError (wrong rank or shape, device mismatch, cu_seqlens not starting at 0, decreasing or
        not ending at total, negative eps) naming the argument.
    """
    _check_tokens_and_params(x, cu_seqlens, {"shift": shift, "scale": scale})
    eps = _check_eps(eps)
    chosen = _registry.select(SPEC, x.device, x.dtype, backend)
    if chosen == "torch":
        return reference.adaln_modulate(x, shift, scale, cu_seqlens, eps=eps)
    out, _, _ = SPEC.family(chosen).op("adaln_modulate")(x.contiguous(), shift.contiguous(), scale.contiguous(),
                                              _cu(cu_seqlens), eps)
    return out


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                   *, backend: str = "auto") -> torch.Tensor:
    """``x + gate[s] * y``.

    Args:
        x, y: (total, C) packed with ``cu_seqlens`` int32 (B + 1,), or (B, N, C) with cu_seqlens None;
            same float dtype and device (math in float32, float64 for float64).
        gate: (B, C) like x.
        backend: see :mod:`vdit.backends`.
    Returns:
        Tensor like x. Differentiable in x, y and gate.
    Raises:
        TypeError / ValueError naming the argument, as :func:`adaln_modulate`.
    """
    _check_tokens_and_params(x, cu_seqlens, {"gate": gate})
    check_tensor("y", y, floating=True, nonempty=False)
    check_like("y", y, "x", x)
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    chosen = _registry.select(GATED_SPEC, x.device, x.dtype, backend)
    if chosen == "torch":
        return reference.gated_residual(x, y, gate, cu_seqlens)
    return GATED_SPEC.family(chosen).op("gated_residual")(x.contiguous(), y.contiguous(), gate.contiguous(),
                                                          _cu(cu_seqlens))
