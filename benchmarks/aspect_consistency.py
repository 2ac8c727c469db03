"""One subject across aspect ratios: does a seed keep its subject at every size with shared initial noise?

For each held-out prompt (vdit.demo.evaluation.held_out_prompts) and seed, the shipped demo model generates the
prompt at five sizes (48x48, 32x64, 64x32, 40x72, 72x40; 16 frames, 20 Euler steps, guidance 4) in one packed
batch, every size from the same seed, once per noise mode (vdit.sampling.noise):

- independent: each size draws its own noise (what ``vdit-generate --seed s`` gives at each size);
- shared: centred crops of one 16x128x128 canvas per seed (``vdit-generate --noise shared``);
- resampled: the same canvas scaled to each size by renormalised block sums (``--noise resampled``).

Per video it measures the colour, the shape class (:func:`shape_class`, a fill-ratio classifier of the
foreground mask, checked on the dataset's own frames by :func:`classifier_accuracy`), the motion direction, the
object's scale relative to the frame and whether it stays fully in frame. The report gives, per mode, the share
of prompt/seed pairs whose colour, shape and direction agree at all five sizes, the spread of the scale over the
sizes and the in-frame share, a markdown table and a contact sheet of one prompt at the five sizes per mode.

Every video's row is appended to ``--raw`` (JSON lines) as it comes and its frames are saved under
``--videos`` (uint8), so an interrupted run resumes where it stopped and ``--report-only`` reports what exists.

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.aspect_consistency --seeds 0
    python -m benchmarks.aspect_consistency --report-only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from benchmarks.common import add_study_arguments, run_study
from vdit.demo.data import ShapesDataset
from vdit.demo.evaluation import classify_colour, classify_motion, foreground_masks, held_out_prompts
from vdit.demo.pipeline import DEFAULT_WEIGHTS, TextToVideo, generate
from vdit.sampling import DEFAULT_CANVAS_HW, InitialNoise

FRAMES, STEPS, GUIDANCE = 16, 20, 4.0
SIZES = ((48, 48), (32, 64), (64, 32), (40, 72), (72, 40))
MODES = ("independent", "shared", "resampled")
RAW, VIDEOS = "runs/aspect-consistency.jsonl", "runs/aspect-videos"
REPORT = "benchmarks/results/cpu-aspect-consistency.md"


def clean_masks(masks: torch.Tensor) -> torch.Tensor:
    """(T, H, W) bool ``masks`` opened by a 3x3 square (stray pixels of a generated video removed), frame by
    frame, where the opening keeps >= 70 % of the frame's pixels (a small object stays as it is)."""
    x = masks.float()[:, None]
    opened = F.max_pool2d(-F.max_pool2d(-x, 3, 1, 1), 3, 1, 1)[:, 0] > 0.5
    keep = opened.flatten(1).sum(1) >= 0.7 * masks.flatten(1).sum(1)
    return torch.where(keep[:, None, None], opened, masks)


def touches_border(mask: torch.Tensor) -> bool:
    """Whether the (H, W) ``mask`` has a pixel in the outermost row or column."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def shape_features(mask: torch.Tensor, whole: bool = True) -> tuple[float, float] | None:
    """(fill ratio of the bounding box, share of the pixels in its upper half) of an (H, W) mask; None for an
    object under 6 pixels or, if ``whole``, cut by the frame's border (its box would not be its own)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) < 6 or (whole and touches_border(mask)):
        return None
    h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    centre = float(ys.min()) + h / 2
    rows = ys.float() + 0.5
    upper = float((rows < centre).sum() + 0.5 * (rows == centre).sum())
    return len(ys) / (h * w), upper / len(ys)


def shape_class(masks: torch.Tensor) -> str | None:
    """circle / square / triangle of the foreground ``masks`` (T, H, W) from the median over frames of the
    bounding box's fill ratio (square 1, circle pi / 4, upward triangle 1 / 2) and of the share of pixels in
    the box's upper half (a triangle's apex is up: about 1 / 4 of its area, a circle's or square's 1 / 2).
    Frames where the object touches the border count only when no frame shows it whole; None without an object."""
    clean = clean_masks(masks)
    features = [f for f in (shape_features(m) for m in clean) if f is not None]
    features = features or [f for f in (shape_features(m, whole=False) for m in clean) if f is not None]
    if not features:
        return None
    fill, upper = torch.tensor(features).median(0).values.tolist()
    if upper < 0.45 or fill < 0.68:
        return "triangle"
    return "square" if fill >= 0.92 else "circle"


def classifier_accuracy(count: int = 300, seed: int = 5) -> tuple[float, int]:
    """(share of correct :func:`shape_class`, videos) on the dataset's one-object videos of a plain background
    (the first ``count`` samples of ``ShapesDataset(seed, max_objects=1)``; two-colour backgrounds skipped)."""
    dataset = ShapesDataset(seed=seed, max_objects=1)
    right = total = 0
    for i in range(count):
        spec, _ = dataset.spec(i)
        if spec.background2 is not None:
            continue
        video, _, spec = dataset[i]
        right += shape_class(foreground_masks(video, spec.background)) == spec.objects[0].shape
        total += 1
    return right / total, total


def measure(video: torch.Tensor) -> dict:
    """Colour, shape class, motion, scale (sqrt of the mean foreground area over min(H, W)), whether the object
    is in every frame without touching the border, the share of frames where it is, and where it starts (its
    centroid over the first quarter of the frames, as fractions (x / W, y / H) of the frame; None if absent), of a
    (3, T, H, W) video in [-1, 1]."""
    masks = foreground_masks(video, "black")
    clean = clean_masks(masks)
    area = clean.flatten(1).sum(1).float()
    whole = [bool(a > 0) and not touches_border(m) for a, m in zip(area, clean)]
    T, H, W = masks.shape
    first = masks[: max(1, T // 4)].float()  # where the object starts: the centroid over the first quarter
    total = float(first.sum())
    ys, xs = torch.arange(H, dtype=torch.float32) + 0.5, torch.arange(W, dtype=torch.float32) + 0.5
    start = None if total == 0 else (float((first.sum((0, 1)) * xs).sum()) / total / W,
                                     float((first.sum((0, 2)) * ys).sum()) / total / H)
    return {"colour": classify_colour(video, masks), "shape": shape_class(masks), "motion": classify_motion(masks),
            "scale": float(area.mean().sqrt()) / min(video.shape[-2:]), "in_frame": all(whole),
            "frames_in_frame": sum(whole) / len(whole), "start": start}


def noise_of(mode: str) -> InitialNoise:
    """The sampler's noise of ``mode``: the shared modes use the demo CLI's fixed canvas, so that
    ``vdit-generate --noise <mode> --seed s --size HxW`` reproduces a video of this benchmark."""
    return InitialNoise(mode, None if mode == "independent" else (FRAMES, *DEFAULT_CANVAS_HW))


def video_path(videos: str, mode: str, index: int, seed: int, size: tuple[int, int]) -> str:
    return os.path.join(videos, f"{mode}-p{index:02d}-s{seed}-{size[0]}x{size[1]}.pt")


def done_keys(raw: str) -> set[tuple]:
    """(mode, prompt index, seed) of the groups ``raw`` already holds all sizes of."""
    counts: dict[tuple, int] = {}
    if os.path.exists(raw):
        with open(raw) as f:
            for line in f:
                r = json.loads(line)
                key = (r["mode"], r["index"], r["seed"])
                counts[key] = counts.get(key, 0) + 1
    return {k for k, n in counts.items() if n >= len(SIZES)}


def run_group(model, prompt, index: int, seed: int, mode: str, args) -> list[dict]:
    """Generate ``prompt`` at every size from ``seed`` with ``mode`` noise (one packed batch); save the frames
    and return one row per video."""
    text, colour, shape, motion = prompt
    start = time.perf_counter()
    videos = generate(model, [text] * len(SIZES), frames=FRAMES, steps=STEPS, guidance=GUIDANCE,
                      seed=[seed] * len(SIZES), sizes=SIZES, noise=noise_of(mode), progress=False)
    seconds = (time.perf_counter() - start) / len(SIZES)
    rows = []
    for size, video in zip(SIZES, videos):
        path = video_path(args.videos, mode, index, seed, size)
        torch.save(((video + 1) * 127.5).round().to(torch.uint8), path)
        masks = foreground_masks(video, "black")
        rows.append({"mode": mode, "index": index, "seed": seed, "prompt": text, "colour": colour, "shape": shape,
                     "motion": motion, "height": size[0], "width": size[1], "seconds": round(seconds, 2),
                     "seen_colour": classify_colour(video, masks), "seen_motion": classify_motion(masks),
                     "video": path})
    return rows


def load_rows(raw: str) -> list[dict]:
    """The rows of ``raw`` with each video's :func:`measure` added (keys ``m_colour``, ``m_shape``, ...)."""
    rows = []
    with open(raw) as f:
        for line in f:
            row = json.loads(line)
            video = torch.load(row["video"]).float() / 127.5 - 1
            row.update({f"m_{k}": v for k, v in measure(video).items()})
            rows.append(row)
    return rows


def groups_of(rows: list[dict], modes=None) -> dict[tuple, list[dict]]:
    """(mode, prompt index, seed) -> its rows, for the groups of ``modes`` (default: every mode that ran) with
    every size, on the prompt/seed pairs that each of those modes completed (so the modes are compared on the
    same pairs, also when a run was cut short or some modes ran on fewer seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["index"], r["seed"]), []).append(r)
    complete = {k: v for k, v in groups.items() if len(v) == len(SIZES)}
    modes = set(modes) if modes is not None else {k[0] for k in complete}
    pairs = {k[1:] for k in complete if all((m, *k[1:]) in complete for m in modes)}
    return {k: v for k, v in complete.items() if k[0] in modes and k[1:] in pairs}


def comparisons(rows: list[dict]) -> list[tuple[tuple[str, ...], dict[tuple, list[dict]]]]:
    """The tables to report: every mode that ran on the pairs all of them share, then independent noise
    against each shared mode on the pairs those two share, where that covers more pairs."""
    ran = [m for m in MODES if any(r["mode"] == m for r in rows)]
    tables = [(tuple(ran), groups_of(rows, ran))]
    for mode in ran[1:]:
        pair = ("independent", mode) if "independent" in ran else (mode,)
        groups = groups_of(rows, pair)
        if len(groups) // len(pair) > len(tables[0][1]) // len(ran):
            tables.append((pair, groups))
    return [(modes, groups) for modes, groups in tables if groups]


def agree(group: list[dict], key: str) -> bool:
    """Whether every video of ``group`` got the same, recognised ``key`` (m_colour, m_shape, m_motion)."""
    seen = {r[key] for r in group}
    return len(seen) == 1 and None not in seen


def start_spread(group: list[dict]) -> float:
    """RMS distance, in fractions of the frame, of the group's start positions from their mean (NaN when a
    video has no object): 0 when the subject starts at the same place of the frame at every size."""
    starts = [r["m_start"] for r in group]
    if any(s is None for s in starts):
        return float("nan")
    points = torch.tensor(starts)
    return float((points - points.mean(0)).pow(2).sum(1).mean().sqrt())


def summarise(groups: dict[tuple, list[dict]], mode: str) -> dict:
    """The figures of ``mode`` over its groups: agreement shares, scale spread, in-frame and prompt accuracy."""
    mine = [g for (m, _, _), g in groups.items() if m == mode]
    n = len(mine)
    out = {"mode": mode, "groups": n, "videos": n * len(SIZES)}
    for key in ("colour", "shape", "motion"):
        out[f"agree_{key}"] = sum(agree(g, f"m_{key}") for g in mine) / n
    out["agree_all"] = sum(all(agree(g, f"m_{k}") for k in ("colour", "shape", "motion")) for g in mine) / n
    out["agree_all_stderr"] = math.sqrt(out["agree_all"] * (1 - out["agree_all"]) / n)  # binomial
    spreads = []
    for g in mine:
        scales = torch.tensor([r["m_scale"] for r in g])
        spreads.append(float(scales.std() / scales.mean()) if scales.mean() > 0 else float("nan"))
    out["scale_spread"] = float(torch.tensor(spreads).nanmean())
    out["start_spread"] = float(torch.tensor([start_spread(g) for g in mine]).nanmean())
    videos = [r for g in mine for r in g]
    out["in_frame"] = sum(r["m_in_frame"] for r in videos) / len(videos)
    out["frames_in_frame"] = sum(r["m_frames_in_frame"] for r in videos) / len(videos)
    for key in ("colour", "shape", "motion"):
        out[f"right_{key}"] = sum(r[f"m_{key}"] == r[key] for r in videos) / len(videos)
    return out


def table(summaries: list[dict]) -> str:
    """Markdown table of :func:`summarise` results, one row per mode."""
    head = ("| noise | prompt/seed pairs | all three agree | colour agrees | shape agrees | direction agrees | "
            "scale spread (CV) | start spread | fully in frame: videos (frames) | colour / shape / direction right |")
    lines = [head, "|" + "---|" * 10]
    for s in summaries:
        lines.append(f"| {s['mode']} | {s['groups']} | **{s['agree_all']:.0%}** +- {s['agree_all_stderr']:.0%} | "
                     f"{s['agree_colour']:.0%} | {s['agree_shape']:.0%} | {s['agree_motion']:.0%} | "
                     f"{s['scale_spread']:.2f} | {s['start_spread']:.2f} | "
                     f"{s['in_frame']:.0%} ({s['frames_in_frame']:.0%}) | {s['right_colour']:.0%} / "
                     f"{s['right_shape']:.0%} / {s['right_motion']:.0%} |")
    return "\n".join(lines)


def sheet(groups: dict[tuple, list[dict]], index: int, seed: int, path: str, frames=(0, 5, 10, 15)) -> None:
    """PNG of prompt ``index`` at ``seed``: one row per noise mode, one column per size, each cell ``frames``
    of the video side by side on a gray 72x72 box per frame (2x upscaled)."""
    from PIL import Image, ImageDraw

    box, gap, label_w, scale = 72, 6, 90, 2
    modes = [m for m in MODES if (m, index, seed) in groups]
    cell_w = len(frames) * (box + 2)
    sheet_img = Image.new("RGB", ((label_w + len(SIZES) * (cell_w + gap)) * 1, 16 + len(modes) * (box + gap)),
                          "white")
    draw = ImageDraw.Draw(sheet_img)
    for col, (h, w) in enumerate(SIZES):
        draw.text((label_w + col * (cell_w + gap), 2), f"{h}x{w}", fill="black")
    for row, mode in enumerate(modes):
        y = 16 + row * (box + gap)
        draw.text((2, y + box // 2), mode, fill="black")
        for col, r in enumerate(sorted(groups[(mode, index, seed)], key=lambda r: SIZES.index((r["height"],
                                                                                                r["width"])))):
            video = torch.load(r["video"])  # (3, T, H, W) uint8
            for k, t in enumerate(frames):
                frame = Image.fromarray(video[:, t].permute(1, 2, 0).numpy())
                x = label_w + col * (cell_w + gap) + k * (box + 2)
                sheet_img.paste((128, 128, 128), (x, y, x + box, y + box))
                sheet_img.paste(frame, (x + (box - r["width"]) // 2, y + (box - r["height"]) // 2))
    sheet_img = sheet_img.resize((sheet_img.width * scale, sheet_img.height * scale), Image.NEAREST)
    sheet_img.save(path)


def plot(summaries: list[dict], path: str) -> None:
    """Bar chart of the agreement shares per noise mode (error bar: one binomial standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("agree_colour", "colour"), ("agree_shape", "shape"), ("agree_motion", "direction"),
            ("agree_all", "all three")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(summaries)
    for i, s in enumerate(summaries):
        values = [s[k] for k, _ in keys]
        errors = [math.sqrt(v * (1 - v) / s["groups"]) for v in values]
        ax.bar([j + i * width for j in range(len(keys))], values, width, yerr=errors, capsize=3,
               label=f"{s['mode']} ({s['groups']} prompt/seed pairs)")
    ax.axhline(0.8, color="gray", linestyle="--", linewidth=1, label="target 80 %")
    ax.set_xticks([j + width * (len(summaries) - 1) / 2 for j in range(len(keys))], [n for _, n in keys])
    ax.set_ylabel("agree at all 5 sizes")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args) -> None:
    """Write the markdown report and the contact sheet from ``args.raw``."""
    rows = load_rows(args.raw)
    tables = comparisons(rows)
    groups = tables[0][1]
    widest = max(tables, key=lambda t: len(t[1]) // len(t[0]))
    summaries = [summarise(widest[1], m) for m in widest[0]]
    accuracy, checked = classifier_accuracy()
    stem = os.path.splitext(args.out)[0]
    prompts = held_out_prompts(args.prompts)
    index = min(k[1] for k in groups if k[2] == min(args.seeds))
    sheet(groups, index, min(args.seeds), stem + "-sheet.png")
    plot(summaries, stem + ".png")
    seconds = sum(r["seconds"] for r in rows) / len(rows)
    text = [f"# One subject across aspect ratios: shared against independent noise ({FRAMES} frames, {STEPS} "
            f"Euler steps, guidance {GUIDANCE:g}, the shipped demo weights)", "",
            f"Sizes {', '.join(f'{h}x{w}' for h, w in SIZES)}; every size from the same seed, one packed batch per "
            f"prompt/seed/mode. Seeds: {sorted({r['seed'] for r in rows})}; {len({r['index'] for r in rows})} of the "
            f"{len(held_out_prompts(36))} held-out prompts; {len(rows)} videos at {seconds:.0f} s each "
            "(one thread, nice 10, a shared 2-core machine).", "",
            *[line for modes, g in tables for line in (
                f"{', '.join(modes)}: {len(g) // len(modes)} prompt/seed pairs (seeds "
                f"{sorted({k[2] for k in g})}), every mode on the same pairs", "",
                table([summarise(g, m) for m in modes]), "")],
            f"![agreement]({os.path.basename(stem)}.png)", "",
            f"Shape classifier (fill ratio and upper-half share of the foreground box): {accuracy:.1%} right on "
            f"{checked} one-object videos of the dataset (vdit.demo.data).", "",
            f"![contact sheet]({os.path.basename(stem)}-sheet.png) (prompt: {prompts[index][0]!r}, seed "
            f"{min(args.seeds)})", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


def generate_all(args) -> None:
    """Every missing (seed, prompt, mode) group, seed-major, the modes of a prompt together (so a run cut
    short compares the modes on the same prompts)."""
    os.makedirs(args.videos, exist_ok=True)
    os.makedirs(os.path.dirname(args.raw) or ".", exist_ok=True)
    model = TextToVideo.load(args.weights)
    prompts = held_out_prompts(args.prompts)
    done = done_keys(args.raw)
    for seed in args.seeds:
        for index, prompt in enumerate(prompts):
            for mode in args.modes:
                if (mode, index, seed) in done:
                    continue
                rows = run_group(model, prompt, index, seed, mode, args)
                with open(args.raw, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                print(f"seed {seed} prompt {index} {mode}: {rows[0]['seconds']:.1f} s per video", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(p, raw=RAW, videos=VIDEOS, report=REPORT,
                        report_help="markdown report (the contact sheet: <out>-sheet.png)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    p.add_argument("--weights", default=DEFAULT_WEIGHTS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    run_study(parse_args(argv), generate_all, report)


if __name__ == "__main__":
    main()
