"""Backend selection for vdit ops.

Backends (the ``backend=`` argument of every op):
    ``torch``   pure-PyTorch reference (``vdit.ops.reference``); any device.
    ``cpu``     C++ kernels (``vdit._C``); CPU tensors.
    ``cuda``    CUDA C++ kernels (``vdit._C`` built with CUDA); CUDA tensors.
    ``triton``  Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (tests).
    ``torch-varlen``, ``flash-attn``  attention kernels vdit calls but does not own (varlen_attention
                on CUDA: ``torch.nn.attention.varlen.varlen_attn``, flash-attn's varlen function).
    ``auto``    the first kernel in the op's declared order that runs on the tensors' device, is
                installed and covers the call (dtype, head dim, the op's rules); ``torch`` where none does.

The backend of a call is, by priority: the op's ``backend=`` argument when it is not ``"auto"``,
then the innermost :func:`use_backend` context, then the op's own ``VDIT_BACKEND_<OP>`` (e.g.
``VDIT_BACKEND_VARLEN_ATTENTION=flash-attn``, read at each call), then ``VDIT_BACKEND`` (read at
import), then auto.
A backend that is named explicitly must be built and applicable to the call, or the call raises
:class:`BackendUnavailableError` (not built), ``ValueError`` (wrong device or head dim) or
``TypeError`` (dtype). Each op's kernels and what they cover are declared once in its
``vdit/ops/<op>.py`` (see :mod:`vdit.ops._registry`); :func:`vdit.plan` shows the choice for a call.
This module sits below the ops: the registry reads it, and it imports nothing from :mod:`vdit.ops`.
"""
from __future__ import annotations

import contextlib
import os

# vdit's own backends, then kernels vdit dispatches to but does not own (see vdit.kernels.external).
# What each needs to be installed is its kernel family's business (vdit.ops._registry.Family).
BACKENDS = ("auto", "torch", "cpu", "cuda", "triton", "torch-varlen", "flash-attn")

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class BackendUnavailableError(RuntimeError):
    """The requested backend is not built or not installed in this environment."""


def check_name(name: str, what: str) -> str:
    """``name`` if it is one of :data:`BACKENDS`, else ValueError naming ``what``."""
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_ENV_BACKEND = check_name(os.environ.get("VDIT_BACKEND", "auto") or "auto", "VDIT_BACKEND")
# A plain list rather than a thread-local keeps the lookup traceable by torch.compile.
_stack: list[str] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed vdit ops on backend ``name`` (one of :data:`BACKENDS`).

    ``with vdit.use_backend("torch"): model(x)`` runs every op on its reference implementation.
    Per-call ``backend=`` arguments other than ``"auto"`` still take priority. Not thread-local.
    """
    _stack.append(check_name(name, "backend"))
    try:
        yield
    finally:
        _stack.pop()


def in_use_backend() -> bool:
    """Whether a :func:`use_backend` context is active."""
    return bool(_stack)


def default_backend() -> str:
    """The backend an op with ``backend="auto"`` uses before device-based choice."""
    return _stack[-1] if _stack else _ENV_BACKEND
