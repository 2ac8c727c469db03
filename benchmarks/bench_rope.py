"""rope_3d_qk on CPU: vdit's C++ kernel against the eager table-based RoPE that diffusers-style video
DiTs run (cos / sin tables of tokens x head_dim, applied to q and to k by several elementwise
passes), torch.compile of that eager code, and a plain copy of q and k (the memory-traffic floor
of any out-of-place implementation), all measured in the same run.

Shape: 16 x 32 x 32 = 16384 tokens (a 16-frame 64x64 latent with 1x2x2 patches), 24 heads, head
dim 128 (HunyuanVideo's split (16, 56, 56), theta 256, interleaved pairs), fp32. The tables are
built once outside the timed region, as a model shares them across layers, so the baseline is timed
at its per-layer cost only. "bytes" counts reading q and k and writing both outputs.

Out-of-place outputs of this size spend much of their time in first-touch page faults; the vdit
kernel asks for transparent huge pages on its outputs (see csrc/rope/cpu.cpp), the baselines run
with torch's default allocator (THP_MEM_ALLOC_ENABLE unset). The in-place row shows the kernel
without any allocation.

    pytest benchmarks/bench_rope.py --benchmark-only --benchmark-json=out.json

On a GPU (CUDA-event timing, bf16, 16k-128k tokens; prints a markdown section):

    python -m benchmarks.bench_rope --gpu
"""
import os

import pytest
import torch

from vdit.ops import rope_3d_qk
from vdit.packing import dense_positions

GRID, HEADS, HEAD_DIM = (16, 32, 32), 24, 128
DIMS, THETA = (16, 56, 56), 256.0
TOKENS = GRID[0] * GRID[1] * GRID[2]
GROUP = f"rope_3d_qk fp32 {TOKENS}x{HEADS}x{HEAD_DIM}"
BYTES = 4 * TOKENS * HEADS * HEAD_DIM * 4  # read q, k; write q', k'
ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


def rope_tables(positions, dims, theta):
    """(tokens, head_dim) cos and sin: every axis frequency repeated for its two pair channels."""
    cos, sin = [], []
    for axis, d in enumerate(dims):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = positions[:, axis].double()[:, None] * inv_freq[None, :]
        cos.append(angle.cos().float().repeat_interleave(2, dim=-1))
        sin.append(angle.sin().float().repeat_interleave(2, dim=-1))
    return torch.cat(cos, -1), torch.cat(sin, -1)


def eager_rope(x, cos, sin):
    """x (tokens, heads, D) * cos + rotate_pairs(x) * sin, rotate_pairs(a, b) = (-b, a)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-b, a), dim=-1).flatten(-2)
    return (x.float() * cos[:, None, :] + rotated.float() * sin[:, None, :]).to(x.dtype)


def eager_rope_qk(q, k, cos, sin):
    return eager_rope(q, cos, sin), eager_rope(k, cos, sin)


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    q = torch.randn(TOKENS, HEADS, HEAD_DIM)
    k = torch.randn(TOKENS, HEADS, HEAD_DIM)
    pos = dense_positions(GRID)
    cos, sin = rope_tables(pos, DIMS, THETA)
    # The benchmarked implementations agree before they are timed.
    ours = rope_3d_qk(q, k, pos, dims=DIMS, theta=THETA, backend="cpu")
    eager = eager_rope_qk(q, k, cos, sin)
    torch.testing.assert_close(ours[0], eager[0], rtol=1e-4, atol=1e-4)
    return q, k, pos, cos, sin


def _setup(benchmark, impl):
    benchmark.group = GROUP
    benchmark.extra_info.update(impl=impl, bytes=BYTES)


def test_vdit_cpu(benchmark, inputs):
    q, k, pos, _, _ = inputs
    _setup(benchmark, "vdit cpu")
    benchmark.pedantic(rope_3d_qk, (q, k, pos), dict(dims=DIMS, theta=THETA, backend="cpu"), **ROUNDS)


def test_vdit_cpu_inplace(benchmark, inputs):
    q, k, pos, _, _ = inputs
    q, k = q.clone(), k.clone()  # rotated over and over in place: only the timing matters
    _setup(benchmark, "vdit cpu, inplace=True (not the reference row)")
    benchmark.pedantic(rope_3d_qk, (q, k, pos), dict(dims=DIMS, theta=THETA, inplace=True, backend="cpu"), **ROUNDS)


def test_eager_tables(benchmark, inputs):
    q, k, _, cos, sin = inputs
    _setup(benchmark, "eager cos/sin tables (diffusers-style)")
    benchmark.pedantic(eager_rope_qk, (q, k, cos, sin), **ROUNDS)


@pytest.mark.skipif(os.environ.get("VDIT_BENCH_SKIP_COMPILE") == "1", reason="VDIT_BENCH_SKIP_COMPILE=1")
def test_compiled_eager_tables(benchmark, inputs):
    q, k, _, cos, sin = inputs
    compiled = torch.compile(eager_rope_qk)
    compiled(q, k, cos, sin)  # compile outside the timed rounds
    _setup(benchmark, "torch.compile(eager cos/sin tables)")
    benchmark.pedantic(compiled, (q, k, cos, sin), **ROUNDS)


def test_copy_floor(benchmark, inputs):
    q, k, _, _, _ = inputs
    _setup(benchmark, "q.clone() + k.clone() (copy bandwidth)")
    benchmark.pedantic(lambda: (q.clone(), k.clone()), **ROUNDS)


# ---- with the fused RMS QK-norm (HunyuanVideo's per-head RMSNorm with weights) -------------------

NORM_GROUP = GROUP.replace("rope_3d_qk", "rms_norm + rope_3d_qk")
NORM_ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


def eager_norm_rope_qk(q, k, qw, kw, cos, sin, eps=1e-6):
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    return eager_rope(rms(q, qw), cos, sin), eager_rope(rms(k, kw), cos, sin)


def test_vdit_cpu_fused_norm(benchmark, inputs):
    q, k, pos, _, _ = inputs
    qw, kw = torch.rand(HEAD_DIM) + 0.5, torch.rand(HEAD_DIM) + 0.5
    benchmark.group = NORM_GROUP
    benchmark.extra_info.update(impl="vdit cpu", bytes=BYTES)
    benchmark.pedantic(rope_3d_qk, (q, k, pos),
                       dict(dims=DIMS, theta=THETA, q_norm_weight=qw, k_norm_weight=kw, backend="cpu"), **NORM_ROUNDS)


def test_eager_norm_then_tables(benchmark, inputs):
    q, k, _, cos, sin = inputs
    qw, kw = torch.rand(HEAD_DIM) + 0.5, torch.rand(HEAD_DIM) + 0.5
    benchmark.group = NORM_GROUP
    benchmark.extra_info.update(impl="eager RMSNorm + cos/sin tables", bytes=BYTES)
    benchmark.pedantic(eager_norm_rope_qk, (q, k, qw, kw, cos, sin), **NORM_ROUNDS)


# ---- GPU (CUDA events), run as a script -------------------------------------------------------

def _cuda_median(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _rope_rows(q, k, pos, cos, sin, compiled) -> dict:
    """The implementations timed for one case, each a call without arguments on that case's tensors."""
    return {
        "vdit cuda": lambda: rope_3d_qk(q, k, pos, dims=DIMS, theta=THETA, backend="cuda"),
        "vdit triton": lambda: rope_3d_qk(q, k, pos, dims=DIMS, theta=THETA, backend="triton"),
        "eager cos/sin tables": lambda: eager_rope_qk(q, k, cos, sin),
        "torch.compile(eager)": lambda: compiled(q, k, cos, sin),
        "q.clone() + k.clone()": lambda: (q.clone(), k.clone()),
    }


def gpu_main(grids=((16, 32, 32), (16, 64, 64), (32, 64, 64)), dtype=torch.bfloat16) -> str:
    """Markdown table: vdit cuda / triton vs eager tables, torch.compile of them and a q, k copy."""
    lines = ["### 3D RoPE q+k (GPU, CUDA events)", "",
             "| case | implementation | median (ms) | vdit cuda speedup vs this | GB/s | % of copy |",
             "|---|---|---:|---:|---:|---:|"]
    compiled = torch.compile(eager_rope_qk)
    for grid in grids:
        pos = dense_positions(grid, device="cuda")
        n = pos.shape[0]
        q = torch.randn(n, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        k = torch.randn(n, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        cos, sin = rope_tables(pos.cpu(), DIMS, THETA)
        cos, sin = cos.cuda(), sin.cuda()
        nbytes = 4 * q.numel() * q.element_size()
        times = {name: _cuda_median(fn) for name, fn in _rope_rows(q, k, pos, cos, sin, compiled).items()}
        copy = times["q.clone() + k.clone()"]
        for name, t in times.items():
            lines.append(f"| rope_3d_qk {dtype} {n}x{HEADS}x{HEAD_DIM} | {name} | {t * 1e3:.3f} | "
                         f"{t / times['vdit cuda']:.2f}x | {nbytes / t / 1e9:.0f} | {100 * copy / t:.0f}% |")
    lines += ["", f"Measured on {torch.cuda.get_device_name()}; every row of a case in the same run.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if "--gpu" not in sys.argv:
        raise SystemExit("CPU benchmarks run under pytest (see the module docstring); use --gpu for the GPU table")
    print(gpu_main())
