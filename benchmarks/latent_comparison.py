"""Pixel model against latent model: the same held-out prompts and seeds, side by side.

Sora-style models diffuse a compressed latent rather than pixels, so that the transformer spends its tokens on
content rather than on redundant pixels. This benchmark runs two demo models (``--model NAME=WEIGHTS``, a shipped
name or a safetensors file) on the held-out prompts (vdit.demo.evaluation.held_out_prompts) at each ``--sizes``
(16 frames, 20 Euler steps, guidance 4, each model at its own sampling shift), one video per prompt, seed and
size, and measures per video:
- colour and motion direction against the prompt, and whether the object is in every frame
  (vdit.demo.evaluation, as ``vdit-eval-demo``);
- the shape class of the object (:func:`benchmarks.aspect_consistency.measure`'s classifier, 99 % right on the
  dataset's own videos);
- frame-to-frame stability: the mean absolute change between consecutive frames and the mean IoU of consecutive
  foreground masks (higher is steadier);
- the sampling time (one thread) and the tokens the transformer sees per video.

Each video's row is appended to ``--raw`` as it comes (resumable; ``--report-only`` reports what exists). The
report ends with ``<out>-notes.md`` where that file exists (the runs' commands and reading, written by hand).

    OMP_NUM_THREADS=1 python -m benchmarks.latent_comparison --seeds 0,1,2 --model pixel=dense --model latent=latent
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.aspect_consistency import measure
from benchmarks.common import add_study_arguments, parse_model_study, run_study
from vdit.demo.evaluation import (
    classify_colour,
    classify_motion,
    foreground_masks,
    held_out_prompts,
    temporal_consistency,
)
from vdit.demo.pipeline import SHIPPED_WEIGHTS, TextToVideo, generate, model_shape

FRAMES, STEPS, GUIDANCE = 16, 20, 4.0
SIZES = ((64, 96), (128, 128))
RAW, VIDEOS = "runs/latent-comparison.jsonl", "runs/latent-comparison-videos"
REPORT = "benchmarks/results/cpu-latent-comparison.md"
MEASURES = (("colour", "colour right"), ("motion", "motion right"), ("shape", "shape right"),
            ("persistent", "object in every frame"), ("mask_iou", "foreground IoU t->t+1"),
            ("frame_diff", "frame-to-frame change"), ("seconds", "s / video (its own run)"),
            ("tokens", "tokens / video"))


def tokens_per_video(model: TextToVideo, frames: int, height: int, width: int) -> int:
    """Patch tokens the transformer sees for one (frames, height, width) video."""
    _, t, h, w = model_shape(model, frames, height, width)
    pt, ph, pw = model.dit.config.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def measure_video(video: torch.Tensor, prompt: tuple) -> dict:
    """The measures of one generated video (3, T, H, W) in [-1, 1] for ``prompt`` (text, colour, shape, motion)."""
    masks = foreground_masks(video, "black")
    diff, iou = temporal_consistency(video, masks)
    return {"seen_colour": classify_colour(video, masks), "seen_motion": classify_motion(masks),
            "seen_shape": measure(video)["shape"], "persistent": bool(masks.flatten(1).any(1).all()),
            "frame_diff": diff, "mask_iou": iou}


def done_keys(raw: str) -> set[tuple]:
    """(model, height, width, seed, prompt index) of the videos already in ``raw``."""
    if not os.path.exists(raw):
        return set()
    with open(raw) as f:
        return {(r["model"], r["height"], r["width"], r["seed"], r["index"]) for r in map(json.loads, f)}


def generate_all(args) -> None:
    """Every missing video, model by model (each loaded once), size-major, seed by seed."""
    os.makedirs(args.videos, exist_ok=True)
    os.makedirs(os.path.dirname(args.raw) or ".", exist_ok=True)
    prompts = held_out_prompts(args.prompts)
    done = done_keys(args.raw)
    for name, weights in args.model:
        model = TextToVideo.load(SHIPPED_WEIGHTS.get(weights, weights))
        for h, w in args.sizes:
            tokens = tokens_per_video(model, FRAMES, h, w)
            for seed in args.seeds:
                for index, prompt in enumerate(prompts):
                    if (name, h, w, seed, index) in done:
                        continue
                    start = time.perf_counter()
                    video, = generate(model, [prompt[0]], frames=FRAMES, height=h, width=w, steps=STEPS,
                                      guidance=GUIDANCE, seed=seed * 1000 + index, progress=False)
                    seconds = time.perf_counter() - start
                    path = os.path.join(args.videos, f"{name}-{h}x{w}-s{seed}-p{index:02d}.pt")
                    torch.save(((video + 1) * 127.5).round().to(torch.uint8), path)
                    row = {"model": name, "weights": weights, "height": h, "width": w, "seed": seed, "index": index,
                           "prompt": prompt[0], "colour": prompt[1], "shape": prompt[2], "motion": prompt[3],
                           "seconds": round(seconds, 3), "tokens": tokens, "video": path,
                           **measure_video(video, prompt)}
                    with open(args.raw, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{name} {h}x{w} seed {seed} prompt {index}: {seconds:.1f} s", flush=True)


TIMING = ((16, 64, 96), (16, 128, 128), (32, 128, 128), (32, 128, 256))  # (frames, height, width)


def timing(args) -> dict:
    """Median seconds of one video per model and (frames, height, width) of :data:`TIMING` (``--timing-sizes``),
    the models interleaved round by round so that both see the same machine load; a model runs a size only when
    its tokens per video stay within ``--timing-max-tokens``. Written to ``<out stem>-timing.json``."""
    models = [(name, TextToVideo.load(SHIPPED_WEIGHTS.get(w, w))) for name, w in args.model]
    prompt = held_out_prompts(1)[0][0]
    seconds: dict[str, dict[str, list[float]]] = {}
    tokens: dict[str, dict[str, int]] = {}
    for _ in range(args.timing_rounds):
        for frames, h, w in args.timing_sizes:
            key = f"{frames}x{h}x{w}"
            for name, model in models:
                n = tokens_per_video(model, frames, h, w)
                tokens.setdefault(name, {})[key] = n
                if n > args.timing_max_tokens:
                    continue
                start = time.perf_counter()
                generate(model, [prompt], frames=frames, height=h, width=w, steps=STEPS, guidance=GUIDANCE, seed=0,
                         progress=False)
                seconds.setdefault(name, {}).setdefault(key, []).append(time.perf_counter() - start)
                print(f"timing {name} {key}: {seconds[name][key][-1]:.1f} s", flush=True)
    result = {"threads": torch.get_num_threads(), "rounds": args.timing_rounds, "tokens": tokens,
              "seconds": {m: {k: statistics.median(v) for k, v in sizes.items()} for m, sizes in seconds.items()}}
    with open(os.path.splitext(args.out)[0] + "-timing.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def timing_table(result: dict) -> str:
    """Markdown: seconds per video of each model at each timed size, and tokens per video."""
    models = list(result["tokens"])
    sizes = list(next(iter(result["tokens"].values())))
    lines = ["| video (frames x H x W) | " + " | ".join(f"{m}: s (tokens)" for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    for key in sizes:
        cells = []
        for m in models:
            t = result["seconds"].get(m, {}).get(key)
            cells.append(f"{t:.1f} ({result['tokens'][m][key]})" if t is not None else
                         f"not run ({result['tokens'][m][key]})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def value(row: dict, key: str) -> float:
    """The row's value of measure ``key`` (:data:`MEASURES`) as a number."""
    if key in ("colour", "motion", "shape"):
        return float(row[f"seen_{key}"] == row[key])
    return float(row[key])


def by_size(rows: list[dict]) -> list[tuple[tuple[int, int], list[dict], list[str]]]:
    """((height, width), its rows, its models) per size, smallest first; every size lists its models in the order
    they first appear in ``rows``."""
    order = list(dict.fromkeys(r["model"] for r in rows))
    groups = []
    for size in sorted({(r["height"], r["width"]) for r in rows}, key=lambda s: s[0] * s[1]):
        at = [r for r in rows if (r["height"], r["width"]) == size]
        groups.append((size, at, [m for m in order if any(r["model"] == m for r in at)]))
    return groups


def summarise(rows: list[dict]) -> dict[tuple, dict]:
    """(height, width) -> model -> {measure: mean, "videos": n, "seconds_median": ...}, over the (seed, prompt)
    pairs every model has at that size (so the models are compared on the same videos)."""
    out: dict[tuple, dict] = {}
    for size, at, models in by_size(rows):
        keys = set.intersection(*({(r["seed"], r["index"]) for r in at if r["model"] == m} for m in models))
        out[size] = {}
        for m in models:
            mine = [r for r in at if r["model"] == m and (r["seed"], r["index"]) in keys]
            if not mine:
                continue
            stats = {key: statistics.fmean(value(r, key) for r in mine) for key, _ in MEASURES}
            stats["videos"] = len(mine)
            stats["seconds_median"] = statistics.median(r["seconds"] for r in mine)
            out[size][m] = stats
    return out


PAIRED = ("colour", "motion", "shape")


def paired_differences(rows: list[dict]) -> list[str]:
    """Markdown lines: at each size with two models, the second model's accuracy minus the first's on the
    (seed, prompt) pairs both ran, with the standard error of the paired mean, for colour, motion and shape."""
    lines = []
    for (h, w), at, models in by_size(rows):
        if len(models) != 2:
            continue
        first, second = ({(r["seed"], r["index"]): r for r in at if r["model"] == m} for m in models)
        keys = sorted(first.keys() & second.keys())
        if len(keys) < 2:
            continue
        parts = []
        for key in PAIRED:
            diffs = [value(second[k], key) - value(first[k], key) for k in keys]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            parts.append(f"{key} {100 * statistics.fmean(diffs):+.1f} +- {100 * se:.1f}")
        lines.append(f"- {FRAMES}x{h}x{w}, {models[1]} - {models[0]} on {len(keys)} paired videos (points, +- one "
                     f"standard error): {', '.join(parts)}")
    return lines


def table(summary: dict[tuple, dict]) -> str:
    """Markdown: one row per size and model."""
    lines = ["| size | model | videos | " + " | ".join(label for _, label in MEASURES) + " |",
             "|---|---|---|" + "---|" * len(MEASURES)]
    for (h, w), models in summary.items():
        for m, s in models.items():
            cells = []
            for key, _ in MEASURES:
                if key in ("colour", "motion", "shape", "persistent"):
                    cells.append(f"{s[key]:.0%}")
                elif key == "seconds":
                    cells.append(f"{s['seconds_median']:.1f}")
                elif key == "tokens":
                    cells.append(f"{s[key]:.0f}")
                else:
                    cells.append(f"{s[key]:.3f}")
            lines.append(f"| {FRAMES}x{h}x{w} | {m} | {s['videos']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args) -> None:
    """Write the markdown report (and ``<out>.json``) from ``args.raw``."""
    with open(args.raw) as f:
        rows = [json.loads(line) for line in f]
    summary = summarise(rows)
    weights = {r["model"]: r["weights"] for r in rows}
    text = [f"# Pixel model against latent model ({FRAMES} frames, {STEPS} Euler steps, guidance {GUIDANCE:g}, "
            "each model at its own sampling shift)", "",
            f"Models: {', '.join(f'{m} = `{w}`' for m, w in weights.items())}. Seeds "
            f"{sorted({r['seed'] for r in rows})}, {len({r['index'] for r in rows})} held-out prompts, "
            f"{len(rows)} videos; times are medians, one thread (torch {torch.__version__}, CPU "
            f"{torch.backends.cpu.get_cpu_capability()}). Each size compares the models on the prompt/seed pairs "
            "both ran.", "", "```", "OMP_NUM_THREADS=1 python -m benchmarks.latent_comparison " +
            " ".join(f"--model {m}={w}" for m, w in weights.items()) +
            f" --seeds {','.join(map(str, sorted({r['seed'] for r in rows})))}", "```", "",
            table(summary), ""]
    paired = paired_differences(rows)
    if paired:
        text += ["Paired differences:", "", *paired, ""]
    timing_path = os.path.splitext(args.out)[0] + "-timing.json"
    if os.path.exists(timing_path):
        with open(timing_path) as f:
            result = json.load(f)
        text += [f"Sampling time, the models interleaved in one process ({result['threads']} thread(s), median of "
                 f"{result['rounds']} round(s); 'not run': above the timing's token limit):", "",
                 timing_table(result), ""]
    notes_path = os.path.splitext(args.out)[0] + "-notes.md"
    if os.path.exists(notes_path):  # what ran and what it says, written by hand: kept when the report is redone
        with open(notes_path) as f:
            text += [f.read().rstrip("\n"), ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({f"{h}x{w}": models for (h, w), models in summary.items()}, f, indent=1)
    print("\n".join(text))


def size_list(text: str) -> list[tuple[int, ...]]:
    """Comma-separated sizes, each 'x'-separated integers: '64x96,128x128' -> [(64, 96), (128, 128)]."""
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(p, raw=RAW, videos=VIDEOS, report=REPORT, report_help="markdown report (and <out>.json)")
    p.add_argument("--sizes", type=size_list,
                   default=list(SIZES), help="comma-separated HxW")
    p.add_argument("--timing-rounds", type=int, default=0,
                   help="also time one video per model at each --timing-sizes, this many rounds (0: no timing)")
    p.add_argument("--timing-sizes", type=size_list,
                   default=list(TIMING), help="comma-separated FxHxW")
    p.add_argument("--timing-max-tokens", type=int, default=4096, help="skip timings above this many tokens")
    return parse_model_study(p, argv, "NAME=WEIGHTS (a shipped name such as dense or latent, or a safetensors "
                                      "file); give two")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.timing_rounds and not args.report_only:
        timing(args)
    run_study(args, generate_all, report)


if __name__ == "__main__":
    main()
