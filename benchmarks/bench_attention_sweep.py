"""varlen_attention forward throughput against sequence length (CPU, fp32): vdit's C++ kernel and SDPA
on one sequence, 4 heads of dim 64, lengths from a short clip's latent to a long one. Feeds the
"attention GFLOP/s vs sequence length" plot of vdit-bench; FLOPs = 4 * D * H * L^2."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import quick
from vdit.ops import varlen_attention

HEADS, HEAD_DIM = 4, 64
LENGTHS = [256, 1024, 2048] if quick() else [256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("impl", ["vdit cpu", "SDPA"])
def test_attention_length_sweep(benchmark, impl, length):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(length, HEADS, HEAD_DIM, generator=g) for _ in range(3))
    cu = torch.tensor([0, length], dtype=torch.int32)
    benchmark.group = f"attention sweep L={length}"
    benchmark.extra_info.update(impl=impl, flops=4 * HEAD_DIM * HEADS * length * length, seqlen=length)
    if impl == "vdit cpu":
        benchmark(varlen_attention, q, k, v, cu, cu, length, length, backend="cpu")
    else:
        qt, kt, vt = (t.transpose(0, 1) for t in (q, k, v))
        benchmark(F.scaled_dot_product_attention, qt, kt, vt)
