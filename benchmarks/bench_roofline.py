"""Machine ceilings measured in the same run as the op benchmarks: a large copy (GB/s, counting read +
write) and a large matmul (GFLOP/s) in fp32 on the CPU. The report divides each op's achieved rate by
these to give % of roofline."""
import torch

from benchmarks.common import quick

N_COPY = (16 if quick() else 64) * 2**20  # elements (fp32): 64 / 256 MiB, well past the caches
N_MM = 1024 if quick() else 2048


def test_copy_bandwidth(benchmark):
    src = torch.randn(N_COPY)
    dst = torch.empty_like(src)
    benchmark.group = "roofline"
    benchmark.extra_info.update(impl="copy (torch.Tensor.copy_)", bytes=2 * src.numel() * 4, ceiling="bandwidth")
    benchmark(dst.copy_, src)


def test_matmul_rate(benchmark):
    a, b = torch.randn(N_MM, N_MM), torch.randn(N_MM, N_MM)
    benchmark.group = "roofline"
    benchmark.extra_info.update(impl=f"matmul fp32 {N_MM}^3", flops=2 * N_MM**3, ceiling="flops")
    benchmark(torch.mm, a, b)
