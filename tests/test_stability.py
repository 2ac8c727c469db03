"""Numerical stability and memory: extreme values, long sequences, constant rows, far positions."""
import os
import subprocess
import sys

import pytest
import torch

from vdit.ops import adaln_modulate, reference, rope_3d, varlen_attention
from conftest import cu_seqlens_of

LONG = int(os.environ.get("VDIT_LONG_SEQLEN", "32768"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_attention_large_logits_fp16(backend):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 64, 1, 33]
    q = (torch.rand(sum(lengths), 2, 64, generator=g) * 2 - 1) * 250  # |q . k| up to ~1e6: overflows fp16 math
    k = (torch.rand(sum(lengths), 2, 64, generator=g) * 2 - 1) * 250
    v = torch.rand(sum(lengths), 2, 64, generator=g) * 2 - 1
    cu = cu_seqlens_of(lengths)
    out = varlen_attention(q.half(), k.half(), v.half(), cu, cu, softmax_scale=1.0, backend=backend)
    expected = reference.varlen_attention(q.half().double(), k.half().double(), v.half().double(), cu, cu, softmax_scale=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3)


def test_attention_equal_keys_average_values():
    q = torch.randn(50, 2, 32)
    k = torch.ones(50, 2, 32)
    v = torch.randn(50, 2, 32)
    cu = cu_seqlens_of([20, 30])
    out = varlen_attention(q, k, v, cu, cu, softmax_scale=1.0, backend="cpu")
    torch.testing.assert_close(out[:20], v[:20].mean(0, keepdim=True).expand(20, 2, 32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[20:], v[20:].mean(0, keepdim=True).expand(30, 2, 32), rtol=1e-5, atol=1e-5)


def test_attention_very_long_sequence():
    """One sequence of LONG tokens (default 32k), one head, fp32: finite and equal to the reference on sampled rows."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(LONG, 1, 64, generator=g) for _ in range(3))
    cu = cu_seqlens_of([LONG])
    out = varlen_attention(q, k, v, cu, cu, backend="cpu")
    assert torch.isfinite(out).all()
    rows = torch.randint(0, LONG, (64,), generator=g)
    scores = (q[rows, 0].double() @ k[:, 0].double().T) * 64 ** -0.5
    expected = torch.softmax(scores, -1) @ v[:, 0].double()
    torch.testing.assert_close(out[rows, 0].double(), expected, rtol=1e-5, atol=1e-5)


_MEMORY_PROBE = """
import resource, sys, torch
from vdit.ops import varlen_attention
n = int(sys.argv[1])
q, k, v = (torch.randn(n, 1, 64) for _ in range(3))
cu = torch.tensor([0, n], dtype=torch.int32)
varlen_attention(q[:64], k[:64], v[:64], torch.tensor([0, 64], dtype=torch.int32), torch.tensor([0, 64], dtype=torch.int32), backend="cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
varlen_attention(q, k, v, cu, cu, backend="cpu")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_attention_memory_grows_linearly():
    """Peak resident memory added by one forward at 8k / 16k / 32k tokens (kB): linear, not quadratic
    (a materialized 32k x 32k fp32 score matrix alone would be 4 GiB)."""
    growth = {}
    for n in (8192, 16384, 32768):
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert out.returncode == 0, out.stderr
        growth[n] = int(out.stdout.strip().splitlines()[-1])
    # q, k, v, out at 32k x 64 fp32 are 8 MiB each; allow generous slack but nothing near n^2.
    assert growth[32768] < 64 * 1024, growth
    assert growth[32768] <= 4 * max(growth[8192], 4096), growth


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_layernorm_of_constant_rows(backend):
    x = torch.full((10, 64), 3.25)
    shift, scale = torch.randn(2, 64), torch.randn(2, 64)
    out = adaln_modulate(x, shift, scale, cu_seqlens_of([4, 6]), backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.cat([shift[:1].expand(4, 64), shift[1:].expand(6, 64)]))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_rope_far_positions(backend):
    """Positions up to 1e5: fp32 angles lose absolute precision (1e5 rad has an fp32 spacing of 0.008),
    so results are compared with the float64 reference at a matching tolerance."""
    x = torch.randn(100, 2, 64)
    pos = torch.randint(0, 100_000, (100, 3), dtype=torch.int64)
    out = rope_3d(x, pos, dims=(20, 22, 22), backend=backend)
    expected = reference.rope_3d(x.double(), pos, dims=(20, 22, 22))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=5e-2)
    torch.testing.assert_close(out.norm(dim=-1).double(), x.norm(dim=-1).double(), rtol=1e-5, atol=1e-4)
