"""Markdown table of vdit against its baselines from a pytest-benchmark JSON file.

Convention for every benchmark module: each benchmark sets ``benchmark.group`` (op + shape + dtype)
and ``benchmark.extra_info["impl"]`` (``"vdit <backend>"`` for ours, else the baseline's name, e.g.
``"nn.Conv3d"``). Optional ``extra_info["bytes"]`` / ``extra_info["flops"]`` give GB/s and GFLOP/s.
In each group the speedup of a row is (its median time) / (vdit's median time), so a baseline row
showing 2.0x means vdit is twice as fast as that baseline.

    pytest benchmarks/bench_x.py --benchmark-only --benchmark-json=out.json
    python -m benchmarks.report_table out.json --title "patch embedding"
"""
from __future__ import annotations

import argparse
import json
import platform


def table(data: dict, title: str) -> str:
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"] or bench["name"], []).append(bench)
    lines = [f"### {title}", "",
             "| case | implementation | median (ms) | vdit speedup vs this | throughput |",
             "|---|---|---:|---:|---:|"]
    for group, rows in groups.items():
        ours = next((r for r in rows if r["extra_info"].get("impl", "").startswith("vdit")), None)
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            median = r["stats"]["median"]
            impl = r["extra_info"].get("impl", r["name"])
            speedup = f"{median / ours['stats']['median']:.2f}x" if ours else "-"
            info = r["extra_info"]
            rate = []
            if "bytes" in info:
                rate.append(f"{info['bytes'] / median / 1e9:.1f} GB/s")
            if "flops" in info:
                rate.append(f"{info['flops'] / median / 1e9:.1f} GFLOP/s")
            label = f"**{impl}**" if r is ours else impl
            lines.append(f"| {group} | {label} | {median * 1e3:.3f} | {speedup if r is not ours else '1.00x'} | "
                         f"{', '.join(rate) or '-'} |")
    machine = data.get("machine_info", {})
    lines += ["", f"Measured {data.get('datetime', '')[:19]} on {machine.get('cpu', {}).get('brand_raw', platform.processor())}"
              f" ({machine.get('cpu', {}).get('count', '?')} cores), torch threads as configured; medians of "
              "pytest-benchmark rounds, every row of a case measured in the same run.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--title", default="benchmark")
    args = parser.parse_args()
    with open(args.json_file) as f:
        print(table(json.load(f), args.title))


if __name__ == "__main__":
    main()
