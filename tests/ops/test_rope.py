"""The rope_3d / rope_3d_qk ops (vdit/ops/rope.py): every backend against the float64 reference, forward
and backward, both pair layouts, uneven splits and pass-through channels, packed ragged and dense
batches, strided (fused-qkv) inputs, in-place, fused RMS QK-norm, torch.compile, bad inputs, and
numerical stability (far positions).

Kernel-specific cases (GPU rows split across warps, in place) are in tests/kernels/test_rope.py; the
RotaryEmbedding3d module and its presets in tests/nn/test_rope.py."""
import random

import pytest
import torch

import vdit
from tests.conftest import assert_close, backends_of
from vdit.ops import reference, rope_3d, rope_3d_qk
from vdit.packing import grid_positions

# Backends that take CPU tensors as built: the reference and the CPU kernels (no interpreter).
CPU_BACKENDS = backends_of("rope_3d", reference=True, device="cpu", interpreted=False, with_device=False)

CASES = [  # (head_dim, dims)
    (16, (4, 6, 6)),        # full head, uneven split
    (40, (8, 12, 14)),      # pass-through tail of 6 channels
    (64, (16, 24, 24)),     # CogVideoX split
    (24, (0, 10, 6)),       # an empty axis chunk
    (128, (44, 42, 42)),    # Wan split: chunk halves of 22 / 21 / 21
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _dtypes(backend):
    # The Triton interpreter runs fp16 / bf16 / fp32 (its kernels compute in fp32, so no fp64 there).
    return [torch.float32, torch.float16, torch.bfloat16] if backend == "triton" else DTYPES


def _ragged_packed(rng, heads, head_dim, dtype, device, batch=4):
    """A packed batch of videos with random grids (one of 1 token), its positions (int32)."""
    grids = [[rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 5)] for _ in range(batch)]
    grids[0] = [1, 1, 1]
    pos = grid_positions(torch.tensor(grids, dtype=torch.int32)).to(device)
    x = torch.randn(pos.shape[0], heads, head_dim, dtype=torch.float64).to(dtype).to(device)
    return x, pos


def _ref(fn, *tensors, **kwargs):
    """Reference in float64 on CPU."""
    return fn(*[t.detach().double().cpu() if t is not None and t.is_floating_point() else
                (t.cpu() if t is not None else None) for t in tensors], **kwargs)


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
@pytest.mark.parametrize("head_dim,dims", CASES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rope_3d_packed_matches_reference(backend, device, head_dim, dims, interleaved, rng):
    for dtype in _dtypes(backend):
        x, pos = _ragged_packed(rng, 3, head_dim, dtype, device)
        out = rope_3d(x, pos, dims=dims, theta=500.0, interleaved=interleaved, backend=backend)
        assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
        expected = _ref(reference.rope_3d, x, pos, dims=dims, theta=500.0, interleaved=interleaved)
        assert_close(out, expected)
        # Pass-through channels are copied exactly.
        assert torch.equal(out[..., sum(dims):], x[..., sum(dims):])


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("norm", ["none", "q", "both"])
def test_rope_3d_qk_dense_matches_reference(backend, device, interleaved, norm):
    dims = (8, 12, 14)
    for dtype in _dtypes(backend):
        for pos_shape in [(5, 3), (2, 5, 3)]:  # shared or per-sample positions
            q = torch.randn(2, 5, 3, 40, dtype=torch.float64).to(dtype).to(device)
            k = torch.randn(2, 5, 2, 40, dtype=torch.float64).to(dtype).to(device)
            pos = torch.randint(0, 30, pos_shape, dtype=torch.int64, device=device)
            qw = torch.randn(40, dtype=dtype, device=device) if norm != "none" else None
            kw = torch.randn(40, dtype=dtype, device=device) if norm == "both" else None
            oq, ok = rope_3d_qk(q, k, pos, dims=dims, interleaved=interleaved, q_norm_weight=qw, k_norm_weight=kw,
                                eps=1e-5, backend=backend)
            eq, ek = _ref(reference.rope_3d_qk, q, k, pos, dims=dims, interleaved=interleaved, q_norm_weight=qw,
                          k_norm_weight=kw, eps=1e-5)
            # The norm weight (randn, up to ~3) scales the output and so its rounding error.
            scale = 4.0 if norm != "none" else 1.0
            assert_close(oq, eq, scale=scale)
            assert_close(ok, ek, scale=scale)


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64, torch.float32, torch.float64], ids=str)
def test_position_dtypes_and_fractional_positions(backend, device, pos_dtype):
    x = torch.randn(30, 2, 32, device=device)
    pos = torch.randint(0, 40, (30, 3), device=device).to(pos_dtype)
    if pos_dtype.is_floating_point:
        pos = pos * 0.37 + 0.25  # scaled / offset grids (resolution extrapolation)
    out = rope_3d(x, pos, dims=(8, 12, 12), backend=backend)
    assert_close(out, _ref(reference.rope_3d, x, pos, dims=(8, 12, 12)))


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
def test_strided_qkv_slices_are_read_in_place(backend, device):
    total, H, D = 23, 4, 32
    qkv = torch.randn(total, 3 * H * D, device=device)
    q, k, v = qkv.split(H * D, dim=-1)
    q, k = q.view(total, H, D), k.view(total, H, D)
    assert not q.is_contiguous()
    pos_big = torch.randint(0, 9, (total, 5), dtype=torch.int32, device=device)
    pos = pos_big[:, 1:4]  # non-contiguous positions
    oq, ok = rope_3d_qk(q, k, pos, dims=(8, 10, 10), interleaved=False, backend=backend)
    eq, ek = _ref(reference.rope_3d_qk, q, k, pos, dims=(8, 10, 10), interleaved=False)
    assert_close(oq, eq)
    assert_close(ok, ek)
    assert oq.is_contiguous() and ok.is_contiguous()
    # A head dim with non-unit stride is copied first.
    xt = torch.randn(total, D, H, device=device).transpose(1, 2)
    assert_close(rope_3d(xt, pos, dims=(8, 10, 10), backend=backend),
                 _ref(reference.rope_3d, xt, pos, dims=(8, 10, 10)))


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_inplace_matches_out_of_place(backend, device, interleaved):
    total, H, D = 17, 3, 40
    qkv = torch.randn(total, 3, H, D, device=device)
    pos = torch.randint(0, 9, (total, 3), device=device)
    w = torch.randn(D, device=device)
    eq, ek = rope_3d_qk(qkv[:, 0], qkv[:, 1], pos, dims=(8, 12, 12), interleaved=interleaved, q_norm_weight=w,
                        backend=backend)
    v_before = qkv[:, 2].clone()
    q, k = qkv[:, 0], qkv[:, 1]
    oq, ok = rope_3d_qk(q, k, pos, dims=(8, 12, 12), interleaved=interleaved, q_norm_weight=w, inplace=True,
                        backend=backend)
    assert oq is q and ok is k
    assert torch.equal(qkv[:, 0], eq) and torch.equal(qkv[:, 1], ek)
    assert torch.equal(qkv[:, 2], v_before)


def test_inplace_refuses_autograd_and_aliasing():
    q = torch.randn(4, 2, 8, requires_grad=True)
    k = torch.randn(4, 2, 8)
    pos = torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="inplace=True is not differentiable"):
        rope_3d_qk(q, k, pos, dims=(2, 2, 4), inplace=True, backend="cpu")
    x = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="do not share elements"):
        rope_3d_qk(x, x, pos, dims=(2, 2, 4), inplace=True, backend="cpu")


def _grads(fn, tensors, cotangents):
    return torch.autograd.grad(fn(*tensors), tensors, cotangents)


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("norm", ["none", "k", "both"])
def test_gradients_match_reference(backend, device, interleaved, norm, rng):
    dims = (6, 10, 12)
    q, pos = _ragged_packed(rng, 3, 36, torch.float32, device)
    k = torch.randn(q.shape[0], 2, 36, device=device)
    qw = torch.randn(36, device=device) if norm == "both" else None
    kw = torch.randn(36, device=device) if norm != "none" else None
    inputs = [t.requires_grad_() for t in (q, k, qw, kw) if t is not None]
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def run(impl, q, k, *ws):
        ws = list(ws)
        qw_ = ws.pop(0) if qw is not None else None
        kw_ = ws.pop(0) if kw is not None else None
        kwargs = dict(dims=dims, interleaved=interleaved, q_norm_weight=qw_, k_norm_weight=kw_)
        if impl == "ref":
            return reference.rope_3d_qk(q, k, pos.cpu(), **kwargs)
        return rope_3d_qk(q, k, pos, backend=backend, **kwargs)

    got = _grads(lambda *a: run("kernel", *a), inputs, (gq, gk))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    want = _grads(lambda *a: run("ref", *a), ref_inputs, (gq.double().cpu(), gk.double().cpu()))
    for g, w in zip(got, want):
        # Weight gradients sum over every token and head: allow for fp32 accumulation.
        assert_close(g, w, scale=1.0 if g.dim() > 1 else 10.0)


def test_gradcheck_cpu_float64():
    pos = torch.randint(0, 7, (2, 3, 3))
    q = torch.randn(2, 3, 2, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 12, dtype=torch.float64, requires_grad=True)
    qw = torch.randn(12, dtype=torch.float64, requires_grad=True)
    kw = torch.randn(12, dtype=torch.float64, requires_grad=True)
    dims = (2, 4, 4)  # and 2 pass-through channels
    for interleaved in (True, False):
        fused = lambda *a, il=interleaved: rope_3d_qk(a[0], a[1], pos, dims=dims, interleaved=il,  # noqa: E731
                                                       q_norm_weight=a[2], k_norm_weight=a[3], backend="cpu")
        assert torch.autograd.gradcheck(fused, (q, k, qw, kw))
        plain = lambda q, k, il=interleaved: rope_3d_qk(q, k, pos, dims=dims, interleaved=il,  # noqa: E731
                                                    backend="cpu")
        assert torch.autograd.gradcheck(plain, (q, k))
        assert torch.autograd.gradgradcheck(plain, (q, k))  # the inverse rotation is differentiable too
        single = lambda x, w, il=interleaved: rope_3d(x, pos, dims=dims, interleaved=il, norm_weight=w,  # noqa: E731
                                                     backend="cpu")
        assert torch.autograd.gradcheck(single, (q, qw))


def test_backward_is_the_inverse_rotation():
    x = torch.randn(11, 2, 24, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 50, (11, 3))
    y = rope_3d(x, pos, dims=(8, 8, 8), backend="cpu")
    (g,) = torch.autograd.grad(y, x, y.detach())
    torch.testing.assert_close(g, x.detach(), rtol=1e-12, atol=1e-12)  # R^T R x = x


def test_only_one_output_used_in_backward():
    q = torch.randn(6, 2, 16, requires_grad=True)
    k = torch.randn(6, 2, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    pos = torch.randint(0, 5, (6, 3))
    oq, _ = rope_3d_qk(q, k, pos, dims=(4, 4, 4), q_norm_weight=w, k_norm_weight=w, backend="cpu")
    oq.sum().backward()
    assert torch.count_nonzero(k.grad) == 0 and q.grad.abs().sum() > 0 and torch.isfinite(w.grad).all()


def test_auto_picks_the_cpu_kernel_and_matches():
    q, k = torch.randn(9, 2, 32), torch.randn(9, 2, 32)
    pos = torch.randint(0, 5, (9, 3))
    with vdit.use_backend("torch"):
        expected = rope_3d_qk(q, k, pos, dims=(8, 12, 12))
    got = rope_3d_qk(q, k, pos, dims=(8, 12, 12))
    assert_close(got[0], expected[0].double())
    assert_close(got[1], expected[1].double())


@pytest.mark.parametrize("backend", backends_of("rope_3d", device="cpu", with_device=False))
def test_torch_compile_fullgraph(backend):
    pos = torch.randint(0, 6, (12, 3), dtype=torch.int32)
    w = torch.randn(32, requires_grad=True)

    def f(q, k, w):
        q, k = rope_3d_qk(q, k, pos, dims=(8, 12, 12), q_norm_weight=w, k_norm_weight=w, backend=backend)
        return (q * k).sum() + rope_3d(q, pos, dims=(8, 12, 12), interleaved=False, backend=backend).square().sum()

    q = torch.randn(12, 2, 32, requires_grad=True)
    k = torch.randn(12, 2, 32, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, w)
    grads = torch.autograd.grad(out, (q, k, w))
    with vdit.use_backend("torch"):
        expected = f(q, k, w)
    want = torch.autograd.grad(expected, (q, k, w))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", backends_of("rope_3d", device="cpu", with_device=False))
def test_torch_compile_inplace(backend):
    pos = torch.randint(0, 6, (10, 3), dtype=torch.int32)

    def f(qkv):
        q, k, v = qkv.unbind(1)
        rope_3d_qk(q, k, pos, dims=(4, 6, 6), inplace=True, backend=backend)
        return qkv

    qkv = torch.randn(10, 3, 2, 16)
    expected_q, expected_k = rope_3d_qk(qkv[:, 0], qkv[:, 1], pos, dims=(4, 6, 6), backend="torch")
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv.clone())
    torch.testing.assert_close(out[:, 0], expected_q)
    torch.testing.assert_close(out[:, 1], expected_k)
    torch.testing.assert_close(out[:, 2], qkv[:, 2])


BAD = [  # (kwargs override, exception, message)
    (dict(dims=(3, 4, 4)), ValueError, "dims must be 3 non-negative even ints"),
    (dict(dims=(8, 8, 8, 8)), ValueError, "dims must be 3 non-negative even ints"),
    (dict(dims=(8, 12, 14)), ValueError, "sum to 34, more than the head dim 32"),
    (dict(dims=None), TypeError, "dims must be a sequence of 3 ints"),
    (dict(positions=torch.zeros(9, 2, dtype=torch.int32)), ValueError, "positions must have shape"),
    (dict(positions=torch.zeros(8, 3, dtype=torch.int32)), ValueError, "positions must have shape"),
    (dict(positions=torch.zeros(9, 3, dtype=torch.float16)), TypeError, "positions must be int32, int64"),
    (dict(positions=[[0, 0, 0]] * 9), TypeError, "positions must be a torch.Tensor"),
    (dict(k=torch.randn(9, 2, 16), dims=(4, 4, 4)), ValueError, r"k \(9, 2, 16\) must match q"),
    (dict(k=torch.randn(9, 2, 32, dtype=torch.float64)), TypeError, "k has dtype torch.float64"),
    (dict(k=torch.randint(0, 3, (9, 2, 32))), TypeError, "k must be float16"),
    (dict(q_norm_weight=torch.randn(16)), ValueError, r"q_norm_weight must be \(32,\)"),
    (dict(k_norm_weight=torch.randn(2, 32)), ValueError, "k_norm_weight must have 1 dimensions"),
    (dict(theta=0.0), ValueError, "theta must be positive"),
    (dict(norm="layer"), ValueError, "norm must be 'rms'"),
    (dict(q=torch.randn(9, 32)), ValueError, "q must have 3 or 4 dimensions"),
    (dict(q=torch.randn(0, 2, 32), positions=torch.zeros(0, 3)), ValueError, "q must not be empty"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("override,exc,msg", BAD)
def test_rejects_bad_input_and_leaves_inputs_unmodified(backend, override, exc, msg):
    args = dict(q=torch.randn(9, 2, 32), k=torch.randn(9, 2, 32), positions=torch.zeros(9, 3, dtype=torch.int32),
                dims=(8, 12, 12))
    args.update(override)
    before = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor)}
    q, k, positions = args.pop("q"), args.pop("k"), args.pop("positions")
    with pytest.raises(exc, match=msg):
        rope_3d_qk(q, k, positions, inplace=True, backend=backend, **args)
    for n, t in {"q": q, "k": k, "positions": positions}.items():
        if n in before:
            assert torch.equal(t, before[n])


def test_rope_3d_rejects_bad_input():
    with pytest.raises(ValueError, match="norm_weight must be"):
        rope_3d(torch.randn(4, 2, 8), torch.zeros(4, 3), dims=(2, 2, 2), norm_weight=torch.randn(4), backend="cpu")
    with pytest.raises(ValueError, match="positions must have shape"):
        rope_3d(torch.randn(2, 4, 2, 8), torch.zeros(3, 4, 3), dims=(2, 2, 2), backend="cpu")


def test_random_splits_against_reference():
    """Random head dims, splits and layouts on the CPU kernel (the CUDA kernel shares its slot math)."""
    rng = random.Random(7)
    for _ in range(20):
        D = 2 * rng.randint(1, 40)
        cuts = sorted(2 * rng.randint(0, D // 2) for _ in range(2))
        rot = 2 * rng.randint(cuts[1] // 2, D // 2)
        dims = (cuts[0], cuts[1] - cuts[0], rot - cuts[1])
        interleaved = rng.random() < 0.5
        theta = rng.choice([100.0, 10000.0])
        x = torch.randn(rng.randint(1, 9), rng.randint(1, 3), D, dtype=torch.float64)
        pos = torch.randint(-20, 60, (x.shape[0], 3))
        out = rope_3d(x, pos, dims=dims, theta=theta, interleaved=interleaved, backend="cpu")
        assert_close(out, reference.rope_3d(x, pos, dims=dims, theta=theta, interleaved=interleaved))


def test_gpu_kernels_cap_the_head_dim_and_cpu_does_not():
    x = torch.randn(3, 1, 260)
    pos = torch.randint(0, 4, (3, 3))
    with pytest.raises(ValueError, match="takes head dims up to 256"):
        rope_3d(x, pos, dims=(4, 4, 4), backend="triton")
    assert_close(rope_3d(x, pos, dims=(4, 4, 252), backend="cpu"), _ref(reference.rope_3d, x, pos, dims=(4, 4, 252)))


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
def test_large_positions_keep_float32_accuracy(backend, device):
    """The kernels' sin / cos polynomial holds its accuracy for coordinates up to the documented 1e5.

    Compared with the reference run in float32: at such coordinates the float32 angle itself is
    rounded (by up to 3e-5 rad here) in any float32 implementation, the reference included; what is
    checked is the sin / cos of that angle.
    """
    x = torch.randn(64, 1, 12, device=device)
    pos = torch.linspace(-99000.0, 99000.0, 64 * 3, device=device).reshape(64, 3)
    out = rope_3d(x, pos, dims=(4, 4, 4), backend=backend)
    expected = reference.rope_3d(x.cpu(), pos.cpu(), dims=(4, 4, 4))  # float32 angles, torch.sin / cos
    assert_close(out, expected.double(), scale=2.0)


# ---- numerical stability ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
