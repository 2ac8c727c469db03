"""patch_embed_3d / patch_embed_3d_varlen / patch_unembed_3d on CPU (fp32): vdit's C++ kernel against
the PyTorch ways of doing the same, measured in the same run.

Shapes: a 16-channel VAE latent with patch (1, 2, 2) and model width D = 1152 (Open-Sora-like; Wan and
HunyuanVideo use the same latent channels and patch, D = 1536 / 3072), a 16x64x64 latent (the target
case of issue 3), a wider D = 3072 model on an 8x32x32 latent, and a mixed-resolution list of latents
for the packed form. Sized so that the module runs in about two minutes on 2 cores.

Baselines:
    nn.Conv3d           ``conv(x).flatten(2).transpose(1, 2)`` (channels-first, what the models do;
                        the transpose is a view, no copy is charged to it)
    nn.Conv3d cl3d      the same with x and the weight in ``torch.channels_last_3d``
    reshape + Linear    patchify by view/permute/reshape (a copy) then ``F.linear`` (vdit's reference)
    torch.compile       ``torch.compile`` (inductor) of that reference, when it compiles here
    per-sample Conv3d   for lists: one Conv3d per video, then ``torch.cat``

The GPU cases (bf16, vdit's Triton kernel vs Conv3d; the 32x90x160 latent at D = 3072 among them) run
only where CUDA is available; each round ends with a device synchronize. They have not been run yet:
no GPU was available when they were written.

    pytest benchmarks/bench_patch_embed.py --benchmark-only --benchmark-json=out.json
    python -m benchmarks.report_table out.json --title "patch embedding (CPU, fp32)"
"""
import functools

import pytest
import torch

from vdit.ops import patch_embed_3d, patch_embed_3d_varlen, patch_unembed_3d, reference

C, PATCH = 16, (1, 2, 2)
CASES = [  # (B, T, H, W, D)
    (1, 16, 64, 64, 1152),
    (1, 8, 32, 32, 3072),
]
VARLEN_SIZES = [(16, 32, 32), (8, 48, 64), (1, 64, 64), (4, 40, 24)]  # (T, H, W): mixed durations / aspect ratios
VARLEN_D = 1152


def _name(case):
    B, T, H, W, D = case
    return f"{B}x{C}x{T}x{H}x{W} D={D}"


def _flops_bytes(tokens, D, video_numel, passes=1):
    # One GEMM (tokens x F) @ (F x D) per pass; bytes: read the video once, write/read the tokens once.
    return dict(flops=2 * tokens * C * 4 * D * passes, bytes=4 * (video_numel + tokens * D + D * C * 4))


def _setup(case):
    B, T, H, W, D = case
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(C, D, PATCH, stride=PATCH)
    x = torch.randn(B, C, T, H, W)
    tokens = B * (T // PATCH[0]) * (H // PATCH[1]) * (W // PATCH[2])
    return conv, x, tokens


def _conv(conv, x):
    return conv(x).flatten(2).transpose(1, 2)


@functools.cache
def _compiled_reference():
    return torch.compile(reference.patch_embed_3d, dynamic=False)


FORWARD_IMPLS = ["vdit cpu", "nn.Conv3d", "nn.Conv3d cl3d", "reshape + Linear", "torch.compile(reference)"]


@pytest.mark.parametrize("case", CASES, ids=_name)
@pytest.mark.parametrize("impl", FORWARD_IMPLS)
def test_forward(benchmark, case, impl):
    conv, x, tokens = _setup(case)
    w, b = conv.weight.detach(), conv.bias.detach()
    benchmark.group = f"patch_embed_3d forward fp32 {_name(case)}"
    benchmark.extra_info.update(impl=impl, **_flops_bytes(tokens, case[-1], x.numel()))
    if impl == "vdit cpu":
        fn = functools.partial(patch_embed_3d, x, w, b, backend="cpu")
    elif impl == "nn.Conv3d":
        fn = functools.partial(_conv, conv, x)
    elif impl == "nn.Conv3d cl3d":
        conv = conv.to(memory_format=torch.channels_last_3d)
        fn = functools.partial(_conv, conv, x.contiguous(memory_format=torch.channels_last_3d))
    elif impl == "reshape + Linear":
        fn = functools.partial(reference.patch_embed_3d, x, w, b)
    else:
        compiled = _compiled_reference()
        try:
            compiled(x, w, b)
        except Exception as exc:  # no C++ toolchain for inductor, ...
            pytest.skip(f"torch.compile failed on this machine: {type(exc).__name__}")
        fn = functools.partial(compiled, x, w, b)
    with torch.no_grad():
        expected = reference.patch_embed_3d(x, w, b)
        torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-4)
        benchmark(fn)


# The gradient reaching the embedding is contiguous as (B, N, D) when the next layer is a Linear /
# LayerNorm / add on the tokens (the model case); for Conv3d that is a transposed, channels-last
# output gradient. "grad in conv layout" gives Conv3d a gradient contiguous in its own (B, D, T, H, W)
# layout instead: its best case, which a model does not produce.
BACKWARD_IMPLS = ["vdit cpu", "nn.Conv3d", "nn.Conv3d, grad in conv layout", "nn.Conv3d cl3d", "reshape + Linear"]


def _backward_fn(impl, conv, x, need_x):
    """A closure running one backward pass (through autograd) of ``impl``."""
    w = conv.weight
    b = conv.bias
    xg = x.clone().requires_grad_(need_x)
    if impl == "vdit cpu":
        out = patch_embed_3d(xg, w, b, backend="cpu")
    elif impl.startswith("nn.Conv3d,"):
        out = _conv(conv, xg)
        grad = torch.randn(conv(x).shape, generator=torch.Generator().manual_seed(1)).flatten(2).transpose(1, 2)
        return lambda: torch.autograd.grad(out, [xg, w, b] if need_x else [w, b], grad, retain_graph=True)
    elif impl == "nn.Conv3d":
        out = _conv(conv, xg)
    elif impl == "nn.Conv3d cl3d":
        conv = conv.to(memory_format=torch.channels_last_3d)
        w, b = conv.weight, conv.bias
        xg = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_(need_x)
        out = _conv(conv, xg)
    else:
        out = reference.patch_embed_3d(xg, w, b)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    inputs = [xg, w, b] if need_x else [w, b]
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


@pytest.mark.parametrize("need_x", [True, False], ids=["grad x,W,b", "grad W,b"])
@pytest.mark.parametrize("impl", BACKWARD_IMPLS)
def test_backward(benchmark, impl, need_x):
    case = CASES[0]
    conv, x, tokens = _setup(case)
    benchmark.group = f"patch_embed_3d backward ({'x, W, b' if need_x else 'W, b'}) fp32 {_name(case)}"
    benchmark.extra_info.update(impl=impl, **_flops_bytes(tokens, case[-1], x.numel(), passes=2 if need_x else 1))
    # Conv3d backward takes seconds per call on a loaded 2-core machine: a fixed number of rounds.
    benchmark.pedantic(_backward_fn(impl, conv, x, need_x), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["vdit cpu", "per-sample Conv3d"])
def test_varlen_forward(benchmark, impl):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(C, VARLEN_D, PATCH, stride=PATCH)
    videos = [torch.randn(C, *s) for s in VARLEN_SIZES]
    tokens = sum(t * (h // 2) * (w // 2) for t, h, w in VARLEN_SIZES)
    w, b = conv.weight.detach(), conv.bias.detach()
    benchmark.group = f"patch_embed_3d_varlen forward fp32 {len(videos)} latents {VARLEN_SIZES} D={VARLEN_D}"
    benchmark.extra_info.update(impl=impl, **_flops_bytes(tokens, VARLEN_D, sum(v.numel() for v in videos)))
    if impl == "vdit cpu":
        def fn():
            return patch_embed_3d_varlen(videos, w, b, backend="cpu")[0]
    else:
        def fn():
            return torch.cat([_conv(conv, v[None])[0] for v in videos])
    with torch.no_grad():
        torch.testing.assert_close(fn(), reference.patch_embed_3d_varlen(videos, w, b)[0], rtol=1e-4, atol=1e-4)
        benchmark(fn)


@pytest.mark.parametrize("impl", ["vdit cpu", "Linear + unpatchify"])
def test_unembed_forward(benchmark, impl):
    torch.manual_seed(0)
    D, grid = 1152, (16, 32, 32)
    tokens = torch.randn(1, grid[0] * grid[1] * grid[2], D)
    linear = torch.nn.Linear(D, C * 4)
    w, b = linear.weight.detach(), linear.bias.detach()
    benchmark.group = f"patch_unembed_3d forward fp32 1x{tokens.shape[1]}x{D} -> 1x{C}x16x64x64"
    benchmark.extra_info.update(impl=impl, **_flops_bytes(tokens.shape[1], D, C * 16 * 64 * 64))
    if impl == "vdit cpu":
        fn = functools.partial(patch_unembed_3d, tokens, w, b, grid, PATCH, backend="cpu")
    else:
        fn = functools.partial(reference.patch_unembed_3d, tokens, w, b, grid, PATCH)
    with torch.no_grad():
        torch.testing.assert_close(fn(), reference.patch_unembed_3d(tokens, w, b, grid, PATCH), rtol=1e-4, atol=1e-4)
        benchmark(fn)


# ---- GPU (run where CUDA is available; skipped on the CPU-only machines) -------------------------

GPU_CASES = [  # (B, T, H, W, D), bf16
    (1, 16, 64, 64, 1152),
    (1, 32, 90, 160, 3072),
]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _synced(fn):
    # pytest-benchmark times the host; synchronizing makes each round cover the GPU work.
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_name)
@pytest.mark.parametrize("impl", ["vdit triton", "nn.Conv3d", "nn.Conv3d cl3d", "reshape + Linear"])
def test_gpu_forward(benchmark, case, impl):
    B, T, H, W, D = case
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(C, D, PATCH, stride=PATCH, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, C, T, H, W, device="cuda", dtype=torch.bfloat16)
    w, b = conv.weight.detach(), conv.bias.detach()
    tokens = B * T * (H // 2) * (W // 2)
    benchmark.group = f"patch_embed_3d forward bf16 GPU {_name(case)}"
    info = _flops_bytes(tokens, D, x.numel())
    benchmark.extra_info.update(impl=impl, flops=info["flops"], bytes=info["bytes"] // 2)  # 2-byte elements
    if impl == "vdit triton":
        fn = functools.partial(patch_embed_3d, x, w, b, backend="triton")
    elif impl == "nn.Conv3d":
        fn = functools.partial(_conv, conv, x)
    elif impl == "nn.Conv3d cl3d":
        conv = conv.to(memory_format=torch.channels_last_3d)
        fn = functools.partial(_conv, conv, x.contiguous(memory_format=torch.channels_last_3d))
    else:
        fn = functools.partial(reference.patch_embed_3d, x, w, b)
    with torch.no_grad():
        torch.testing.assert_close(fn().float(), reference.patch_embed_3d(x, w, b).float(), rtol=2e-2, atol=2e-2)
        benchmark.pedantic(_synced(fn), rounds=20, warmup_rounds=3)


@needs_gpu
@pytest.mark.parametrize("impl", ["vdit triton", "nn.Conv3d"])
def test_gpu_backward(benchmark, impl):
    B, T, H, W, D = GPU_CASES[0]
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(C, D, PATCH, stride=PATCH, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, C, T, H, W, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = patch_embed_3d(x, conv.weight, conv.bias, backend="triton") if impl == "vdit triton" else _conv(conv, x)
    grad = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16)  # (B, N, D)-contiguous, as in a model
    tokens = B * T * (H // 2) * (W // 2)
    benchmark.group = f"patch_embed_3d backward (x, W, b) bf16 GPU {_name(GPU_CASES[0])}"
    info = _flops_bytes(tokens, D, x.numel(), passes=2)
    benchmark.extra_info.update(impl=impl, flops=info["flops"], bytes=info["bytes"] // 2)
    fn = functools.partial(torch.autograd.grad, out, [x, conv.weight, conv.bias], grad, retain_graph=True)
    benchmark.pedantic(_synced(fn), rounds=20, warmup_rounds=3)
