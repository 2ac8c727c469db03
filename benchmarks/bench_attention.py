"""varlen_attention on CPU (fp32): vdit's C++ kernel against PyTorch baselines, measured in the same run.

Workload: one packed batch of five videos of different sizes, as a native-resolution video DiT sees
them: latents (T, H, W) = 8x30x40, 5x24x40, 4x24x32, 3x20x24, 2x16x24 with patch (1, 2, 2), i.e.
2400, 1200, 768, 360 and 192 tokens (4920 in all), 4 heads of dim 64, full (non-causal) self-attention.
Sized so that the module runs in about a minute on 2 cores.

Baselines (same inputs, same threads):
    SDPA padded + mask   F.scaled_dot_product_attention on the zero-padded (B, H, N, D) batch with a key
                         padding mask (padding / unpadding copies not timed)
    SDPA per sequence    a Python loop of SDPA over the sequences, outputs concatenated
    SDPA nested jagged   SDPA on torch.nested jagged tensors (layout=torch.jagged)
    FlexAttention        torch.compile(flex_attention) with a document-mask BlockMask; forward only
                         (FlexAttention has no CPU backward)

Throughput counts real work only: forward 4 * D * H * sum(L_i^2) FLOPs, forward + backward 3.5x that.

    pytest benchmarks/bench_attention.py --benchmark-only --benchmark-json=out.json -rs
"""
import pytest
import torch
import torch.nn.functional as F

from vdit.ops import varlen_attention

LATENTS = [(8, 30, 40), (5, 24, 40), (4, 24, 32), (3, 20, 24), (2, 16, 24)]
PATCH = (1, 2, 2)
LENGTHS = [(t // PATCH[0]) * (h // PATCH[1]) * (w // PATCH[2]) for t, h, w in LATENTS]
HEADS, HEAD_DIM = 4, 64
FWD_FLOPS = 4 * HEAD_DIM * HEADS * sum(n * n for n in LENGTHS)
GROUP = f"varlen_attention fp32 {len(LENGTHS)} videos ({'+'.join(map(str, LENGTHS))} tokens) H{HEADS} D{HEAD_DIM}"
ROUNDS = {"fwd": 5, "fwd+bwd": 3}
SLOW_IMPLS = ("SDPA nested jagged",)  # ~10-25 s a call on CPU: one timed round after the checked call


def _packed():
    g = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, generator=g) for _ in range(3))
    grad = torch.randn(total, HEADS, HEAD_DIM, generator=g)
    cu = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(LENGTHS).cumsum(0)
    return q, k, v, grad, cu


Q, K, V, GRAD, CU = _packed()
MAX_LEN = max(LENGTHS)
STARTS = CU[:-1].tolist()
EXPECTED = varlen_attention(Q, K, V, CU, CU, MAX_LEN, MAX_LEN, backend="cpu")


def _vdit(q, k, v):
    return varlen_attention(q, k, v, CU, CU, MAX_LEN, MAX_LEN, backend="cpu")


def _loop(q, k, v):
    outs = []
    for s, n in zip(STARTS, LENGTHS):
        qi, ki, vi = (t[s:s + n].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outs)


def _pad(x):
    """(total, H, D) -> zero-padded (B, H, N, D)."""
    out = x.new_zeros(len(LENGTHS), MAX_LEN, HEADS, HEAD_DIM)
    for b, (s, n) in enumerate(zip(STARTS, LENGTHS)):
        out[b, :n] = x[s:s + n]
    return out.transpose(1, 2).contiguous()


def _unpad(x):
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(LENGTHS)])


OFFSETS = CU.long()  # one offsets tensor, so q, k and v share their ragged dimension
KEY_MASK = (torch.arange(MAX_LEN)[None, :] < torch.tensor(LENGTHS)[:, None])[:, None, None, :]  # (B, 1, 1, N)


def _padded(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=KEY_MASK)


def _nested(x):
    """(total, H, D) -> nested jagged (B, H, j, D)."""
    return torch.nested.nested_tensor_from_jagged(x, offsets=OFFSETS).transpose(1, 2)


def _njt(q, k, v):
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()


def _flex_setup():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))

    def same_video(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    total = sum(LENGTHS)
    mask = create_block_mask(same_video, 1, 1, total, total, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=mask)


def _case(impl):
    """(prepared inputs, attention fn, output -> packed (total, H, D)) of an implementation."""
    if impl == "vdit cpu":
        return (Q, K, V), _vdit, lambda o: o, GRAD
    if impl == "SDPA per sequence":
        return (Q, K, V), _loop, lambda o: o, GRAD
    if impl == "SDPA padded + mask":
        return tuple(_pad(t) for t in (Q, K, V)), _padded, _unpad, _pad(GRAD)
    if impl == "SDPA nested jagged":
        return tuple(_nested(t) for t in (Q, K, V)), _njt, lambda o: o, GRAD
    if impl == "FlexAttention (document mask)":
        fn = _flex_setup()
        inputs = tuple(t.transpose(0, 1)[None].contiguous() for t in (Q, K, V))  # (1, H, total, D)
        return inputs, fn, lambda o: o[0].transpose(0, 1), GRAD.transpose(0, 1)[None].contiguous()
    raise ValueError(impl)


def _optional_baseline(impl: str) -> None:
    """Skip, with the reason, a baseline whose package is missing (flash-attn, xformers: CUDA only)."""
    module = {"flash-attn varlen": "flash_attn", "xformers BlockDiagonalMask": "xformers"}.get(impl)
    if module is None:
        return
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{impl}: {module} is not installed")
    pytest.skip(f"{impl}: CUDA-only kernels; this benchmark runs on CPU tensors")


_CHECKED: set[str] = set()  # implementations whose output was compared with ours
IMPLS = ["vdit cpu", "SDPA padded + mask", "SDPA per sequence", "SDPA nested jagged", "FlexAttention (document mask)",
         "flash-attn varlen", "xformers BlockDiagonalMask"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_attention(benchmark, impl, mode):
    _optional_baseline(impl)
    if impl.startswith("FlexAttention") and mode == "fwd+bwd":
        pytest.skip("FlexAttention has no backward on CPU (NotImplementedError in torch 2.14)")
    try:
        inputs, fn, to_packed, grad = _case(impl)
        if impl not in _CHECKED:
            with torch.no_grad():
                out = fn(*inputs)
    except Exception as exc:  # a baseline that does not run on CPU is reported, not failed
        pytest.skip(f"{impl} does not run on CPU here: {type(exc).__name__}: {exc}")
    if impl not in _CHECKED:
        torch.testing.assert_close(to_packed(out), EXPECTED, rtol=1e-4, atol=1e-4)  # same answer as ours
        _CHECKED.add(impl)

    benchmark.group = f"{GROUP} {mode}"
    benchmark.extra_info.update(impl=impl, flops=FWD_FLOPS * (1.0 if mode == "fwd" else 3.5))
    rounds, warmup = (1, 0) if impl in SLOW_IMPLS else (ROUNDS[mode], 1)
    if mode == "fwd":
        with torch.no_grad():
            benchmark.pedantic(fn, args=inputs, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return
    leaves = tuple(t.detach().requires_grad_() for t in inputs)

    def forward_backward():
        torch.autograd.grad(fn(*leaves), leaves, grad)

    benchmark.pedantic(forward_backward, rounds=rounds, warmup_rounds=warmup, iterations=1)
