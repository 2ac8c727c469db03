"""The AdaLNModulation module (vdit/nn/adaln.py): adaLN-Zero start, the SiLU + Linear projection split
into chunks, and the chunks feeding the fused adaln_modulate / gated_residual ops with gradients
reaching the projection. The ops themselves are tested in tests/ops/test_adaln.py."""
import torch

from tests.conftest import assert_close, cu_seqlens_of
from vdit.nn import AdaLNModulation
from vdit.ops import adaln_modulate, gated_residual, reference


def test_adaln_modulation_module():
    torch.manual_seed(0)
    mod = AdaLNModulation(cond_dim=10, hidden_size=8, chunks=6)
    assert set(mod.state_dict()) == {"linear.weight", "linear.bias"}
    c = torch.randn(3, 10)
    chunks = mod(c)
    assert len(chunks) == 6 and all(t.shape == (3, 8) for t in chunks)
    assert all(torch.equal(t, torch.zeros(3, 8)) for t in chunks)  # adaLN-Zero start

    with torch.no_grad():
        mod.linear.weight.normal_()
        mod.linear.bias.normal_()
    chunks = mod(c)
    expected = torch.nn.functional.linear(torch.nn.functional.silu(c), mod.linear.weight, mod.linear.bias)
    for i, t in enumerate(chunks):
        assert_close(t, expected[:, 8 * i:8 * (i + 1)])

    # The chunks feed the fused ops directly (non-contiguous views) and gradients reach the projection.
    shift, scale, gate = chunks[:3]
    x = torch.randn(11, 8)
    cu = cu_seqlens_of([4, 0, 7])
    out = gated_residual(x, adaln_modulate(x, shift, scale, cu, backend="cpu"), gate, cu, backend="cpu")
    ref = reference.gated_residual(x, reference.adaln_modulate(x, shift, scale, cu), gate, cu)
    assert_close(out, ref)
    out.square().sum().backward()
    assert mod.linear.weight.grad is not None and mod.linear.weight.grad[: 3 * 8].abs().sum() > 0
    assert torch.equal(mod.linear.weight.grad[3 * 8:], torch.zeros(3 * 8, 10))  # chunks 3..5 unused
