"""Dense varlen attention on a GPU: every candidate kernel side by side, and whether the dispatch rule
(`vdit.plan`) picked the fastest.

Candidates: vdit's Triton kernel, `torch.nn.attention.varlen.varlen_attn` (torch-varlen), flash-attn's
varlen function (if installed) and a per-sequence `F.scaled_dot_product_attention` loop, forward and
forward + backward, bf16, on the packed video batch of bench_attention.py scaled to GPU size and on
uniform batches at head dims 64 and 128, causal and not. CUDA-event timing, median of 20 after warm-up.
Every candidate's output is checked against vdit's Triton output first.

    python benchmarks/gpu_attention.py --out benchmarks/results      # needs a GPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from vdit.bench.gpu_timing import REPS, WARMUP, cuda_times, slug, summarize
from vdit.ops import plan, varlen_attention

VIDEO_LENGTHS = [30 * 45 * 80 // 4, 21 * 30 * 52, 16 * 30 * 40, 9 * 24 * 32, 5 * 16 * 24]  # latent grids, patch 1x2x2
CANDIDATES = ("triton", "torch-varlen", "flash-attn", "sdpa-loop")


def cases():
    """(name, lengths, heads, head_dim, causal) of the workloads."""
    yield "packed videos", VIDEO_LENGTHS, 12, 128, False
    for head_dim in (64, 128):
        for causal in (False, True):
            yield f"8 x 4096 d{head_dim}", [4096] * 8, 16, head_dim, causal


def inputs(lengths, heads, head_dim, device="cuda", dtype=torch.bfloat16):
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(lengths, device=device).cumsum(0)
    return q, k, v, cu, max(lengths)


def sdpa_loop(q, k, v, lengths, causal):
    outs, start = [], 0
    for n in lengths:
        qi, ki, vi = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def run_fn(candidate, q, k, v, cu, max_len, lengths, causal):
    if candidate == "sdpa-loop":
        return lambda: sdpa_loop(q, k, v, lengths, causal)
    return lambda: varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal, backend=candidate)


def milliseconds(fn, backward: bool, reps: int = REPS) -> float:
    grad = None

    def step():
        nonlocal grad
        out = fn()
        if backward:
            grad = torch.ones_like(out) if grad is None else grad
            out.backward(grad)

    return summarize(cuda_times(step, WARMUP, reps))["median"]


def rule_verdict(times: dict[str, float], chosen: str) -> str:
    """'yes' if the rule's choice is the fastest vdit.ops candidate (within 5 %), else what was faster."""
    measured = {c: t for c, t in times.items() if c != "sdpa-loop" and t is not None}
    if chosen not in measured:
        return f"no ({chosen} not measured)"
    best = min(measured, key=measured.get)
    if measured[chosen] <= 1.05 * measured[best]:
        return "yes"
    return f"no: {best} {measured[chosen] / measured[best]:.2f}x faster"


def measure(name, lengths, heads, head_dim, causal) -> list[str]:
    q, k, v, cu, max_len = inputs(lengths, heads, head_dim)
    reference = varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal, backend="triton")
    chosen = plan("varlen_attention", device=q.device, dtype=q.dtype, head_dim=head_dim, causal=causal)[0]
    rows = []
    for backward in (False, True):
        times = {}
        for candidate in CANDIDATES:
            fn = run_fn(candidate, q, k, v, cu, max_len, lengths, causal)
            try:
                torch.testing.assert_close(fn().float(), reference.float(), rtol=2e-2, atol=2e-2)
                times[candidate] = milliseconds(fn, backward)
            except Exception as exc:  # not installed or not applicable: reported, not fatal
                times[candidate] = None
                print(f"  {name} {candidate}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        cells = " | ".join("-" if times[c] is None else f"{times[c]:.2f}" for c in CANDIDATES)
        mode = "fwd+bwd" if backward else "fwd"
        label = name + (" causal" if causal else "")
        rows.append(f"| {label} | {mode} | {cells} | {chosen} | {rule_verdict(times, chosen)} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention: no GPU", file=sys.stderr)
        return 2
    gpu = slug(torch.cuda.get_device_name())
    lines = [f"# Dense varlen attention candidates on {torch.cuda.get_device_name()}", "",
             "bf16, milliseconds (median of 20, CUDA events); `rule` is `vdit.plan`'s choice.", "",
             f"| case | mode | {' | '.join(CANDIDATES)} | rule | rule fastest |",
             "|---|---|" + "---:|" * len(CANDIDATES) + "---|---|"]
    for case in cases():
        lines += measure(*case)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{gpu}-attention.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
