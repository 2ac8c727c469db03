"""The C++ adaLN kernel (csrc/adaln) called directly, without the op's Python checks: the compiled
operator re-checks its offsets itself. The op contract is tested in tests/ops/test_adaln.py."""
import pytest
import torch

from tests.conftest import cu_seqlens_of


def _good():
    """The valid inputs of tests/ops/test_adaln.py's bad-input tests."""
    x = torch.randn(7, 4)
    return dict(x=x, shift=torch.randn(3, 4), scale=torch.randn(3, 4), cu_seqlens=cu_seqlens_of([2, 0, 5]))


def test_kernel_rejects_inconsistent_offsets_without_python_checks():
    """The compiled op re-checks offsets on the CPU, so it never reads past x."""
    g = _good()
    bad = torch.tensor([0, 2, 2, 9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.vdit.adaln_modulate(g["x"], g["shift"], g["scale"], bad, 1e-6)
