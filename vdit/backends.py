"""Backend selection for vdit ops.

Backends:
    ``torch``   pure-PyTorch reference (``vdit.ops.reference``); any device.
    ``cpu``     C++ kernels (``vdit._C``); CPU tensors.
    ``cuda``    CUDA C++ kernels (``vdit._C`` built with CUDA); CUDA tensors.
    ``triton``  Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (tests).
    ``auto``    the fastest kernel the op has for the tensors' device, in the op's order of
                preference; ``torch`` only when the op has no kernel for that device.

The backend of a call is, by priority: the op's ``backend=`` argument when it is not ``"auto"``,
then the innermost :func:`use_backend` context, then ``VDIT_BACKEND`` (read at import), then auto.
A backend that is named explicitly must be built and applicable to the tensors' device, or the
call raises :class:`BackendUnavailableError` (not built) or ``ValueError`` (wrong device).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence

import torch

from vdit._extension import HAS_CPU_KERNELS, HAS_CUDA_KERNELS, HAS_TRITON, LOAD_ERROR

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class BackendUnavailableError(RuntimeError):
    """The requested backend is not built or not installed in this environment."""


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_ENV_BACKEND = _check_name(os.environ.get("VDIT_BACKEND", "auto") or "auto", "VDIT_BACKEND")
# A plain list rather than a thread-local keeps the lookup traceable by torch.compile.
_stack: list[str] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed vdit ops on backend ``name`` (one of :data:`BACKENDS`).

    ``with vdit.use_backend("torch"): model(x)`` runs every op on its reference implementation.
    Per-call ``backend=`` arguments other than ``"auto"`` still take priority. Not thread-local.
    """
    _stack.append(_check_name(name, "backend"))
    try:
        yield
    finally:
        _stack.pop()


def default_backend() -> str:
    """The backend an op with ``backend="auto"`` uses before device-based choice."""
    return _stack[-1] if _stack else _ENV_BACKEND


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` in this install, or None if it can."""
    if backend in ("cpu", "cuda") and not HAS_CPU_KERNELS:
        return LOAD_ERROR
    if backend == "cuda" and not HAS_CUDA_KERNELS:
        return "vdit was built without CUDA kernels (see vdit.build_info(); rebuild with VDIT_BUILD_CUDA=1)"
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not TRITON_INTERPRET:
            return "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing vdit)"
    return None


_DEVICE_OF_BACKEND = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu"), "torch": None}


def select_backend(op: str, kernels: Sequence[str], device: torch.device, backend: str = "auto") -> str:
    """Choose the backend for one call of ``op``.

    Args:
        op: op name, for messages.
        kernels: the op's kernel backends in order of preference for auto (e.g. ``("cuda", "triton",
            "cpu")``); ``torch`` is always available.
        device: the device of the op's tensors.
        backend: the per-call request.
    Returns:
        One of ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
    """
    requested = _check_name(backend, "backend")
    if requested == "auto":
        requested = default_backend()
    if requested == "torch":
        return requested
    if requested != "auto":
        if requested not in kernels:
            raise BackendUnavailableError(f"{op} has no {requested!r} kernel; it has {('torch', *kernels)}")
        allowed = _DEVICE_OF_BACKEND[requested]
        if device.type not in allowed:
            raise ValueError(f"{op}: backend {requested!r} runs on {' or '.join(allowed)} tensors, "
                             f"got tensors on {device}")
        reason = _unavailable_reason(requested, device)
        if reason:
            raise BackendUnavailableError(f"{op}: backend {requested!r} is unavailable: {reason}")
        return requested
    # auto: the op's kernels that belong to this device (Triton on CPU only by explicit request).
    native = [k for k in kernels if device.type in _DEVICE_OF_BACKEND[k] and not (k == "triton" and device.type == "cpu")]
    for k in native:
        if _unavailable_reason(k, device) is None:
            return k
    if native:
        _warn_fallback(op, native, device)
    return "torch"


_warned: set[tuple[str, str]] = set()


def _warn_fallback(op: str, native: list[str], device: torch.device) -> None:
    key = (op, device.type)
    if key not in _warned:
        _warned.add(key)
        reasons = "; ".join(f"{k}: {_unavailable_reason(k, device)}" for k in native)
        warnings.warn(f"vdit: {op} on {device.type} falls back to the torch reference ({reasons})", stacklevel=3)
