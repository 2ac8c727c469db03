"""varlen_attention on CPU under each ISA path of vdit's kernels, side by side in one run (fp32).

Workload: one packed batch of 2400 + 1200 + 600 + 300 tokens, 8 heads of dim 64, full self-attention.
Implementations, same inputs and threads: vdit's C++ kernel, a Python loop of
F.scaled_dot_product_attention over the sequences (SDPA per sequence), and SDPA on the zero-padded
(B, H, N, D) batch with a key padding mask (SDPA padded; padding copies not timed); forward and
forward + backward.

Each configuration runs in its own process (the ISA is chosen once per process), configurations
interleaved round by round, so that the noise of a shared machine spreads over all of them:

    --config LABEL=ROOT[:ISA]   a vdit checkout with a built extension (ROOT, imported first) and the ISA
                                to force (VDIT_CPU_ISA; omit for a build that has no ISA choice). ISA avx2
                                also restricts MKL and ATen to AVX2 (MKL_ENABLE_INSTRUCTIONS,
                                ATEN_CPU_CAPABILITY), so that the baselines and the tile GEMMs run as on
                                an AVX2-only CPU.
    --busy N                    N background processes busy-looping in Python during the timing
                                (a shared machine), killed afterwards
    --rounds R                  rounds of processes (default 3); each reports medians of its repeats

    python benchmarks/bench_attention_isa.py --config avx512=.:avx512 --config avx2=.:avx2
    python benchmarks/bench_attention_isa.py --busy 2 --config before=/path/to/old/checkout --config after=.

Prints a Markdown table: per configuration and implementation the median over rounds of the per-process
medians (ms), and vdit's speedup against each baseline (baseline time / vdit time), computed within
each process before taking the median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LENGTHS = [2400, 1200, 600, 300]
HEADS, HEAD_DIM = 8, 64
REPEATS = {"fwd": 5, "fwd+bwd": 3}
IMPLS = ["vdit", "SDPA per sequence", "SDPA padded"]


def _worker(threads: int) -> dict:
    """Times every implementation in this process; returns {mode: {impl: median seconds}} and the build."""
    import torch
    import torch.nn.functional as F

    import vdit
    from vdit.ops import varlen_attention

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    total, max_len = sum(LENGTHS), max(LENGTHS)
    q, k, v, grad = (torch.randn(total, HEADS, HEAD_DIM, generator=g) for _ in range(4))
    cu = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(LENGTHS).cumsum(0)
    starts = cu[:-1].tolist()
    mask = (torch.arange(max_len)[None, :] < torch.tensor(LENGTHS)[:, None])[:, None, None, :]

    def pad(x):
        out = x.new_zeros(len(LENGTHS), max_len, HEADS, HEAD_DIM)
        for b, (s, n) in enumerate(zip(starts, LENGTHS)):
            out[b, :n] = x[s:s + n]
        return out.transpose(1, 2).contiguous()

    def loop(a, b, c):
        outs = [F.scaled_dot_product_attention(*(t[s:s + n].transpose(0, 1) for t in (a, b, c))).transpose(0, 1)
                for s, n in zip(starts, LENGTHS)]
        return torch.cat(outs)

    cases = {
        "vdit": ((q, k, v), lambda a, b, c: varlen_attention(a, b, c, cu, cu, max_len, max_len, backend="cpu"), grad),
        "SDPA per sequence": ((q, k, v), loop, grad),
        "SDPA padded": (tuple(pad(t) for t in (q, k, v)),
                        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), pad(grad)),
    }
    result = {}
    for mode, repeats in REPEATS.items():
        result[mode] = {}
        for impl, (inputs, fn, dout) in cases.items():
            args = [t.detach().requires_grad_(mode != "fwd") for t in inputs]
            times = []
            for i in range(repeats + 1):  # the first call warms up
                t0 = time.perf_counter()
                if mode == "fwd":
                    with torch.no_grad():
                        fn(*args)
                else:
                    torch.autograd.grad(fn(*args), args, dout)
                if i:
                    times.append(time.perf_counter() - t0)
            result[mode][impl] = statistics.median(times)
    info = vdit.build_info()
    result["build"] = {key: info.get(key) for key in ("cpu_isa", "cpu_arch", "cpu_tiles")}
    result["aten"] = torch.backends.cpu.get_cpu_capability()
    return result


def _env(root: str, isa: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VDIT_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")}
    env["PYTHONPATH"] = os.path.abspath(root) + os.pathsep + env.get("PYTHONPATH", "")
    if isa:
        env["VDIT_CPU_ISA"] = isa
    if isa == "avx2":
        env.update(MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2")
    return env


def _run_config(root: str, isa: str | None, threads: int) -> dict:
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads)],
                         cwd=os.path.abspath(root), env=_env(root, isa), capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _table(configs: list[tuple[str, str, str | None]], runs: dict) -> str:
    lines = ["| config | ISA (vdit / ATen) | mode | vdit (ms) | SDPA per sequence (ms) | SDPA padded (ms) "
             "| vdit vs per-seq loop | vdit vs padded |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for label, _, isa in configs:
        rs = runs[label]
        build = rs[0]["build"]
        isa_text = f"{build.get('cpu_isa') or ('(' + (isa or 'build') + ')')} / {rs[0]['aten']}"
        for mode in REPEATS:
            med = {impl: statistics.median(r[mode][impl] for r in rs) * 1e3 for impl in IMPLS}
            speed = [statistics.median(r[mode][base] / r[mode]["vdit"] for r in rs) for base in IMPLS[1:]]
            lines.append(f"| {label} | {isa_text} | {mode} | {med['vdit']:.1f} | {med['SDPA per sequence']:.1f} "
                         f"| {med['SDPA padded']:.1f} | {speed[0]:.2f}x | {speed[1]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", default=[], help="LABEL=ROOT[:ISA]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.threads)))
        return
    configs = []
    for c in args.config or ["this=.:"]:
        label, spec = c.split("=", 1)
        root, _, isa = spec.partition(":")
        configs.append((label, root, isa or None))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        runs = {label: [] for label, _, _ in configs}
        for r in range(args.rounds):
            for label, root, isa in configs:
                runs[label].append(_run_config(root, isa, args.threads))
            print(f"after round {r + 1}:\n{_table(configs, runs)}", file=sys.stderr, flush=True)  # partial
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(f"packed {'+'.join(map(str, LENGTHS))} tokens, H{HEADS} D{HEAD_DIM} fp32, {args.threads} threads, "
          f"{args.busy} busy-looping background processes, median of {args.rounds} rounds "
          f"(fwd {REPEATS['fwd']}, fwd+bwd {REPEATS['fwd+bwd']} timed calls per round)")
    print(_table(configs, runs))


if __name__ == "__main__":
    main()
