"""Compare vdit's speedups over its baselines between vdit-bench runs (e.g. the AVX-512 and AVX2 code paths).

Reads the JSON files ``vdit-bench`` writes (one per run, ``--cpu-isa`` chooses the path) and prints one markdown
row per (case, baseline): vdit's speedup (baseline median / vdit median, both from the same run) in each run,
and a mark where a run's ratio falls below the first run's by more than ``--tolerance`` (relative).

    vdit-bench --cpu-isa avx512 --out runs/isa && vdit-bench --cpu-isa avx2 --out runs/isa
    python -m benchmarks.compare_isa avx512=runs/isa/cpu-avx512.json avx2=runs/isa/cpu-avx2.json
"""
from __future__ import annotations

import argparse
import json

from vdit.bench.tables import groups, vdit_row


def speedups(data: dict) -> dict[tuple[str, str], float]:
    """{(case, baseline): baseline median / vdit median} of one vdit-bench JSON (groups without a vdit row and
    vdit's own variants left out)."""
    out = {}
    for group, rows in groups(data).items():
        mine = vdit_row(rows)
        if mine is None:
            continue
        for r in rows:
            impl = r["extra_info"].get("impl", r["name"])
            if r is not mine and not impl.startswith("vdit"):
                out[(group, impl)] = r["stats"]["median"] / mine["stats"]["median"]
    return out


def paths(data: dict) -> str:
    """The CPU code paths a run recorded (vdit / ATen / MKL)."""
    info = data.get("machine_info", {})
    return (f"{info.get('vdit_cpu_isa', '?')} / {info.get('aten_cpu_capability', '?')} / "
            f"{info.get('mkl_enable_instructions') or 'auto'}")


def table(runs: dict[str, dict], tolerance: float) -> tuple[str, list[tuple]]:
    """The markdown table and the (case, baseline, run, ratio, first run's ratio) rows that fall below."""
    labels = list(runs)
    ratios = {label: speedups(data) for label, data in runs.items()}
    keys = list(dict.fromkeys(k for label in labels for k in ratios[label]))
    lines = ["| case | baseline | " + " | ".join(f"{label} ({paths(runs[label])})" for label in labels) + " |",
             "|---|---|" + "---:|" * len(labels)]
    below = []
    for case, impl in keys:
        first = ratios[labels[0]].get((case, impl))
        cells = []
        for label in labels:
            value = ratios[label].get((case, impl))
            mark = ""
            if value is not None and first is not None and value < first * (1 - tolerance):
                mark = " (lower)"
                below.append((case, impl, label, value, first))
            cells.append("-" if value is None else f"{value:.2f}x{mark}")
        lines.append(f"| {case} | {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines), below


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=PATH of a vdit-bench JSON; the first is the reference")
    p.add_argument("--tolerance", type=float, default=0.1, help="relative drop below the first run to mark")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep:
            p.error(f"expected LABEL=PATH, got {spec!r}")
        with open(path) as f:
            runs[label] = json.load(f)
    text, below = table(runs, args.tolerance)
    print(text)
    print(f"\n{len(below)} ratios more than {args.tolerance:.0%} below {next(iter(runs))}'s.")


if __name__ == "__main__":
    main()
