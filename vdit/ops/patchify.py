"""patchify_3d / unpatchify_3d: videos <-> spacetime patch tokens.

Kernels: C++ (``cpu``), CUDA C++ (``cuda``), Triton (``triton``), reference (``torch``). Each op is
registered with torch.library (``vdit::patchify_3d``, ``vdit::unpatchify_3d`` for the compiled
kernels, ``vdit::patchify_3d_triton`` / ``vdit::unpatchify_3d_triton``) with a fake implementation,
and each is the other's backward, so both are differentiable to any order.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vdit._extension import HAS_CPU_KERNELS
from vdit.backends import select_backend
from vdit.ops import reference
from vdit.ops._validation import check_divides, check_tensor, check_triple

KERNELS = ("cuda", "triton", "cpu")  # auto preference; cuda/cpu pick the compiled kernel by device


# ---- torch.library: Triton ops, fake implementations, autograd ------------------------------

@torch.library.custom_op("vdit::patchify_3d_triton", mutates_args=())
def _patchify_3d_triton(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    from vdit.kernels.triton import patchify

    return patchify.patchify_3d(x, tuple(patch_size))


@torch.library.custom_op("vdit::unpatchify_3d_triton", mutates_args=())
def _unpatchify_3d_triton(tokens: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    from vdit.kernels.triton import patchify

    return patchify.unpatchify_3d(tokens, tuple(grid), tuple(patch_size))


def _patchify_fake(x, patch_size):
    B, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    return x.new_empty((B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw))


def _unpatchify_fake(tokens, grid, patch_size):
    (Tp, Hp, Wp), (pt, ph, pw) = grid, patch_size
    return tokens.new_empty((tokens.shape[0], tokens.shape[2] // (pt * ph * pw), Tp * pt, Hp * ph, Wp * pw))


def _register(patchify_op: str, unpatchify_op: str) -> None:
    patchify = getattr(torch.ops.vdit, patchify_op.split("::")[1])
    unpatchify = getattr(torch.ops.vdit, unpatchify_op.split("::")[1])
    torch.library.register_fake(patchify_op)(_patchify_fake)
    torch.library.register_fake(unpatchify_op)(_unpatchify_fake)

    def setup_patchify(ctx, inputs, output):
        x, patch_size = inputs
        ctx.grid = [s // p for s, p in zip(x.shape[2:], patch_size)]
        ctx.patch_size = list(patch_size)

    def backward_patchify(ctx, grad):
        return unpatchify(grad.contiguous(), ctx.grid, ctx.patch_size), None

    def setup_unpatchify(ctx, inputs, output):
        _, ctx.grid, ctx.patch_size = inputs

    def backward_unpatchify(ctx, grad):
        return patchify(grad.contiguous(), ctx.patch_size), None, None

    torch.library.register_autograd(patchify_op, backward_patchify, setup_context=setup_patchify)
    torch.library.register_autograd(unpatchify_op, backward_unpatchify, setup_context=setup_unpatchify)


_register("vdit::patchify_3d_triton", "vdit::unpatchify_3d_triton")
if HAS_CPU_KERNELS:
    _register("vdit::patchify_3d", "vdit::unpatchify_3d")


def _op(backend: str, name: str):
    return getattr(torch.ops.vdit, name + "_triton" if backend == "triton" else name)


# ---- public API ------------------------------------------------------------------------------

def patchify_3d(x: torch.Tensor, patch_size: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """Cut videos into spacetime patch tokens.

    Args:
        x: (B, C, T, H, W), any dtype, non-empty. Non-contiguous input is copied to contiguous first.
        patch_size: (pt, ph, pw), positive, dividing (T, H, W).
        backend: see :mod:`vdit.backends`.
    Returns:
        (B, N, F), N = T/pt * H/ph * W/pw tokens in (t, h, w) row-major order (w fastest) and
        F = C*pt*ph*pw features in (c, i, j, k) order (the flattening of a Conv3d weight).
    Raises:
        TypeError / ValueError naming the argument for bad input.
    """
    check_tensor("x", x, ndim=5)
    patch = check_triple("patch_size", patch_size)
    check_divides("patch_size", patch, "(T, H, W) of x", x.shape[2:])
    chosen = select_backend("patchify_3d", KERNELS, x.device, backend)
    if chosen == "torch":
        return reference.patchify_3d(x, patch)
    return _op(chosen, "patchify_3d")(x.contiguous(), list(patch))


def unpatchify_3d(tokens: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int], *,
                  backend: str = "auto") -> torch.Tensor:
    """Reassemble videos from patch tokens; the exact inverse of :func:`patchify_3d`.

    Args:
        tokens: (B, N, F), non-empty, N = Tp*Hp*Wp and pt*ph*pw dividing F. Copied to contiguous first
            if needed.
        grid: (Tp, Hp, Wp) = (T/pt, H/ph, W/pw).
        patch_size: (pt, ph, pw).
        backend: see :mod:`vdit.backends`.
    Returns:
        (B, C, T, H, W) with C = F / (pt*ph*pw).
    """
    check_tensor("tokens", tokens, ndim=3)
    grid = check_triple("grid", grid)
    patch = check_triple("patch_size", patch_size)
    if tokens.shape[1] != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"tokens has N = {tokens.shape[1]} tokens but grid {grid} holds {grid[0] * grid[1] * grid[2]}")
    volume = patch[0] * patch[1] * patch[2]
    if tokens.shape[2] % volume:
        raise ValueError(f"tokens has F = {tokens.shape[2]} features, not a multiple of the patch volume "
                         f"{volume} of patch_size {patch}")
    chosen = select_backend("unpatchify_3d", KERNELS, tokens.device, backend)
    if chosen == "torch":
        return reference.unpatchify_3d(tokens, grid, patch)
    return _op(chosen, "unpatchify_3d")(tokens.contiguous(), list(grid), list(patch))
