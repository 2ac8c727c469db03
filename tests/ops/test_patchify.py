"""The patchify_3d / unpatchify_3d ops (vdit/ops/patchify.py): every backend against the reference
(exact), gradients, non-contiguous input, torch.compile, bad inputs."""
import pytest
import torch

import vdit
from tests.conftest import backends_of
from vdit.ops import patchify_3d, reference, unpatchify_3d

# Backends that take CPU tensors as built: the reference and the CPU kernels (no interpreter).
CPU_BACKENDS = backends_of("patchify_3d", reference=True, device="cpu", interpreted=False, with_device=False)

SHAPES = [  # (B, C, T, H, W), patch
    ((1, 1, 1, 2, 2), (1, 2, 2)),
    ((2, 3, 4, 6, 8), (2, 2, 2)),
    ((3, 16, 3, 10, 14), (1, 2, 2)),
    ((1, 5, 6, 9, 15), (3, 3, 5)),
    ((2, 4, 2, 8, 40), (1, 2, 2)),  # long token rows
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("backend,device", backends_of("patchify_3d"))
@pytest.mark.parametrize("shape,patch", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_matches_reference(backend, device, shape, patch, dtype):
    x = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    tokens = patchify_3d(x, patch, backend=backend)
    assert tokens.dtype == dtype and tokens.device == x.device
    assert torch.equal(tokens.cpu(), reference.patchify_3d(x.cpu(), patch))  # a copy: exact
    grid = [s // p for s, p in zip(shape[2:], patch)]
    assert torch.equal(unpatchify_3d(tokens, grid, patch, backend=backend), x)


@pytest.mark.parametrize("backend,device", backends_of("patchify_3d"))
def test_gradients_are_the_inverse_op(backend, device):
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64, device=device, requires_grad=True)
    tokens = patchify_3d(x, (2, 3, 2), backend=backend)
    grad = torch.randn_like(tokens)
    (gx,) = torch.autograd.grad(tokens, x, grad)
    assert torch.equal(gx, reference.unpatchify_3d(grad, (2, 2, 4), (2, 3, 2)))
    t = tokens.detach().requires_grad_()
    video = unpatchify_3d(t, (2, 2, 4), (2, 3, 2), backend=backend)
    (gt,) = torch.autograd.grad(video, t, x.detach())
    assert torch.equal(gt, reference.patchify_3d(x.detach(), (2, 3, 2)))


def test_gradcheck_cpu_kernel():
    x = torch.randn(1, 2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: patchify_3d(v, (1, 2, 2), backend="cpu"), (x,))
    assert torch.autograd.gradgradcheck(lambda v: patchify_3d(v, (1, 2, 2), backend="cpu"), (x,))


@pytest.mark.parametrize("backend,device", backends_of("patchify_3d"))
def test_non_contiguous_input_is_copied(backend, device):
    base = torch.randn(2, 8, 6, 4, 3, device=device)
    x = base.permute(0, 4, 2, 1, 3)  # (2, 3, 6, 8, 4), non-contiguous
    assert not x.is_contiguous()
    assert torch.equal(patchify_3d(x, (2, 2, 2), backend=backend), reference.patchify_3d(x, (2, 2, 2)))


def test_auto_picks_the_cpu_kernel_and_matches():
    x = torch.randn(2, 4, 2, 4, 4)
    with vdit.use_backend("torch"):
        expected = patchify_3d(x, (1, 2, 2))
    assert torch.equal(patchify_3d(x, (1, 2, 2)), expected)


def test_torch_compile_fullgraph():
    def f(x):
        t = patchify_3d(x, (1, 2, 2), backend="cpu")
        return unpatchify_3d(t * 2, (2, 2, 3), (1, 2, 2), backend="cpu")

    x = torch.randn(2, 3, 2, 4, 6, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out, 2 * x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


BAD_PATCHIFY = [  # (x shape, patch_size, exception, message fragment)
    ((2, 3, 4, 4), (1, 2, 2), ValueError, "x must have 5 dimensions"),
    ((1, 3, 4, 6, 8), (3, 2, 2), ValueError, "patch_size (3, 2, 2) must divide"),
    ((1, 3, 4, 6, 8), (1, 2), TypeError, "patch_size must be a sequence of 3 ints"),
    ((1, 3, 4, 6, 8), (1, 0, 2), ValueError, "patch_size must be positive"),
    ((1, 3, 4, 6, 8), (1, 2.0, 2), TypeError, "patch_size"),
    ((0, 3, 4, 6, 8), (1, 2, 2), ValueError, "x must not be empty"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,patch,exc,msg", BAD_PATCHIFY)
def test_patchify_rejects_bad_input(backend, shape, patch, exc, msg):
    x = torch.randn(shape)
    before = x.clone()
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        patchify_3d(x, patch, backend=backend)
    assert torch.equal(x, before)


def test_patchify_rejects_non_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        patchify_3d([[1.0]], (1, 1, 1))


@pytest.mark.parametrize("shape,grid,patch,msg", [
    ((1, 12, 8), (2, 2, 2), (1, 2, 2), "tokens has N = 12 tokens but grid"),
    ((1, 8, 6), (2, 2, 2), (1, 2, 2), "not a multiple of the patch volume 4"),
    ((8, 6), (2, 2, 2), (1, 2, 2), "tokens must have 3 dimensions"),
])
def test_unpatchify_rejects_bad_input(shape, grid, patch, msg):
    with pytest.raises(ValueError, match=msg):
        unpatchify_3d(torch.randn(shape), grid, patch, backend="cpu")
