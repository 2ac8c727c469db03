"""The varlen_attention op (vdit/ops/attention.py): every backend against the float64 reference, forward,
lse and gradients, the backward API (varlen_attention_backward, the building block of ring attention),
torch.compile, bad inputs, and numerical stability and memory (extreme logits, equal keys, a very long
sequence, linear memory growth).

Kernel-internal cases (the Triton kernels called directly, the C++ kernel's own offset checks) are in
tests/kernels/test_attention.py; the attention modules in tests/nn/test_attention.py."""
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import vdit
from tests.conftest import HAS_GPU, assert_close, backends_of, cu_seqlens_of
from vdit.ops import attention as attention_ops
from vdit.ops import plan, reference, varlen_attention
from vdit.ops.attention import varlen_attention_backward

# Backends that take CPU tensors as built: the reference and the CPU kernels (no interpreter).
CPU_BACKENDS = backends_of("varlen_attention", reference=True, device="cpu", interpreted=False, with_device=False)

TRITON_FUNCTIONS = ("varlen_attention_forward", "varlen_attention_backward")


def _triton_skip_reason():
    """Why the Triton attention kernels cannot be tested here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("vdit.kernels.triton.attention") is None:
        return ("vdit.kernels.triton.attention does not exist on this branch "
                "(the Triton kernels come with their own branch)")
    module = importlib.import_module("vdit.kernels.triton.attention")
    missing = [f for f in TRITON_FUNCTIONS if not hasattr(module, f)]
    if missing:
        return f"vdit.kernels.triton.attention lacks {', '.join(missing)}"
    if not HAS_GPU and not vdit.backends.TRITON_INTERPRET:
        return "no GPU and TRITON_INTERPRET is not set"
    return None


TRITON_SKIP = _triton_skip_reason()


def _inputs(lens_q, lens_k, hq, hk, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    k = torch.randn(sum(lens_k), hk, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    v = torch.randn(sum(lens_k), hk, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    return q, k, v, cu_seqlens_of(lens_q, device), cu_seqlens_of(lens_k, device)


def _reference(q, k, v, cu_q, cu_k, *, causal, scale=None, grad=None):
    """Float64 reference output, lse and (with grad) gradients of the inputs as given (upcast)."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out, lse = reference.varlen_attention(q64, k64, v64, cu_q.cpu(), cu_k.cpu(), softmax_scale=scale,
                                          causal=causal, return_lse=True)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad.cpu().double()) if grad is not None else None
    return out.detach(), lse, grads


def _check(backend, device, lens_q, lens_k, hq, hk, d, dtype, causal, scale=None, fwd_scale=1.0, grad_scale=1.0):
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, hq, hk, d, dtype, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), softmax_scale=scale, causal=causal,
                                backend=backend, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(device)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, cu_q, cu_k, causal=causal, scale=scale, grad=grad)
    assert_close(out, ref_out, scale=fwd_scale)
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite().cpu(), finite), "rows that see no key must have lse = -inf"
    assert torch.all(lse.cpu()[~finite] == float("-inf"))
    assert_close(lse.cpu()[finite], ref_lse[finite], dtype=dtype, scale=fwd_scale)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close(g, r, scale=grad_scale)


# (lens_q, lens_k, Hq, Hk, head_dim): self-attention uses lens_k = lens_q.
CPU_CASES = [
    pytest.param([0, 1, 17, 255, 1030], None, 2, 2, 64, id="self-mixed-d64"),
    pytest.param([300, 1, 0, 17], [77, 5, 0, 400], 4, 2, 40, id="cross-gqa-d40"),
    pytest.param([33, 0, 130], None, 4, 1, 32, id="self-mqa-d32"),
    pytest.param([70, 1, 129], [5, 3, 300], 2, 2, 96, id="cross-d96"),
    pytest.param([200, 17], None, 2, 1, 128, id="self-gqa-d128"),
]
CPU_DTYPES = [  # dtype, forward / gradient tolerance scale
    pytest.param(torch.float32, 2.0, 8.0, id="fp32"),
    pytest.param(torch.float64, 1.0, 1.0, id="fp64"),
    pytest.param(torch.float16, 1.0, 2.0, id="fp16"),
    pytest.param(torch.bfloat16, 1.0, 2.0, id="bf16"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens_q,lens_k,hq,hk,d", CPU_CASES)
@pytest.mark.parametrize("dtype,fwd_scale,grad_scale", CPU_DTYPES)
def test_cpu_kernel_matches_reference(lens_q, lens_k, hq, hk, d, causal, dtype, fwd_scale, grad_scale):
    _check("cpu", "cpu", lens_q, lens_k or lens_q, hq, hk, d, dtype, causal, fwd_scale=fwd_scale,
           grad_scale=grad_scale)


TRITON_CASES = [  # small shapes: the interpreter is slow
    pytest.param([0, 1, 17, 40], None, 2, 2, 32, id="self-d32"),
    pytest.param([5, 0, 33, 1], [20, 4, 1, 0], 4, 2, 64, id="cross-gqa-d64"),
    pytest.param([9, 24], [30, 7], 2, 1, 40, id="cross-mqa-d40"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens_q,lens_k,hq,hk,d", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.skipif(TRITON_SKIP is not None, reason=TRITON_SKIP or "")
def test_triton_kernel_matches_reference(lens_q, lens_k, hq, hk, d, causal, dtype):
    device = "cuda" if HAS_GPU else "cpu"
    # fp32 inputs may be multiplied in tf32 on a GPU; fp16 keeps its own tolerance.
    scale = 100.0 if (dtype == torch.float32 and HAS_GPU) else (10.0 if dtype == torch.float32 else 2.0)
    _check("triton", device, lens_q, lens_k or lens_q, hq, hk, d, dtype, causal, fwd_scale=scale, grad_scale=scale)


@pytest.mark.parametrize("backend,device", backends_of("varlen_attention"))
def test_softmax_scale_and_head_dims(backend, device):
    dims = [32, 64, 96, 128] if backend == "cpu" else [32, 64]
    dtype = torch.float32
    for d in dims:
        _check(backend, device, [9, 1, 40], [9, 1, 40], 2, 2, d, dtype, False, scale=0.3, fwd_scale=10.0,
               grad_scale=10.0)


@pytest.mark.parametrize("backend,device", backends_of("varlen_attention"))
def test_all_empty_and_no_key_sequences(backend, device):
    q, k, v, cu_q, cu_k = _inputs([0, 3, 2], [0, 0, 4], 2, 2, 32, torch.float32, device)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, backend=backend, return_lse=True)
    assert torch.equal(out[:3].cpu(), torch.zeros(3, 2, 32))  # sequence 1 sees no key
    assert torch.all(lse[:, :3] == float("-inf"))
    ref, _, _ = _reference(q, k, v, cu_q, cu_k, causal=False)
    assert_close(out, ref, scale=10.0)
    # causal with Lq > Lk: the first Lq - Lk queries see nothing
    q, k, v, cu_q, cu_k = _inputs([6], [2], 1, 1, 32, torch.float32, device)
    out = varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend=backend)
    assert torch.equal(out[:4].cpu(), torch.zeros(4, 1, 32))
    assert_close(out, _reference(q, k, v, cu_q, cu_k, causal=True)[0], scale=10.0)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_cpu_kernel(causal):
    q, k, v, cu_q, cu_k = _inputs([3, 0, 5, 1], [4, 2, 0, 6], 4, 2, 8, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: varlen_attention(a, b, c, cu_q, cu_k, causal=causal, backend="cpu"), inputs)


def test_cpu_backward_is_deterministic_and_handles_non_contiguous_input():
    torch.manual_seed(0)
    qkv = torch.randn(600, 3, 4, 32)  # (total, q/k/v, heads, Dh): q, k, v are strided views
    q, k, v = (t.requires_grad_() for t in qkv.clone().unbind(1))
    assert not q.is_contiguous()
    cu = cu_seqlens_of([100, 7, 493])
    grad = torch.randn(600, 4, 32)
    runs = []
    for _ in range(2):
        out = varlen_attention(q, k, v, cu, cu, 493, 493, causal=True, backend="cpu")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert_close(runs[0][0], _reference(q, k, v, cu, cu, causal=True)[0], scale=2.0)


def test_auto_backend_uses_the_cpu_kernel_on_cpu():
    assert [k.name for k in attention_ops.SPEC.kernels] == ["flash-attn", "torch-varlen", "triton", "cpu"]
    assert plan("varlen_attention", device="cpu", dtype=torch.float32, head_dim=16)[0] == "cpu"
    q, k, v, cu_q, cu_k = _inputs([5, 12], [7, 3], 2, 2, 16, torch.float32)
    assert torch.equal(varlen_attention(q, k, v, cu_q, cu_k), varlen_attention(q, k, v, cu_q, cu_k, backend="cpu"))
    with vdit.use_backend("torch"):
        ref = varlen_attention(q, k, v, cu_q, cu_k)
    assert_close(varlen_attention(q, k, v, cu_q, cu_k), ref, scale=2.0)


def test_torch_backend_return_lse():
    q, k, v, cu_q, cu_k = _inputs([5, 12], [7, 3], 2, 1, 16, torch.float64)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, backend="torch", return_lse=True)
    out2, lse2 = varlen_attention(q, k, v, cu_q, cu_k, backend="cpu", return_lse=True)
    assert lse.shape == lse2.shape == (2, 17) and lse2.dtype == torch.float64
    assert_close(out2, out)
    assert_close(lse2, lse)


@pytest.mark.parametrize("backend,device", backends_of("varlen_attention"))
def test_torch_compile_fullgraph(backend, device):
    q, k, v, cu_q, cu_k = _inputs([17, 1, 40], [9, 30, 2], 4, 2, 32, torch.float32, device)
    w = torch.randn(32, device=device)

    def f(q, k, v):
        out = varlen_attention(q * 2, k, v, cu_q, cu_k, 40, 30, causal=True, backend=backend)
        return (out * w).sum()

    q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q1, k1, v1)
    loss.backward()
    expected = f(q2, k2, v2)
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-4)
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", backends_of("varlen_attention"))
def test_compiled_call_with_too_small_max_seqlen_raises(backend, device):
    """Under torch.compile the host checks are skipped; a wrong max_seqlen must still raise (device-side
    assertion) rather than let a kernel that sizes its launch from it leave output rows unwritten."""
    q, k, v, cu_q, cu_k = _inputs([17, 1, 40], [9, 30, 2], 4, 2, 32, torch.float32, device)
    compiled = torch.compile(lambda q, k, v, m: varlen_attention(q, k, v, cu_q, cu_k, m, 30, backend=backend),
                             fullgraph=True, backend="aot_eager")
    expected = varlen_attention(q, k, v, cu_q, cu_k, backend=backend)
    torch.testing.assert_close(compiled(q, k, v, 40), expected)
    with pytest.raises(RuntimeError, match="max_seqlen_q is smaller than the longest sequence"):
        compiled(q, k, v, 8)


def test_compiled_call_with_inconsistent_cu_seqlens_raises():
    q, k, v, cu_q, cu_k = _inputs([17, 1, 40], [9, 30, 2], 4, 2, 32, torch.float32)
    bad = torch.tensor([0, 17, 18, 60], dtype=torch.int32)  # ends past the 58 packed tokens
    compiled = torch.compile(lambda q, k, v, cu: varlen_attention(q, k, v, cu, cu_k, 42, 30, backend="cpu"),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0, be non-decreasing and end at 58"):
        compiled(q, k, v, bad)


def test_offsets_are_read_on_the_host_once_per_tensor_version(monkeypatch):
    """Calls that reuse a packing read its cu_seqlens once; the cache never outlives the values."""
    from vdit.ops import _validation
    reads = []
    monkeypatch.setattr(_validation, "_summarize", lambda cu: reads.append(1) or _validation._Offsets(
        *(lambda v: (v[0], v[-1], max((b - a for a, b in zip(v, v[1:])), default=0), None))(cu.tolist())))
    _validation._OFFSETS.clear()
    q, k, v, cu_q, cu_k = _inputs([5, 12], [7, 3], 2, 2, 16, torch.float32)
    for _ in range(3):
        varlen_attention(q, k, v, cu_q, cu_k, backend="cpu")
    assert len(reads) == 2  # cu_seqlens_q and cu_seqlens_k, once each
    cu_q[1] = 2  # an in-place write bumps the version (lengths 2, 15): the cached summary must not be used
    with pytest.raises(ValueError, match="max_seqlen_q = 12 is smaller than the longest sequence"):
        varlen_attention(q, k, v, cu_q, cu_k, 12, None, backend="cpu")
    assert len(reads) == 3
    varlen_attention(q, k, v, cu_q.clone(), cu_k, backend="cpu")  # a new tensor with equal values: read again
    assert len(reads) == 4


@pytest.mark.cuda
def test_repeated_calls_with_one_packing_make_no_host_syncs():
    q, k, v, cu_q, cu_k = _inputs([300, 1, 40], [300, 2, 40], 4, 2, 64, torch.float16, "cuda")
    varlen_attention(q, k, v, cu_q, cu_k)  # first call: checks and work lists are built and cached
    torch.cuda.set_sync_debug_mode("error")
    try:
        varlen_attention(q, k, v, cu_q, cu_k)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["triton", "torch-varlen", "flash-attn"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim,hk", [(64, 4), (128, 2), (72, 4)], ids=["d64", "d128-gqa", "d72"])
def test_every_dense_kernel_matches_the_reference_forward_and_backward(kernel, causal, head_dim, hk):
    """Whichever kernel dispatch picks, the forward and its own backward agree with the float64 oracle."""
    q, k, v, cu_q, cu_k = _inputs([513, 1, 0, 200], [513, 3, 7, 200], 4, hk, head_dim, torch.bfloat16, "cuda")
    try:
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=causal, backend=kernel, return_lse=True)
    except vdit.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = reference.varlen_attention(*leaves, cu_q, cu_k, causal=causal, return_lse=True)
    r_grads = torch.autograd.grad(r_out, leaves, dout.double())
    assert_close(out, r_out, torch.bfloat16, scale=2.0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    for got, want in zip(grads, r_grads):
        assert_close(got, want, torch.bfloat16, scale=4.0)


def _bad(name):
    q, k, v, cu_q, cu_k = _inputs([3, 5], [4, 2], 4, 2, 8, torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=None, max_seqlen_k=None)
    return {
        "q-2d": ({"q": q[:, 0]}, ValueError, "q must have 3 dimensions"),
        "q-int": ({"q": q.int()}, TypeError, "q must be float16"),
        "k-dtype": ({"k": k.double()}, TypeError, "k has dtype torch.float64 but q"),
        "v-shape": ({"v": v[:, :1]}, ValueError, "k and v must have the same shape"),
        "head-dim": ({"k": k[..., :4], "v": v[..., :4]}, ValueError, "q has head dim 8 but k has 4"),
        "heads": ({"k": torch.randn(6, 3, 8), "v": torch.randn(6, 3, 8)}, ValueError,
                  r"q heads \(4\) must be a multiple"),
        "cu-int64": ({"cu_seqlens_q": cu_q.long()}, TypeError, "cu_seqlens_q must be int32"),
        "cu-start": ({"cu_seqlens_q": torch.tensor([1, 4, 8], dtype=torch.int32)}, ValueError,
                     "cu_seqlens_q must start at 0"),
        "cu-decreasing": ({"cu_seqlens_k": torch.tensor([0, 5, 4, 6], dtype=torch.int32),
                           "cu_seqlens_q": torch.tensor([0, 3, 3, 8], dtype=torch.int32)}, ValueError,
                          "cu_seqlens_k must be non-decreasing"),
        "cu-total": ({"cu_seqlens_k": torch.tensor([0, 4, 7], dtype=torch.int32)}, ValueError,
                     r"cu_seqlens_k\[-1\] must equal the number of packed tokens 6"),
        "batch": ({"cu_seqlens_k": torch.tensor([0, 6], dtype=torch.int32)}, ValueError,
                  "cu_seqlens_q describes 2 sequences but cu_seqlens_k describes 1"),
        "max-seqlen": ({"max_seqlen_q": 4}, ValueError, r"max_seqlen_q = 4 is smaller than the longest sequence \(5\)"),
        "max-seqlen-type": ({"max_seqlen_k": 4.0}, TypeError, "max_seqlen_k must be an int"),
        "cu-2d": ({"cu_seqlens_q": cu_q[None]}, ValueError, "cu_seqlens_q must be 1-D"),
    }[name], args


BAD_NAMES = ["q-2d", "q-int", "k-dtype", "v-shape", "head-dim", "heads", "cu-int64", "cu-start", "cu-decreasing",
             "cu-total", "batch", "max-seqlen", "max-seqlen-type", "cu-2d"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", BAD_NAMES)
def test_rejects_bad_input(backend, name):
    (override, exc, msg), args = _bad(name)
    args.update(override)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=msg):
        varlen_attention(**args, backend=backend)
    for key, value in before.items():
        assert torch.equal(args[key], value)


def test_rejects_bad_keywords():
    q, k, v, cu_q, cu_k = _inputs([3], [4], 2, 2, 8, torch.float32)
    with pytest.raises(TypeError, match="softmax_scale must be a float"):
        varlen_attention(q, k, v, cu_q, cu_k, softmax_scale="0.1")
    with pytest.raises(TypeError, match="causal must be a bool"):
        varlen_attention(q, k, v, cu_q, cu_k, causal=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        varlen_attention(q, k, v, cu_q, cu_k, backend="flash")
    with pytest.raises(vdit.backends.BackendUnavailableError, match="no 'cuda' kernel"):
        varlen_attention(q, k, v, cu_q, cu_k, backend="cuda")


@pytest.mark.skipif(TRITON_SKIP is not None, reason=TRITON_SKIP or "")
def test_triton_rejects_float64():
    q, k, v, cu_q, cu_k = _inputs([3], [4], 2, 2, 8, torch.float64, "cuda" if HAS_GPU else "cpu")
    with pytest.raises(TypeError, match="backend 'triton' takes float16"):
        varlen_attention(q, k, v, cu_q, cu_k, backend="triton")


# ---- backward API: varlen_attention_backward from (out, lse) ----------------------------------

@pytest.mark.parametrize("backend,device", backends_of("varlen_attention", reference=True))
@pytest.mark.parametrize("causal", [False, True])
def test_backward_from_out_and_lse_matches_autograd(backend, device, causal):
    dtype = torch.float64 if backend in ("cpu", "torch") else torch.float32
    lq, lk = [5, 0, 17, 1], [7, 3, 17, 0]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), 4, 32, generator=g, dtype=dtype)
    k, v = (torch.randn(sum(lk), 2, 32, generator=g, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    cu_q, cu_k = cu_seqlens_of(lq), cu_seqlens_of(lk)
    out, lse = varlen_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                softmax_scale=0.4, causal=causal, backend=backend, return_lse=True)
    grads = varlen_attention_backward(dout.to(device), q.to(device), k.to(device), v.to(device), out, lse,
                                      cu_q.to(device), cu_k.to(device), softmax_scale=0.4, causal=causal,
                                      backend=backend)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    reference.varlen_attention(qr, kr, vr, cu_q, cu_k, softmax_scale=0.4, causal=causal).backward(dout.double())
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        assert_close(got.cpu(), want, dtype, scale=10)


# ---- numerical stability and memory --------------------------------------------------------------

LONG = int(os.environ.get("VDIT_LONG_SEQLEN", "32768"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_large_logits_fp16(backend):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 64, 1, 33]
    q = (torch.rand(sum(lengths), 2, 64, generator=g) * 2 - 1) * 250  # |q . k| up to ~1e6: overflows fp16 math
    k = (torch.rand(sum(lengths), 2, 64, generator=g) * 2 - 1) * 250
    v = torch.rand(sum(lengths), 2, 64, generator=g) * 2 - 1
    cu = cu_seqlens_of(lengths)
    out = varlen_attention(q.half(), k.half(), v.half(), cu, cu, softmax_scale=1.0, backend=backend)
    expected = reference.varlen_attention(q.half().double(), k.half().double(), v.half().double(), cu, cu,
                                          softmax_scale=1.0)
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
varlen_attention(q[:64], k[:64], v[:64], torch.tensor([0, 64], dtype=torch.int32),
                 torch.tensor([0, 64], dtype=torch.int32), backend="cpu")
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
