"""adaln_modulate and gated_residual on CPU (fp32): vdit's C++ kernels against the eager PyTorch
formulation a DiT block uses (``F.layer_norm`` + per-token shift/scale gathered from the per-sample
(B, C) tensors; ``x + gate[s] * y``) and ``torch.compile`` (inductor) of that same formulation, all
measured in the same run, forward and forward+backward.

Shapes: hidden size 1152 (DiT-XL / Latte-XL / Open-Sora 1.x width) and ~16k tokens:
    dense   (4, 4096, 1152): four equal-length samples, the parameters broadcast over N;
    packed  a mixed batch of 8 samples (6144, 4096, 3072, 1536, 768, 384, 1, 0 tokens; 16001 in all),
            the parameters gathered per token. The baselines get the per-token sample index
            precomputed outside the timed region (their best case; vdit reads cu_seqlens directly).

With a GPU, ``test_cuda`` also times the CUDA kernels (bf16, the mixed batch with 4x the tokens)
against the same baselines on the GPU (wall clock around a device synchronize).

    pytest benchmarks/bench_adaln.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from vdit.ops import adaln_modulate, gated_residual

C = 1152
LENGTHS = [6144, 4096, 3072, 1536, 768, 384, 1, 0]
EPS = 1e-6
ROUNDS = 6


def _make(layout, lengths=LENGTHS, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    if layout == "dense":
        B, shape, cu, index = 4, (4, 4096, C), None, None
    else:
        B = len(lengths)
        shape = (sum(lengths), C)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        index = torch.repeat_interleave(torch.arange(B), torch.tensor(lengths))
    x, y = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    shift, scale, gate = (torch.randn(B, C, generator=gen) * 0.1 for _ in range(3))
    moved = [t.to(device=device, dtype=dtype) for t in (x, y, shift, scale, gate)]
    return (*moved, None if cu is None else cu.to(device), None if index is None else index.to(device))


def _per_token(p, index):
    return p[:, None, :] if index is None else p[index]


def eager_adaln(x, shift, scale, index):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + _per_token(scale, index)) + _per_token(shift, index)


def eager_gated(x, y, gate, index):
    return x + _per_token(gate, index) * y


_compiled = {}


def _impl(op, name):
    """(label for the table, fn(*tensors, cu=..., index=...)) of one implementation."""
    eager = eager_adaln if op == "adaln_modulate" else eager_gated
    if name.startswith("vdit"):
        vdit_op = adaln_modulate if op == "adaln_modulate" else gated_residual
        return name, lambda *a, cu, index: vdit_op(*a, cu, backend=name.split()[1])
    if name == "eager":
        label = "torch eager (F.layer_norm + gather)" if op == "adaln_modulate" else "torch eager (gather, mul, add)"
        return label, lambda *a, cu, index: eager(*a, index)

    def compiled(*a, cu, index):
        key = (op, index is None)
        if key not in _compiled:
            _compiled[key] = torch.compile(eager, dynamic=False)
        return _compiled[key](*a, index)

    return "torch.compile (inductor) of eager", compiled


IMPL_NAMES = ["vdit cpu", "eager", "compile"]


def _args(op, data):
    x, y, shift, scale, gate, cu, index = data
    return ((x, shift, scale) if op == "adaln_modulate" else (x, y, gate)), cu, index


def _passes(op, backward):
    # Minimal full-tensor passes over memory: adaln fwd reads x, writes out; bwd reads grad, x, writes
    # grad_x. gated fwd reads x, y, writes out; bwd reads grad, y, writes grad_y (grad_x = grad).
    return {("adaln_modulate", False): 2, ("adaln_modulate", True): 5,
            ("gated_residual", False): 3, ("gated_residual", True): 6}[(op, backward)]


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual"])
def test_forward(benchmark, op, layout, impl):
    data = _make(layout)
    tensors, cu, index = _args(op, data)
    label, fn = _impl(op, impl)
    shape = "4x4096x1152" if layout == "dense" else f"packed {sum(LENGTHS)}x1152 (8 mixed samples)"
    benchmark.group = f"{op} forward fp32 {shape}"
    benchmark.extra_info.update(impl=label, bytes=_passes(op, False) * tensors[0].numel() * 4)
    with torch.no_grad():
        fn(*tensors, cu=cu, index=index)  # warm-up (and compile for torch.compile)
        benchmark.pedantic(fn, args=tensors, kwargs=dict(cu=cu, index=index), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual"])
def test_forward_backward(benchmark, op, layout, impl):
    data = _make(layout)
    tensors, cu, index = _args(op, data)
    tensors = tuple(t.requires_grad_() for t in tensors)
    grad = torch.randn_like(tensors[0])
    label, fn = _impl(op, impl)

    def step():
        return torch.autograd.grad(fn(*tensors, cu=cu, index=index), tensors, grad)

    shape = "4x4096x1152" if layout == "dense" else f"packed {sum(LENGTHS)}x1152 (8 mixed samples)"
    benchmark.group = f"{op} forward+backward fp32 {shape}"
    benchmark.extra_info.update(impl=label, bytes=_passes(op, True) * tensors[0].numel() * 4)
    step()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)


# ---- GPU (skipped without one): bf16, 4x the tokens of the CPU mixed batch --------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["vdit cuda", "eager", "compile"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual"])
def test_cuda(benchmark, op, backward, impl):
    lengths = [4 * n for n in LENGTHS]
    tensors, cu, index = _args(op, _make("packed", lengths, torch.bfloat16, "cuda"))
    label, fn = _impl(op, impl)
    tensors = tuple(t.requires_grad_(backward) for t in tensors)
    grad = torch.randn_like(tensors[0])

    def step():
        with torch.set_grad_enabled(backward):
            out = fn(*tensors, cu=cu, index=index)
            if backward:
                torch.autograd.grad(out, tensors, grad)
        torch.cuda.synchronize()  # wall-clock timing of GPU work needs the sync

    benchmark.group = f"{op} {'forward+backward' if backward else 'forward'} bf16 cuda packed {sum(lengths)}x{C}"
    benchmark.extra_info.update(impl=label, bytes=_passes(op, backward) * tensors[0].numel() * 2)
    step()
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
