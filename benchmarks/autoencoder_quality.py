"""Reconstruction quality, compression and speed of the demo's causal video autoencoder (vdit.demo.autoencoder).

For an autoencoder directory (``config.json`` + ``autoencoder.safetensors``, as ``CausalVideoAutoencoder.save``
writes it) this measures the posterior-mean reconstructions of held-out shapes videos: videos from the trainer's
held-out dataset seed (training seed + ``HELD_OUT_SEED_OFFSET``, never in the training stream; the first 8
training-size videos are the ones the trainer logs its held-out PSNR on), in three kinds of groups:

- training sizes: heights and widths drawn independently from 32..64 (the trainer's ``--sides``), at 9, 13 and 17
  frames;
- unseen sizes, one group each: 48x96, 96x48, 64x128, 128x64 (landscape 2:1 and portrait 1:2) and 128x128, 17
  frames, never trained on (sides above 64; 2:1 and 1:2 themselves were in training at 32x64 and 64x32), drawn
  from the dataset's distribution at that exact size (``random_spec(rng, height=..., width=...)`` + ``render``);
- images: first frames alone (1 frame), at training sizes.

Per group: mean PSNR (``vdit.demo.autoencoder.psnr``, per video, averaged over videos), mean SSIM (:func:`ssim`),
the worst video's PSNR, and the PSNR of the first frame (coded alone, as an image, by the causal encoder) against
that of the later frames. Whether shapes survive: the demo's shape classifier
(:func:`benchmarks.aspect_consistency.shape_class`) on one-object, one-background videos at ``--shape-sizes``,
originals against reconstructions (a latent model cannot draw shapes its decoder loses). Then the compression
ratio and latent shape of a 17x64x64 video, and the median encode and decode time (5 runs after a warm-up, one
thread) of a 17x64x64 and a 33x128x128 video. The targets (mean PSNR >= 30 dB on held-out videos at training
sizes, >= 28 dB at each unseen size) are checked in the report.
Sizes are height x width; aspect ratios width:height.

Writes ``--out`` (markdown), ``<out stem>.json`` (every number) and ``<out stem>-sheet.png`` (the median-PSNR video
of each group: original frames above their reconstruction, 2x nearest).

    OMP_NUM_THREADS=1 python -m benchmarks.autoencoder_quality    # the shipped autoencoder
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.aspect_consistency import shape_class
from vdit.demo.autoencoder import CausalVideoAutoencoder, psnr
from vdit.demo.cli.train_autoencoder import HELD_OUT_SEED_OFFSET
from vdit.demo.data import ShapesDataset, random_spec, render
from vdit.demo.evaluation import foreground_masks
from vdit.demo.pipeline import SHIPPED_AUTOENCODER
from vdit.demo.video_io import contact_sheet

REPORT = "benchmarks/results/cpu-autoencoder.md"
SIDES = (32, 40, 48, 56, 64)  # the trainer's --sides
FRAMES = (9, 13, 17)
UNSEEN_SIZES = ((48, 96), (96, 48), (64, 128), (128, 64), (128, 128))
UNSEEN_FRAMES = 17
TIMING_SIZES = ((17, 64, 64), (33, 128, 128))
SHAPE_SIZES = ((64, 96), (128, 128))  # the latent comparison's sizes
COMPRESSION_SIZE = (17, 64, 64)
IMAGE_INDEX0 = 100_000  # the images are first frames of held-out samples 100000.., not of the training-size videos
TARGET_TRAINING, TARGET_UNSEEN = 30.0, 28.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_C1, SSIM_C2 = 11, 1.5, 0.01 ** 2, 0.03 ** 2


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean structural similarity (Wang et al. 2004) of ``reconstruction`` (clamped to [-1, 1]) against ``target``
    in [-1, 1], same shapes (..., H, W), e.g. videos (3, T, H, W), with H, W >= 11.

    The standard SSIM on values mapped to [0, 1]: local means, variances and covariance under an 11x11 Gaussian
    window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2, computed in float64 on each frame of each channel separately at
    the positions where the window fits (no padding), averaged over the positions, then over frames and channels.
    1 for identical inputs; symmetric in its arguments."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction and target must have the same shape, got {tuple(reconstruction.shape)} "
                         f"and {tuple(target.shape)}")
    if reconstruction.ndim < 2 or min(target.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got shape "
                         f"{tuple(target.shape)}")
    h, w = target.shape[-2:]
    x = ((reconstruction.detach().double().clamp(-1, 1) + 1) / 2).reshape(-1, 1, h, w).cpu()
    y = ((target.detach().double() + 1) / 2).reshape(-1, 1, h, w).cpu()
    k = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-k.square() / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(t, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2))
    return ssim_map.mean(dim=(1, 2, 3)).mean().item()  # per frame and channel, then averaged


# --- the held-out videos -------------------------------------------------------------------------------------------


def training_size_videos(seed: int, sides: tuple[int, ...], frames: tuple[int, ...], n: int) -> list[torch.Tensor]:
    """The first ``n`` videos (3, T, H, W) of the dataset at seed ``seed``, ``sides`` and frame counts ``frames``
    (at the trainer's held-out seed and defaults, its first 8 are the trainer's held-out videos)."""
    dataset = ShapesDataset(seed=seed, sides=sides, frame_counts=frames)
    return [dataset[i][0] for i in range(n)]


def image_videos(seed: int, sides: tuple[int, ...], n: int) -> list[torch.Tensor]:
    """``n`` images (3, 1, H, W): the first frames of the dataset's samples IMAGE_INDEX0.. at ``sides``."""
    dataset = ShapesDataset(seed=seed, sides=sides, frame_counts=(9,))
    return [dataset[IMAGE_INDEX0 + i][0][:, :1].contiguous() for i in range(n)]


def sized_videos(seed: int, height: int, width: int, frames: int, n: int) -> list[torch.Tensor]:
    """``n`` videos (3, frames, height, width) of the dataset's distribution at exactly that size: what
    ``ShapesDataset`` draws and renders, with the size given instead of drawn (each from its own seeded rng)."""
    videos = []
    for i in range(n):
        rng = random.Random(f"autoencoder-quality/{seed}/{height}x{width}/{i}")
        videos.append(render(random_spec(rng, frames=frames, height=height, width=width), rng))
    return videos


@torch.no_grad()
def shapes_kept(model: CausalVideoAutoencoder, sizes, frames: int, count: int, seed: int) -> list[dict]:
    """Per (height, width) of ``sizes``: the share of ``count`` one-object videos on one background (the dataset's
    distribution at that size, ``frames`` frames) whose shape the classifier reads right, on the originals and on
    their reconstructions."""
    result = []
    for h, w in sizes:
        right = {"originals": 0, "reconstructions": 0}
        done = attempt = 0
        while done < count:
            rng = random.Random(f"autoencoder-quality/shapes/{seed}/{h}x{w}/{attempt}")
            attempt += 1
            spec = random_spec(rng, frames=frames, height=h, width=w, max_objects=1)
            if spec.background2 is not None:  # the classifier reads a one-colour background
                continue
            video = render(spec, rng)
            reconstruction = model.decode(model.encode(video[None]))[0].clamp(-1, 1)
            truth = spec.objects[0].shape
            right["originals"] += shape_class(foreground_masks(video, spec.background)) == truth
            right["reconstructions"] += shape_class(foreground_masks(reconstruction, spec.background)) == truth
            done += 1
        result.append({"height": h, "width": w, "frames": frames, "videos": count,
                       **{k: v / count for k, v in right.items()}})
    return result


def aspect(height: int, width: int) -> str:
    """``width:height`` in lowest terms, e.g. ``2:1`` for 48x96 (landscape)."""
    d = math.gcd(height, width)
    return f"{width // d}:{height // d}"


def groups_of(args: argparse.Namespace) -> list[dict]:
    """The groups to measure: name, kind ("training", "unseen" or "images"), target (dB or None) and videos."""
    seed = args.seed + HELD_OUT_SEED_OFFSET
    groups = [{"name": "training sizes", "kind": "training", "target": args.target_training,
               "videos": training_size_videos(seed, args.sides, args.frames, args.videos)}]
    for h, w in args.unseen_sizes:
        groups.append({"name": f"unseen {h}x{w} ({aspect(h, w)})", "kind": "unseen", "target": args.target_unseen,
                       "videos": sized_videos(seed, h, w, args.unseen_frames, args.unseen_videos)})
    groups.append({"name": "images (training sizes)", "kind": "images", "target": None,
                   "videos": image_videos(seed, args.sides, args.videos)})
    return groups


# --- measuring -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def measure_video(model: CausalVideoAutoencoder, video: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """One video's numbers (size, PSNR, SSIM, first-frame and later-frames PSNR) and its reconstruction."""
    reconstruction = model.decode(model.encode(video[None]))[0]
    t, h, w = video.shape[1:]
    row = {"frames": t, "height": h, "width": w, "psnr": psnr(reconstruction, video),
           "ssim": ssim(reconstruction, video), "psnr_first": psnr(reconstruction[:, :1], video[:, :1]),
           "psnr_later": psnr(reconstruction[:, 1:], video[:, 1:]) if t > 1 else None}
    return row, reconstruction


def summarise(rows: list[dict]) -> dict:
    """A group's mean PSNR, mean SSIM, worst PSNR, mean first-frame and later-frames PSNR (None without later
    frames), and its sizes and frame counts."""
    later = [r["psnr_later"] for r in rows if r["psnr_later"] is not None]
    return {"videos": len(rows), "psnr": statistics.fmean(r["psnr"] for r in rows),
            "ssim": statistics.fmean(r["ssim"] for r in rows), "worst_psnr": min(r["psnr"] for r in rows),
            "psnr_first": statistics.fmean(r["psnr_first"] for r in rows),
            "psnr_later": statistics.fmean(later) if later else None,
            "sizes": sorted({f"{r['height']}x{r['width']}" for r in rows}),
            "frame_counts": sorted({r["frames"] for r in rows}),
            "by_frames": {str(t): {"videos": len(mine), "psnr": statistics.fmean(r["psnr"] for r in mine),
                                   "ssim": statistics.fmean(r["ssim"] for r in mine)}
                          for t in sorted({r["frames"] for r in rows})
                          for mine in [[r for r in rows if r["frames"] == t]]}}


def evaluate(model: CausalVideoAutoencoder, groups: list[dict]) -> list[dict]:
    """Measure every video of every group (a progress bar over all of them); each group gains ``rows``,
    ``summary`` and ``example`` (the median-PSNR video with its reconstruction, for the contact sheet)."""
    bar = tqdm(total=sum(len(g["videos"]) for g in groups), desc="reconstruct", dynamic_ncols=True)
    for group in groups:
        bar.set_postfix_str(group["name"])
        rows, reconstructions = [], []
        for video in group["videos"]:
            row, reconstruction = measure_video(model, video)
            rows.append(row)
            reconstructions.append(reconstruction)
            bar.update(1)
        order = sorted(range(len(rows)), key=lambda i: rows[i]["psnr"])
        median = order[(len(order) - 1) // 2]
        group.update(rows=rows, summary=summarise(rows),
                     example=(median, group["videos"][median], reconstructions[median]))
    bar.close()
    return groups


def targets(groups: list[dict]) -> list[dict]:
    """One verdict per group with a target: its mean PSNR against the threshold, computed."""
    return [{"group": g["name"], "threshold_db": g["target"], "psnr": g["summary"]["psnr"],
             "met": g["summary"]["psnr"] >= g["target"]} for g in groups if g["target"] is not None]


@torch.inference_mode()
def timing(model: CausalVideoAutoencoder, sizes, runs: int, seed: int) -> list[dict]:
    """Median encode and decode seconds over ``runs`` runs (after one warm-up) of a shapes video of each
    (frames, height, width) in ``sizes``, in the current thread count."""
    results = []
    for t, h, w in tqdm(sizes, desc="timing", dynamic_ncols=True):
        video = sized_videos(seed, h, w, t, 1)[0][None]
        model.decode(model.encode(video))  # warm-up
        encode, decode = [], []
        for _ in range(runs):
            start = time.perf_counter()
            z = model.encode(video)
            middle = time.perf_counter()
            model.decode(z)
            encode.append(middle - start)
            decode.append(time.perf_counter() - middle)
        results.append({"frames": t, "height": h, "width": w, "latent_shape": list(z.shape[1:]), "runs": runs,
                        "encode_s": statistics.median(encode), "decode_s": statistics.median(decode)})
    return results


def compression(model: CausalVideoAutoencoder, size=COMPRESSION_SIZE) -> dict:
    """Pixel values over latent values of a (3, frames, height, width) video, its latent shape, and the nominal
    ratio of one full temporal_stride x spatial_stride^2 block."""
    t, h, w = size
    latent = model.latent_shape(t, h, w)
    c = model.config
    return {"frames": t, "height": h, "width": w, "latent_shape": list(latent), "pixel_values": 3 * t * h * w,
            "latent_values": math.prod(latent), "ratio": 3 * t * h * w / math.prod(latent),
            "nominal_ratio": c.block_features / c.latent_channels}


def checkpoint_step(directory: str) -> int | None:
    """The trainer's step of the checkpoint in ``directory`` (its state.json), or None (e.g. shipped weights)."""
    try:
        with open(os.path.join(directory, "state.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- the report ----------------------------------------------------------------------------------------------------


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_sheet(groups: list[dict], path: str) -> None:
    """The contact sheet: per group its median-PSNR video, 4 frames, original row above reconstruction row."""
    videos, labels = [], []
    for g in groups:
        index, video, reconstruction = g["example"]
        row = g["rows"][index]
        t, h, w = video.shape[1:]
        videos += [video, reconstruction]
        labels += [f"{g['name']}: video {index}, {h}x{w}, {t} frame{'s' * (t > 1)}, original",
                   f"reconstruction: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}"]
    contact_sheet(videos, path, labels=labels, max_frames=4, upscale=2)


def markdown(result: dict, sheet_name: str) -> str:
    """The markdown report of ``result`` (what the JSON holds)."""
    m = result["model"]
    step = f", trainer step {m['step']}" if m["step"] is not None else ""
    lines = ["# Causal video autoencoder: reconstruction quality, compression and speed (CPU)", "",
             "```", result["command"], "```", "",
             f"Autoencoder `{m['directory']}`{step}: {json.dumps(m['config'])}, {m['parameters'] / 1e6:.2f} M "
             f"parameters. Held-out videos from dataset seed {result['held_out_seed']} (training seed "
             f"{result['training_seed']} + {HELD_OUT_SEED_OFFSET}, never in the training stream"
             + ("; the first 8 training-size videos are the trainer's own held-out videos"
                if result["trainer_eval_videos"] else "") + "). Reconstructions decode the posterior mean. PSNR: "
             "`vdit.demo.autoencoder.psnr` (10 log10(1 / MSE) on [0, 1]) per video, averaged over videos; SSIM: "
             "11x11 Gaussian window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2 on [0, 1], per frame and channel, "
             "averaged. Sizes are height x width, aspect ratios width:height. Training sizes: heights and widths "
             f"drawn independently from {', '.join(map(str, result['sides']))} (the trainer's `--sides`, so aspect "
             f"ratios up to {max(result['sides']) / min(result['sides']):g}:1 were trained); the unseen sizes "
             "are not among them.", "",
             "## Targets", "", "| group | target | mean PSNR | met |", "|---|---:|---:|---|"]
    for v in result["targets"]:
        lines.append(f"| {v['group']} | >= {v['threshold_db']:g} dB | {v['psnr']:.2f} dB | "
                     f"{'**yes**' if v['met'] else '**no**'} |")
    met = all(v["met"] for v in result["targets"])
    lines += ["", f"All targets met: **{'yes' if met else 'no'}**.", "", "## Reconstruction", "",
              "| group | videos | sizes | frames | mean PSNR (dB) | mean SSIM | worst PSNR (dB) | first frame PSNR "
              "(dB) | later frames PSNR (dB) |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for g in result["groups"]:
        s = g["summary"]
        sizes = ", ".join(s["sizes"]) if len(s["sizes"]) <= 2 else f"{len(s['sizes'])} sizes"
        lines.append(f"| {g['name']} | {s['videos']} | {sizes} | {', '.join(map(str, s['frame_counts']))} | "
                     f"{s['psnr']:.2f} | {s['ssim']:.4f} | {s['worst_psnr']:.2f} | {_db(s['psnr_first'])} | "
                     f"{_db(s['psnr_later'])} |")
    lines += ["", "The first frame is coded alone, as an image (latent frame 0 sees it only); the later frames "
              "4 to a latent frame.", ""]
    for g in result["groups"]:
        by = g["summary"]["by_frames"]
        if len(by) > 1:
            lines += [f"{g['name']} by frame count:", "", "| frames | videos | mean PSNR (dB) | mean SSIM |",
                      "|---:|---:|---:|---:|"]
            lines += [f"| {t} | {v['videos']} | {v['psnr']:.2f} | {v['ssim']:.4f} |" for t, v in by.items()]
            lines.append("")
    lines += ["## Shapes kept", "",
              "The demo's shape classifier (`benchmarks.aspect_consistency.shape_class`: circle, square or "
              "triangle from the foreground masks) on one-object videos of one background colour, originals "
              "against their reconstructions:", "", "| size | frames | videos | shape right, originals | "
              "shape right, reconstructions |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['height']}x{r['width']} | {r['frames']} | {r['videos']} | {r['originals']:.0%} | "
              f"{r['reconstructions']:.0%} |" for r in result["shapes"]]
    lines.append("")
    c = result["compression"]
    lines += ["## Compression", "",
              f"A {c['frames']}x{c['height']}x{c['width']} video: {c['pixel_values']:,} pixel values, latent "
              f"{tuple(c['latent_shape'])} = {c['latent_values']:,} values: **{c['ratio']:.2f}x** fewer "
              f"({c['nominal_ratio']:.2f}x for each full {m['config']['temporal_stride']}x"
              f"{m['config']['spatial_stride']}x{m['config']['spatial_stride']} block; the causal first frame "
              "takes a latent frame of its own).", "",
              "## Speed", "",
              f"One thread (`torch.set_num_threads(1)`), CPU capability {result['cpu_capability']}, torch "
              f"{result['torch']}, {result['machine']}; median of {result['timing'][0]['runs']} runs after a "
              f"warm-up. Load average at start {', '.join(f'{x:.2f}' for x in result['load_average'])} (a shared "
              "machine: other jobs may slow these).", "",
              "| video (frames x H x W) | latent | encode (ms) | decode (ms) |", "|---|---|---:|---:|"]
    for r in result["timing"]:
        lines.append(f"| {r['frames']}x{r['height']}x{r['width']} | {tuple(r['latent_shape'])} | "
                     f"{r['encode_s'] * 1e3:.1f} | {r['decode_s'] * 1e3:.1f} |")
    lines += ["", "## Contact sheet", "",
              "The median-PSNR video of each group, 4 frames: original above reconstruction (2x nearest).", "",
              f"![originals and reconstructions]({sheet_name})", "", "## Per video", ""]
    for g in result["groups"]:
        lines += [f"### {g['name']}", "", "| video | size | frames | PSNR (dB) | SSIM | first frame (dB) | "
                  "later frames (dB) |", "|---:|---|---:|---:|---:|---:|---:|"]
        for i, r in enumerate(g["rows"]):
            lines.append(f"| {i} | {r['height']}x{r['width']} | {r['frames']} | {r['psnr']:.2f} | "
                         f"{r['ssim']:.4f} | {r['psnr_first']:.2f} | {_db(r['psnr_later'])} |")
        lines.append("")
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _sizes(parts: int):
    def parse(text: str) -> tuple[tuple[int, ...], ...]:
        try:
            sizes = tuple(tuple(int(v) for v in item.split("x")) for item in text.split(","))
        except ValueError:
            sizes = ()
        if not sizes or any(len(s) != parts or min(s) < 1 for s in sizes):
            form = "x".join(("T", "H", "W")[-parts:])
            raise argparse.ArgumentTypeError(f"expected comma-separated {form} sizes, got {text!r}")
        return sizes
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autoencoder", default=SHIPPED_AUTOENCODER,
                   help="autoencoder directory (config.json + autoencoder.safetensors); default: the shipped one")
    p.add_argument("--out", default=REPORT, help="markdown report (also <stem>.json and <stem>-sheet.png)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"the autoencoder's training seed; held-out videos come from seed + {HELD_OUT_SEED_OFFSET}")
    p.add_argument("--videos", type=int, default=24, help="held-out videos at training sizes, and images")
    p.add_argument("--unseen-videos", type=int, default=8, help="videos per unseen size")
    p.add_argument("--sides", type=_ints, default=SIDES, help="training heights / widths")
    p.add_argument("--frames", type=_ints, default=FRAMES, help="frame counts of the training-size videos")
    p.add_argument("--unseen-sizes", type=_sizes(2), default=UNSEEN_SIZES, help="HxW,... never trained on")
    p.add_argument("--unseen-frames", type=int, default=UNSEEN_FRAMES)
    p.add_argument("--shape-sizes", type=_sizes(2), default=SHAPE_SIZES, help="HxW,... of the shape check")
    p.add_argument("--shape-videos", type=int, default=60, help="one-object videos per size in the shape check")
    p.add_argument("--timing-sizes", type=_sizes(3), default=TIMING_SIZES, help="TxHxW,... to time")
    p.add_argument("--timing-runs", type=int, default=5, help="timed runs per size (median), after a warm-up")
    p.add_argument("--target-training", type=float, default=TARGET_TRAINING, help="dB, training sizes")
    p.add_argument("--target-unseen", type=float, default=TARGET_UNSEEN, help="dB, each unseen size")
    args = p.parse_args(argv)
    for name in ("videos", "unseen_videos", "unseen_frames", "timing_runs", "shape_videos"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def command_line(argv: list[str]) -> str:
    """The command that reproduces this run (OMP_NUM_THREADS as it was set)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return f"{prefix}python -m benchmarks.autoencoder_quality {shlex.join(argv)}".rstrip()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark as ``argv`` (default ``sys.argv[1:]``) says; write the report, JSON and contact sheet and
    return what the JSON holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = CausalVideoAutoencoder.load(args.autoencoder)
        c = model.config
        try:  # sizes the strides do not divide fail here, before any work
            for t in (*args.frames, args.unseen_frames, 1, COMPRESSION_SIZE[0]):
                model.latent_shape(t, c.spatial_stride, c.spatial_stride)
            for h, w in [(s, s) for s in args.sides] + list(args.unseen_sizes) + list(args.shape_sizes):
                model.latent_shape(1, h, w)
            for size in args.timing_sizes:
                model.latent_shape(*size)
            trained = [f"{h}x{w}" for h, w in args.unseen_sizes if h in args.sides and w in args.sides]
            if trained:
                raise ValueError(f"--unseen-sizes {', '.join(trained)} are training sizes (--sides {args.sides})")
        except ValueError as exc:
            raise SystemExit(f"autoencoder_quality: error: {exc}") from None
        load = list(os.getloadavg())
        groups = evaluate(model, groups_of(args))
        result = {
            "command": command_line(argv),
            "model": {"directory": args.autoencoder, "step": checkpoint_step(args.autoencoder),
                      "config": model.config_dict(), "parameters": sum(p.numel() for p in model.parameters())},
            "training_seed": args.seed, "held_out_seed": args.seed + HELD_OUT_SEED_OFFSET,
            "sides": list(args.sides), "trainer_eval_videos": args.sides == SIDES and args.frames == FRAMES,
            "groups": [{"name": g["name"], "kind": g["kind"], "target_db": g["target"], "summary": g["summary"],
                        "sheet_video": g["example"][0], "rows": g["rows"]} for g in groups],
            "targets": targets(groups),
            "shapes": shapes_kept(model, args.shape_sizes, args.unseen_frames, args.shape_videos,
                                  args.seed + HELD_OUT_SEED_OFFSET),
            "compression": compression(model),
            "timing": timing(model, args.timing_sizes, args.timing_runs, args.seed + HELD_OUT_SEED_OFFSET),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads(), "load_average": load,
        }
        result["all_targets_met"] = all(v["met"] for v in result["targets"])
    finally:
        torch.set_num_threads(threads)
    stem = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_sheet(groups, stem + "-sheet.png")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    text = markdown(result, os.path.basename(stem) + "-sheet.png")
    with open(args.out, "w") as f:
        f.write(text)
    print(text.split("## Per video")[0])
    return result


if __name__ == "__main__":
    main()
