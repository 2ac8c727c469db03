"""Speed against quality of spacetime block-sparse attention in the demo model, at a grid large enough for
sparsity to exist: 16 frames of 128x128 pixels (16x16x16 tokens, 64 tiles of 4x4x4).

Each configuration runs ``vdit-eval-demo`` (held-out prompts, colour / motion / object in every frame) with
its attention options and writes its JSON under ``--work``; configurations already there are not rerun, so
an interrupted sweep resumes. The table says, per configuration, the share of the dense attention FLOPs it
computes (exact, from its tile lists at this grid), the evaluation figures, the share of prompts whose
colour and motion classifications agree with dense attention's on the same noise, and the forward time of
the model on one CFG batch (2 videos) relative to dense, measured back to back in one process.

    python -m benchmarks.sparse_quality --work runs/sparse-eval --out benchmarks/results/sparse-quality.md
    python -m benchmarks.sparse_quality --only dense sta-1/4 --prompts 12      # a subset
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from vdit.demo.cli import eval as eval_cli
from vdit.demo.growth import with_attention
from vdit.demo.pipeline import DEFAULT_WEIGHTS, TextToVideo
from vdit.ops.sparse_pattern import MODES
from vdit.ops.tiles import sliding_window_tiles, tile_layout

FRAMES, SIZE, TILE = 16, (128, 128), (4, 4, 4)
GRID = (FRAMES, SIZE[0] // 8, SIZE[1] // 8)  # the demo model's 1x8x8 patches

# name -> (label, attention options (vdit-eval-demo flags), weights (None: shipped; else inside --runs))
CONFIGS = {
    "dense": ("dense", {}, None),
    "sta-1/2": ("sliding_tile, window 4x4x2", {"attention": "sliding_tile", "window": (4, 4, 2)}, None),
    "sta-1/4": ("sliding_tile, window 4x2x2", {"attention": "sliding_tile", "window": (4, 2, 2)}, None),
    "sta-1/8": ("sliding_tile, window 2x2x2", {"attention": "sliding_tile", "window": (2, 2, 2)}, None),
    "topk-1/4": ("topk_tile, top 16", {"attention": "topk_tile", "topk": 16}, None),
    "topk-1/8": ("topk_tile, top 8", {"attention": "topk_tile", "topk": 8}, None),
    "ft-sta-1/4": ("sliding_tile, window 4x2x2, fine-tuned", {}, "ft-sta/ema.safetensors"),
    "ft-topk-1/4": ("topk_tile, top 16, fine-tuned", {}, "ft-topk/ema.safetensors"),
}


def attention_flops_share(options: dict, heads: int = 4) -> float:
    """Share of dense attention's FLOPs (QK^T and PV over every query-key pair) at GRID: the visible key
    tokens summed over queries / N^2, plus the pooled coarse pass of topk_tile."""
    mode = options.get("attention", "dense")
    if mode == "dense":
        return 1.0
    grids = torch.tensor([GRID], dtype=torch.int32)
    layout = tile_layout(grids, TILE)
    n = math.prod(GRID)
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).long()
    if mode == "sliding_tile":
        lists = sliding_window_tiles(layout, torch.tensor([options["window"]])).long()[:, 0]
        visible = torch.where(lists >= 0, sizes[lists.clamp_min(0)], 0).sum(1)
        return float((sizes * visible).sum()) / n ** 2
    keys = min(options["topk"], layout.num_tiles) * int(sizes.max())
    return (n * keys + layout.num_tiles ** 2) / n ** 2


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    if options.get("attention") in MODES:
        out += ["--tile", ",".join(map(str, TILE))]
    return out


def run_eval(name: str, work: str, prompts: int, steps: int, seed: int, runs: str = "runs") -> dict | None:
    """The configuration's evaluation record (computed now unless its JSON exists); None if its weights
    are missing."""
    label, options, weights = CONFIGS[name]
    path = os.path.join(work, name.replace("/", "_") + ".json")
    if not os.path.exists(path):
        weights = os.path.join(runs, weights) if weights else DEFAULT_WEIGHTS
        if not os.path.exists(weights):
            print(f"{name}: {weights} not found, skipped")
            return None
        argv = ["--weights", weights, "--prompts", str(prompts), "--steps", str(steps), "--seed", str(seed),
                "--frames", str(FRAMES), "--size", f"{SIZE[0]}x{SIZE[1]}", "--json", path, *flags(options)]
        print(f"{name}: vdit-eval-demo {' '.join(argv)}", flush=True)
        eval_cli.main(argv)
    with open(path) as f:
        return json.load(f)


def forward_seconds(names: list[str], repeats: int = 3) -> dict[str, float]:
    """Median seconds of one model forward on a CFG batch (2 videos of GRID tokens) per configuration,
    measured back to back in this process."""
    shipped = TextToVideo.load(DEFAULT_WEIGHTS)
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(3, FRAMES, *SIZE, generator=g) for _ in range(2)]
    t = torch.tensor([0.5, 0.5])
    out = {}
    for name in names:
        options = dict(CONFIGS[name][1])
        if "attention" in options:
            options["tile"] = TILE
        model = with_attention(shipped, **options)
        times = []
        with torch.no_grad():
            for _ in range(repeats + 1):
                start = time.perf_counter()
                model(videos, t, ["a red circle moves up on a black background", ""])
                times.append(time.perf_counter() - start)
        out[name] = sorted(times[1:])[len(times[1:]) // 2]
    return out


def table(records: dict[str, dict], seconds: dict[str, float]) -> str:
    dense_rows = records["dense"]["per_seed"][0]["rows"] if "dense" in records else None
    lines = ["| configuration | attention FLOPs | colour | motion | object in every frame | agrees with dense "
             "(colour, motion) | forward time vs dense |", "|---|---|---|---|---|---|---|"]
    for name, record in records.items():
        label, options, _ = CONFIGS[name]
        result = record["pooled"]
        agree = "-"
        if dense_rows is not None and name != "dense":
            rows = record["per_seed"][0]["rows"]
            same = sum(a[1] == b[1] and a[2] == b[2] for a, b in zip(rows, dense_rows))
            agree = f"{same}/{len(rows)}"
        speed = f"{seconds[name] / seconds['dense']:.2f}x" if name in seconds and "dense" in seconds else "-"
        lines.append(f"| {label} | {attention_flops_share(options or CONFIGS[name.replace('ft-', '')][1]):.0%} | "
                     f"{result['colour_accuracy']:.0%} | {result['motion_accuracy']:.0%} +- "
                     f"{result['motion_stderr']:.0%} | {result['object_in_every_frame']:.0%} | {agree} | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/sparse-eval", help="folder of the per-configuration JSON records")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--runs", default="runs", help="folder of the fine-tuning runs ft-sta, ft-topk (vdit-train --out)")
    p.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-timing", action="store_true", help="skip the forward-time column")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    records = {}
    for name in args.only:
        record = run_eval(name, args.work, args.prompts, args.steps, args.seed, args.runs)
        if record is not None:
            records[name] = record
    # Fine-tuned weights run the same kernels as their shipped-weight configuration: time those.
    timed = list(dict.fromkeys(n.replace("ft-", "") for n in ["dense", *args.only]))
    seconds = {} if args.no_timing else forward_seconds(timed)
    for name in records:  # fine-tuned weights run the same kernels as their shipped-weight configuration
        base = name.replace("ft-", "")
        if name not in seconds and base in seconds:
            seconds[name] = seconds[base]
    text = table(records, seconds)
    print(text)
    if args.out:
        first = next(iter(records.values()))
        header = (f"# Sparse attention in the demo model: speed and quality\n\n{FRAMES} frames of {SIZE[0]}x{SIZE[1]} "
                  f"pixels ({'x'.join(map(str, GRID))} tokens, tiles of {'x'.join(map(str, TILE))} tokens), "
                  f"{first['pooled']['prompts']} held-out prompts, seed {args.seed}, {args.steps} Euler steps, "
                  f"guidance 4; `python -m benchmarks.sparse_quality`. Motion accuracy +- one standard error.\n\n")
        with open(args.out, "w") as f:
            f.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
