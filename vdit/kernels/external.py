"""Attention kernels vdit does not own, behind vdit's varlen call: PyTorch's ``varlen_attn`` and
flash-attn's ``flash_attn_varlen_func`` (FlashAttention-3 from ``flash_attn_interface`` if installed,
else FlashAttention-2 from ``flash_attn``).

Both take vdit's packed layout as it is: q (total_q, Hq, D), k / v (total_k, Hk, D), int32 cu_seqlens,
bottom-right aligned causal masks, grouped-query heads, and return lse (Hq, total_q) in float32. Both
are differentiable on their own (their backward is their own kernel), so a forward run here is never
paired with another family's backward. Both size their launch grids from ``max_seqlen``; the ops layer
checks it (eagerly, or with a device-side assertion under torch.compile) before calling them.

Nothing here is importable without CUDA builds of the packages, and nothing runs on a CPU; the
availability functions say why a kernel cannot be used, for :func:`vdit.plan`.

Quarantine: ``benchmarks/gpu_dense_lse_check.py`` runs each external kernel against vdit's reference (output,
lse, bottom-right causal alignment) on a GPU and writes a JSON file naming the implementations that disagree
(``{"kernels": {"torch-varlen": {"implementation": "torch 2.14.0", "problems": [...]}}}``). With
``VDIT_KERNEL_QUARANTINE=<that file>`` a listed kernel counts as not installed, so auto skips it and naming it
raises, until vdit adapts to it. An entry holds for the exact implementation (package and version) it
names: an upgrade lifts it, and the check must then run again. Read once per process.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
from collections.abc import Callable

import torch

# The keywords vdit passes to each external kernel. Older releases lack some (torch 2.9 / 2.10's varlen_attn
# has is_causal instead of scale / window_size / enable_gqa; early FA3 builds have no return_attn_probs), and a
# call with them would raise TypeError on every dense attention, so such a release is not offered at all.
TORCH_VARLEN_KEYWORDS = ("return_aux", "scale", "window_size", "enable_gqa")
FLASH_ATTN_KEYWORDS = ("softmax_scale", "causal", "deterministic", "return_attn_probs")
QUARANTINE_ENV = "VDIT_KERNEL_QUARANTINE"


def missing_keywords(fn, keywords) -> list[str]:
    """The ``keywords`` that ``fn``'s signature does not accept ([] when it takes ``**kwargs`` or has no
    inspectable signature: then the call itself is the test)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    return [k for k in keywords if k not in parameters]


@functools.cache
def torch_varlen_missing() -> str | None:
    """Why ``torch.nn.attention.varlen.varlen_attn`` cannot be used, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (added in 2.9)"
    from torch.nn.attention.varlen import varlen_attn

    missing = missing_keywords(varlen_attn, TORCH_VARLEN_KEYWORDS)
    if missing:
        return f"torch {torch.__version__}'s varlen_attn takes no {', '.join(missing)} (vdit passes them)"
    return quarantined("torch-varlen", lambda: implementation("torch-varlen"))


@functools.cache
def flash_attn_version() -> int | None:
    """3 when FlashAttention-3 (``flash_attn_interface``) imports, 2 for ``flash_attn``, else None. A build
    whose ``flash_attn_varlen_func`` lacks a keyword vdit passes counts as not installed
    (:func:`flash_attn_missing` says why)."""
    for module, version in (("flash_attn_interface", 3), ("flash_attn", 2)):
        if _flash_attn_module_missing(module) is None:
            return version
    return None


def flash_attn_missing() -> str | None:
    """Why neither flash-attn module can be used, or None."""
    reasons = [r for r in map(_flash_attn_module_missing, ("flash_attn_interface", "flash_attn")) if r]
    if len(reasons) < 2:
        return None
    found = [r for r in reasons if not r.endswith("not installed")]
    return "; ".join(found) if found else "not installed (pip install flash-attn)"


@functools.cache
def _flash_attn_module_missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} not installed"
    try:
        fn = importlib.import_module(module).flash_attn_varlen_func
    except Exception as exc:  # installed but built for another torch / CUDA: not usable
        return f"{module} does not import ({type(exc).__name__})"
    missing = missing_keywords(fn, FLASH_ATTN_KEYWORDS)
    if missing:
        return f"{module}.flash_attn_varlen_func takes no {', '.join(missing)} (vdit passes them)"
    return quarantined("flash-attn", lambda: _module_implementation(module))


def implementation(kernel: str) -> str:
    """What runs the external ``kernel`` ("torch-varlen", "flash-attn") here, with its version, e.g.
    ``"torch 2.14.0+cu130"`` or ``"flash_attn_interface 3.0.0"``: the key of a quarantine entry."""
    if kernel == "torch-varlen":
        return f"torch {torch.__version__}"
    if kernel == "flash-attn":
        return _module_implementation("flash_attn_interface" if flash_attn_version() == 3 else "flash_attn")
    raise ValueError(f"kernel must be 'torch-varlen' or 'flash-attn', got {kernel!r}")


def _module_implementation(module: str) -> str:
    version = getattr(importlib.import_module(module), "__version__", None) if importlib.util.find_spec(module) \
        else None
    if version is None:  # FlashAttention-3's flash_attn_interface has no __version__: ask its distribution
        dists = importlib.metadata.packages_distributions().get(module, [])
        version = importlib.metadata.version(dists[0]) if dists else "unknown"
    return f"{module} {version}"


def quarantined(kernel: str, implementation: Callable[[], str]) -> str | None:
    """Why ``kernel`` is excluded by the file ``$VDIT_KERNEL_QUARANTINE``, or None (no such variable or file,
    no entry for the kernel, or an entry for another implementation than ``implementation()``, called only
    when there is an entry)."""
    path = os.environ.get(QUARANTINE_ENV)
    if not path or not os.path.exists(path):
        return None
    entry = read_quarantine(path).get(kernel)
    if not entry or entry.get("implementation") != (installed := implementation()):
        return None
    problems = entry.get("problems") or ["no problem recorded"]
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return f"{installed} is quarantined by {path} ({problems[0]}{more})"


def read_quarantine(path: str) -> dict[str, dict]:
    """{kernel: {"implementation": ..., "problems": [...]}} of a quarantine file; ValueError naming
    VDIT_KERNEL_QUARANTINE when it is not one."""
    try:
        with open(path) as f:
            kernels = json.load(f)["kernels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{QUARANTINE_ENV}={path} is not a quarantine file: {type(exc).__name__}: {exc}") from None
    if not isinstance(kernels, dict) or not all(isinstance(e, dict) for e in kernels.values()):
        raise ValueError(f"{QUARANTINE_ENV}={path}: 'kernels' must map kernel names to entries")
    return kernels


def torch_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float, causal: bool):
    """(out, lse) of :func:`torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 in-tree, cuDNN on
    sm_90 / sm_100 for fp16 / bf16 without GQA)."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       return_aux=AuxRequest(lse=True), scale=softmax_scale,
                       window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])


def flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float, causal: bool, deterministic: bool):
    """(out, lse) of flash-attn's ``flash_attn_varlen_func`` (version :func:`flash_attn_version`)."""
    module = importlib.import_module("flash_attn_interface" if flash_attn_version() == 3 else "flash_attn")
    result = module.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                                           return_attn_probs=True)
    # FA2 returns (out, lse, probs); FA3 releases return (out, lse) or (out, lse, ...).
    return result[0], result[1]
