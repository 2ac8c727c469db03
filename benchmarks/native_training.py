"""Native-size training against square crops: framing and motion of two fine-tunes on non-square outputs.

Sora's report argues for training on videos at their native size: a model trained on square centre crops has
seen subjects cut by the crop, and frames widescreen and vertical videos worse. This benchmark compares two
fine-tunes of the shipped demo model with equal steps and settings, one on native-size packed batches
(``vdit-train --init-weights ...``) and one on the centre square crops of the same videos (``--square-crops``);
the commands are in :data:`COMMANDS`.

For each held-out prompt (vdit.demo.evaluation.held_out_prompts) and seed, each model generates the prompt at
four non-square sizes (32x64, 64x32, 40x72, 72x40; 16 frames, 20 Euler steps, guidance 4, independent noise) in
one packed batch. Per video it measures, with :func:`benchmarks.aspect_consistency.measure`, whether the object
is in every frame without touching the border ("fully in frame"), the share of such frames, and whether colour,
shape and motion direction are the prompt's. Both models see the same prompts, seeds and noise, so the report
also gives the paired difference (native minus square) with its standard error over prompt/seed pairs.

Each video's row is appended to ``--raw`` as it comes (resumable; ``--report-only`` reports what exists).

    OMP_NUM_THREADS=1 python -m benchmarks.native_training --seeds 0,1 \\
        --model native=runs/ft-native/model.safetensors --model square=runs/ft-square/model.safetensors
    python -m benchmarks.native_training --report-only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from benchmarks.aspect_consistency import FRAMES, GUIDANCE, STEPS, measure
from benchmarks.common import add_study_arguments, parse_model_study, run_study
from vdit.demo.evaluation import held_out_prompts
from vdit.demo.pipeline import TextToVideo, generate

SIZES = ((32, 64), (64, 32), (40, 72), (72, 40))
RAW, VIDEOS = "runs/native-training.jsonl", "runs/native-training-videos"
REPORT = "benchmarks/results/cpu-native-training.md"
COMMANDS = """\
w=vdit/demo/assets/demo/model.safetensors
common="--init-weights $w --steps 1000 --lr 1e-4 --warmup 50 --decay-steps 200 --seed 7 --save-every 25 \\
  --timestep-sampling uniform --timestep-shift 8"
OMP_NUM_THREADS=1 python -m vdit.demo.cli.train --out runs/ft-native $common
OMP_NUM_THREADS=1 python -m vdit.demo.cli.train --out runs/ft-square $common --square-crops"""
MEASURES = (("in_frame", "fully in frame"), ("frames_in_frame", "frames in frame"), ("motion", "direction right"),
            ("colour", "colour right"), ("shape", "shape right"))


def done_keys(raw: str) -> set[tuple]:
    """(model, prompt index, seed) of the groups already in ``raw``."""
    if not os.path.exists(raw):
        return set()
    with open(raw) as f:
        return {(r["model"], r["index"], r["seed"]) for r in map(json.loads, f)}


def run_group(model: TextToVideo, name: str, prompt: tuple, index: int, seed: int, videos: str) -> list[dict]:
    """Generate ``prompt`` at every size of :data:`SIZES` from ``seed`` (one packed batch), save the uint8
    frames (3, T, H, W) under ``videos`` and return one measured row per video."""
    text = prompt[0]
    start = time.perf_counter()
    out = generate(model, [text] * len(SIZES), frames=FRAMES, steps=STEPS, guidance=GUIDANCE,
                   seed=[seed] * len(SIZES), sizes=SIZES, progress=False)
    seconds = (time.perf_counter() - start) / len(SIZES)
    rows = []
    for (h, w), video in zip(SIZES, out):
        path = os.path.join(videos, f"{name}-p{index:02d}-s{seed}-{h}x{w}.pt")
        torch.save(((video + 1) * 127.5).round().to(torch.uint8), path)
        rows.append(_row(name, index, seed, prompt, (h, w), measure(video), round(seconds, 2), path))
    return rows


def _row(model: str, index: int, seed: int, prompt: tuple, size: tuple[int, int], m: dict, seconds: float,
         video: str | None = None) -> dict:
    """One video's JSON row: the prompt's attributes, the size, and what :func:`measure` saw (``m``)."""
    text, colour, shape, motion = prompt
    return {"model": model, "index": index, "seed": seed, "prompt": text, "colour": colour, "shape": shape,
            "motion": motion, "height": size[0], "width": size[1], "seconds": seconds, "video": video,
            "in_frame": m["in_frame"], "frames_in_frame": m["frames_in_frame"],
            "seen_colour": m["colour"], "seen_shape": m["shape"], "seen_motion": m["motion"]}


def dataset_reference(seeds: list[int], prompts: int = 36) -> list[dict]:
    """Rows as :func:`run_group` makes them for the training data itself: each held-out prompt's attributes
    rendered by vdit.demo.data at every size of :data:`SIZES` (16 frames, a random object size and placement per
    prompt, seed and size), measured alike. What the measures give on the videos the models learn from."""
    import random

    from vdit.demo.data import SIZES as OBJECT_SIZES
    from vdit.demo.data import ObjectSpec, VideoSpec, render

    rows = []
    for seed in seeds:
        for index, prompt in enumerate(held_out_prompts(prompts)):
            _, colour, shape, motion = prompt
            for h, w in SIZES:
                rng = random.Random(f"native-training/{seed}/{index}/{h}x{w}")
                spec = VideoSpec(FRAMES, h, w, "black", None,
                                 [ObjectSpec(shape, colour, rng.choice(list(OBJECT_SIZES)), motion)])
                rows.append(_row("training data", index, seed, prompt, (h, w), measure(render(spec, rng)), 0.0))
    return rows


def score(row: dict, key: str) -> float:
    """The row's value of measure ``key`` (one of :data:`MEASURES`) as a number in [0, 1]."""
    if key in ("in_frame", "frames_in_frame"):
        return float(row[key])
    return float(row[f"seen_{key}"] == row[key])


def summarise(rows: list[dict], names: list[str]) -> tuple[dict, dict]:
    """Per model the mean of each measure over the videos whose (prompt, seed) every model has, and per measure
    the paired difference ``names[0] - names[1]`` (mean over prompt/seed pairs, standard error)."""
    by = {}
    for r in rows:
        by.setdefault((r["index"], r["seed"]), {}).setdefault(r["model"], []).append(r)
    pairs = [k for k, v in by.items() if all(len(v.get(n, [])) == len(SIZES) for n in names)]
    means = {n: {"pairs": len(pairs)} for n in names}
    for n in names:
        videos = [r for k in pairs for r in by[k][n]]
        for key, _ in MEASURES:
            means[n][key] = sum(score(r, key) for r in videos) / max(1, len(videos))
    diffs = {}
    if len(names) == 2 and len(pairs) > 1:
        for key, _ in MEASURES:
            d = torch.tensor([sum(score(r, key) for r in by[k][names[0]]) / len(SIZES)
                              - sum(score(r, key) for r in by[k][names[1]]) / len(SIZES) for k in pairs])
            diffs[key] = (float(d.mean()), float(d.std() / math.sqrt(len(pairs))))
    return means, diffs


def per_size(rows: list[dict], names: list[str]) -> str:
    """Markdown table: fully-in-frame share per model and size."""
    lines = ["| size | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for h, w in SIZES:
        cells = []
        for n in names:
            mine = [r for r in rows if r["model"] == n and (r["height"], r["width"]) == (h, w)]
            cells.append(f"{sum(r['in_frame'] for r in mine) / max(1, len(mine)):.0%} ({len(mine)})")
        lines.append(f"| {h}x{w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(means: dict, names: list[str], path: str, reference: dict | None = None) -> None:
    """Bar chart of each measure per model, with binomial standard errors over the videos; ``reference`` (the
    training data's means) as a black mark over each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.3))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        values = [means[n][k] for k, _ in MEASURES]
        videos = means[n]["pairs"] * len(SIZES)
        errors = [math.sqrt(v * (1 - v) / max(1, videos)) for v in values]
        ax.bar([j + i * width for j in range(len(MEASURES))], values, width, yerr=errors, capsize=3,
               label=f"{n} ({videos} videos)")
    centres = [j + width * (len(names) - 1) / 2 for j in range(len(MEASURES))]
    if reference is not None:
        ax.scatter(centres, [reference[k] for k, _ in MEASURES], marker="_", s=900, color="black", zorder=3,
                   label="training data")
    ax.set_xticks(centres, [t for _, t in MEASURES])
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("share of non-square videos")
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args) -> None:
    """Write the markdown report and its plot from ``args.raw``."""
    with open(args.raw) as f:
        rows = [json.loads(line) for line in f]
    names = list(dict.fromkeys(r["model"] for r in rows))
    complete = {k for k in {(r["index"], r["seed"]) for r in rows}
                if all(sum(r["model"] == n and (r["index"], r["seed"]) == k for r in rows) == len(SIZES)
                       for n in names)}
    rows = [r for r in rows if (r["index"], r["seed"]) in complete]  # a run cut short: the pairs every model has
    means, diffs = summarise(rows, names)
    data_rows = [r for r in dataset_reference(sorted({r["seed"] for r in rows}), args.prompts)
                 if (r["index"], r["seed"]) in complete]
    data, _ = summarise(data_rows, ["training data"])
    stem = os.path.splitext(args.out)[0]
    plot(means, names, stem + ".png", data["training data"])
    seconds = statistics.median(r["seconds"] for r in rows)
    head = "| model | prompt/seed pairs | " + " | ".join(t for _, t in MEASURES) + " |"
    lines = [head, "|---|---|" + "---|" * len(MEASURES)]
    for n in names:
        lines.append(f"| {n} | {means[n]['pairs']} | " + " | ".join(f"{means[n][k]:.1%}" for k, _ in MEASURES)
                     + " |")
    lines.append(f"| (training data) | {data['training data']['pairs']} | "
                 + " | ".join(f"{data['training data'][k]:.1%}" for k, _ in MEASURES) + " |")
    if diffs:
        lines.append(f"| {names[0]} - {names[1]} (paired) | | "
                     + " | ".join(f"{diffs[k][0]:+.1%} +- {diffs[k][1]:.1%}" for k, _ in MEASURES) + " |")
    seeds = sorted({r["seed"] for r in rows})
    text = [f"# Native-size training against square crops ({FRAMES} frames, {STEPS} Euler steps, guidance "
            f"{GUIDANCE:g}, independent noise)", "",
            f"Sizes {', '.join(f'{h}x{w}' for h, w in SIZES)}; seeds {seeds}; {len(rows)} videos, median {seconds:.1f} "
            "s each (one thread, a shared 2-core machine). Both models are the shipped demo model fine-tuned with "
            "equal steps and settings:", "", "```", COMMANDS, "```", "",
            "\n".join(lines), "",
            "(training data: the same prompts' attributes rendered by the dataset at the same sizes, measured "
            "alike: the share its own videos reach.)", "",
            "Fully in frame, per size (videos):", "", per_size(rows + data_rows, names + ["training data"]), "",
            f"![native against square]({os.path.basename(stem)}.png)", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


def generate_all(args) -> None:
    """Every missing (model, seed, prompt) group, prompt-major so that a run cut short compares the models on
    the same prompts."""
    os.makedirs(args.videos, exist_ok=True)
    os.makedirs(os.path.dirname(args.raw) or ".", exist_ok=True)
    models = {name: TextToVideo.load(path) for name, path in args.model}
    done = done_keys(args.raw)
    for seed in args.seeds:
        for index, prompt in enumerate(held_out_prompts(args.prompts)):
            for name, model in models.items():
                if (name, index, seed) in done:
                    continue
                rows = run_group(model, name, prompt, index, seed, args.videos)
                with open(args.raw, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                print(f"seed {seed} prompt {index} {name}: {rows[0]['seconds']:.1f} s per video", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(p, raw=RAW, videos=VIDEOS, report=REPORT, report_help="markdown report (its plot: <out>.png)")
    return parse_model_study(p, argv, "NAME=WEIGHTS (safetensors with config.json beside it); give two, native first")


def main(argv=None) -> None:
    run_study(parse_args(argv), generate_all, report)


if __name__ == "__main__":
    main()
