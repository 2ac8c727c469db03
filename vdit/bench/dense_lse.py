"""The dense-attention lse check (benchmarks/gpu_dense_lse_check.py): every installed ``varlen_attention``
kernel, with ``return_lse=True``, against vdit's fp32 reference (the ``torch`` backend), on cases that pin
down what vdit's contract says and an external kernel may read otherwise: lse (Hq, total_q) in natural-log
units, -inf for a query that sees no key (and output 0), and the causal mask aligned to the bottom-right
corner when Lq != Lk (query i sees keys j <= i + Lk - Lq).

Each kernel that offers the backward from a given output and lse (ring attention's building block,
``varlen_attention_backward``) is checked the way the ring uses it (:func:`check_backward`): the keys of each
case split in two halves, each half's gradients computed from the reference output and lse merged over all
keys, dq summed over the halves and dk / dv put together, against the reference gradients.

An external kernel (flash-attn, torch-varlen) that disagrees, forward or backward, goes into a quarantine file
(:func:`quarantine`, read by :func:`vdit.kernels.external.quarantined` under ``VDIT_KERNEL_QUARANTINE``):
dispatch then treats it as not installed until vdit adapts to it. vdit's own kernels are not quarantined:
a disagreement there is a vdit bug, and the check fails.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Sequence

import torch

from vdit.bench.accuracy import installed_kernels, mismatch, tolerance
from vdit.kernels import external
from vdit.ops import varlen_attention
from vdit.ops.attention import varlen_attention_backward
from vdit.packing import cu_seqlens_from_lengths

EXTERNAL = ("flash-attn", "torch-varlen")


@dataclasses.dataclass(frozen=True)
class LseCase:
    """One packed batch: per-sequence query and key lengths, (Hq, Hk), head dim, causal."""

    name: str
    lengths_q: tuple
    lengths_k: tuple
    heads: tuple = (4, 4)
    head_dim: int = 64
    causal: bool = False


CASES = (
    LseCase("self", (37, 200, 1, 129), (37, 200, 1, 129), head_dim=128),
    LseCase("self causal gqa", (37, 200, 1, 129), (37, 200, 1, 129), heads=(8, 2), causal=True),
    LseCase("cross Lq != Lk", (37, 100, 64), (80, 150, 20)),
    LseCase("causal Lq < Lk", (37, 100, 64), (80, 150, 65), causal=True),
    LseCase("causal Lq > Lk (rows see no key)", (120, 64, 33), (50, 64, 1), causal=True, head_dim=128),
)
# Small enough for CPU kernels and the Triton interpreter (tests).
TINY_CASES = (
    LseCase("causal Lq < Lk", (5, 9), (8, 12), heads=(2, 1), head_dim=16, causal=True),
    LseCase("causal Lq > Lk", (9, 4), (3, 4), heads=(2, 2), head_dim=16, causal=True),
)


def case_inputs(case: LseCase, dtype: torch.dtype, device, seed: int = 0):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of ``case``."""
    g = torch.Generator().manual_seed(seed)
    hq, hk = case.heads
    q = torch.randn(sum(case.lengths_q), hq, case.head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(sum(case.lengths_k), hk, case.head_dim, generator=g).to(device, dtype) for _ in range(2))
    return (q, k, v, cu_seqlens_from_lengths(case.lengths_q, device), cu_seqlens_from_lengths(case.lengths_k, device),
            max(case.lengths_q), max(case.lengths_k))


def lse_hint(got: torch.Tensor, expected: torch.Tensor, lengths_q: Sequence[int]) -> str:
    """A guess at the convention of an lse that disagrees with vdit's (Hq, total_q) natural-log one."""
    heads, total = expected.shape
    shape = tuple(got.shape)
    if shape == (total, heads):
        return "transposed: (total_q, Hq)"
    if shape == (len(lengths_q), heads, max(lengths_q, default=0)):
        return "padded: (B, Hq, max_seqlen_q)"
    if shape != (heads, total):
        return f"layout {shape}"
    finite = torch.isfinite(expected) & torch.isfinite(got)
    if bool(finite.any()) and mismatch(got[finite] * math.log(2), expected[finite], tolerance(got.dtype, "lse")) \
            is None:
        return "log2 units"
    return "values differ"


def check_kernel(run: Callable, cases: Sequence[LseCase], dtypes: Sequence[torch.dtype], device) -> list[str]:
    """The problems of ``run(q, k, v, cu_q, cu_k, max_q, max_k, causal) -> (out, lse)`` against the reference
    on every case and dtype, one string each ([] when it agrees)."""
    problems = []
    for dtype in dtypes:
        for case in cases:
            q, k, v, cu_q, cu_k, max_q, max_k = args = case_inputs(case, dtype, device)
            out, lse = varlen_attention(*(t.float() for t in (q, k, v)), cu_q, cu_k, max_q, max_k,  # the oracle
                                        causal=case.causal, backend="torch", return_lse=True)
            label = f"{case.name} {str(dtype).replace('torch.', '')}"
            try:
                got_out, got_lse = run(*args, case.causal)
            except Exception as exc:  # a kernel that refuses a case vdit's contract allows disagrees too
                problems.append(f"{label}: raised {type(exc).__name__}: {str(exc)[:120]}")
                continue
            why = mismatch(got_out, out, tolerance(dtype, "out"))
            if why:
                problems.append(f"{label}: out {why}")
            why = mismatch(got_lse, lse, tolerance(dtype, "lse"))
            if why:
                problems.append(f"{label}: lse {why} ({lse_hint(got_lse, lse, case.lengths_q)})")
    return problems


def vdit_run(backend: str) -> Callable:
    """``run`` for :func:`check_kernel`: vdit's ``varlen_attention`` on ``backend`` with ``return_lse``."""
    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, backend=backend, return_lse=True)

    return run


def key_halves(case: LseCase) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each sequence's keys split in two: (the first half's lengths, the second's). In a causal case the first
    half holds only keys every query of its sequence sees (at most Lk - Lq + 1, none when Lq > Lk), as the
    blocks before a ring rank's own do, so it runs unmasked; the second keeps the bottom-right aligned mask,
    which is the whole sequence's mask there."""
    first = [lk // 2 if not case.causal else max(0, min(lk // 2, lk - lq + 1))
             for lq, lk in zip(case.lengths_q, case.lengths_k)]
    return tuple(first), tuple(lk - a for lk, a in zip(case.lengths_k, first))


def split_backward(run: Callable, case: LseCase, dout, q, k, v, out, lse, cu_q, max_q):
    """(dq, dk, dv) in float32 from ``run(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal)`` called on
    each half of the keys (:func:`key_halves`) with the merged ``out`` / ``lse`` over all keys, as ring attention
    calls it: dq summed over the halves, each half's dk / dv put back in place."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))
    starts = [0, *itertools.accumulate(case.lengths_k)][:-1]
    first, second = key_halves(case)
    for lengths, skips, causal in ((first, (0,) * len(first), False), (second, first, case.causal)):
        if not sum(lengths):  # no key in this half: the ring skips such a pair
            continue
        index = torch.tensor([s + skip + j for s, skip, n in zip(starts, skips, lengths) for j in range(n)],
                             device=k.device)
        dq_b, dk_b, dv_b = run(dout, q, k[index], v[index], out, lse, cu_q,
                               cu_seqlens_from_lengths(lengths, k.device), max_q, max(lengths), causal)
        dq += dq_b.float()
        dk[index], dv[index] = dk_b.float(), dv_b.float()
    return dq, dk, dv


def check_backward(run: Callable, cases: Sequence[LseCase], dtypes: Sequence[torch.dtype], device) -> list[str]:
    """The problems of the backward from a given output and lse, ``run(dout, q, k, v, out, lse, cu_q, cu_k, max_q,
    max_k, causal) -> (dq, dk, dv)``, run over two halves of the keys (:func:`split_backward`) against the
    reference gradients, on every case and dtype, one string each naming the backward ([] when it agrees)."""
    problems = []
    for dtype in dtypes:
        for case in cases:
            q, k, v, cu_q, cu_k, max_q, max_k = case_inputs(case, dtype, device)
            dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            out, lse = varlen_attention(*(t.float() for t in (q, k, v)), cu_q, cu_k, max_q, max_k,  # the oracle
                                        causal=case.causal, backend="torch", return_lse=True)
            out = out.to(dtype)  # as the ring passes it: in the inputs' dtype, lse in float32
            expected = varlen_attention_backward(*(t.float() for t in (dout, q, k, v, out)), lse, cu_q, cu_k,
                                                 softmax_scale=case.head_dim ** -0.5, causal=case.causal,
                                                 backend="torch")  # the oracle, through the op
            label = f"{case.name} {str(dtype).replace('torch.', '')}: backward from merged (out, lse)"
            try:
                got = split_backward(run, case, dout, q, k, v, out, lse, cu_q, max_q)
            except Exception as exc:  # a kernel that refuses a case vdit's contract allows disagrees too
                problems.append(f"{label} raised {type(exc).__name__}: {str(exc)[:120]}")
                continue
            for name, g, e in zip(("dq", "dk", "dv"), got, expected):
                why = mismatch(g, e, tolerance(dtype, "grad"))
                if why:
                    problems.append(f"{label}: {name} {why}")
    return problems


def vdit_backward_run(backend: str) -> Callable:
    """``run`` for :func:`check_backward`: vdit's ``varlen_attention_backward`` on ``backend``."""
    def run(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal):
        return varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=causal,
                                         backend=backend)

    return run


def check_installed(device, dtypes: Sequence[torch.dtype], cases: Sequence[LseCase] = CASES,
                    kernels: Sequence[str] | None = None, backward: bool = False) -> dict[str, list[str] | str]:
    """{kernel: its problems ([] agrees), or why it is not installed (a str)} for ``kernels`` (default: every
    kernel varlen_attention declares), each run through vdit on every dtype it takes; with ``backward``, the
    same for the backward from a given output and lse (:func:`check_backward`) of the kernels that offer it."""
    results = {}
    for dtype in dtypes:
        features = dict(backward=True) if backward else dict(lse=True)
        available = installed_kernels("varlen_attention", device, dtype, 64, causal=True, **features)
        for kernel, why in available.items():
            if kernels is not None and kernel not in kernels:
                continue
            if why is not None:
                results.setdefault(kernel, why)
                continue
            done = results.get(kernel)
            check, run = (check_backward, vdit_backward_run) if backward else (check_kernel, vdit_run)
            problems = check(run(kernel), cases, [dtype], device)
            results[kernel] = (done if isinstance(done, list) else []) + problems
    return results


def implementations(*results: dict[str, list[str] | str]) -> dict[str, str]:
    """{kernel: package and version} of the external kernels that ran in any of ``results`` (the key of their
    quarantine entries)."""
    return {k: external.implementation(k) for result in results for k, r in result.items()
            if k in EXTERNAL and isinstance(r, list)}


def quarantine(results: dict[str, list[str] | str], implementations: dict[str, str], device_name: str,
               backward: dict[str, list[str] | str] | None = None) -> dict:
    """The quarantine file's content: every external kernel with problems, forward (``results``) or backward
    from a given output and lse (``backward``, whose problems name it), keyed to its implementation."""
    entries = {}
    for result in (results, backward or {}):
        for kernel, problems in result.items():
            if kernel in EXTERNAL and isinstance(problems, list) and problems:
                entry = entries.setdefault(kernel, {"implementation": implementations[kernel], "problems": []})
                entry["problems"] += problems
    return {"written_by": "benchmarks/gpu_dense_lse_check.py", "device": device_name, "kernels": entries}


def write_quarantine(path: str, content: dict) -> None:
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def report(device_name: str, results: dict[str, list[str] | str], implementations: dict[str, str],
           quarantine_path: str, cases: Sequence[LseCase] = CASES,
           dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16),
           backward: dict[str, list[str] | str] | None = None) -> str:
    """Markdown: what was run, one row per kernel (agrees / disagrees / not installed; with ``backward``, a
    column for the backward from a given output and lse), then every problem."""
    names = " and ".join(str(d).replace("torch.", "") for d in dtypes)
    lines = [f"# Dense attention lse and causal alignment on {device_name}", "",
             f"Every varlen_attention kernel with return_lse=True against vdit's fp32 reference on {len(cases)} "
             f"cases ({', '.join(c.name for c in cases)}), {names}. External kernels that disagree are "
             f"listed in `{quarantine_path}`; with VDIT_KERNEL_QUARANTINE pointing to it, dispatch skips them."]
    if backward is None:
        lines += ["", "| kernel | implementation | result |", "|---|---|---|"]
    else:
        lines += ["", "Backward from merged (out, lse): varlen_attention_backward on the two halves of each case's "
                  "keys, given the output and lse over all keys (as ring attention calls it), against the "
                  "reference gradients.", "",
                  "| kernel | implementation | result | backward from merged (out, lse) |", "|---|---|---|---|"]
    for kernel, problems in results.items():
        row = f"| {kernel} | {implementations.get(kernel, 'vdit')} | {_verdict(kernel, problems)} |"
        if backward is not None:
            row += f" {_verdict(kernel, backward.get(kernel, 'not checked'))} |"
        lines.append(row)
    for kernel, problems in results.items():
        both = [p for p in (problems, (backward or {}).get(kernel)) if isinstance(p, list)]
        if any(both):
            lines += ["", f"{kernel}:", *(f"- {p}" for found in both for p in found)]
    return "\n".join(lines) + "\n"


def _verdict(kernel: str, problems: list[str] | str) -> str:
    if isinstance(problems, str):
        return f"not run: {problems}"
    verdict = "quarantined" if kernel in EXTERNAL else "FAILS (a vdit kernel: fix it)"
    return f"{verdict}: {len(problems)} problems" if problems else "agrees"
