"""patchify_3d / unpatchify_3d: videos <-> spacetime patch tokens.

Kernels (declared in ``SPEC``): CUDA C++ (``cuda``), Triton (``triton``), C++ (``cpu``), reference
(``torch``). Each is the other's backward, so both are differentiable to any order.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vdit.ops import _registry, reference
from vdit.ops._registry import ALL_FLOATS, TRITON, Kernel
from vdit.ops._validation import check_divides, check_tensor, check_triple

# A pure data movement: every kernel takes every dtype (the tables list the float ones).
SPEC = _registry.declare(
    "patchify_3d",
    Kernel("cuda", devices=("cuda",), dtypes=ALL_FLOATS, note="vectorized tile transpose"),
    Kernel("triton", devices=("cuda",), family=TRITON, interpreted=True, dtypes=ALL_FLOATS),
    Kernel("cpu", devices=("cpu",), dtypes=ALL_FLOATS, note="OpenMP copy per token row"),
)
UNPATCHIFY_SPEC = _registry.declare("unpatchify_3d", *SPEC.kernels)


# ---- Triton implementations ------------------------------------------------------------------

# {operator: "module:function" in vdit.kernels.triton}: the functions that implement the Triton
# operators, imported at their first call (triton is optional).
_registry.implement(TRITON, {
    "patchify_3d": "patchify:patchify_3d",
    "unpatchify_3d": "patchify:unpatchify_3d",
})


# ---- fake implementations and autograd: each op is the other's backward ------------------------

def _patchify_fake(x, patch_size):
    B, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    return x.new_empty((B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw))


def _unpatchify_fake(tokens, grid, patch_size):
    (Tp, Hp, Wp), (pt, ph, pw) = grid, patch_size
    return tokens.new_empty((tokens.shape[0], tokens.shape[2] // (pt * ph * pw), Tp * pt, Hp * ph, Wp * pw))


def _autograd(family: _registry.Family) -> dict:
    def setup_patchify(ctx, inputs, output):
        x, patch_size = inputs
        ctx.grid = [s // p for s, p in zip(x.shape[2:], patch_size)]
        ctx.patch_size = list(patch_size)

    def backward_patchify(ctx, grad):
        return family.op("unpatchify_3d")(grad.contiguous(), ctx.grid, ctx.patch_size), None

    def setup_unpatchify(ctx, inputs, output):
        _, ctx.grid, ctx.patch_size = inputs

    def backward_unpatchify(ctx, grad):
        return family.op("patchify_3d")(grad.contiguous(), ctx.patch_size), None, None

    return {"patchify_3d": (backward_patchify, setup_patchify),
            "unpatchify_3d": (backward_unpatchify, setup_unpatchify)}


_registry.register(fakes={"patchify_3d": _patchify_fake, "unpatchify_3d": _unpatchify_fake}, autograd=_autograd)


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
    chosen = _registry.select(SPEC, x.device, None, backend)
    if chosen == "torch":
        return reference.patchify_3d(x, patch)
    return SPEC.family(chosen).op("patchify_3d")(x.contiguous(), list(patch))


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
    chosen = _registry.select(UNPATCHIFY_SPEC, tokens.device, None, backend)
    if chosen == "torch":
        return reference.unpatchify_3d(tokens, grid, patch)
    return UNPATCHIFY_SPEC.family(chosen).op("unpatchify_3d")(tokens.contiguous(), list(grid), list(patch))
