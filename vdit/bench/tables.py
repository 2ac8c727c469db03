"""Markdown tables and ceilings from pytest-benchmark JSON.

Convention for benchmark modules: each benchmark sets ``benchmark.group`` (op + shape + dtype) and
``benchmark.extra_info["impl"]`` (``"vdit <backend>"`` for ours, else the baseline's name); optional
``extra_info["bytes"]`` / ``["flops"]`` give GB/s and GFLOP/s. In each group a row's speedup is its
median time divided by vdit's, so a baseline row showing 2.0x means vdit is twice as fast.
The ``roofline`` group (benchmarks/bench_roofline.py) holds the machine's measured ceilings.
"""
from __future__ import annotations

import platform


def groups(data: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        out.setdefault(bench["group"] or bench["name"], []).append(bench)
    return out


def vdit_row(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["extra_info"].get("impl", "").startswith("vdit")), None)


def ceilings(data: dict) -> dict[str, float]:
    """{"bandwidth": bytes/s, "flops": flop/s} measured by the roofline benchmarks, when present."""
    out = {}
    for r in groups(data).get("roofline", []):
        info, median = r["extra_info"], r["stats"]["median"]
        if info.get("ceiling") == "bandwidth":
            out["bandwidth"] = info["bytes"] / median
        elif info.get("ceiling") == "flops":
            out["flops"] = info["flops"] / median
    return out


def roofline_fraction(info: dict, median: float, ceiling: dict[str, float]) -> float | None:
    """Achieved / attainable: the roofline time is max(bytes / bandwidth, flops / flop rate)."""
    bound = 0.0
    if "bytes" in info and "bandwidth" in ceiling:
        bound = max(bound, info["bytes"] / ceiling["bandwidth"])
    if "flops" in info and "flops" in ceiling:
        bound = max(bound, info["flops"] / ceiling["flops"])
    return bound / median if bound else None


def markdown_table(data: dict, title: str, ceiling: dict[str, float] | None = None, skip_roofline: bool = True) -> str:
    ceiling = ceilings(data) if ceiling is None else ceiling
    lines = [f"### {title}", "",
             "| case | implementation | median (ms) | vdit speedup vs this | throughput | % of roofline |",
             "|---|---|---:|---:|---:|---:|"]
    for group, rows in groups(data).items():
        if skip_roofline and group == "roofline":
            continue
        ours = vdit_row(rows)
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            median, info = r["stats"]["median"], r["extra_info"]
            impl = info.get("impl", r["name"])
            speedup = "1.00x" if r is ours else (f"{median / ours['stats']['median']:.2f}x" if ours else "-")
            rate = []
            if "bytes" in info:
                rate.append(f"{info['bytes'] / median / 1e9:.1f} GB/s")
            if "flops" in info:
                rate.append(f"{info['flops'] / median / 1e9:.1f} GFLOP/s")
            frac = roofline_fraction(info, median, ceiling)
            label = f"**{impl}**" if r is ours else impl
            lines.append(f"| {group} | {label} | {median * 1e3:.3f} | {speedup} | {', '.join(rate) or '-'} | "
                         f"{f'{frac:.0%}' if frac is not None else '-'} |")
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    lines += ["", f"Measured {data.get('datetime', '')[:19]} on {cpu.get('brand_raw', platform.processor())} "
              f"({cpu.get('count', '?')} cores); medians of pytest-benchmark rounds, every row of a case measured in "
              "the same run.", ""]
    return "\n".join(lines)
