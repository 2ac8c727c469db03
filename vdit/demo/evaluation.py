"""Prompt adherence of the demo model, measured with simple image analysis (what ``vdit-eval-demo`` prints).

For held-out (colour, shape, motion) combinations that training never drew (vdit.demo.data.HELD_OUT),
:func:`evaluate` generates one video per prompt and measures:
- colour accuracy: the mean colour of the foreground pixels (far from the background colour) is
  nearest, among the dataset's colours, to the prompt's colour;
- motion accuracy: the foreground centroid's displacement from the first to the last quarter of the
  video points in the prompt's direction (one of 8 directions, or "still" below a threshold);
- object persistence: the fraction of videos with foreground in every frame (needed for a motion track);
- temporal consistency: mean absolute change between consecutive frames (lower is steadier) and the
  mean IoU of consecutive foreground masks.
:func:`pooled` combines several evaluations (one per seed) with the motion accuracy's standard error.
"""
from __future__ import annotations

import math
import random

import torch

from vdit.demo.data import BACKGROUNDS, COLORS, HELD_OUT, MOTIONS
from vdit.demo.pipeline import generate

__all__ = ["classify_colour", "classify_motion", "evaluate", "foreground_masks", "held_out_prompts", "pooled",
           "summary", "temporal_consistency"]

DIRECTIONS = {name: (dx, dy) for name, (dx, dy) in MOTIONS.items()}


def foreground_masks(video: torch.Tensor, background: str) -> torch.Tensor:
    """(T, H, W) bool: pixels whose colour is far from the background's. video: (3, T, H, W) in [-1, 1]."""
    rgb = (video.float() + 1) / 2
    bg = torch.tensor(BACKGROUNDS[background])[:, None, None, None]
    return (rgb - bg).abs().amax(0) > 0.3


def classify_colour(video: torch.Tensor, masks: torch.Tensor) -> str | None:
    if masks.sum() == 0:
        return None
    rgb = ((video.float() + 1) / 2).permute(1, 2, 3, 0)[masks]  # (pixels, 3)
    mean = rgb.mean(0)
    return min(COLORS, key=lambda c: float((torch.tensor(COLORS[c]) - mean).pow(2).sum()))


def classify_motion(masks: torch.Tensor, still_fraction: float = 0.08) -> str | None:
    """Direction of the centroid's displacement between the first and last quarter of frames."""
    T, H, W = masks.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    centroids = []
    for m in masks:
        if m.sum() == 0:
            return None
        centroids.append(((xs * m).sum() / m.sum(), (ys * m).sum() / m.sum()))
    q = max(1, T // 4)
    x0 = sum(c[0] for c in centroids[:q]) / q
    y0 = sum(c[1] for c in centroids[:q]) / q
    x1 = sum(c[0] for c in centroids[-q:]) / q
    y1 = sum(c[1] for c in centroids[-q:]) / q
    dx, dy = float(x1 - x0), float(y1 - y0)
    if math.hypot(dx, dy) < still_fraction * min(H, W):
        return "stays still"
    angle = math.atan2(dy, dx)
    return min((n for n, d in DIRECTIONS.items() if d != (0, 0)),
               key=lambda n: abs(math.remainder(angle - math.atan2(DIRECTIONS[n][1], DIRECTIONS[n][0]), math.tau)))


def temporal_consistency(video: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """(mean |frame_t+1 - frame_t| in [0, 2] units, mean IoU of consecutive foreground masks)."""
    diff = (video[:, 1:] - video[:, :-1]).abs().mean().item()
    inter = (masks[1:] & masks[:-1]).sum((1, 2)).float()
    union = (masks[1:] | masks[:-1]).sum((1, 2)).float().clamp_min(1)
    return diff, (inter / union).mean().item()


def held_out_prompts(count: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """``count`` (prompt, colour, shape, motion) of held-out combinations, on a black background."""
    combos = sorted(HELD_OUT)
    random.Random(seed).shuffle(combos)
    return [(f"a {c} {s} {m} on a black background", c, s, m) for c, s, m in combos[:count]]


def evaluate(model, prompts, *, frames=16, size=(48, 48), steps=20, guidance=4.0, shift=None, seed=0,
             progress=True, cache=None) -> dict:
    """Generate one (3, frames, *size) video per (prompt, colour, shape, motion) of ``prompts`` (seed
    ``seed + i`` for the i-th; ``cache``: the step caching of vdit.demo.pipeline.generate) and measure it.
    Returns the counts as fractions of the prompts
    (``colour_accuracy``, ``motion_accuracy``, ``object_in_every_frame``), the mean ``frame_diff`` and
    ``mask_iou``, ``prompts`` and ``rows``: (prompt, colour seen, motion seen) per video."""
    from tqdm import tqdm

    colour_ok = motion_ok = persistent = 0
    diffs, ious, rows = [], [], []
    for i, (prompt, colour, _shape, motion) in enumerate(tqdm(prompts, desc="eval", disable=not progress)):
        video, = generate(model, [prompt], frames=frames, height=size[0], width=size[1], steps=steps,
                          guidance=guidance, shift=shift, seed=seed + i, progress=False, cache=cache)
        masks = foreground_masks(video, "black")
        got_colour, got_motion = classify_colour(video, masks), classify_motion(masks)
        colour_ok += got_colour == colour
        motion_ok += got_motion == motion
        persistent += bool(masks.flatten(1).any(1).all())
        d, iou = temporal_consistency(video, masks)
        diffs.append(d)
        ious.append(iou)
        rows.append((prompt, got_colour, got_motion))
    n = len(prompts)
    return {"prompts": n, "colour_accuracy": colour_ok / n, "motion_accuracy": motion_ok / n,
            "object_in_every_frame": persistent / n,
            "frame_diff": sum(diffs) / n, "mask_iou": sum(ious) / n, "rows": rows}


def pooled(results: list[dict]) -> dict:
    """Figures of several evaluations (e.g. one per seed) over all their videos together, plus the standard
    error of the pooled motion accuracy (binomial): one seed's 36 prompts leave it about +-7 points."""
    n = sum(r["prompts"] for r in results)
    out = {"prompts": n}
    for key in ("colour_accuracy", "motion_accuracy", "object_in_every_frame", "frame_diff", "mask_iou"):
        out[key] = sum(r[key] * r["prompts"] for r in results) / n
    p = out["motion_accuracy"]
    out["motion_stderr"] = math.sqrt(p * (1 - p) / n)
    return out


def summary(label: str, result: dict) -> str:
    """One printed line of an ``evaluate`` (or ``pooled``) result, prefixed by ``label``; a pooled result's
    line ends with the motion accuracy's standard error."""
    line = (f"{label}: {result['prompts']} held-out videos, colour accuracy {result['colour_accuracy']:.0%}, "
            f"motion accuracy {result['motion_accuracy']:.0%}, object in every frame "
            f"{result['object_in_every_frame']:.0%}, frame-to-frame change {result['frame_diff']:.3f}, "
            f"foreground IoU {result['mask_iou']:.2f}")
    if "motion_stderr" in result:
        line += f"; motion accuracy +- {result['motion_stderr']:.0%} (one standard error)"
    return line
