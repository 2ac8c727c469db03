"""VideoDiT step on a mixed-resolution packed batch (CPU, fp32).

Model: the ``small`` preset (hidden 384, depth 12, 6 heads, 16-channel latents, patch 1x2x2: the
latent and patch layout of Open-Sora / Wan, at a width a 2-core CPU can run; depth reduced to 4 under
``--quick``). Batch: four latent videos of different duration and aspect ratio, (T, H, W) = (4, 16, 24),
(2, 24, 16), (6, 12, 12), (3, 20, 20), i.e. 384, 192, 216 and 300 tokens.
Compared in the same run: vdit kernels (auto backend) vs the same model on the reference ops
(``vdit.use_backend("torch")``), and the packed batch vs the same videos zero-padded to the largest
(T, H, W) (what a padding-based implementation computes).
"""
import pytest
import torch

import vdit
from benchmarks.common import quick
from vdit.models import VideoDiT, VideoDiTConfig

SIZES = [(4, 16, 24), (2, 24, 16), (6, 12, 12), (3, 20, 20)]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = VideoDiTConfig.preset("small", depth=4 if quick() else 12, context_dim=128)
    model = VideoDiT(cfg).eval()
    videos = [torch.randn(16, *s) for s in SIZES]
    context = torch.randn(40, cfg.context_dim)
    cu_ctx = torch.tensor([0, 10, 20, 30, 40], dtype=torch.int32)
    t = torch.rand(len(SIZES))
    tokens = sum(t_ * (h // 2) * (w // 2) for t_, h, w in SIZES)
    return model, videos, t, context, cu_ctx, tokens


def _padded(videos):
    T, H, W = (max(v.shape[i] for v in videos) for i in (1, 2, 3))
    return [torch.nn.functional.pad(v, (0, W - v.shape[3], 0, H - v.shape[2], 0, T - v.shape[1])) for v in videos]


@pytest.mark.parametrize("variant", ["vdit kernels, packed", "reference ops, packed", "vdit kernels, padded to max"])
def test_forward(benchmark, setup, variant):
    model, videos, t, context, cu_ctx, tokens = setup
    inputs = _padded(videos) if "padded" in variant else videos
    backend = "torch" if "reference" in variant else "auto"
    benchmark.group = f"VideoDiT small forward, 4 mixed videos ({tokens} real tokens)"
    impl = {"vdit kernels, packed": "vdit auto", "vdit kernels, padded to max": "padded to max (vdit kernels)"}
    benchmark.extra_info.update(impl=impl.get(variant, variant), tokens=tokens)

    def step():
        with torch.no_grad(), vdit.use_backend(backend):
            return model(inputs, t, context, cu_ctx)

    benchmark(step)


@pytest.mark.parametrize("variant", ["vdit kernels", "reference ops"])
def test_forward_backward(benchmark, setup, variant):
    model, videos, t, context, cu_ctx, tokens = setup
    backend = "torch" if variant == "reference ops" else "auto"
    benchmark.group = f"VideoDiT small forward+backward, 4 mixed videos ({tokens} tokens)"
    benchmark.extra_info.update(impl="vdit auto" if backend == "auto" else variant, tokens=tokens)

    def step():
        with vdit.use_backend(backend):
            out = model(videos, t, context, cu_ctx)
            sum(o.square().mean() for o in out).backward()

    benchmark(step)
