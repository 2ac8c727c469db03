"""The patch_embed_3d / patch_embed_3d_varlen / patch_unembed_3d / patch_unembed_3d_varlen ops
(vdit/ops/patch_embed.py): every backend against F.conv3d and the reference in float64, forward and
backward (x, weight, bias), gradient masks, torch.compile, and bad inputs.

Kernel-specific cases (the large tile configurations, the C++ kernel's huge-page outputs) are in
tests/kernels/test_patch_embed.py; the PatchEmbed3d / PatchUnembed3d modules in tests/nn/test_patch_embed.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import vdit
from tests.conftest import TOLERANCES, backends_of
from vdit.ops import patch_embed_3d, patch_embed_3d_varlen, patch_unembed_3d, patch_unembed_3d_varlen, reference

# (B, C, T, H, W), patch, D: odd channel counts, D not a multiple of any tile, T = 1 images,
# odd token-grid sizes and the latent shape class of real models (C = 16, patch (1, 2, 2)).
SHAPES = [
    ((1, 1, 1, 2, 2), (1, 2, 2), 1),
    ((2, 3, 4, 6, 8), (2, 3, 2), 37),
    ((3, 5, 1, 10, 14), (1, 2, 2), 130),
    ((1, 16, 3, 12, 10), (1, 2, 2), 72),
    ((2, 4, 4, 4, 4), (2, 2, 2), 200),
]


def dtypes_of(backend):
    # bf16 tl.dot is broken in the Triton interpreter (ENV.md) and Triton has no fp64 dot here.
    if backend == "triton":
        return [torch.float32, torch.float16]
    return [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def close(actual, expected, dtype):
    """Per-dtype tolerance scaled by the magnitude of the result (the error of a sum of products grows
    with it)."""
    scale = max(1.0, expected.abs().max().item())
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol * scale, atol=atol * scale)


def make_embed(shape, patch, D, dtype, device, bias=True):
    B, C = shape[:2]
    x = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    fan_in = C * math.prod(patch)
    w = (torch.randn(D, C, *patch, dtype=torch.float64) / math.sqrt(fan_in)).to(dtype).to(device)
    b = torch.randn(D, dtype=torch.float64).to(dtype).to(device) if bias else None
    return x, w, b


def as_leaf64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def as_leaf(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("backend,device", backends_of("patch_embed_3d"))
@pytest.mark.parametrize("shape,patch,D", SHAPES)
def test_embed_matches_conv3d_forward_and_backward(backend, device, shape, patch, D):
    for dtype in dtypes_of(backend):
        x, w, b = make_embed(shape, patch, D, dtype, device, bias=(D % 2 == 1 or dtype != torch.float32))
        xk, wk, bk = as_leaf(x, w, b)
        out = patch_embed_3d(xk, wk, bk, backend=backend)
        assert out.shape == (shape[0], math.prod(s // p for s, p in zip(shape[2:], patch)), D)
        assert out.dtype == dtype and out.is_contiguous()
        x64, w64, b64 = as_leaf64(x, w, b)
        expected = F.conv3d(x64, w64, b64, stride=patch).flatten(2).transpose(1, 2)
        close(out, expected, dtype)
        grad = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(device)
        inputs = [t for t in (xk, wk, bk) if t is not None]
        got = torch.autograd.grad(out, inputs, grad)
        want = torch.autograd.grad(expected, [t for t in (x64, w64, b64) if t is not None], grad.double())
        for g, e in zip(got, want):
            assert g.dtype == dtype
            close(g, e, dtype)


@pytest.mark.parametrize("backend,device", backends_of("patch_embed_3d"))
def test_embed_gradient_masks(backend, device):
    """Only the requested gradients are computed, and each is still right (x without grad: the
    usual training case, where the input latent is data)."""
    x, w, b = make_embed((2, 3, 2, 4, 6), (1, 2, 2), 20, torch.float32, device)
    w1, b1 = as_leaf(w, b)
    out = patch_embed_3d(x, w1, b1, backend=backend)
    gw, gb = torch.autograd.grad(out, [w1, b1], torch.ones_like(out))
    x64, w64, b64 = as_leaf64(x, w, b)
    ew, eb = torch.autograd.grad(reference.patch_embed_3d(x64, w64, b64), [w64, b64], torch.ones_like(out).double())
    close(gw, ew, torch.float32)
    close(gb, eb, torch.float32)
    x2 = x.clone().requires_grad_()
    out = patch_embed_3d(x2, w, None, backend=backend)
    (gx,) = torch.autograd.grad(out, [x2], torch.ones_like(out))
    (ex,) = torch.autograd.grad(reference.patch_embed_3d(x64, w64.detach(), None), [x64], torch.ones_like(out).double())
    close(gx, ex, torch.float32)


def test_gradcheck_cpu():
    x, w, b = as_leaf64(*make_embed((2, 3, 2, 4, 6), (2, 2, 3), 5, torch.float64, "cpu"))
    assert torch.autograd.gradcheck(lambda *a: patch_embed_3d(*a, backend="cpu"), (x, w, b), fast_mode=True)
    vids = [torch.randn(3, 2, 4, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 4, 2, 6, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda v0, v1, w, b: patch_embed_3d_varlen([v0, v1], w, b, backend="cpu")[0],
                                    (*vids, w, b), fast_mode=True)
    t = torch.randn(2, 8, 7, dtype=torch.float64, requires_grad=True)
    wu = torch.randn(3 * 12, 7, dtype=torch.float64, requires_grad=True)
    bu = torch.randn(36, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: patch_unembed_3d(t, w, b, (2, 2, 2), (2, 2, 3), backend="cpu"),
                                    (t, wu, bu), fast_mode=True)


VARLEN = [  # list of (T, H, W), C, patch, D
    ([(1, 2, 2)], 1, (1, 2, 2), 3),  # one sample, one token
    ([(2, 6, 4), (4, 3, 8), (2, 3, 2)], 3, (2, 3, 2), 37),
    ([(1, 4, 6), (3, 10, 2), (2, 2, 2), (5, 8, 12)], 5, (1, 2, 2), 130),
]


@pytest.mark.parametrize("backend,device", backends_of("patch_embed_3d"))
@pytest.mark.parametrize("sizes,C,patch,D", VARLEN)
def test_embed_varlen_forward_and_backward(backend, device, sizes, C, patch, D):
    for dtype in dtypes_of(backend)[:2]:
        videos = [torch.randn(C, *s, dtype=torch.float64).to(dtype).to(device) for s in sizes]
        _, w, b = make_embed((1, C, *patch), patch, D, dtype, device)
        vk = as_leaf(*videos)
        wk, bk = as_leaf(w, b)
        tokens, cu, grids = patch_embed_3d_varlen(vk, wk, bk, backend=backend)
        v64 = as_leaf64(*videos)
        w64, b64 = as_leaf64(w, b)
        e_tokens, e_cu, e_grids = reference.patch_embed_3d_varlen(v64, w64, b64)
        assert cu.dtype == torch.int32 and grids.dtype == torch.int32 and cu.device == tokens.device
        assert torch.equal(cu.cpu(), e_cu.cpu()) and torch.equal(grids.cpu(), e_grids.cpu())
        close(tokens, e_tokens, dtype)
        # Each sample's tokens equal F.conv3d of that sample alone.
        c = cu.tolist()
        for i, v in enumerate(v64):
            conv = F.conv3d(v[None], w64, b64, stride=patch).flatten(2).transpose(1, 2)[0]
            close(tokens[c[i]:c[i + 1]], conv, dtype)
        grad = torch.randn(tokens.shape, dtype=torch.float64).to(dtype).to(device)
        got = torch.autograd.grad(tokens, [*vk, wk, bk], grad)
        want = torch.autograd.grad(e_tokens, [*v64, w64, b64], grad.double())
        for g, e in zip(got, want):
            close(g, e, dtype)


UNEMBED = [  # B, grid, patch, C, D
    (1, (1, 1, 1), (1, 2, 2), 1, 5),
    (2, (2, 3, 4), (2, 2, 3), 3, 37),
    (3, (1, 5, 7), (1, 2, 2), 16, 72),
]


@pytest.mark.parametrize("backend,device", backends_of("patch_embed_3d"))
@pytest.mark.parametrize("B,grid,patch,C,D", UNEMBED)
def test_unembed_forward_and_backward(backend, device, B, grid, patch, C, D):
    N, Fdim = math.prod(grid), C * math.prod(patch)
    for dtype in dtypes_of(backend)[:2]:
        tokens = torch.randn(B, N, D, dtype=torch.float64).to(dtype).to(device)
        w = (torch.randn(Fdim, D, dtype=torch.float64) / math.sqrt(D)).to(dtype).to(device)
        b = torch.randn(Fdim, dtype=torch.float64).to(dtype).to(device)
        tk, wk, bk = as_leaf(tokens, w, b)
        video = patch_unembed_3d(tk, wk, bk, grid, patch, backend=backend)
        t64, w64, b64 = as_leaf64(tokens, w, b)
        expected = reference.patch_unembed_3d(t64, w64, b64, grid, patch)
        assert video.shape == expected.shape and video.dtype == dtype
        close(video, expected, dtype)
        grad = torch.randn(video.shape, dtype=torch.float64).to(dtype).to(device)
        for g, e in zip(torch.autograd.grad(video, [tk, wk, bk], grad),
                        torch.autograd.grad(expected, [t64, w64, b64], grad.double())):
            close(g, e, dtype)


@pytest.mark.parametrize("backend,device", backends_of("patch_embed_3d"))
def test_unembed_varlen_forward_and_backward(backend, device):
    grids = torch.tensor([[1, 1, 1], [2, 3, 1], [1, 2, 5]], dtype=torch.int32)
    lengths = grids.prod(1).tolist()
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(device)
    patch, C, D = (2, 1, 2), 3, 19
    for dtype in dtypes_of(backend)[:2]:
        tokens = torch.randn(sum(lengths), D, dtype=torch.float64).to(dtype).to(device)
        w = (torch.randn(C * 4, D, dtype=torch.float64) / math.sqrt(D)).to(dtype).to(device)
        b = torch.randn(C * 4, dtype=torch.float64).to(dtype).to(device)
        tk, wk, bk = as_leaf(tokens, w, b)
        videos = patch_unembed_3d_varlen(tk, wk, bk, cu, grids.to(device), patch, backend=backend)
        t64, w64, b64 = as_leaf64(tokens, w, b)
        expected = reference.patch_unembed_3d_varlen(t64, w64, b64, cu.cpu(), grids, patch)
        grads = [torch.randn(e.shape, dtype=torch.float64).to(dtype).to(device) for e in expected]
        for v, e in zip(videos, expected):
            assert v.shape == e.shape
            close(v, e, dtype)
        for g, e in zip(torch.autograd.grad(videos, [tk, wk, bk], grads),
                        torch.autograd.grad(expected, [t64, w64, b64], [g.double() for g in grads])):
            close(g, e, dtype)


def test_unembed_inverts_embed_layout():
    """patch_unembed with a weight that copies token features reproduces unpatchify exactly."""
    tokens = torch.randn(2, 2 * 3 * 4, 12, dtype=torch.float64)
    video = patch_unembed_3d(tokens, torch.eye(12, dtype=torch.float64), None, (2, 3, 4), (1, 2, 2), backend="cpu")
    assert torch.equal(video, reference.unpatchify_3d(tokens, (2, 3, 4), (1, 2, 2)))


def test_auto_backend_uses_the_cpu_kernel():
    x, w, b = make_embed((1, 3, 2, 4, 4), (1, 2, 2), 8, torch.float32, "cpu")
    with vdit.use_backend("torch"):
        expected = patch_embed_3d(x, w, b)
    torch.testing.assert_close(patch_embed_3d(x, w, b), expected)
    assert vdit.plan("patch_embed_3d", device=x.device, dtype=x.dtype)[0] == "cpu"


def test_non_contiguous_inputs():
    x, w, b = make_embed((2, 3, 2, 4, 6), (1, 2, 2), 9, torch.float64, "cpu")
    xt = x.transpose(3, 4).contiguous().transpose(3, 4)
    assert not xt.is_contiguous()
    torch.testing.assert_close(patch_embed_3d(xt, w, b, backend="cpu"), reference.patch_embed_3d(x, w, b))


# ---- torch.compile ------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    def f(x, w, b, wu):
        tokens = patch_embed_3d(x, w, b, backend="cpu")
        return patch_unembed_3d(tokens, wu, None, (2, 2, 3), (1, 2, 2), backend="cpu")

    x, w, b = make_embed((2, 3, 2, 4, 6), (1, 2, 2), 10, torch.float32, "cpu")
    wu = torch.randn(12, 10)
    w.requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, wu)
    close(out, f(x, w, b, wu).detach(), torch.float32)
    out.sum().backward()
    assert w.grad is not None


def test_torch_compile_varlen():
    def f(v0, v1, w):
        return patch_embed_3d_varlen([v0, v1], w, None, backend="cpu")[0]

    _, w, _ = make_embed((1, 3, 1, 2, 2), (1, 2, 2), 7, torch.float32, "cpu")
    v0, v1 = torch.randn(3, 1, 4, 4), torch.randn(3, 2, 2, 6)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(v0, v1, w)
    close(out, reference.patch_embed_3d_varlen([v0, v1], w)[0], torch.float32)


# ---- bad inputs ---------------------------------------------------------------------------------

def test_bad_inputs_raise_and_leave_inputs_unchanged():
    x, w, b = make_embed((1, 3, 2, 4, 4), (1, 2, 2), 8, torch.float32, "cpu")
    saved = [x.clone(), w.clone(), b.clone()]
    cases = [
        (lambda: patch_embed_3d(x[0], w, b), ValueError, "x must have 5 dimensions"),
        (lambda: patch_embed_3d(x, w[:, :2], b), ValueError, "weight expects 2 input channels"),
        (lambda: patch_embed_3d(x[..., :3], w, b), ValueError, "must divide"),
        (lambda: patch_embed_3d(x, w.double(), b), TypeError, "weight has dtype"),
        (lambda: patch_embed_3d(x, w, b[:3]), ValueError, "bias has 3 entries"),
        (lambda: patch_embed_3d(x.int(), w, b), TypeError, "x must be float"),
        (lambda: patch_embed_3d_varlen([], w, b), ValueError, "non-empty list"),
        (lambda: patch_embed_3d_varlen(x[0], w, b), ValueError, "non-empty list"),
        (lambda: patch_embed_3d_varlen([x[0], x], w, b), ValueError, r"videos\[1\] must have 4 dimensions"),
        (lambda: patch_embed_3d_varlen([x[0], x[0, :2]], w, b), ValueError, r"videos\[1\] has 2 channels"),
        (lambda: patch_embed_3d_varlen([x[0], x[0].half()], w, b), TypeError, r"videos\[1\] has dtype"),
        (lambda: patch_embed_3d_varlen([x[0], x[0, :, :, :3]], w, b), ValueError,
         r"must divide \(T, H, W\) of videos\[1\] \(2, 3, 4\)"),
        (lambda: patch_unembed_3d(torch.randn(1, 4, 8), torch.randn(12, 8), None, (1, 2, 3), (1, 2, 2)),
         ValueError, "grid"),
        (lambda: patch_unembed_3d(torch.randn(1, 4, 8), torch.randn(10, 8), None, (1, 2, 2), (1, 2, 2)),
         ValueError, "multiple of the patch volume"),
        (lambda: patch_unembed_3d_varlen(torch.randn(5, 8), torch.randn(12, 8), None,
                                         torch.tensor([0, 1, 5], dtype=torch.int32),
                                         torch.tensor([[1, 1, 1], [1, 1, 3]]), (1, 2, 2)),
         ValueError, r"grids\[1\]"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    for t, s in zip((x, w, b), saved):
        assert torch.equal(t, s)
