"""patch_embed_3d (Conv3d with stride = kernel as one fused op) and patch_unembed_3d (final linear +
unpatchify), dense and packed.

Kernels (declared in ``SPECS``): Triton (``triton``: gather + ``tl.dot`` + bias in one kernel), C++
(``cpu``: patch gather into cache-sized blocks + BLAS GEMM per block), reference (``torch``). Every
kernel's backward is again one fused operator (``vdit::<op>_backward``, returning the input, weight and
bias gradients that are needed), so the ops run under ``torch.compile(fullgraph=True)`` and train.
The Triton kernels take fp16, bf16 and fp32; with ``backend="auto"`` fp64 CUDA tensors use the reference.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from vdit.ops import _registry, reference
from vdit.ops._registry import ALL_FLOATS, GPU_FLOATS, TRITON, Kernel
from vdit.ops._validation import check_cu_seqlens, check_divides, check_like, check_tensor, check_triple

_KERNELS = (
    Kernel("triton", devices=("cuda",), family=TRITON, interpreted=True, dtypes=GPU_FLOATS,
           note="gather + tl.dot + bias in one kernel"),
    Kernel("cpu", devices=("cpu",), dtypes=ALL_FLOATS, note="patch gather into cache-sized blocks + BLAS GEMM"),
)
SPECS = {name: _registry.declare(name, *_KERNELS) for name in
         ("patch_embed_3d", "patch_embed_3d_varlen", "patch_unembed_3d", "patch_unembed_3d_varlen")}


# ---- Triton implementations -------------------------------------------------------------------

# {operator: "module:function" in vdit.kernels.triton}: the functions that implement the Triton
# operators, imported at their first call (triton is optional).
_registry.implement(TRITON, {
    "patch_embed_3d": "patch_embed:patch_embed_3d",
    "patch_embed_3d_backward": "patch_embed:patch_embed_3d_backward",
    "patch_embed_3d_varlen": "patch_embed:patch_embed_3d_varlen",
    "patch_embed_3d_varlen_backward": "patch_embed:patch_embed_3d_varlen_backward",
    "patch_unembed_3d": "patch_embed:patch_unembed_3d",
    "patch_unembed_3d_backward": "patch_embed:patch_unembed_3d_backward",
    "patch_unembed_3d_varlen": "patch_embed:patch_unembed_3d_varlen",
    "patch_unembed_3d_varlen_backward": "patch_embed:patch_unembed_3d_varlen_backward",
})


# ---- fake implementations (shapes only) -------------------------------------------------------
# A gradient that a backward op is not asked for (output_mask) is an empty tensor: the schemas
# return Tensor, not Tensor?.

def _embed_fake(x, weight, bias):
    B, _, T, H, W = x.shape
    pt, ph, pw = weight.shape[2:]
    return x.new_empty((B, (T // pt) * (H // ph) * (W // pw), weight.shape[0]))


def _embed_backward_fake(grad, x, weight, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if output_mask[2] else weight.new_empty(0))


def _num_tokens(sizes, patch):
    return (sizes[0] // patch[0]) * (sizes[1] // patch[1]) * (sizes[2] // patch[2])


def _embed_varlen_fake(videos, weight, bias):
    patch = weight.shape[2:]
    total = sum(_num_tokens(v.shape[1:], patch) for v in videos)
    v0 = videos[0]
    return (v0.new_empty((total, weight.shape[0])), v0.new_empty(len(videos) + 1, dtype=torch.int32),
            v0.new_empty((len(videos), 3), dtype=torch.int32))


def _embed_varlen_backward_fake(grad, videos, weight, output_mask):
    return ([v.new_empty(v.shape) for v in videos] if output_mask[0] else [],
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if output_mask[2] else weight.new_empty(0))


def _video_shape(weight, grid, patch):
    C = weight.shape[0] // (patch[0] * patch[1] * patch[2])
    return (C, grid[0] * patch[0], grid[1] * patch[1], grid[2] * patch[2])


def _unembed_fake(tokens, weight, bias, grid, patch_size):
    return tokens.new_empty((tokens.shape[0], *_video_shape(weight, grid, patch_size)))


def _unembed_backward_fake(grad, tokens, weight, grid, patch_size, output_mask):
    return (tokens.new_empty(tokens.shape) if output_mask[0] else tokens.new_empty(0),
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if output_mask[2] else weight.new_empty(0))


def _unembed_varlen_fake(tokens, weight, bias, grids, patch_size):
    return [tokens.new_empty(_video_shape(weight, grids[i:i + 3], patch_size)) for i in range(0, len(grids), 3)]


def _unembed_varlen_backward_fake(grads, tokens, weight, grids, patch_size, output_mask):
    return _unembed_backward_fake(None, tokens, weight, None, None, output_mask)


# ---- autograd -----------------------------------------------------------------------------------

def _mask_of(ctx, has_bias: bool) -> list[bool]:
    """output_mask of a backward operator: which of (input, weight, bias) gradients are needed."""
    need = ctx.needs_input_grad
    return [bool(need[0]), bool(need[1]), bool(has_bias and need[2])]


def _grads_of(mask, gx, gw, gb):
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)


# Each op's setup saves what its backward needs; each backward is one fused operator of the family
# the forward ran in (bound with functools.partial when registered).

def _setup_embed(ctx, inputs, output):  # patch_embed_3d(x, weight, bias)
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward_embed(family, ctx, grad):
    x, weight = ctx.saved_tensors
    mask = _mask_of(ctx, ctx.has_bias)
    return _grads_of(mask, *family.op("patch_embed_3d_backward")(grad.contiguous(), x, weight, mask))


def _setup_embed_varlen(ctx, inputs, output):  # patch_embed_3d_varlen(videos, weight, bias) -> (tokens, cu, grids)
    videos, weight, bias = inputs
    ctx.save_for_backward(weight, *videos)
    ctx.has_bias = bias is not None


def _backward_embed_varlen(family, ctx, grad, _grad_cu, _grad_grids):
    weight, *videos = ctx.saved_tensors
    mask = _mask_of(ctx, ctx.has_bias)
    if grad is None:
        return ([torch.zeros_like(v) for v in videos] if mask[0] else None,
                torch.zeros_like(weight) if mask[1] else None,
                weight.new_zeros(weight.shape[0]) if mask[2] else None)
    gx, gw, gb = family.op("patch_embed_3d_varlen_backward")(grad.contiguous(), videos, weight, mask)
    return _grads_of(mask, list(gx), gw, gb)


def _setup_unembed(ctx, inputs, output):  # patch_unembed_3d(tokens, weight, bias, grid, patch_size)
    tokens, weight, bias, grid, patch = inputs
    ctx.save_for_backward(tokens, weight)
    ctx.has_bias, ctx.grid, ctx.patch = bias is not None, list(grid), list(patch)


def _backward_unembed(family, ctx, grad):
    tokens, weight = ctx.saved_tensors
    mask = _mask_of(ctx, ctx.has_bias)
    grads = family.op("patch_unembed_3d_backward")(grad.contiguous(), tokens, weight, ctx.grid, ctx.patch, mask)
    return (*_grads_of(mask, *grads), None, None)


def _setup_unembed_varlen(ctx, inputs, output):  # patch_unembed_3d_varlen(tokens, weight, bias, grids, patch)
    tokens, weight, bias, grids, patch = inputs
    ctx.save_for_backward(tokens, weight)
    ctx.has_bias, ctx.grids, ctx.patch = bias is not None, list(grids), list(patch)
    ctx.shapes = [tuple(v.shape) for v in output]


def _backward_unembed_varlen(family, ctx, grads):
    tokens, weight = ctx.saved_tensors
    mask = _mask_of(ctx, ctx.has_bias)
    grads = [g.contiguous() if g is not None else tokens.new_zeros(s) for g, s in zip(grads, ctx.shapes)]
    out = family.op("patch_unembed_3d_varlen_backward")(grads, tokens, weight, ctx.grids, ctx.patch, mask)
    return (*_grads_of(mask, *out), None, None)


def _autograd(family: _registry.Family) -> dict:
    """Autograd formulas of one kernel family."""
    return {"patch_embed_3d": (functools.partial(_backward_embed, family), _setup_embed),
            "patch_embed_3d_varlen": (functools.partial(_backward_embed_varlen, family), _setup_embed_varlen),
            "patch_unembed_3d": (functools.partial(_backward_unembed, family), _setup_unembed),
            "patch_unembed_3d_varlen": (functools.partial(_backward_unembed_varlen, family), _setup_unembed_varlen)}


_registry.register(
    fakes={"patch_embed_3d": _embed_fake, "patch_embed_3d_backward": _embed_backward_fake,
           "patch_embed_3d_varlen": _embed_varlen_fake, "patch_embed_3d_varlen_backward": _embed_varlen_backward_fake,
           "patch_unembed_3d": _unembed_fake, "patch_unembed_3d_backward": _unembed_backward_fake,
           "patch_unembed_3d_varlen": _unembed_varlen_fake,
           "patch_unembed_3d_varlen_backward": _unembed_varlen_backward_fake},
    autograd=_autograd)


# ---- validation ---------------------------------------------------------------------------------

def _check_weight(weight, bias, ref_name, ref, *, embed: bool):
    check_tensor("weight", weight, ndim=5 if embed else 2, floating=True)
    check_like("weight", weight, ref_name, ref)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        check_like("bias", bias, ref_name, ref)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} output features")


def _run(op: str, device: torch.device, dtype: torch.dtype, backend: str):
    """The operator ``op`` of the chosen kernel family, or None for the reference."""
    chosen = _registry.select(SPECS[op], device, dtype, backend)
    return None if chosen == "torch" else SPECS[op].family(chosen).op(op)


def _contiguous(t):
    return None if t is None else t.contiguous()


# ---- public API ---------------------------------------------------------------------------------

def patch_embed_3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str = "auto") -> torch.Tensor:
    """Fused 3D patch embedding.

    Args:
        x: (B, C, T, H, W) float (fp16, bf16, fp32, fp64); copied to contiguous first if needed.
        weight: (D, C, pt, ph, pw), an ``nn.Conv3d`` weight; the patch size is ``weight.shape[2:]`` and
            must divide (T, H, W). Same dtype and device as x.
        bias: (D,) or None; same dtype and device as x.
        backend: see :mod:`vdit.backends`.
    Returns:
        (B, N, D) contiguous, N = T/pt * H/ph * W/pw, in x's dtype (accumulated in fp32, fp64 for fp64)
        == ``F.conv3d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)``.
    Raises:
        TypeError / ValueError naming the argument for bad input.
    """
    check_tensor("x", x, ndim=5, floating=True)
    _check_weight(weight, bias, "x", x, embed=True)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels but x has {x.shape[1]}")
    check_divides("patch size weight.shape[2:]", weight.shape[2:], "(T, H, W) of x", x.shape[2:])
    kernel_op = _run("patch_embed_3d", x.device, x.dtype, backend)
    if kernel_op is None:
        return reference.patch_embed_3d(x, weight, bias)
    return kernel_op(x.contiguous(), weight.contiguous(), _contiguous(bias))


def patch_embed_3d_varlen(videos: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None,
                          *, backend: str = "auto"):
    """Patch embedding of videos of different sizes into one packed token sequence, in one kernel pass.

    Args:
        videos: non-empty list of B tensors (C, Ti, Hi, Wi), same C, dtype and device; the patch size
            ``weight.shape[2:]`` must divide each (Ti, Hi, Wi).
        weight: (D, C, pt, ph, pw); bias: (D,) or None.
        backend: see :mod:`vdit.backends`.
    Returns:
        tokens (total, D) in the videos' dtype (video i's Ni tokens at rows cu_seqlens[i]:cu_seqlens[i+1],
        in patchify order), cu_seqlens int32 (B + 1,), grids int32 (B, 3) of (Ti/pt, Hi/ph, Wi/pw); all
        on the videos' device.
    Raises:
        TypeError / ValueError naming the argument (the sample index and sizes for a patch that does
        not divide a video).
    """
    if not isinstance(videos, (list, tuple)) or len(videos) == 0:
        raise ValueError("videos must be a non-empty list of (C, T, H, W) tensors")
    for i, v in enumerate(videos):
        check_tensor(f"videos[{i}]", v, ndim=4, floating=True)
        check_like(f"videos[{i}]", v, "videos[0]", videos[0])
        if v.shape[0] != videos[0].shape[0]:
            raise ValueError(f"videos[{i}] has {v.shape[0]} channels but videos[0] has {videos[0].shape[0]}")
    _check_weight(weight, bias, "videos[0]", videos[0], embed=True)
    if weight.shape[1] != videos[0].shape[0]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels but the videos have {videos[0].shape[0]}")
    for i, v in enumerate(videos):
        check_divides("patch size weight.shape[2:]", weight.shape[2:], f"(T, H, W) of videos[{i}]", v.shape[1:])
    kernel_op = _run("patch_embed_3d_varlen", videos[0].device, videos[0].dtype, backend)
    if kernel_op is None:
        return reference.patch_embed_3d_varlen(videos, weight, bias)
    return kernel_op([v.contiguous() for v in videos], weight.contiguous(),
                                                _contiguous(bias))


def patch_unembed_3d(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     grid: Sequence[int], patch_size: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """Final projection + unpatchify for dense tokens, fused: the projected patches are written
    straight into the (B, C, T, H, W) video.

    Args:
        tokens: (B, N, D) float, N = Tp*Hp*Wp.
        weight: (C*pt*ph*pw, D), an ``nn.Linear(D, C*pt*ph*pw)`` weight; bias: (C*pt*ph*pw,) or None.
            Same dtype and device as tokens.
        grid: (Tp, Hp, Wp); patch_size: (pt, ph, pw).
        backend: see :mod:`vdit.backends`.
    Returns:
        (B, C, Tp*pt, Hp*ph, Wp*pw) in tokens' dtype == ``unpatchify_3d(tokens @ weight.T + bias, grid, patch)``.
    """
    check_tensor("tokens", tokens, ndim=3, floating=True)
    grid, patch = check_triple("grid", grid), check_triple("patch_size", patch_size)
    _check_unembed(tokens, weight, bias, patch)
    if tokens.shape[1] != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"tokens has N = {tokens.shape[1]} tokens but grid {grid} holds {grid[0] * grid[1] * grid[2]}")
    kernel_op = _run("patch_unembed_3d", tokens.device, tokens.dtype, backend)
    if kernel_op is None:
        return reference.patch_unembed_3d(tokens, weight, bias, grid, patch)
    return kernel_op(tokens.contiguous(), weight.contiguous(), _contiguous(bias),
                                           list(grid), list(patch))


def patch_unembed_3d_varlen(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            cu_seqlens: torch.Tensor, grids: torch.Tensor, patch_size: Sequence[int], *,
                            backend: str = "auto") -> list[torch.Tensor]:
    """Final projection + unpatchify for packed tokens, one kernel pass over all samples.

    Args:
        tokens: (total, D); cu_seqlens: int32 (B + 1,); grids: int (B, 3) with Tp*Hp*Wp = each length.
            The grids are read on the host (one small copy).
        weight, bias, patch_size: as :func:`patch_unembed_3d`.
        backend: see :mod:`vdit.backends`.
    Returns:
        list of B videos (C, Ti, Hi, Wi) in tokens' dtype.
    """
    check_tensor("tokens", tokens, ndim=2, floating=True)
    patch = check_triple("patch_size", patch_size)
    _check_unembed(tokens, weight, bias, patch)
    B = check_cu_seqlens("cu_seqlens", cu_seqlens, tokens.shape[0], tokens.device)
    if not isinstance(grids, torch.Tensor) or grids.shape != (B, 3):
        raise ValueError(f"grids must be a ({B}, 3) tensor matching cu_seqlens")
    grid_list = grids.tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    for i, ((tp, hp, wp), n) in enumerate(zip(grid_list, lengths)):
        if tp <= 0 or hp <= 0 or wp <= 0:
            raise ValueError(f"grids[{i}] = {(tp, hp, wp)} must be positive")
        if tp * hp * wp != n:
            raise ValueError(f"grids[{i}] = {(tp, hp, wp)} holds {tp * hp * wp} tokens but sequence {i} has {n}")
    kernel_op = _run("patch_unembed_3d_varlen", tokens.device, tokens.dtype, backend)
    if kernel_op is None:
        return reference.patch_unembed_3d_varlen(tokens, weight, bias, cu_seqlens, grids, patch)
    flat = [int(v) for row in grid_list for v in row]
    return list(kernel_op(tokens.contiguous(), weight.contiguous(), _contiguous(bias),
                                                       flat, list(patch)))


def _check_unembed(tokens, weight, bias, patch):
    _check_weight(weight, bias, "tokens", tokens, embed=False)
    if weight.shape[1] != tokens.shape[-1]:
        raise ValueError(f"weight expects {weight.shape[1]} input features but tokens have {tokens.shape[-1]}")
    volume = patch[0] * patch[1] * patch[2]
    if weight.shape[0] % volume:
        raise ValueError(f"weight has {weight.shape[0]} output features, not a multiple of the patch volume {volume}")
