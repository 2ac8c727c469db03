"""Triton kernels of patch_embed_3d / patch_unembed_3d, dense and packed, forward and backward.

Three kernels serve every op (F = C*pt*ph*pw patch features, D model width):

* ``embed_kernel``    tokens[n, :] = patches[n, :] @ w_fd + bias: the patch pixels are gathered from the
                      video straight into the ``tl.dot`` operand (no im2col buffer), fp32 accumulation.
                      patch_embed forward; the token gradient of patch_unembed.
* ``project_kernel``  video[patch pixels of n] = tokens[n, :] @ w_df + bias, scattered straight into
                      the video tensor. patch_unembed forward; the x gradient of patch_embed (patches
                      never overlap: no atomics).
* ``reduce_kernel``   out[f, d] = sum_n patches[n, f] * tokens[n, d] (the weight gradients), plus the
                      column sums of either side (the bias gradients); split over the token axis into
                      partial sums that the launcher adds (deterministic, no atomics).

Dense batches and packed lists share the kernels: videos are addressed through a flat buffer and an
int64 (B, 6) per-sample metadata table (columns as csrc/patch_embed/math.h: token offset, T, H, W,
token-row offset, video element offset), and programs through an int32 (tiles, 2) table of
(sample, first token) so that a tile never straddles two samples. Pixel index math follows
csrc/patchify/math.h. The weight operand is read through strides, so one kernel serves W and W^T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vdit._memory import new_output

# What only a GPU can verify (quoted by the static report): speed and bf16 tl.dot numerics. Patches
# never overlap, so project_kernel's scatter has one writer per element, and reduce_kernel's split
# partial sums are added by the launcher (no atomics).
GPU_ONLY = "speed; bf16 tl.dot numerics (the interpreter's bf16 dot is wrong)"

# Columns of the per-sample metadata table (csrc/patch_embed/math.h); a constexpr so the kernels can read it.
META_COLS = tl.constexpr(6)

# Shipped tile configurations per element size (2: fp16/bf16, 4: fp32), a large one for large
# problems and a small one; every one is compiled ahead of time for sm_80 and sm_90 without spills by
# the static GPU check (``aot_specs``; the address math of the gathered operand costs registers, which is
# what bounds these tiles; fp32 dots without TF32 need the smaller ones).
# embed / project: (BLOCK_N tokens, BLOCK_D or BLOCK_F output features, BLOCK_F or BLOCK_D reduced
# features, num_warps, num_stages); reduce: (BLOCK_F, BLOCK_D, BLOCK_N, num_warps, num_stages).
EMBED_CONFIGS = {2: [(64, 128, 32, 4, 3), (64, 64, 32, 8, 2)], 4: [(64, 128, 16, 8, 2), (64, 64, 16, 4, 2)]}
PROJECT_CONFIGS = {2: [(128, 64, 32, 8, 3), (64, 32, 32, 8, 2)], 4: [(64, 64, 32, 8, 2), (64, 32, 32, 8, 2)]}
REDUCE_CONFIGS = {2: [(64, 128, 32, 8, 3), (32, 64, 32, 8, 2)], 4: [(32, 64, 32, 8, 2), (32, 64, 16, 4, 2)]}


def _pick(configs, dtype, large: bool):
    return configs[torch.empty((), dtype=dtype).element_size()][0 if large else 1]


@triton.jit
def _token_geometry(meta_ptr, tiles_ptr, tile, PT, PH, PW, BLOCK_N: tl.constexpr):
    """Sample of a tile and, per token of the tile: local index, mask and video offset of its patch."""
    s = tl.load(tiles_ptr + 2 * tile)
    start = tl.load(tiles_ptr + 2 * tile + 1)
    row = meta_ptr + s.to(tl.int64) * META_COLS
    tok0 = tl.load(row)
    T = tl.load(row + 1).to(tl.int32)
    H = tl.load(row + 2).to(tl.int32)
    W = tl.load(row + 3).to(tl.int32)
    video0 = tl.load(row + 5)
    Hp = H // PH
    Wp = W // PW
    N = (T // PT) * Hp * Wp
    n = start + tl.arange(0, BLOCK_N)
    ww = n % Wp
    hh = (n // Wp) % Hp
    tt = n // (Wp * Hp)
    video_n = (tt * PT * H + hh * PH) * W + ww * PW
    return tok0, video0, T, H, W, n, n < N, video_n


@triton.jit
def _feature_offsets(f, T, H, W, PT, PH, PW):
    k = f % PW
    j = (f // PW) % PH
    i = (f // (PW * PH)) % PT
    c = f // (PW * PH * PT)
    return ((c * T + i) * H + j) * W + k


@triton.jit
def embed_kernel(
    video_ptr, w_ptr, bias_ptr, out_ptr, meta_ptr, tiles_ptr,
    C, D, PT, PH, PW, stride_wf, stride_wd,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_d = tl.program_id(1)
    tok0, video0, T, H, W, n, n_mask, video_n = _token_geometry(meta_ptr, tiles_ptr, tile, PT, PH, PW, BLOCK_N)
    F = C * PT * PH * PW
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        f_mask = f < F
        video_f = _feature_offsets(f, T, H, W, PT, PH, PW)
        a = tl.load(video_ptr + video0 + (video_n[:, None] + video_f[None, :]),
                    mask=n_mask[:, None] & f_mask[None, :], other=0.0)
        b = tl.load(w_ptr + f[:, None] * stride_wf + d[None, :] * stride_wd,
                    mask=f_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + (tok0 + n.to(tl.int64))[:, None] * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


@triton.jit
def project_kernel(
    tokens_ptr, w_ptr, bias_ptr, video_ptr, meta_ptr, tiles_ptr,
    C, D, PT, PH, PW, stride_wd, stride_wf,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_f = tl.program_id(1)
    tok0, video0, T, H, W, n, n_mask, video_n = _token_geometry(meta_ptr, tiles_ptr, tile, PT, PH, PW, BLOCK_N)
    F = C * PT * PH * PW
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = f < F
    rows = (tok0 + n.to(tl.int64)) * D
    acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        a = tl.load(tokens_ptr + rows[:, None] + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        b = tl.load(w_ptr + d[:, None] * stride_wd + f[None, :] * stride_wf,
                    mask=d_mask[:, None] & f_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    video_f = _feature_offsets(f, T, H, W, PT, PH, PW)
    tl.store(video_ptr + video0 + (video_n[:, None] + video_f[None, :]), acc.to(video_ptr.dtype.element_ty),
             mask=n_mask[:, None] & f_mask[None, :])


@triton.jit
def reduce_kernel(
    video_ptr, tokens_ptr, out_ptr, sum_f_ptr, sum_d_ptr, meta_ptr, tiles_ptr,
    num_tiles, tiles_per_split, C, D, PT, PH, PW,
    SUM_F: tl.constexpr, SUM_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (pid_f, pid_d, split) sums tiles [split * tiles_per_split, ...) into partial sums
    # out[split] (F, D), sum_f[split] (F,) and sum_d[split] (D,), all fp32.
    pid_f = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    F = C * PT * PH * PW
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = f < F
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_F,), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        tok0, video0, T, H, W, n, n_mask, video_n = _token_geometry(meta_ptr, tiles_ptr, tile, PT, PH, PW, BLOCK_N)
        video_f = _feature_offsets(f, T, H, W, PT, PH, PW)
        # Patches transposed: (BLOCK_F, BLOCK_N).
        p = tl.load(video_ptr + video0 + (video_f[:, None] + video_n[None, :]),
                    mask=f_mask[:, None] & n_mask[None, :], other=0.0)
        t = tl.load(tokens_ptr + (tok0 + n.to(tl.int64))[:, None] * D + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(p, t, acc, input_precision=DOT_PRECISION)
        if SUM_F:
            acc_f += tl.sum(p.to(tl.float32), axis=1)
        if SUM_D:
            acc_d += tl.sum(t.to(tl.float32), axis=0)
    base = split.to(tl.int64) * F * D
    tl.store(out_ptr + base + f[:, None] * D + d[None, :], acc, mask=f_mask[:, None] & d_mask[None, :])
    if SUM_F:
        if pid_d == 0:
            tl.store(sum_f_ptr + split * F + f, acc_f, mask=f_mask)
    if SUM_D:
        if pid_f == 0:
            tl.store(sum_d_ptr + split * D + d, acc_d, mask=d_mask)


# ---- launchers ----------------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 accuracy (no TF32); fp16/bf16 multiply natively, accumulate in fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton patch_embed kernels support float16, bfloat16 and float32, got {dtype}")


class _Packing:
    """Per-sample metadata of B videos (C, Ti, Hi, Wi) and the tile table for one BLOCK_N."""

    def __init__(self, sizes, C, patch, device):
        pt, ph, pw = patch
        rows, tokens, rows_done, elems = [], 0, 0, 0
        self.lengths = []
        for T, H, W in sizes:
            if C * T * H * W >= 2**31:
                raise ValueError(f"the triton patch_embed kernels need videos of < 2**31 elements, got {C * T * H * W}")
            n = (T // pt) * (H // ph) * (W // pw)
            rows.append([tokens, T, H, W, rows_done, elems])
            self.lengths.append(n)
            tokens += n
            rows_done += (T // pt) * (H // ph)
            elems += C * T * H * W
        self.total = tokens
        self.meta = torch.tensor(rows, dtype=torch.int64).to(device)
        self.device = device
        self._tiles: dict[int, torch.Tensor] = {}

    def tiles(self, block_n: int) -> torch.Tensor:
        if block_n not in self._tiles:
            table = [[s, start] for s, n in enumerate(self.lengths) for start in range(0, n, block_n)]
            self._tiles[block_n] = torch.tensor(table, dtype=torch.int32).to(self.device)
        return self._tiles[block_n]


def _embed(video_flat, packing, C, patch, w_fd, bias, out):
    """out (total, D) = patches @ w_fd + bias, w_fd a (F, D) view of any strides."""
    D = out.shape[1]
    block_n, block_d, block_f, warps, stages = _pick(EMBED_CONFIGS, out.dtype, D >= 128 and packing.total >= 1024)
    tiles = packing.tiles(block_n)
    grid = (tiles.shape[0], triton.cdiv(D, block_d))
    embed_kernel[grid](video_flat, w_fd, bias if bias is not None else out, out, packing.meta, tiles,
                       C, D, *patch, w_fd.stride(0), w_fd.stride(1),
                       HAS_BIAS=bias is not None, DOT_PRECISION=_precision(out.dtype),
                       BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_F=block_f, num_warps=warps, num_stages=stages)


def _project(tokens, packing, C, patch, w_df, bias, video_flat):
    """video_flat <- unpatchify(tokens @ w_df + bias), w_df a (D, F) view of any strides."""
    D, F = w_df.shape
    block_n, block_f, block_d, warps, stages = _pick(PROJECT_CONFIGS, tokens.dtype, F >= 64 and packing.total >= 1024)
    tiles = packing.tiles(block_n)
    grid = (tiles.shape[0], triton.cdiv(F, block_f))
    project_kernel[grid](tokens, w_df, bias if bias is not None else tokens, video_flat, packing.meta, tiles,
                         C, D, *patch, w_df.stride(0), w_df.stride(1),
                         HAS_BIAS=bias is not None, DOT_PRECISION=_precision(tokens.dtype),
                         BLOCK_N=block_n, BLOCK_F=block_f, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


def _reduce(video_flat, tokens, packing, C, patch, sum_f: bool, sum_d: bool):
    """(F, D) = patches^T @ tokens in fp32, with the column sums (F,) of patches and (D,) of tokens."""
    D = tokens.shape[1]
    F = C * patch[0] * patch[1] * patch[2]
    block_f, block_d, block_n, warps, stages = _pick(REDUCE_CONFIGS, tokens.dtype, F >= 64 and D >= 128)
    tiles = packing.tiles(block_n)
    num_tiles = tiles.shape[0]
    programs = triton.cdiv(F, block_f) * triton.cdiv(D, block_d)
    # Enough partial sums to fill a GPU; two under the interpreter so the split path is tested.
    target = 2 if video_flat.device.type == "cpu" else max(1, 4 * 132 // programs)
    per_split = triton.cdiv(num_tiles, min(num_tiles, target))
    splits = triton.cdiv(num_tiles, per_split)
    out = torch.empty((splits, F, D), dtype=torch.float32, device=tokens.device)
    sums_f = torch.empty((splits, F), dtype=torch.float32, device=tokens.device)
    sums_d = torch.empty((splits, D), dtype=torch.float32, device=tokens.device)
    grid = (triton.cdiv(F, block_f), triton.cdiv(D, block_d), splits)
    reduce_kernel[grid](video_flat, tokens, out, sums_f, sums_d, packing.meta, tiles, num_tiles, per_split,
                        C, D, *patch, SUM_F=sum_f, SUM_D=sum_d, DOT_PRECISION=_precision(tokens.dtype),
                        BLOCK_F=block_f, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out.sum(0), sums_f.sum(0), sums_d.sum(0)


def _empty(like):
    return like.new_empty(0)


def _flat(videos) -> torch.Tensor:
    # One buffer so that one launch addresses every sample (a copy of the inputs; the token side,
    # D/F times larger for latent videos, is never copied).
    return torch.cat([v.reshape(-1) for v in videos])


def _dense_packing(x: torch.Tensor, patch) -> _Packing:
    B, C, T, H, W = x.shape
    return _Packing([(T, H, W)] * B, C, patch, x.device)


# ---- patch_embed_3d ---------------------------------------------------------------------------

def patch_embed_3d(x, weight, bias):
    """(B, C, T, H, W) contiguous -> (B, N, D) tokens; inputs validated by ``vdit.ops``."""
    _check_dtype(x.dtype)
    D, C = weight.shape[:2]
    patch = tuple(weight.shape[2:])
    packing = _dense_packing(x, patch)
    out = new_output((packing.total, D), dtype=x.dtype, device=x.device)
    _embed(x, packing, C, patch, weight.reshape(D, -1).t(), bias, out)
    return out.view(x.shape[0], -1, D)


def _embed_backward(grad, video_flat, grad_flat, packing, weight, mask):
    D, C = weight.shape[:2]
    patch = tuple(weight.shape[2:])
    w2 = weight.reshape(D, -1)
    if mask[0]:
        _project(grad, packing, C, patch, w2, None, grad_flat)
    gw, gb = _empty(weight), _empty(weight)
    if mask[1] or mask[2]:
        w_fd, _, sum_d = _reduce(video_flat, grad, packing, C, patch, False, mask[2])
        if mask[1]:
            gw = w_fd.t().to(weight.dtype).reshape(weight.shape)
        if mask[2]:
            gb = sum_d.to(weight.dtype)
    return gw, gb


def patch_embed_3d_backward(grad, x, weight, mask):
    """Gradients (x, weight, bias) of :func:`patch_embed_3d`; unrequested ones are empty tensors."""
    _check_dtype(x.dtype)
    packing = _dense_packing(x, tuple(weight.shape[2:]))
    gx = new_output(x.shape, dtype=x.dtype, device=x.device) if mask[0] else _empty(x)
    gw, gb = _embed_backward(grad.reshape(packing.total, -1), x, gx, packing, weight, mask)
    return gx, gw, gb


def patch_embed_3d_varlen(videos, weight, bias):
    """List of (C, Ti, Hi, Wi) -> tokens (total, D), cu_seqlens int32 (B + 1,), grids int32 (B, 3)."""
    _check_dtype(videos[0].dtype)
    D, C = weight.shape[:2]
    patch = tuple(weight.shape[2:])
    packing = _Packing([tuple(v.shape[1:]) for v in videos], C, patch, videos[0].device)
    out = new_output((packing.total, D), dtype=videos[0].dtype, device=videos[0].device)
    _embed(_flat(videos), packing, C, patch, weight.reshape(D, -1).t(), bias, out)
    cu = torch.tensor([0] + packing.lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(out.device)
    grids = torch.tensor([[s // p for s, p in zip(v.shape[1:], patch)] for v in videos], dtype=torch.int32)
    return out, cu, grids.to(out.device)


def patch_embed_3d_varlen_backward(grad, videos, weight, mask):
    """Gradients (list of video grads, weight, bias) of :func:`patch_embed_3d_varlen`."""
    _check_dtype(videos[0].dtype)
    C = weight.shape[1]
    patch = tuple(weight.shape[2:])
    packing = _Packing([tuple(v.shape[1:]) for v in videos], C, patch, videos[0].device)
    numel = sum(v.numel() for v in videos)
    gflat = new_output((numel,), dtype=videos[0].dtype, device=videos[0].device) if mask[0] else None
    gw, gb = _embed_backward(grad, _flat(videos) if (mask[1] or mask[2]) else None, gflat, packing, weight, mask)
    gx = [g.view(v.shape).clone() for g, v in zip(gflat.split([v.numel() for v in videos]), videos)] if mask[0] else []
    return gx, gw, gb


# ---- patch_unembed_3d -------------------------------------------------------------------------

def _unembed_packing(sizes_grid, weight, patch, device):
    C = weight.shape[0] // (patch[0] * patch[1] * patch[2])
    sizes = [(g[0] * patch[0], g[1] * patch[1], g[2] * patch[2]) for g in sizes_grid]
    return C, sizes, _Packing(sizes, C, patch, device)


def patch_unembed_3d(tokens, weight, bias, grid, patch):
    """(B, N, D) -> (B, C, T, H, W) = unpatchify(tokens @ weight^T + bias)."""
    _check_dtype(tokens.dtype)
    B = tokens.shape[0]
    C, sizes, packing = _unembed_packing([grid] * B, weight, patch, tokens.device)
    video = new_output((B, C, *sizes[0]), dtype=tokens.dtype, device=tokens.device)
    _project(tokens.reshape(packing.total, -1), packing, C, patch, weight.t(), bias, video)
    return video


def _unembed_backward(grad_flat, tokens, packing, C, patch, weight, mask):
    gt = new_output(tokens.shape, dtype=tokens.dtype, device=tokens.device) if mask[0] else _empty(tokens)
    if mask[0]:
        _embed(grad_flat, packing, C, patch, weight, None, gt.view(packing.total, -1))
    gw, gb = _empty(weight), _empty(weight)
    if mask[1] or mask[2]:
        w_fd, sum_f, _ = _reduce(grad_flat, tokens.reshape(packing.total, -1), packing, C, patch, mask[2], False)
        if mask[1]:
            gw = w_fd.to(weight.dtype)
        if mask[2]:
            gb = sum_f.to(weight.dtype)
    return gt, gw, gb


def patch_unembed_3d_backward(grad, tokens, weight, grid, patch, mask):
    """Gradients (tokens, weight, bias) of :func:`patch_unembed_3d`."""
    _check_dtype(tokens.dtype)
    C, _, packing = _unembed_packing([grid] * tokens.shape[0], weight, patch, tokens.device)
    return _unembed_backward(grad, tokens, packing, C, patch, weight, mask)


def _grid_list(grids):
    return [tuple(grids[i:i + 3]) for i in range(0, len(grids), 3)]


def patch_unembed_3d_varlen(tokens, weight, bias, grids, patch):
    """Packed (total, D) tokens -> list of (C, Ti, Hi, Wi); ``grids`` flat (Tp0, Hp0, Wp0, Tp1, ...)."""
    _check_dtype(tokens.dtype)
    C, sizes, packing = _unembed_packing(_grid_list(grids), weight, patch, tokens.device)
    numels = [C * T * H * W for T, H, W in sizes]
    flat = new_output((sum(numels),), dtype=tokens.dtype, device=tokens.device)
    _project(tokens, packing, C, patch, weight.t(), bias, flat)
    # Separate storages: a custom op's outputs may not alias one another.
    return [piece.view(C, *s).clone() for piece, s in zip(flat.split(numels), sizes)]


def patch_unembed_3d_varlen_backward(grads, tokens, weight, grids, patch, mask):
    """Gradients (tokens, weight, bias) of :func:`patch_unembed_3d_varlen`."""
    _check_dtype(tokens.dtype)
    C, _, packing = _unembed_packing(_grid_list(grids), weight, patch, tokens.device)
    return _unembed_backward(_flat(grads), tokens, packing, C, patch, weight, mask)


def aot_specs() -> list:
    """Every shipped tile configuration of the three kernels, per dtype, for the static GPU check."""
    from vdit.kernels.triton.aot import KernelSpec, signature

    kernels = {"embed_kernel": (embed_kernel, EMBED_CONFIGS, ("BLOCK_N", "BLOCK_D", "BLOCK_F"), {"HAS_BIAS": True}),
               "project_kernel": (project_kernel, PROJECT_CONFIGS, ("BLOCK_N", "BLOCK_F", "BLOCK_D"),
                                  {"HAS_BIAS": True}),
               "reduce_kernel": (reduce_kernel, REDUCE_CONFIGS, ("BLOCK_F", "BLOCK_D", "BLOCK_N"),
                                 {"SUM_F": True, "SUM_D": True})}
    specs = []
    for dtype, size in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        for name, (fn, table, blocks, flags) in kernels.items():
            types = {"meta_ptr": "*i64", "tiles_ptr": "*i32"}
            if name == "reduce_kernel":  # fp32 partial sums
                types.update(out_ptr="*fp32", sum_f_ptr="*fp32", sum_d_ptr="*fp32")
            sig = signature(fn, dtype, **types)
            for a, b, c, warps, stages in table[size]:
                constexprs = {**flags, **dict(zip(blocks, (a, b, c))),
                              "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
                # wgmma takes M tiles of 64 rows per warpgroup; smaller tiles use mma.sync on sm_90 too.
                specs.append(KernelSpec(fn, sig, constexprs, warps, stages, f"{name} {dtype} {a}x{b}x{c}",
                                        matmul=dtype != "fp32" and a >= 64))
    return specs
