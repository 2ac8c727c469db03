"""Attention kernels vdit does not own, behind vdit's varlen call: PyTorch's ``varlen_attn`` and
flash-attn's ``flash_attn_varlen_func`` (FlashAttention-3 from ``flash_attn_interface`` if installed,
else FlashAttention-2 from ``flash_attn``).

Both take vdit's packed layout as it is: q (total_q, Hq, D), k / v (total_k, Hk, D), int32 cu_seqlens,
bottom-right aligned causal masks, grouped-query heads, and return lse (Hq, total_q) in float32. Both
are differentiable on their own (their backward is their own kernel), so a forward run here is never
paired with another family's backward. Both size their launch grids from ``max_seqlen``; the ops layer
checks it (eagerly, or with a device-side assertion under torch.compile) before calling them.

flash-attn's private varlen backward (:func:`flash_attention_backward`) is used only for ring attention's
backward from a given output and lse (``vdit.ops.attention.varlen_attention_backward``): it computes
P = exp(S * scale - lse) and dS = P * (dP - rowsum(dO * O)) from the ``out`` / ``lse`` it is given, so the
merged ones over all key blocks give each block's exact gradients.

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
# flash-attn's private backward from a given out and lse, per module: (function, the keywords vdit passes
# besides the causal flag). FA3's _flash_attn_backward has taken varlen offsets (and the spelling sequed_q /
# sequed_k) since its 2025-01 rewrite; its flag is `causal` until 2025-07, `is_causal` since. FA2's
# _flash_attn_varlen_backward takes window_size_left / _right from 2.7.0 on (a `window_size` pair before).
# Both write dq, dk, dv into the tensors passed (what they return differs between releases).
FLASH_ATTN_BACKWARDS = {
    "flash_attn_interface": ("_flash_attn_backward", (
        "cu_seqlens_q", "cu_seqlens_k", "sequed_q", "sequed_k", "max_seqlen_q", "max_seqlen_k", "dq", "dk", "dv",
        "softmax_scale", "deterministic")),
    "flash_attn": ("_flash_attn_varlen_backward", (
        "dq", "dk", "dv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
        "softmax_scale", "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic")),
}
CAUSAL_KEYWORDS = ("is_causal", "causal")
QUARANTINE_ENV = "VDIT_KERNEL_QUARANTINE"


def missing_keywords(fn, keywords) -> list[str]:
    """The ``keywords`` that ``fn``'s signature does not accept ([] when it takes ``**kwargs`` or has no
    inspectable signature: then the call itself is the test)."""
    # torch.library.custom_op wraps a function in a CustomOpDef whose own signature is (*args, **kwargs);
    # its _init_fn is the function as written (flash-attn's private functions are such ops on torch 2.4+).
    fn = getattr(fn, "_init_fn", fn)
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


def flash_attn_backward_missing() -> str | None:
    """Why the flash-attn kernel cannot run the backward from a given output and lse, or None. It runs in the
    module the forward uses (:func:`flash_attn_version`), so a quarantine of that module holds for both."""
    version = flash_attn_version()
    if version is None:
        return flash_attn_missing() or "not installed"
    return _flash_attn_backward_missing(_flash_attn_module(version))


@functools.cache
def _flash_attn_backward_missing(module: str) -> str | None:
    name, keywords = FLASH_ATTN_BACKWARDS[module]
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except Exception as exc:  # as in _flash_attn_module_missing: installed but not importable here
        return f"{module} does not import ({type(exc).__name__})"
    if fn is None:
        return f"{module} has no {name} (its backward from a given output and lse)"
    missing = missing_keywords(fn, keywords)
    if _causal_keyword(fn) is None:
        missing.append(" / ".join(CAUSAL_KEYWORDS))
    if missing:
        return f"{module}.{name} takes no {', '.join(missing)} (vdit passes them)"
    return None


def _causal_keyword(fn) -> str | None:
    """The name ``fn`` gives its causal flag (the first of CAUSAL_KEYWORDS it takes), or None."""
    return next((k for k in CAUSAL_KEYWORDS if not missing_keywords(fn, (k,))), None)


def _flash_attn_module(version: int) -> str:
    return "flash_attn_interface" if version == 3 else "flash_attn"


def implementation(kernel: str) -> str:
    """What runs the external ``kernel`` ("torch-varlen", "flash-attn") here, with its version, e.g.
    ``"torch 2.14.0+cu130"`` or ``"flash_attn_interface 3.0.0"``: the key of a quarantine entry."""
    if kernel == "torch-varlen":
        return f"torch {torch.__version__}"
    if kernel == "flash-attn":
        return _module_implementation(_flash_attn_module(flash_attn_version()))
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
    module = importlib.import_module(_flash_attn_module(flash_attn_version()))
    result = module.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                                           return_attn_probs=True)
    # FA2 returns (out, lse, probs); FA3 releases return (out, lse) or (out, lse, ...).
    return result[0], result[1]


def flash_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                             max_seqlen_k: int, softmax_scale: float, causal: bool, deterministic: bool):
    """(dq, dk, dv) from a given ``out`` and ``lse`` by flash-attn's private varlen backward (usable when
    :func:`flash_attn_backward_missing` is None).

    Args:
        dout, q, out: (total_q, Hq, D) float16 / bfloat16, contiguous; k, v: (total_k, Hk, D), Hq % Hk == 0,
            D a multiple of 8 (the private function does not pad, as flash_attn_varlen_func does).
        lse: (Hq, total_q) float32, contiguous: FA3 reads it by pointer without checking its shape. -inf
            for a query that sees no key is fine: both subtract 0 in place of an infinite lse, and every
            score of such a row is masked.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,); max_seqlen_q, max_seqlen_k: the longest sequences.
        softmax_scale, causal (bottom-right aligned), deterministic: as for the forward.
    Returns:
        dq (total_q, Hq, D), dk, dv (total_k, Hk, D) in the dtypes of q, k, v; dk and dv summed over the
        query heads of each key head.
    """
    module = _flash_attn_module(flash_attn_version())
    fn = getattr(importlib.import_module(module), FLASH_ATTN_BACKWARDS[module][0])
    # Both write every row, zeros for queries (keys) of a sequence without keys (queries), as their own
    # autograd relies on.
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    keywords = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                    max_seqlen_k=max_seqlen_k, dq=dq, dk=dk, dv=dv, softmax_scale=softmax_scale,
                    deterministic=deterministic, **{_causal_keyword(fn): causal})
    if module == "flash_attn_interface":
        keywords.update(sequed_q=None, sequed_k=None)  # required (no default) in the 2025-07 releases
    else:  # all required in FA2: no dropout (so its rng_state is unused), window, softcap or ALiBi
        keywords.update(dropout_p=0.0, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None)
    # dout, q, k, v, out, softmax_lse lead in this order in every release of both.
    fn(dout, q, k, v, out, lse, **keywords)
    return dq, dk, dv
