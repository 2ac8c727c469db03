"""patchify_3d / unpatchify_3d on CPU: vdit's C++ kernel against the PyTorch reference
(view + permute + contiguous copy), measured in the same run.

Shape: a 16x64x64 latent with 16 channels and patch (1, 2, 2), the latent and patch size class of
Open-Sora / Wan / HunyuanVideo (16-channel VAE latents, 1x2x2 patches).

    pytest benchmarks/bench_patchify.py --benchmark-only
"""
import pytest
import torch

from vdit.ops import patchify_3d, unpatchify_3d

SHAPE, PATCH = (2, 16, 16, 64, 64), (1, 2, 2)
GRID = (16, 32, 32)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_patchify(benchmark, backend):
    x = torch.randn(SHAPE)
    benchmark.group = "patchify_3d fp32 2x16x16x64x64"
    benchmark.extra_info.update(impl=f"vdit {backend}" if backend != "torch" else "torch reference (permute + copy)",
                                bytes=2 * x.numel() * 4)
    benchmark(patchify_3d, x, PATCH, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_unpatchify(benchmark, backend):
    tokens = torch.randn(2, 16 * 32 * 32, 64)
    benchmark.group = "unpatchify_3d fp32 2x16384x64"
    benchmark.extra_info.update(impl=f"vdit {backend}" if backend != "torch" else "torch reference (permute + copy)",
                                bytes=2 * tokens.numel() * 4)
    benchmark(unpatchify_3d, tokens, GRID, PATCH, backend=backend)
