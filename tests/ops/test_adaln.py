"""The adaln_modulate / gated_residual ops (vdit/ops/adaln.py): every backend against the float64
reference (forward and every gradient), packed and dense layouts, ragged batches with empty and
length-1 samples, bad inputs, torch.compile and the fake implementations, and numerical stability
(constant rows).

The C++ kernel's own offset checks are in tests/kernels/test_adaln.py; the AdaLNModulation module in
tests/nn/test_adaln.py."""
import random

import pytest
import torch

import vdit
from tests.conftest import HAS_GPU, TOLERANCES, assert_close, backends_of, cu_seqlens_of, ragged_lengths
from vdit.ops import adaln_modulate, gated_residual, reference

# Backends that take CPU tensors as built: the reference and the CPU kernels (no interpreter).
CPU_BACKENDS = backends_of("adaln_modulate", reference=True, device="cpu", interpreted=False, with_device=False)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (layout, batch, max_len or N, C): packed cases get ragged lengths with an empty and a length-1 sample.
CASES = [
    ("packed", 5, 9, 1),
    ("packed", 6, 13, 7),
    ("packed", 4, 70, 64),  # samples span several 32-row blocks of the backward
    ("packed", 3, 40, 1152),
    ("packed", 2, 5, 3072),
    ("packed", 1, 1, 5),  # a single one-token sample
    ("packed", 2, 3, 4608),  # wider than the CUDA forward keeps in registers
    ("dense", 2, 1, 1),
    ("dense", 3, 17, 33),
    ("dense", 2, 40, 1152),
]


def make_inputs(layout, batch, length, C, dtype, device, seed=0):
    """x, a second token tensor y, three (B, C) parameters, cu_seqlens (None for dense)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "packed":
        lengths = ragged_lengths(random.Random(seed), batch, length)
        cu = cu_seqlens_of(lengths, device)
        shape = (sum(lengths), C)
    else:
        cu, shape = None, (batch, length, C)

    def rand(*s, mean=0.0, std=1.0):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * std + mean).to(dtype).to(device)

    x = rand(*shape, mean=0.5, std=2.0)  # a nonzero mean exercises the centering
    y = rand(*shape)
    shift, scale, gate = rand(batch, C), rand(batch, C, std=0.5), rand(batch, C)
    return x, y, shift, scale, gate, cu


def grads_of(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out)


def reference_grads(fn, inputs, grad_out):
    """Output and gradients of the reference evaluated in float64 on the same (rounded) values."""
    return grads_of(fn, [t.double().cpu() for t in inputs], grad_out.double().cpu())


@pytest.mark.parametrize("backend,device", backends_of("adaln_modulate"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}-L{c[2]}-C{c[3]}")
def test_adaln_modulate_matches_reference(backend, device, dtype, case):
    x, _, shift, scale, _, cu = make_inputs(*case, dtype, device)
    grad_out = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(device)
    cu_ref = None if cu is None else cu.cpu()
    out, grads = grads_of(lambda a, b, c: adaln_modulate(a, b, c, cu, backend=backend), [x, shift, scale], grad_out)
    ref, ref_grads = reference_grads(lambda a, b, c: reference.adaln_modulate(a, b, c, cu_ref), [x, shift, scale],
                                     grad_out)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert_close(out, ref)
    for name, g, r in zip(("x", "shift", "scale"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape, name
        # Parameter grads sum up to ~100 terms; they pass at 1x here, 2x leaves room for other seeds.
        assert_close(g, r, scale=2.0)


@pytest.mark.parametrize("backend,device", backends_of("adaln_modulate"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}-L{c[2]}-C{c[3]}")
def test_gated_residual_matches_reference(backend, device, dtype, case):
    x, y, _, _, gate, cu = make_inputs(*case, dtype, device)
    grad_out = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(device)
    cu_ref = None if cu is None else cu.cpu()
    out, grads = grads_of(lambda a, b, c: gated_residual(a, b, c, cu, backend=backend), [x, y, gate], grad_out)
    ref, ref_grads = reference_grads(lambda a, b, c: reference.gated_residual(a, b, c, cu_ref), [x, y, gate], grad_out)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close(g, r, scale=2.0)


def test_layernorm_backward_is_exact_in_float64():
    """The kernel's LayerNorm backward is the exact gradient: gradcheck against finite differences."""
    x, y, shift, scale, gate, cu = make_inputs("packed", 4, 6, 5, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: adaln_modulate(a, b, c, cu, backend="cpu"),
                                    [t.requires_grad_() for t in (x, shift, scale)])
    assert torch.autograd.gradcheck(lambda a, b, c: gated_residual(a, b, c, cu, backend="cpu"),
                                    [t.requires_grad_() for t in (x.detach(), y, gate)])


def test_all_samples_empty_gives_zero_parameter_grads():
    x = torch.randn(0, 8, requires_grad=True)
    shift, scale = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    cu = cu_seqlens_of([0, 0, 0])
    out = adaln_modulate(x, shift, scale, cu, backend="cpu")
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(shift.grad, torch.zeros(3, 8)) and torch.equal(scale.grad, torch.zeros(3, 8))

    y, gate = torch.randn(2, 0, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    dense = gated_residual(torch.randn(2, 0, 8), y, gate, backend="cpu")
    assert dense.shape == (2, 0, 8)
    dense.sum().backward()
    assert torch.equal(gate.grad, torch.zeros(2, 8))


def test_non_contiguous_parameters_from_chunks():
    """shift/scale/gate as chunks of one (B, 3C) projection, the way AdaLNModulation produces them."""
    x, y, _, _, _, cu = make_inputs("packed", 4, 20, 24, torch.float32, "cpu")
    params = torch.randn(4, 3 * 24)
    shift, scale, gate = params.chunk(3, dim=-1)
    assert not shift.is_contiguous()
    assert_close(adaln_modulate(x, shift, scale, cu, backend="cpu"), reference.adaln_modulate(x, shift, scale, cu))
    assert_close(gated_residual(x, y, gate, cu, backend="cpu"), reference.gated_residual(x, y, gate, cu))


@pytest.mark.parametrize("backend,device", backends_of("adaln_modulate"))
def test_misaligned_contiguous_views(backend, device):
    """Views starting 4 bytes into their storage: contiguous, but too misaligned for 16-byte packets."""
    x, y, shift, scale, gate, cu = make_inputs("packed", 3, 9, 64, torch.float32, device)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    xs, ys, ss, cs, gs = (shifted(t) for t in (x, y, shift, scale, gate))
    assert xs.is_contiguous() and xs.data_ptr() % 16 != 0
    assert_close(adaln_modulate(xs, ss, cs, cu, backend=backend), reference.adaln_modulate(x, shift, scale, cu))
    assert_close(gated_residual(xs, ys, gs, cu, backend=backend), reference.gated_residual(x, y, gate, cu))


def test_results_do_not_depend_on_thread_count():
    x, _, shift, scale, _, cu = make_inputs("packed", 6, 200, 96, torch.float32, "cpu")
    g = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(grads_of(lambda a, b, c: adaln_modulate(a, b, c, cu, backend="cpu"), [x, shift, scale], g))
    finally:
        torch.set_num_threads(threads)
    (out1, g1), (out2, g2) = results
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_auto_uses_the_cpu_kernel():
    x, y, shift, scale, gate, cu = make_inputs("packed", 3, 10, 16, torch.float32, "cpu")
    with vdit.use_backend("torch"):
        expected = adaln_modulate(x, shift, scale, cu)
    assert_close(adaln_modulate(x, shift, scale, cu), expected)
    assert_close(gated_residual(x, y, gate, cu), reference.gated_residual(x, y, gate, cu))


@pytest.mark.parametrize("seed", range(6))
def test_random_ragged_batches(seed):
    """Random batch sizes, lengths (with empty and length-1 samples) and widths, all outputs and grads."""
    r = random.Random(seed)
    case = ("packed", r.randint(1, 9), r.randint(1, 120), r.choice([1, 3, 17, 40, 129, 384]))
    x, y, shift, scale, gate, cu = make_inputs(*case, torch.float32, "cpu", seed=seed)
    g = torch.randn_like(x)
    out, grads = grads_of(lambda a, b, c, d, e: gated_residual(a, adaln_modulate(a, b, c, cu, backend="cpu"), d, cu,
                                                               backend="cpu") * e, [x, shift, scale, gate, y], g)
    ref, ref_grads = reference_grads(
        lambda a, b, c, d, e: reference.gated_residual(a, reference.adaln_modulate(a, b, c, cu), d, cu) * e,
        [x, shift, scale, gate, y], g)
    assert_close(out, ref, scale=2.0)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, scale=2.0)


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_torch_compile_fullgraph(layout):
    x, y, shift, scale, gate, cu = make_inputs(layout, 4, 12, 16, torch.float32, "cpu")

    def block(x, y, shift, scale, gate, cu):
        h = adaln_modulate(x, shift, scale, cu, backend="cpu")
        return gated_residual(x, h * y, gate, cu, backend="cpu")

    inputs = [t.detach().requires_grad_() for t in (x, y, shift, scale, gate)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs, cu)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    eager_inputs = [t.detach().requires_grad_() for t in inputs]
    eager = block(*eager_inputs, cu)
    eager_grads = torch.autograd.grad(eager.square().sum(), eager_inputs)
    assert torch.equal(out, eager)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads))


def test_fake_implementations_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(10, 6, dtype=torch.float16)
        p = torch.empty(3, 6, dtype=torch.float16)
        cu = torch.empty(4, dtype=torch.int32)
        out, mean, rstd = torch.ops.vdit.adaln_modulate(x, p, p, cu, 1e-6)
        assert out.shape == (10, 6) and out.dtype == torch.float16
        assert mean.shape == (10,) and mean.dtype == torch.float32 and rstd.shape == (10,)
        gx, gs, gc = torch.ops.vdit.adaln_modulate_backward(x, x, p, mean, rstd, cu)
        assert gx.shape == (10, 6) and gs.shape == gc.shape == (3, 6)
        assert torch.ops.vdit.gated_residual(x, x, p, cu).shape == (10, 6)
        gy, gg = torch.ops.vdit.gated_residual_backward(x, x, p, cu)
        assert gy.shape == (10, 6) and gg.shape == (3, 6)


# ---- bad inputs -------------------------------------------------------------------------------

def _good():
    x = torch.randn(7, 4)
    return dict(x=x, shift=torch.randn(3, 4), scale=torch.randn(3, 4), cu_seqlens=cu_seqlens_of([2, 0, 5]))


BAD = [  # (override, exception, message)
    (dict(cu_seqlens=torch.tensor([0, 2, 2, 7])), TypeError, "cu_seqlens must be int32"),
    (dict(cu_seqlens=torch.tensor([1, 2, 2, 7], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 7], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 2, 2, 6], dtype=torch.int32)), ValueError, r"cu_seqlens\[-1\] must equal"),
    (dict(cu_seqlens=torch.tensor([[0, 7]], dtype=torch.int32)), ValueError, "cu_seqlens must be 1-D"),
    (dict(shift=torch.randn(2, 4)), ValueError, r"shift must be \(3, 4\)"),
    (dict(scale=torch.randn(3, 5)), ValueError, r"scale must be \(3, 4\)"),
    (dict(shift=torch.randn(3, 4, dtype=torch.float64)), TypeError, "shift has dtype torch.float64 but x has"),
    (dict(x=torch.randn(7, 4).half()), TypeError, "shift has dtype torch.float32 but x has torch.float16"),
    (dict(x=torch.randint(0, 3, (7, 4))), TypeError, "x must be float16, bfloat16, float32 or float64"),
    (dict(x=torch.randn(1, 7, 4)), ValueError, "x must have 2 dimensions"),
    (dict(shift=[[0.0] * 4] * 3), TypeError, "shift must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("override,exc,msg", BAD)
def test_adaln_modulate_rejects_bad_input(backend, override, exc, msg):
    args = {**_good(), **override}
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=msg):
        adaln_modulate(args["x"], args["shift"], args["scale"], args["cu_seqlens"], backend=backend)
    assert all(torch.equal(args[k], v) for k, v in before.items())


@pytest.mark.parametrize("eps,exc", [(-1.0, ValueError), (float("nan"), ValueError), ("0.1", TypeError)])
def test_adaln_modulate_rejects_bad_eps(eps, exc):
    g = _good()
    with pytest.raises(exc, match="eps must be"):
        adaln_modulate(g["x"], g["shift"], g["scale"], g["cu_seqlens"], eps=eps, backend="cpu")


def test_dense_layout_rejects_batch_mismatch_and_packed_x_without_offsets():
    with pytest.raises(ValueError, match=r"shift must be \(2, 4\)"):
        adaln_modulate(torch.randn(2, 5, 4), torch.randn(3, 4), torch.randn(3, 4), backend="cpu")
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        adaln_modulate(torch.randn(7, 4), torch.randn(3, 4), torch.randn(3, 4), backend="cpu")


def test_gated_residual_rejects_bad_input():
    g = _good()
    x, cu = g["x"], g["cu_seqlens"]
    with pytest.raises(ValueError, match="y must have x's shape"):
        gated_residual(x, torch.randn(7, 5), torch.randn(3, 4), cu, backend="cpu")
    with pytest.raises(TypeError, match="y has dtype torch.float16 but x has"):
        gated_residual(x, torch.randn(7, 4).half(), torch.randn(3, 4), cu, backend="cpu")
    with pytest.raises(ValueError, match=r"gate must be \(3, 4\)"):
        gated_residual(x, torch.randn(7, 4), torch.randn(4, 4), cu, backend="cpu")
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        gated_residual(x, torch.randn(7, 4), torch.randn(3, 4), cu.long(), backend="cpu")


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only error path")
def test_cuda_backend_on_cpu_tensors_is_rejected():
    g = _good()
    with pytest.raises(ValueError, match="backend 'cuda' runs on cuda tensors"):
        adaln_modulate(g["x"], g["shift"], g["scale"], g["cu_seqlens"], backend="cuda")


def test_tolerances_cover_all_dtypes():
    assert set(DTYPES) <= set(TOLERANCES)


# ---- numerical stability ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layernorm_of_constant_rows(backend):
    x = torch.full((10, 64), 3.25)
    shift, scale = torch.randn(2, 64), torch.randn(2, 64)
    out = adaln_modulate(x, shift, scale, cu_seqlens_of([4, 6]), backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.cat([shift[:1].expand(4, 64), shift[1:].expand(6, 64)]))
