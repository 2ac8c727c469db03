"""What the GPU checks share: per-dtype tolerances against vdit's fp32 reference, the comparison of one tensor,
and the kernels of an op that are installed here (the registry's answer, through :func:`vdit.ops.plan`).

The tolerances follow the test suite's (tests/conftest.py ``TOLERANCES``, scaled as tests/ops scale them for
attention): outputs at twice the dtype's base tolerance, gradients at eight times (they sum over a sequence
and go through a rounded probability matrix), lse at 1e-3 (numerical noise is ~1e-6 in fp32; a wrong
convention, a log2 lse or a misaligned causal mask, is off by O(1)).
"""
from __future__ import annotations

import torch

from vdit.backends import BackendUnavailableError
from vdit.ops import plan
from vdit.ops._registry import OPS

BASE_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}
SCALE = {"out": 2.0, "grad": 8.0}
LSE_TOLERANCE = 1e-3


def tolerance(dtype: torch.dtype, what: str) -> float:
    """rtol = atol for ``what`` ("out", "grad", "lse") of a kernel run in ``dtype``."""
    if what == "lse":
        return LSE_TOLERANCE
    if what not in SCALE:
        raise ValueError(f"what must be 'out', 'grad' or 'lse', got {what!r}")
    if dtype not in BASE_TOLERANCE:
        raise ValueError(f"dtype must be a float dtype, got {dtype}")
    return BASE_TOLERANCE[dtype] * SCALE[what]


def mismatch(got: torch.Tensor, expected: torch.Tensor, tol: float) -> str | None:
    """Why ``got`` differs from ``expected`` (any shapes) beyond |got - expected| <= tol * (1 + |expected|),
    or None. -inf must match -inf exactly (a query that sees no key); NaN never matches."""
    if tuple(got.shape) != tuple(expected.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(got).any():
        return f"{int(torch.isnan(got).sum())} NaN"
    inf_got, inf_expected = torch.isinf(got), torch.isinf(expected)
    if not torch.equal(inf_got, inf_expected) or not torch.equal(got[inf_got], expected[inf_expected]):
        return f"infinities at {int((inf_got != inf_expected).sum())} other places"
    finite = ~inf_expected
    error = (got[finite] - expected[finite]).abs()
    bound = tol * (1 + expected[finite].abs())
    if bool((error > bound).any()):
        worst = int((error - bound).argmax())
        return f"max |err| {float(error.max()):.3g} (at {float(expected[finite][worst]):.3g}, tol {tol:g})"
    return None


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| over the places where both are finite (0 for none)."""
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(got) & torch.isfinite(expected)
    return float((got[finite] - expected[finite]).abs().max()) if bool(finite.any()) else 0.0


def installed_kernels(op: str, device: torch.device | str, dtype: torch.dtype, head_dim: int,
                      **features) -> dict[str, str | None]:
    """{kernel: None if it runs such a call here, else why not}, for every kernel ``op`` declares, in the
    op's order: what :func:`vdit.ops.plan` says for each kernel named explicitly."""
    out = {}
    for kernel in OPS[op].kernels:
        try:
            plan(op, device=device, dtype=dtype, head_dim=head_dim, backend=kernel.name, **features)
            out[kernel.name] = None
        except (BackendUnavailableError, ValueError, TypeError) as exc:
            out[kernel.name] = str(exc)
    return out
