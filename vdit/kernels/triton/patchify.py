"""Triton kernels for patchify_3d / unpatchify_3d.

One program moves a (BLOCK_N tokens x BLOCK_F features) tile of one video between the video tensor
(B, C, T, H, W) and the token tensor (B, N, F). The token side is contiguous along features; the
video side is contiguous in runs of pw pixels. Index math follows csrc/patchify/math.h.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vdit._memory import new_output

# What only a GPU can verify (quoted by the static report): speed. The kernel is a pure copy in which
# every output element is written by exactly one program.
GPU_ONLY = "speed (a copy: each output element has exactly one writer)"

# (BLOCK_N, BLOCK_F, num_warps): every shipped configuration is compiled ahead of time for sm_80 and
# sm_90 by the static GPU check (``aot_specs``).
CONFIGS = [(32, 64, 4), (64, 64, 8)]


@triton.jit
def patch_transpose_kernel(
    video_ptr, tokens_ptr,
    C, T, H, W, PT, PH, PW,
    TO_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_f = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Hp = H // PH
    Wp = W // PW
    N = (T // PT) * Hp * Wp
    F = C * PT * PH * PW
    # Both tensors' offsets are linear in (token, feature): offset = token part + feature part, so the
    # index math runs on 1-D vectors and the tile only adds them. Offsets within one video fit
    # int32 (checked by the launcher); the batch offset is applied to the pointers in int64.
    video_ptr += b * C * T * H * W
    tokens_ptr += b * N * F

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    ww = n % Wp
    hh = (n // Wp) % Hp
    tt = n // (Wp * Hp)
    k = f % PW
    j = (f // PW) % PH
    i = (f // (PW * PH)) % PT
    c = f // (PW * PH * PT)
    video_n = (tt * PT * H + hh * PH) * W + ww * PW
    video_f = ((c * T + i) * H + j) * W + k
    video_offs = video_n[:, None] + video_f[None, :]
    token_offs = n[:, None] * F + f[None, :]
    mask = (n[:, None] < N) & (f[None, :] < F)
    if TO_TOKENS:
        vals = tl.load(video_ptr + video_offs, mask=mask)
        tl.store(tokens_ptr + token_offs, vals, mask=mask)
    else:
        vals = tl.load(tokens_ptr + token_offs, mask=mask)
        tl.store(video_ptr + video_offs, vals, mask=mask)


def _config(num_features: int) -> tuple[int, int, int]:
    # Narrow features (latent videos: F = 16 * 1 * 2 * 2 = 64) use taller tiles.
    return CONFIGS[1] if num_features <= 64 else CONFIGS[0]


def _launch(video: torch.Tensor, tokens: torch.Tensor, patch_size, to_tokens: bool) -> None:
    B, C, T, H, W = video.shape
    N, F = tokens.shape[1], tokens.shape[2]
    if C * T * H * W >= 2**31:
        raise ValueError(f"the triton patchify kernel needs videos of < 2**31 elements, got {C * T * H * W}")
    block_n, block_f, num_warps = _config(F)
    grid = (triton.cdiv(N, block_n), triton.cdiv(F, block_f), B)
    patch_transpose_kernel[grid](video, tokens, C, T, H, W, *patch_size, TO_TOKENS=to_tokens,
                                 BLOCK_N=block_n, BLOCK_F=block_f, num_warps=num_warps)


def patchify_3d(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) contiguous -> (B, N, F) tokens; inputs validated by ``vdit.ops``."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    tokens = new_output((B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw), dtype=x.dtype, device=x.device)
    _launch(x, tokens, patch_size, True)
    return tokens


def unpatchify_3d(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, F) contiguous tokens -> (B, C, T, H, W); inputs validated by ``vdit.ops``."""
    B, _, F = tokens.shape
    (Tp, Hp, Wp), (pt, ph, pw) = grid, patch_size
    x = new_output((B, F // (pt * ph * pw), Tp * pt, Hp * ph, Wp * pw), dtype=tokens.dtype, device=tokens.device)
    _launch(x, tokens, patch_size, False)
    return x


def aot_specs() -> list:
    """Every shipped configuration, both directions, for the static GPU check."""
    from vdit.kernels.triton.aot import KernelSpec, signature

    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        sig = signature(patch_transpose_kernel, dtype)
        for block_n, block_f, num_warps in CONFIGS:
            for to_tokens in (True, False):
                label = f"{'patchify' if to_tokens else 'unpatchify'} {dtype} {block_n}x{block_f}"
                specs.append(KernelSpec(patch_transpose_kernel, sig,
                                        {"TO_TOKENS": to_tokens, "BLOCK_N": block_n, "BLOCK_F": block_f},
                                        num_warps, 1, label))
    return specs
