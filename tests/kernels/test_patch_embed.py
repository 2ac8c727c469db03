"""Patch-embedding kernel specifics, through the op on each kernel backend: problems big enough for the
Triton kernels' large tile configurations, and token outputs large enough (>= 4 MiB) for the C++
kernel's huge-page allocation and streaming stores. The op contract is tested in
tests/ops/test_patch_embed.py."""
import pytest
import torch

from tests.conftest import backends_of
from tests.ops.test_patch_embed import as_leaf, as_leaf64, close, dtypes_of, make_embed  # the op tests' helpers
from vdit.ops import patch_embed_3d, patch_unembed_3d, reference


@pytest.mark.parametrize("backend,device", backends_of("patch_embed_3d"))
def test_large_tile_configurations(backend, device):
    """A problem big enough for the large tile configurations (>= 1024 tokens, F = 64, D >= 128)."""
    shape, patch, D = (1, 16, 1, 64, 64), (1, 2, 2), 136
    for dtype in dtypes_of(backend)[1:3]:
        x, w, b = make_embed(shape, patch, D, dtype, device)
        wk, bk = as_leaf(w, b)
        out = patch_embed_3d(x, wk, bk, backend=backend)
        x64, w64, b64 = as_leaf64(x, w, b)
        expected = reference.patch_embed_3d(x64, w64, b64)
        close(out, expected, dtype)
        grad = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(device) / 32
        got = torch.autograd.grad(out, [wk, bk], grad)
        for g, e in zip(got, torch.autograd.grad(expected, [w64, b64], grad.double())):
            close(g, e, dtype)
        video = patch_unembed_3d(out, w.reshape(D, -1).t().contiguous(), None, (1, 32, 32), patch, backend=backend)
        w_unembed = w64.detach().reshape(D, -1).t()
        close(video, reference.patch_unembed_3d(out.double(), w_unembed, None, (1, 32, 32), patch), dtype)


@pytest.mark.parametrize("D", [256, 259])  # 259: rows not 64-byte aligned for the streaming copy
def test_large_outputs_on_huge_pages_cpu(D):
    """Token outputs of >= 4 MiB take the C++ kernel's huge-page allocation and streaming stores
    (poisoned in tests too)."""
    x, w, b = make_embed((1, 4, 4, 64, 64), (1, 2, 2), D, torch.float32, "cpu")
    wk = w.clone().requires_grad_()
    out = patch_embed_3d(x, wk, b, backend="cpu")
    assert out.numel() * 4 >= 4 << 20
    close(out, reference.patch_embed_3d(x.double(), w.double(), b.double()), torch.float32)
    tokens = out.detach().clone().requires_grad_()
    w_fd = w.reshape(D, -1).t().contiguous()
    video = patch_unembed_3d(tokens, w_fd, None, (4, 32, 32), (1, 2, 2), backend="cpu")
    (gt,) = torch.autograd.grad(video, [tokens], x)
    close(gt, reference.patchify_3d(x.double(), (1, 2, 2)) @ w_fd.double(), torch.float32)
    out.sum().backward()
    assert torch.isfinite(wk.grad).all()
