"""One small-shape pass of every CUDA and Triton kernel, forward and backward, checked against the
reference: the workload `compute-sanitizer --tool memcheck` runs in benchmarks/gpu_check.sh.

    python benchmarks/gpu_smoke.py            # needs a GPU; exit 1 on any mismatch
"""
from __future__ import annotations

import sys

import torch

import vdit
from vdit.ops import reference as R


def cases(device):
    """(op name, callable(backend) -> tensor or tuple, callable() -> reference result) at small shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    x = rand(2, 4, 4, 6, 8)
    yield "patchify_3d", lambda b: vdit.ops.patchify_3d(x, (2, 2, 2), backend=b), lambda: R.patchify_3d(x, (2, 2, 2))
    cu = torch.tensor([0, 1, 0 + 1, 40, 97], dtype=torch.int32, device=device)
    q, k, v = rand(97, 4, 64), rand(97, 2, 64), rand(97, 2, 64)
    yield ("varlen_attention", lambda b: vdit.ops.varlen_attention(q, k, v, cu, cu, 57, 57, causal=True, backend=b),
           lambda: R.varlen_attention(q, k, v, cu, cu, 57, 57, causal=True))
    pos = torch.randint(0, 9, (97, 3), device=device, dtype=torch.int32)
    yield ("rope_3d_qk", lambda b: vdit.ops.rope_3d_qk(q, k, pos, dims=(20, 22, 22), backend=b),
           lambda: R.rope_3d_qk(q, k, pos, dims=(20, 22, 22)))
    h = rand(97, 96)
    shift, scale = rand(4, 96), rand(4, 96)
    yield ("adaln_modulate", lambda b: vdit.ops.adaln_modulate(h, shift, scale, cu, backend=b),
           lambda: R.adaln_modulate(h, shift, scale, cu))
    w, bias = rand(32, 4, 1, 2, 2), rand(32)
    yield ("patch_embed_3d", lambda b: vdit.ops.patch_embed_3d(x, w, bias, backend=b),
           lambda: R.patch_embed_3d(x, w, bias))


def flatten(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_smoke: no GPU", file=sys.stderr)
        return 2
    failures, ran = [], 0
    for name, run, ref in cases("cuda"):
        expected = [t.float() for t in flatten(ref())]
        for backend in ("cuda", "triton"):
            try:
                got = flatten(run(backend))
            except vdit.BackendUnavailableError:
                continue
            ran += 1
            loss = sum((t.float() * torch.linspace(0, 1, t.numel(), device=t.device).view_as(t)).sum() for t in got)
            loss.backward()
            torch.cuda.synchronize()
            err = max((a.float() - b).abs().max().item() for a, b in zip(got, expected))
            status = "ok" if err < 5e-2 else "MISMATCH"
            print(f"{name:18s} {backend:6s} max |err| {err:.2e} {status}")
            if status != "ok":
                failures.append(f"{name}/{backend}")
    print(f"gpu_smoke: {ran} kernel runs, {len(failures)} failures {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
