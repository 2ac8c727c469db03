"""Speed against quality of First-Block step caching (vdit.sampling.cache) with the shipped demo model.

Part 1, thresholds: each held-out prompt (vdit.demo.evaluation.held_out_prompts, seed 0) is generated without
skipping and at each threshold, same noise, one video per call (CFG: 2 packed videos). Per configuration: colour /
motion accuracy against the prompt, agreement of the colour and motion classifications with the uncached video's,
PSNR against the uncached video, share of block evaluations skipped, wall-clock speed-up. The uncached run is the
cache at threshold 0 (it skips nothing and is bit-identical to no cache; it measures the changes, a small cost that
makes the speed-ups slightly conservative).

Part 2, per video against per batch: one packed batch of videos of mixed sizes at one threshold, deciding per
video and per batch (the batch's relative change, all videos skip together).

Every result is appended to ``--raw`` (JSON lines) as it comes, so an interrupted run keeps what it measured and
``--report-only`` writes the table and the plot from it.

    python -m benchmarks.step_cache --prompts 36 --out benchmarks/results/cpu-step-cache.md
    python -m benchmarks.step_cache --report-only --raw runs/step-cache.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from vdit.demo.evaluation import classify_colour, classify_motion, foreground_masks, held_out_prompts
from vdit.demo.pipeline import DEFAULT_WEIGHTS, TextToVideo
from vdit.sampling import FlowSampler, StepCache

FRAMES, SIZE, STEPS, GUIDANCE = 16, (64, 96), 20, 4.0
THRESHOLDS = (0.1, 0.2)
MIXED = [(3, 8, 32, 48), (3, 8, 48, 64), (3, 16, 32, 32)]  # the mixed-size batch of part 2


def run(model, prompts: list[str], shapes, cache: StepCache | None, seed: int) -> tuple[list, float, object]:
    """Videos (3, T, H, W) in [-1, 1] for ``prompts`` at ``shapes``, the seconds and the sampler's cache stats."""
    with torch.no_grad():
        context, cu = model.encode(prompts)
        uncond, cu_uncond = model.encode([""] * len(prompts))
    sampler = FlowSampler(model.dit, steps=STEPS, shift=model.sampling_shift, guidance=GUIDANCE, progress=False,
                          cache=cache)
    start = time.perf_counter()
    videos = sampler(shapes, context, cu, uncond_context=uncond, uncond_cu_seqlens=cu_uncond, seed=seed)
    return [v.clamp(-1, 1).float() for v in videos], time.perf_counter() - start, sampler.cache_stats


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4 / mse)


def classes(video: torch.Tensor) -> tuple[str | None, str | None]:
    masks = foreground_masks(video, "black")
    return classify_colour(video, masks), classify_motion(masks)


def thresholds_part(model, count: int, thresholds, seeds, size: tuple, raw, done: set) -> None:
    """Part 1: one JSON line per (size, seed, prompt, threshold); threshold 0 is the uncached reference. Seed ``s``
    takes the held-out prompts in the order ``held_out_prompts(count, s)`` with noise seed ``s + i`` for the i-th,
    as ``vdit-eval-demo`` does. Combinations already in ``done`` (from an earlier, interrupted run) are skipped."""
    shape = (3, FRAMES, *size)
    for seed in seeds:
        for i, (prompt, colour, _shape, motion) in enumerate(held_out_prompts(count, seed)):
            if all((tuple(size), seed, prompt, t) in done for t in (0.0, *thresholds)):
                continue
            (ref,), ref_time, stats = run(model, [prompt], [shape], StepCache(threshold=0.0), seed + i)
            ref_classes = classes(ref)
            changes = [c for call in stats.changes for c in call]
            for threshold in (0.0, *thresholds):
                if threshold == 0.0:
                    video, seconds, got = ref, ref_time, stats
                else:
                    (video,), seconds, got = run(model, [prompt], [shape], StepCache(threshold=threshold), seed + i)
                got_classes = classes(video)
                record = {"part": "thresholds", "size": list(size), "seed": seed, "prompt": prompt,
                          "threshold": threshold, "seconds": seconds, "ref_seconds": ref_time,
                          "block_share": got.block_share, "skipped_share": got.skipped_share,
                          "psnr": psnr(video, ref), "colour_ok": got_classes[0] == colour,
                          "motion_ok": got_classes[1] == motion, "colour_agrees": got_classes[0] == ref_classes[0],
                          "motion_agrees": got_classes[1] == ref_classes[1],
                          "changes": changes if threshold == 0.0 else None}
                raw.write(json.dumps(record) + "\n")
                raw.flush()
                print(f"{size} seed {seed} prompt {i} threshold {threshold}: {seconds:.1f} s, "
                      f"skipped {got.block_share:.0%}, psnr {record['psnr']:.1f}", flush=True)


def done_keys(path: str) -> set:
    """(size, seed, prompt, threshold) of the part-1 records already in ``path``."""
    if not os.path.exists(path):
        return set()
    return {(tuple(r.get("size", SIZE)), r.get("seed", 0), r["prompt"], r["threshold"])
            for r in load(path) if r["part"] == "thresholds"}


def mixed_part(model, threshold: float, raw) -> None:
    """Part 2: the mixed-size batch uncached, per video and per batch at ``threshold``."""
    prompts = [p for p, *_ in held_out_prompts(len(MIXED), 1)]
    ref, ref_time, _ = run(model, prompts, MIXED, StepCache(threshold=0.0), 0)
    for per in ("video", "batch"):
        videos, seconds, stats = run(model, prompts, MIXED, StepCache(threshold=threshold, per=per), 0)
        per_video = [sum(call[i] for call in stats_decisions(stats, len(MIXED))) for i in range(len(MIXED))]
        record = {"part": "mixed", "per": per, "threshold": threshold, "seconds": seconds, "ref_seconds": ref_time,
                  "block_share": stats.block_share, "skipped_per_video": per_video,
                  "psnr": [psnr(v, r) for v, r in zip(videos, ref)]}
        raw.write(json.dumps(record) + "\n")
        raw.flush()
        print(record, flush=True)


def stats_decisions(stats, batch: int) -> list[list[bool]]:
    """Per model call, whether each of the ``batch`` videos skipped (both CFG branches counted as one video each)."""
    return [[call[i] or call[i + batch] for i in range(batch)] for call in stats.decisions]


def timing_part(model, repeats: int, raw) -> None:
    """Part 3: seconds of one full model call and of its first block alone (embedding included) on one CFG batch
    at FRAMES x SIZE, interleaved ``repeats`` times, so a shared machine's load falls on both alike."""
    prompt = held_out_prompts(1, 0)[0][0]
    with torch.no_grad():
        context, cu = model.encode([prompt, ""])
        videos = [torch.randn(3, FRAMES, *SIZE)] * 2
        t = torch.full((2,), 0.5)
        full, first = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            model.dit(videos, t, context, cu)
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.dit.first_block(videos, t, context, cu)
            first.append(time.perf_counter() - start)
    record = {"part": "timing", "full": min(full), "first": min(first), "repeats": repeats}
    raw.write(json.dumps(record) + "\n")
    raw.flush()
    print(record, flush=True)


def modelled_speedup(share: float, timing: dict) -> float:
    """Speed-up of a run that skips the remaining blocks of ``share`` of its video evaluations, from the timed
    full call and first block (ignores the cache's bookkeeping and the final layer's share)."""
    return timing["full"] / ((1 - share) * timing["full"] + share * timing["first"])


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sizes_of(records: list[dict]) -> list[tuple[int, int]]:
    """The part-1 video sizes in ``records``, largest last."""
    return sorted({tuple(r.get("size", SIZE)) for r in records if r["part"] == "thresholds"}, key=lambda s: s[0] * s[1])


def threshold_rows(records: list[dict], size: tuple[int, int]) -> list[dict]:
    """One summary per threshold at ``size`` over the (seed, prompt) pairs that threshold and the uncached run
    both finished (thresholds measured on fewer prompts than others say so in their video count)."""
    done = {}
    for r in records:
        if r["part"] == "thresholds" and tuple(r.get("size", SIZE)) == tuple(size):
            done.setdefault((r.get("seed", 0), r["prompt"]), {})[r["threshold"]] = r
    levels = sorted({t for by in done.values() for t in by})
    rows = []
    for t in levels:
        rs = [by[t] for by in done.values() if t in by and 0.0 in by]
        n = max(len(rs), 1)
        finite = [r["psnr"] for r in rs if math.isfinite(r["psnr"])]
        rows.append({"threshold": t, "videos": len(rs), "seeds": len({r.get("seed", 0) for r in rs}),
                     "speedup": sum(r["ref_seconds"] for r in rs) / max(sum(r["seconds"] for r in rs), 1e-9),
                     "block_share": sum(r["block_share"] for r in rs) / n,
                     "psnr": sum(finite) / len(finite) if finite else float("inf"),
                     "skipped_share": sum(r["skipped_share"] for r in rs) / n,
                     **{k: sum(r[k] for r in rs) / n for k in ("colour_ok", "motion_ok", "colour_agrees",
                                                               "motion_agrees")}})
    return rows


def threshold_table(rows: list[dict], size: tuple[int, int], timing: list[dict]) -> list[str]:
    """Markdown lines of part 1 at one size."""
    lines = [f"\n## {FRAMES}x{size[0]}x{size[1]}\n",
             "| threshold | videos (seeds) | wall-clock speed-up | timed speed-up | block evaluations skipped | "
             "PSNR vs uncached (dB) | colour acc. | motion acc. | colour agrees | motion agrees |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = "0 (uncached)" if r["threshold"] == 0 else f"{r['threshold']:g}"
        timed = f"{modelled_speedup(r['skipped_share'], timing[-1]):.2f}x" if timing and size == SIZE else "-"
        lines.append(f"| {label} | {r['videos']} ({r['seeds']}) | {r['speedup']:.2f}x | {timed} | "
                     f"{r['block_share']:.0%} | {r['psnr']:.1f} | {r['colour_ok']:.0%} | {r['motion_ok']:.0%} | "
                     f"{r['colour_agrees']:.0%} | {r['motion_agrees']:.0%} |")
    return lines


def report(records: list[dict], out: str, plot: str) -> None:
    """The markdown table of both parts and the plot (speed-up and block share against PSNR and accuracy)."""
    timing = [r for r in records if r["part"] == "timing"]
    lines = ["# First-Block step cache, shipped demo model, CPU\n",
             f"{FRAMES} frames, {STEPS} Euler steps, guidance {GUIDANCE} (CFG: 2 packed videos per call), max 3 "
             "consecutive skips, first and last step computed. Generated by `benchmarks/step_cache.py`."]
    for size in sizes_of(records):
        lines += threshold_table(threshold_rows(records, size), size, timing)
    changes = sorted(c for r in records if r["part"] == "thresholds" and r.get("changes") for c in r["changes"])
    if changes:
        q = [changes[int(f * (len(changes) - 1))] for f in (0.1, 0.25, 0.5, 0.75, 0.9)]
        lines.append(f"\nRelative first-block change between consecutive uncached steps (steps 2..{STEPS - 1}, both "
                     f"CFG branches): 10/25/50/75/90 % quantiles {', '.join(f'{v:.3f}' for v in q)}.\n")
    if timing:
        t = timing[-1]
        lines.append(f"Timed speed-up: one full CFG call ({t['full']:.2f} s) and its first block alone "
                     f"({t['first']:.2f} s), "
                     f"timed back to back (best of {t['repeats']}), weighted by each threshold's share of skipped "
                     "video evaluations.\n")
    mixed = [r for r in records if r["part"] == "mixed"]
    if mixed:
        sizes = ", ".join("x".join(map(str, s[1:])) for s in MIXED)
        lines += [f"\n## Per video against per batch (one packed batch of {sizes})\n",
                  "| decision | threshold | skipped evaluations per video | block evaluations skipped | "
                  "PSNR per video (dB) | speed-up |", "|---|---|---|---|---|---|"]
        for r in mixed:
            lines.append(f"| per {r['per']} | {r['threshold']:g} | {r['skipped_per_video']} | {r['block_share']:.0%} | "
                         f"{', '.join(f'{p:.1f}' for p in r['psnr'])} | {r['ref_seconds'] / r['seconds']:.2f}x |")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_rows(threshold_rows(records, SIZE), plot)


def plot_rows(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cached = [r for r in rows if r["threshold"] > 0]
    if not cached:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ts = [r["threshold"] for r in cached]
    a.plot(ts, [r["speedup"] for r in cached], "o-", label="wall-clock speed-up")
    a.plot(ts, [1 / (1 - r["block_share"]) for r in cached], "s--", label="1 / (1 - block share skipped)")
    a.set_xlabel("threshold")
    a.set_ylabel("speed-up (x)")
    a.legend()
    b.plot(ts, [100 * r["colour_agrees"] for r in cached], "o-", label="colour agrees with uncached (%)")
    b.plot(ts, [100 * r["motion_agrees"] for r in cached], "s-", label="motion agrees with uncached (%)")
    b.plot(ts, [r["psnr"] for r in cached], "^-", label="PSNR vs uncached (dB)")
    b.set_xlabel("threshold")
    b.legend()
    counts = " / ".join(str(r["videos"]) for r in cached)
    fig.suptitle(f"First-Block cache, demo model {FRAMES}x{SIZE[0]}x{SIZE[1]}, videos per threshold: {counts}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=36)
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", default="64x96", help="HxW of part 1's videos")
    p.add_argument("--mixed-threshold", type=float, default=0.1)
    p.add_argument("--skip-thresholds", action="store_true", help="only part 2")
    p.add_argument("--skip-mixed", action="store_true", help="only part 1")
    p.add_argument("--raw", default="runs/step-cache.jsonl")
    p.add_argument("--out", default="benchmarks/results/cpu-step-cache.md")
    p.add_argument("--plot", default="benchmarks/results/cpu-step-cache.png")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--timing", type=int, default=0, help="only part 3, with this many repeats")
    args = p.parse_args(argv)
    if not args.report_only:
        model = TextToVideo.load(DEFAULT_WEIGHTS)
        os.makedirs(os.path.dirname(os.path.abspath(args.raw)), exist_ok=True)
        with open(args.raw, "a") as raw:
            if args.timing:
                timing_part(model, args.timing, raw)
                args.skip_mixed = args.skip_thresholds = True
            if not args.skip_mixed:
                mixed_part(model, args.mixed_threshold, raw)
            if not args.skip_thresholds:
                size = tuple(int(v) for v in args.size.split("x"))
                thresholds_part(model, args.prompts, args.thresholds, args.seeds, size, raw, done_keys(args.raw))
    report(load(args.raw), args.out, args.plot)


if __name__ == "__main__":
    main()
