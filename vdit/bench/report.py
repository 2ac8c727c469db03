"""vdit-bench: run the benchmark suite and write a report with tables and plots.

Runs every ``benchmarks/bench_*.py`` module (pytest-benchmark) in one process, so each op and its
baselines, and the machine's ceilings (bench_roofline.py), are measured in the same run. Writes
``<device>.md`` (machine, versions, date, one table per module: vdit time, each baseline's time,
speedup, achieved GB/s or GFLOP/s, % of roofline), ``<device>.json`` (raw) and four plots:
``<device>-speedups.png``, ``<device>-attention-vs-seqlen.png``, ``<device>-packed-vs-padded.png``,
``<device>-sparse-attention-vs-visible.png``.

    vdit-bench --quick                 # under 5 minutes on a 2-core CPU
    vdit-bench --gpu-static            # static GPU report (no GPU needed): gpu-static.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys

import torch

import vdit
from vdit.bench.tables import ceilings, groups, markdown_table, vdit_row


def device_name() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def find_benchmarks() -> str:
    candidates = [os.environ.get("VDIT_BENCH_DIR"), os.path.join(os.getcwd(), "benchmarks"),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(vdit.__file__))), "benchmarks")]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "bench_roofline.py")):
            return path
    raise SystemExit("vdit-bench: cannot find the benchmarks/ folder of a vdit checkout; run from the repository "
                     "root or set VDIT_BENCH_DIR")


# What --cpu-isa sets for the suite: vdit's attention kernels, ATen's own kernels and MKL's GEMMs all on the one
# ISA, so that an AVX2 run on an AVX-512 CPU measures both sides as an AVX2-only CPU would run them.
ISA_ENVIRONMENT = {
    "avx2": {"VDIT_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"VDIT_CPU_ISA": "avx512", "ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}


def run_suite(bench_dir: str, json_path: str, quick: bool, select: str | None, cpu_isa: str | None = None) -> int:
    cmd = [sys.executable, "-m", "pytest", bench_dir, "-q", "--benchmark-only", f"--benchmark-json={json_path}",
           "-o", "python_files=bench_*.py", "-p", "no:cacheprovider", "--rootdir", os.path.dirname(bench_dir)]
    if quick:
        cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.25", "--benchmark-warmup=off"]
    if select:
        cmd += ["-k", select]
    env = {**os.environ, "VDIT_BENCH_QUICK": "1" if quick else "0",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(bench_dir), os.environ.get("PYTHONPATH", "")]),
           **ISA_ENVIRONMENT.get(cpu_isa, {})}
    return subprocess.call(cmd, env=env)


def module_of(bench: dict) -> str:
    return bench["fullname"].split("::")[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("bench_")


def write_report(data: dict, out_dir: str, device: str) -> str:
    info = vdit.build_info()
    ceiling = ceilings(data)
    lines = [f"# vdit benchmarks: {device}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
             f"{data['machine_info'].get('cpu', {}).get('count', '?')} cores, torch threads {torch.get_num_threads()}"
             + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
             f"- versions: vdit {vdit.__version__}, torch {info['torch']}, triton {info['triton']}, "
             f"python {data['machine_info'].get('python_version', '?')}",
             f"- CPU code paths: vdit {data['machine_info'].get('vdit_cpu_isa', '?')} / ATen "
             f"{data['machine_info'].get('aten_cpu_capability', '?')} / MKL "
             f"{data['machine_info'].get('mkl_enable_instructions') or 'its own choice'}",
             f"- ceilings measured in this run: copy {ceiling.get('bandwidth', 0) / 1e9:.1f} GB/s, "
             f"fp32 matmul {ceiling.get('flops', 0) / 1e9:.1f} GFLOP/s", "",
             "Speedup = baseline time / vdit time (higher is better for vdit); % of roofline = "
             "max(bytes / copy bandwidth, FLOPs / matmul rate) / time.", ""]
    lines += kernel_choices("cuda" if torch.cuda.is_available() else "cpu")
    by_module: dict[str, list] = {}
    for bench in data["benchmarks"]:
        by_module.setdefault(module_of(bench), []).append(bench)
    for module, benches in by_module.items():
        if module == "roofline":
            continue
        lines.append(markdown_table({**data, "benchmarks": benches}, module.replace("_", " "), ceiling))
    path = os.path.join(out_dir, f"{device}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# Representative calls whose kernel choice the report states: (op, dtype, head dim).
CHOICE_CALLS = [("varlen_attention", torch.bfloat16, 128), ("varlen_attention", torch.bfloat16, 72),
                ("varlen_attention", torch.float32, 64), ("rope_3d_qk", torch.bfloat16, 128),
                ("patch_embed_3d_varlen", torch.bfloat16, None), ("adaln_modulate", torch.bfloat16, None),
                ("patchify_3d", torch.bfloat16, None)]


def kernel_choices(device: str) -> list[str]:
    """Markdown: which kernel ``auto`` runs for each representative call on ``device`` here, and why."""
    from vdit.ops import plan

    lines = [f"## Kernel choice on {device} (`vdit.plan`)", "", "| op | dtype | head dim | kernel | why |",
             "|---|---|---:|---|---|"]
    for op, dtype, head_dim in CHOICE_CALLS:
        kernel, why = plan(op, device=device, dtype=dtype, head_dim=head_dim)
        lines.append(f"| `{op}` | {str(dtype).replace('torch.', '')} | {head_dim or '-'} | {kernel} | {why} |")
    return lines + [""]


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_speedups(data: dict, path: str) -> str | None:
    labels, values = [], []
    for group, rows in groups(data).items():
        ours = vdit_row(rows)
        if ours is None:
            continue
        for r in rows:
            if r is not ours:
                labels.append(f"{group}\nvs {r['extra_info'].get('impl', r['name'])}")
                values.append(r["stats"]["median"] / ours["stats"]["median"])
    if not values:
        return None
    fig, ax = _pyplot().subplots(figsize=(9, 0.45 * len(values) + 1))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("vdit speedup (baseline time / vdit time, log scale)")
    ax.invert_yaxis()
    return _save(fig, path)


def plot_attention_sweep(data: dict, path: str) -> str | None:
    """GFLOP/s of each attention implementation against sequence length (benchmarks with extra_info seqlen)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "seqlen" in info and "flops" in info:
            series.setdefault(info["impl"], []).append((info["seqlen"], info["flops"] / b["stats"]["median"] / 1e9))
    if not series:
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for impl, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("GFLOP/s (forward)")
    ax.set_title("varlen attention throughput")
    ax.legend()
    return _save(fig, path)


def plot_packed_vs_padded(data: dict, path: str) -> str | None:
    """Real tokens per second of the model step for each variant (benchmarks with extra_info tokens)."""
    rows = sorted((f'{b["group"].split(", ", 1)[-1]}: {b["extra_info"]["impl"]}',
                   b["extra_info"]["tokens"] / b["stats"]["median"])
                  for b in data["benchmarks"] if "tokens" in b["extra_info"] and b["group"].startswith("VideoDiT")
                  and "forward+backward" not in b["group"])
    if not rows:
        return None
    fig, ax = _pyplot().subplots(figsize=(9, 0.5 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="tab:blue")
    ax.set_xlabel("real (unpadded) tokens per second, VideoDiT forward")
    ax.invert_yaxis()
    return _save(fig, path)


def plot_sparse_sweep(data: dict, path: str) -> str | None:
    """Sliding-tile attention time against the fraction of visible tiles (benchmarks with extra_info window)."""
    points = sorted((b["extra_info"]["visible"], b["stats"]["median"] * 1e3, str(b["extra_info"]["window"]))
                    for b in data["benchmarks"] if "window" in b["extra_info"] and "visible" in b["extra_info"])
    sparse = [p for p in points if p[2] != "dense"]
    if not sparse:
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.plot([p[0] for p in sparse], [p[1] for p in sparse], marker="o", label="vdit sliding-tile (C++)")
    for x, y, label in sparse:
        ax.annotate(label.replace(", ", "x").strip("[]"), (x, y), fontsize=7, textcoords="offset points",
                    xytext=(4, -8))
    for _x, y, label in points:
        if label == "dense":
            ax.axhline(y, color="tab:red", linestyle="--", label="dense vdit varlen_attention (C++)")
    ax.set_xlabel("fraction of key tiles visible per query tile")
    ax.set_ylabel("forward time (ms)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, None)
    ax.set_title("spacetime block-sparse attention: time vs visible tiles")
    ax.legend()
    return _save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vdit-bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes and few rounds (< 5 minutes on 2 CPU cores)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression selecting benchmarks")
    p.add_argument("--gpu-static", action="store_true", help="write the static GPU report instead (no GPU needed)")
    p.add_argument("--cpu-isa", choices=sorted(ISA_ENVIRONMENT), default=None,
                   help="run vdit's, ATen's and MKL's CPU code on this ISA (default: the widest the CPU has); the "
                        "report is cpu-<isa>.md")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.gpu_static:
        from vdit.kernels.triton import static_check

        return static_check.main(["--out", args.out])
    device = device_name()
    if args.cpu_isa and device == "cpu":
        device = f"cpu-{args.cpu_isa}"
    json_path = os.path.join(args.out, f"{device}.json")
    status = run_suite(find_benchmarks(), json_path, args.quick, args.select, args.cpu_isa)
    if not os.path.exists(json_path):
        print("vdit-bench: the benchmark run produced no results", file=sys.stderr)
        return status or 1
    with open(json_path) as f:
        data = json.load(f)
    print("wrote", write_report(data, args.out, device))
    for name, fn in (("speedups", plot_speedups), ("attention-vs-seqlen", plot_attention_sweep),
                     ("packed-vs-padded", plot_packed_vs_padded), ("sparse-attention-vs-visible", plot_sparse_sweep)):
        plot = fn(data, os.path.join(args.out, f"{device}-{name}.png"))
        if plot:
            print("wrote", plot)
    return status


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
