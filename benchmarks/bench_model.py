"""VideoDiT step on mixed-resolution packed batches (CPU, fp32).

Model: the ``small`` preset (hidden 384, depth 12, 6 heads, 16-channel latents, patch 1x2x2: the
latent and patch layout of Open-Sora / Wan, at a width a 2-core CPU can run; depth 4 under ``--quick``).
Batches of latent videos of different duration and aspect ratio:
- ``4 videos, 1092 tokens``: (T, H, W) = (4, 16, 24), (2, 24, 16), (6, 12, 12), (3, 20, 20);
- ``5 videos, 4920 tokens``: the packed batch of benchmarks/bench_attention.py, (8, 30, 40), (5, 24, 40),
  (4, 24, 32), (3, 20, 24), (2, 16, 24) = 2400 + 1200 + 768 + 360 + 192 tokens.
Compared in the same run: vdit kernels (auto backend) vs the same model on the reference ops
(``vdit.use_backend("torch")``), and the packed batch vs the same videos zero-padded to the largest
(T, H, W) (what a padding-based implementation computes). Throughput counts real tokens only.
"""
import pytest
import torch

import vdit
from benchmarks.common import quick
from vdit.models import VideoDiT, VideoDiTConfig

BATCHES = {
    "4 videos, 1092 tokens": [(4, 16, 24), (2, 24, 16), (6, 12, 12), (3, 20, 20)],
    "5 videos, 4920 tokens": [(8, 30, 40), (5, 24, 40), (4, 24, 32), (3, 20, 24), (2, 16, 24)],
}
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoDiT(VideoDiTConfig.preset("small", depth=4 if quick() else 12, context_dim=128)).eval()


def _inputs(sizes, padded=False):
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(16, *s, generator=g) for s in sizes]
    if padded:
        T, H, W = (max(s[i] for s in sizes) for i in range(3))
        videos = [torch.nn.functional.pad(v, (0, W - v.shape[3], 0, H - v.shape[2], 0, T - v.shape[1])) for v in videos]
    B = len(sizes)
    context = torch.randn(10 * B, 128, generator=g)
    cu_ctx = torch.arange(0, 10 * B + 1, 10, dtype=torch.int32)
    return videos, torch.rand(B, generator=g), context, cu_ctx


VARIANTS = {"vdit auto": ("auto", False), "reference ops, packed": ("torch", False),
            "padded to max (vdit kernels)": ("auto", True)}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward(benchmark, model, batch, variant):
    backend, padded = VARIANTS[variant]
    sizes = BATCHES[batch]
    videos, t, context, cu_ctx = _inputs(sizes, padded)
    tokens = sum(a * (b // 2) * (c // 2) for a, b, c in sizes)
    benchmark.group = f"VideoDiT small forward, {batch}"
    benchmark.extra_info.update(impl=variant, tokens=tokens)

    def step():
        with torch.no_grad(), vdit.use_backend(backend):
            return model(videos, t, context, cu_ctx)

    benchmark.pedantic(step, **ROUNDS)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("variant", ["vdit auto", "reference ops, packed"])
def test_forward_backward(benchmark, model, batch, variant):
    backend, _ = VARIANTS[variant]
    videos, t, context, cu_ctx = _inputs(BATCHES[batch])
    benchmark.group = f"VideoDiT small forward+backward, {batch}"
    benchmark.extra_info.update(impl=variant)

    def step():
        with vdit.use_backend(backend):
            out = model(videos, t, context, cu_ctx)
            sum(o.square().mean() for o in out).backward()

    benchmark.pedantic(step, **ROUNDS)
