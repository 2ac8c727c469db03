"""Dense attention on a GPU: every installed varlen_attention kernel's output, lse and causal alignment
(Lq != Lk, bottom-right), and the backward from a given output and lse of each kernel that has one (ring
attention's, over two halves of the keys), against vdit's fp32 reference (vdit.bench.dense_lse). Writes
<out>/<gpu>-dense-lse.md and the quarantine file (external kernels that disagree; point
VDIT_KERNEL_QUARANTINE at it and dispatch skips them). Exit 1 when any kernel disagrees.

    python benchmarks/gpu_dense_lse_check.py --out benchmarks/results      # needs a GPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from vdit.bench import dense_lse
from vdit.bench.gpu_timing import slug
from vdit.kernels import external

DEVICE, DTYPES, CASES = "cuda", (torch.float16, torch.bfloat16), dense_lse.CASES  # the tests run it on CPU kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--quarantine", help="the quarantine file to write (default <out>/<gpu>-quarantine.json)")
    args = parser.parse_args(argv)
    os.environ.pop(external.QUARANTINE_ENV, None)  # judge every kernel afresh, before anything reads the file
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_dense_lse_check: no GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    path = args.quarantine or os.path.join(args.out, f"{slug(name)}-quarantine.json")
    results = dense_lse.check_installed(DEVICE, DTYPES, CASES)
    backward = dense_lse.check_installed(DEVICE, DTYPES, CASES, backward=True)
    implementations = dense_lse.implementations(results, backward)
    os.makedirs(args.out, exist_ok=True)
    dense_lse.write_quarantine(path, dense_lse.quarantine(results, implementations, name, backward))
    text = dense_lse.report(name, results, implementations, path, CASES, DTYPES, backward)
    with open(os.path.join(args.out, f"{slug(name)}-dense-lse.md"), "w") as f:
        f.write(text)
    print(text)
    return 1 if any(isinstance(r, list) and r for found in (results, backward) for r in found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
