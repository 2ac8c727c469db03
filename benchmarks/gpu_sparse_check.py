"""Block-sparse attention on a GPU (vdit.bench.sparse_gpu).

    python benchmarks/gpu_sparse_check.py smoke      # every installed kernel vs the fp32 reference, fwd + bwd,
                                                     # fp16 and bf16; exit 1 on a mismatch (memcheck runs this)
    python benchmarks/gpu_sparse_check.py timing --out benchmarks/results   # -> <out>/<gpu>-sparse.md

Timing: sliding-tile and top-k at five sparsities, tiles 4x4x4 and 6x8x8, on one 30x48x80 video and a packed
mix of four sizes, against the installed dense kernels, bf16; each time beside the cost model's.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from vdit.bench import sparse_gpu as S
from vdit.bench.accuracy import installed_kernels
from vdit.bench.gpu_timing import REPS, WARMUP, cuda_times, slug, summarize, training_step
from vdit.kernels import external
from vdit.kernels.triton.attention.configs import arch_of

HEADS, HEAD_DIM, DTYPE = 4, 128, torch.bfloat16
DEVICE, SPARSE_BACKEND = "cuda", "triton"  # the tests run the script's logic on CPU kernels


def dtype_name() -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[DTYPE]


def smoke() -> int:
    rows = [row for pattern in S.PATTERNS for dtype in (torch.float16, torch.bfloat16)
            for row in S.check_smoke(pattern, S.SmokeCase(), DEVICE, dtype)]
    for pattern, backend, dtype, problem in rows:
        print(f"{pattern:13s} {backend:7s} {dtype:9s} {problem or 'ok'}")
    failures = [r for r in rows if r[3]]
    print(f"gpu_sparse_check smoke: {len(rows)} kernel runs, {len(failures)} failures")
    return 1 if failures or not rows else 0


def measure(fn, inputs, reps: int) -> dict:
    """{mode: summary or None (failed: reported on stderr)} of ``fn`` forward and forward + backward."""
    times = {}
    for mode in S.MODES:
        try:
            times[mode] = summarize(cuda_times(training_step(fn, inputs, mode == "fwd+bwd"), WARMUP, reps))
        except Exception as exc:  # a kernel that cannot run this case is reported, not fatal
            times[mode] = None
            print(f"  {mode}: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
    return times


def dense_rows(batch: str, q, k, v, cu, reps: int) -> list[dict]:
    rows = []
    for kernel, why in installed_kernels("varlen_attention", DEVICE, DTYPE, HEAD_DIM).items():
        if kernel not in S.DENSE_KERNELS or why is not None:
            continue
        label = f"dense {kernel}" + (f" ({external.implementation(kernel)})" if kernel != "triton" else "")
        print(f"{batch}: {label}", file=sys.stderr)
        rows.append(dict(batch=batch, kernel=label, times=measure(S.dense_call(q, k, v, cu, kernel), (q, k, v), reps)))
    return rows


def sparse_rows(batch: str, q, k, v, cu, grids, dense_triton: dict, reps: int) -> list[dict]:
    rows, arch = [], arch_of(q.device)
    for case in (c for c in S.timing_cases() if c.batch == batch):
        print(f"{batch}: {case.tile} {case.describe()}", file=sys.stderr)
        try:
            fn, lists = S.sparse_call(case, q, k, v, cu, grids, backend=SPARSE_BACKEND)
            figures = S.model_figures(case.grids, case.tile, lists, arch, HEAD_DIM, dtype_name())
        except Exception as exc:  # one case that cannot be set up is reported, the others still run
            print(f"  {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
            continue
        times = measure(fn, (q, k, v), reps)
        model = {mode: figures["ratio"][mode] * dense_triton[mode]["median"] for mode in S.MODES
                 if dense_triton.get(mode)}
        rows.append(dict(batch=batch, tile="x".join(map(str, case.tile)), kernel=case.describe(),
                         sparsity=case.sparsity, visible=figures["visible"], times=times, model=model,
                         useful_rows=figures["useful_rows"], loop=figures["loop"]))
    return rows


def timing(out_dir: str, reps: int) -> int:
    why = installed_kernels("sliding_tile_attention", DEVICE, DTYPE, HEAD_DIM)[SPARSE_BACKEND]
    if why is not None:
        print(f"gpu_sparse_check timing: {why}", file=sys.stderr)
        return 1
    rows = []
    for batch, grids in S.BATCHES.items():
        q, k, v, cu, g = S.packed_inputs(grids, (HEADS, HEADS), HEAD_DIM, DTYPE, DEVICE)
        dense = dense_rows(batch, q, k, v, cu, reps)
        triton = next((r["times"] for r in dense if r["kernel"] == "dense triton"), {})
        rows += dense + sparse_rows(batch, q, k, v, cu, g, triton, reps)
    setting = (f"{dtype_name()}, {HEADS} heads, head dim {HEAD_DIM}, {WARMUP} warm-up + {reps} timed runs; batches: "
               + "; ".join(f"{b} {' + '.join('x'.join(map(str, x)) for x in grids)} tokens"
                           for b, grids in S.BATCHES.items())
               + f". torch {torch.__version__}. Top-k lists are chosen outside the timed call; the op's checks "
               "of the lists (a sort and a host sync) are inside it, as users pay them.")
    text = S.report(torch.cuda.get_device_name(), setting, rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{slug(torch.cuda.get_device_name())}-sparse.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("smoke", "timing"))
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--reps", type=int, default=REPS, help=f"timed runs per measurement (>= {REPS})")
    args = parser.parse_args(argv)
    if args.reps < REPS:
        parser.error(f"--reps must be >= {REPS} (the median of at least {REPS} runs)")
    if not torch.cuda.is_available():
        print("gpu_sparse_check: no GPU", file=sys.stderr)
        return 2
    return smoke() if args.what == "smoke" else timing(args.out, args.reps)


if __name__ == "__main__":
    sys.exit(main())
