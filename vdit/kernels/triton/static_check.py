"""Static GPU check: what every shipped GPU kernel costs on sm_80, sm_86 and sm_90, without a GPU.

Triton kernels: each shipped configuration (vdit.kernels.triton.registry) is compiled ahead of time
and ptxas reports registers, spill bytes and stack; triton reports shared memory. CUDA C++ kernels:
read from the compiled extension with cuobjdump (registers, stack, local memory per kernel and arch).
A configuration that spills, has a stack frame or exceeds shared memory fails the check.

    python -m vdit.kernels.triton.static_check --out benchmarks/results   # writes gpu-static.md, exit 1 on failure

The compile gate of the kernel layer (``vdit-bench --gpu-static`` runs it too); it imports only the kernel layer.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys

ARCHS = (80, 86, 90)  # A100, sm_86/89 (99 KB shared memory), Hopper

# CUDA kernels allowed a stack frame (never spills): (substrings of the demangled name, bytes, why).
CUDA_STACK_ALLOWANCES = [
    (("rope", "double"), 64, "float64 RoPE kernels call the precise library sin/cos, whose huge-angle "
     "reduction keeps a small stack frame; float64 is not a GPU hot path"),
]


def cuda_allowance(row: dict) -> str | None:
    """Why a CUDA kernel's stack frame is accepted, or None."""
    for needles, limit, why in CUDA_STACK_ALLOWANCES:
        if all(n in row["kernel"] for n in needles) and row["stack"] <= limit and row["local"] == 0:
            return why
    return None
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = {80: 64, 86: 48, 90: 64}


def occupancy(registers: int, num_warps: int, shared: int, arch: int) -> float:
    """Fraction of the SM's warp slots a kernel can fill (registers and shared memory limits)."""
    from vdit.kernels.triton.aot import SHARED_MEMORY_LIMIT

    regs_per_warp = max(registers, 1) * 32
    blocks_by_regs = REGISTERS_PER_SM // (regs_per_warp * num_warps)
    blocks_by_smem = SHARED_MEMORY_LIMIT[arch] // shared if shared else 32
    blocks = min(blocks_by_regs, blocks_by_smem, MAX_WARPS_PER_SM[arch] // num_warps)
    return blocks * num_warps / MAX_WARPS_PER_SM[arch]


def triton_rows(archs=ARCHS, jobs: int = 2) -> list[dict]:
    from vdit.kernels.triton import aot
    from vdit.kernels.triton.registry import shipped_specs

    work = [(module, spec, arch) for module, specs in shipped_specs().items() for spec in specs for arch in archs
            if arch in spec.archs]

    def one(item):
        module, spec, arch = item
        try:
            r = aot.spec_resources(spec, arch)
        except Exception as exc:  # a configuration that does not compile is a failure, not a crash
            return dict(module=module, label=spec.label, arch=arch, error=f"{type(exc).__name__}: {exc}"[:200])
        matmul_sm90 = spec.matmul and arch == 90
        return dict(module=module, label=spec.label, arch=arch, warps=spec.num_warps, stages=spec.num_stages,
                    aligned=spec.aligned, registers=r.registers, spill=r.spills, stack=r.stack, shared=r.shared,
                    fits=r.fits, occupancy=occupancy(r.registers, spec.num_warps, r.shared, arch),
                    wgmma=r.uses_wgmma if matmul_sm90 else None,
                    wgmma_serialized=r.wgmma_serialized if matmul_sm90 else None)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, work))


def cuda_rows(extension_path: str | None = None) -> list[dict]:
    """Per-kernel resource usage of the CUDA extension (empty if it was built without CUDA)."""
    from vdit._extension import build_info
    from vdit.kernels.triton.aot import _nvidia_tool

    if extension_path is None:
        if not build_info()["cuda"]:
            return []
        from vdit import _C

        extension_path = _C.__file__
    out = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", extension_path], capture_output=True, text=True,
                         check=True).stdout
    rows, arch = [], None
    lines = out.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"arch = sm_(\d+)", line.strip())
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            rows.append(dict(kernel=_demangle(m.group(1)), arch=arch, registers=int(usage.get("REG", 0)),
                             stack=int(usage.get("STACK", 0)), local=int(usage.get("LOCAL", 0)),
                             shared=int(usage.get("SHARED", 0))))
    return rows


def _demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    except OSError:
        return name


def failures(triton: list[dict], cuda: list[dict]) -> list[str]:
    bad = []
    for r in triton:
        if "error" in r:
            bad.append(f"{r['module']} {r['label']} sm_{r['arch']}: does not compile ({r['error']})")
        elif r["spill"] or r["stack"] or not r["fits"]:
            bad.append(f"{r['module']} {r['label']} sm_{r['arch']}: spill {r['spill']} B, stack {r['stack']} B, "
                       f"shared {r['shared']} B")
        elif r["wgmma"] is False or r["wgmma_serialized"]:
            bad.append(f"{r['module']} {r['label']} sm_{r['arch']}: tl.dot without a pipelined wgmma "
                       f"(wgmma {r['wgmma']}, serialized by ptxas {r['wgmma_serialized']})")
    for r in cuda:
        if (r["local"] or r["stack"]) and cuda_allowance(r) is None:
            bad.append(f"CUDA {r['kernel']} sm_{r['arch']}: stack {r['stack']} B, local {r['local']} B")
    return bad


def report(triton: list[dict], cuda: list[dict]) -> str:
    import triton as triton_pkg

    from vdit._extension import build_info

    info = build_info()
    lines = ["# Static GPU report", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
             f"`python -m vdit.kernels.triton.static_check` with triton {triton_pkg.__version__}, "
             f"torch {info['torch']}, CUDA extension archs "
             f"`{info['cuda_archs'] or 'none'}`. No GPU is needed: Triton kernels are compiled ahead of time and "
             "ptxas reports their resources; CUDA kernels are read from the extension with cuobjdump.", "",
             "## Triton kernels", "",
             "Every configuration is compiled with the specialization the runtime applies: pointer arguments "
             "16-byte aligned where the launcher guarantees it (`aligned`), and the unaligned variant too where a "
             "kernel accepts unaligned views.", "",
             "| module | configuration | arch | aligned | warps | stages | registers | spill (B) | stack (B) "
             "| shared (KiB) | occupancy | wgmma |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in triton:
        if "error" in r:
            lines.append(f"| {r['module']} | {r['label']} | sm_{r['arch']} | | | | | | | | | error: {r['error']} |")
            continue
        wgmma = "" if r["wgmma"] is None else ("**serialized**" if r["wgmma_serialized"] else
                                               "yes" if r["wgmma"] else "**no**")
        lines.append(f"| {r['module']} | {r['label']} | sm_{r['arch']} | {'yes' if r['aligned'] else 'no'} | "
                     f"{r['warps']} | {r['stages']} | {r['registers']} | {r['spill']} | {r['stack']} | "
                     f"{r['shared'] / 1024:.1f} | {r['occupancy']:.0%} | {wgmma} |")
    lines += ["", "## CUDA C++ kernels (vdit._C)", ""]
    if cuda:
        lines += ["| kernel | arch | registers | stack (B) | local (B) | static shared (B) |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| `{r['kernel']}` | sm_{r['arch']} | {r['registers']} | {r['stack']} | {r['local']} "
                  f"| {r['shared']} |" for r in cuda]
        excused = sorted({why for r in cuda if (r["stack"] or r["local"]) and (why := cuda_allowance(r))})
        if excused:
            lines += ["", "Documented exceptions (stack frame, no spills): " + "; ".join(excused) + "."]
    else:
        lines.append("The extension was built without CUDA kernels.")
    from vdit.kernels.triton.registry import gpu_only_notes

    lines += ["", "## What is verified where", "",
              "Statically, here, for every Triton configuration above: it compiles for its architecture with the "
              "runtime's alignment specialization, uses no spill or stack, fits shared memory, and (sm_90, tl.dot "
              "kernels) runs a pipelined wgmma; every kernel also passes its tests against the float64 reference "
              "under `TRITON_INTERPRET=1` (fp16 and fp32). Scalar-argument specializations (an int equal to 1 or "
              "divisible by 16) are not enumerated. Only on a GPU (`bash benchmarks/gpu_check.sh`):", ""]
    lines += [f"- `{module}`: {note}" for module, note in gpu_only_notes().items()]
    lines += ["- CUDA C++ kernels: speed and real-warp behaviour; their per-element math is shared with the C++ "
              "CPU kernels and tested there."]
    bad = failures(triton, cuda)
    lines += ["", "## Result", "", "All configurations compile without spills and fit their shared memory." if not bad
              else "Failing configurations:\n\n" + "\n".join(f"- {b}" for b in bad), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Under the interpreter triton's own @jit helpers (tl.sum, ...) cannot be compiled: rerun cleanly.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "vdit.kernels.triton.static_check", *(argv or sys.argv[1:])],
                               env=env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="also write the rows as JSON to this path (the tests read it)")
    args = parser.parse_args(argv)
    triton, cuda = triton_rows(jobs=args.jobs), cuda_rows()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu-static.md")
    with open(path, "w") as f:
        f.write(report(triton, cuda))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton, "cuda": cuda}, f)
    bad = failures(triton, cuda)
    print(f"wrote {path}: {len(triton)} Triton configurations, {len(cuda)} CUDA kernels, {len(bad)} failing")
    for b in bad:
        print("  FAIL", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
