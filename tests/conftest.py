"""Shared test setup: seeded RNG, per-dtype tolerances, ragged-batch generator, device markers,
Triton under the interpreter on machines without a GPU, and NaN-poisoned kernel outputs."""
from __future__ import annotations

import os
import random

# Triton reads TRITON_INTERPRET when kernels are defined, so it must be set before vdit imports
# triton. Without a GPU, Triton kernels run on CPU tensors in the interpreter.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import vdit  # noqa: E402
from vdit._memory import poison_outputs  # noqa: E402

HAS_GPU = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (rtol, atol) for comparing an op's output in `dtype` with the float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """Compare with the per-dtype tolerance (of ``dtype`` or actual's dtype), scaled by ``scale``."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol * scale, atol=atol * scale)


def reordered_sum_tolerance(dtype: torch.dtype, length: int, *, layers: int = 1) -> dict:
    """``rtol`` / ``atol`` for comparing two computations in ``dtype`` that add the same ``length`` terms
    in different orders (tiles against raster order, AVX2 against AVX-512 vector widths, packed
    against alone), repeated through ``layers`` stacked reductions.

    Each order's rounding error is at most ``(length - 1) * eps`` relative to the terms' magnitudes
    (the first-order bound of recursive summation), so two orders differ by at most twice that, and
    stacked layers add their errors. A fixed 1e-5 holds for small sums on one CPU and fails on another.
    """
    tol = 2 * max(length - 1, 1) * layers * torch.finfo(dtype).eps
    return dict(rtol=tol, atol=tol)


def ragged_lengths(rng: random.Random, batch: int, max_len: int, *, allow_empty: bool = True) -> list[int]:
    """Sequence lengths for a ragged batch: always includes a length-1 sequence and, if allowed, an empty one."""
    lengths = [rng.randint(1, max_len) for _ in range(batch)]
    lengths[0] = 1
    if allow_empty and batch > 2:
        lengths[1] = 0
    rng.shuffle(lengths)
    return lengths


def cu_seqlens_of(lengths, device="cpu") -> torch.Tensor:
    """int32 (B + 1,) prefix sums of ``lengths``."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Every test starts from the same seeds, with kernel outputs poisoned (NaN-filled)."""
    random.seed(0)
    torch.manual_seed(0)
    with poison_outputs(True):
        yield


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


def kernel_backends() -> list:
    """(backend, device) pairs that can run here; GPU ones are marked `cuda`."""
    cases = [pytest.param("cpu", "cpu", id="cpu")]
    cases.append(pytest.param("triton", "cuda" if HAS_GPU else "cpu", id="triton"))
    cases.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda))
    return cases


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
