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

import vdit  # noqa: E402, F401  (loads the kernels after TRITON_INTERPRET is set)
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


def backends_of(op: str, *, reference: bool = False, device: str | None = None, interpreted: bool = True,
                with_device: bool = True) -> list:
    """pytest params ``(backend, device)`` of every vdit kernel declared for ``op`` (in ``vdit/ops/<op>.py``),
    so that a newly declared kernel is tested without editing a list.

    A kernel with CUDA among its devices runs on ``"cuda"`` (marked ``cuda``: skipped without a GPU), except
    that an interpreted one (``Kernel.interpreted``) runs on CPU tensors when there is no GPU. A kernel its
    family reports as not installed here is skipped with that reason. Kernels vdit calls but does not own
    (``family=None``: flash-attn, torch-varlen) are left out; they have their own GPU tests.

    Args:
        op: a declared op name (``vdit.ops._registry.OPS``).
        reference: also the pure-PyTorch reference (``"torch"``), on CPU, first.
        device: only the kernels that run on this device type here (``"cpu"`` or ``"cuda"``).
        interpreted: keep interpreted kernels on CPU (False: only the kernels built for CPU tensors).
        with_device: False for params of the backend name alone (tests that build CPU tensors).
    """
    from vdit.ops import _registry

    cases = [("torch", "cpu", [])] if reference else []
    for kernel in _registry.OPS[op].kernels:
        # Asked for CUDA kernels: every kernel built for CUDA tensors, marked (and so skipped without a GPU).
        on = "cuda" if device == "cuda" and "cuda" in kernel.devices else _test_device(kernel, interpreted)
        if kernel.family is None or on is None or (device is not None and on != device):
            continue
        marks = [pytest.mark.cuda] if on == "cuda" else []
        missing = kernel.not_installed(torch.device(on)) if (on == "cpu" or HAS_GPU) else None
        if missing is not None:
            marks.append(pytest.mark.skip(reason=f"{kernel.name}: {missing}"))
        cases.append((kernel.name, on, marks))
    return [pytest.param(*((name, on) if with_device else (name,)), id=name, marks=marks)
            for name, on, marks in cases]


def _test_device(kernel, interpreted: bool) -> str | None:
    """The device type the tests run ``kernel`` on here, or None."""
    if "cuda" in kernel.devices and (HAS_GPU or not kernel.interpreted):
        return "cuda"
    if "cpu" in kernel.devices or (kernel.interpreted and interpreted):
        return "cpu"
    return None


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_build(monkeypatch):
    """Pretend to be a CUDA build of torch (for the external kernels' availability checks), with their caches
    cleared before and after; yields ``monkeypatch``."""
    from vdit.kernels import external

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    caches = (external.torch_varlen_missing, external.flash_attn_version, external._flash_attn_module_missing,
              external._flash_attn_backward_missing)
    for cached in caches:
        cached.cache_clear()
    yield monkeypatch
    for cached in caches:
        cached.cache_clear()
