"""vdit-generate: text-to-video with the demo model (shipped weights by default).

    vdit-generate --prompt "a red circle moves to the left on a black background" --out red.mp4
    torchrun --nproc_per_node 2 -m vdit.demo.cli.generate --prompt "..." --out red.mp4 --sp-mode ring  # 2 ranks

Under torchrun every rank runs the sampler on its share of each video's tokens (vdit.distributed) and
rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import NamedTuple

import torch

from vdit.backends import default_backend
from vdit.demo.cli import common
from vdit.demo.cli.common import UsageError, add_expand_arguments, parse_size
from vdit.demo.growth import with_attention
from vdit.demo.pipeline import DEFAULT_WEIGHTS, SHIPPED_WEIGHTS, TextToVideo, generate
from vdit.demo.prompts import expand_prompts
from vdit.demo.video_io import contact_sheet, save_video
from vdit.sampling.noise import DEFAULT_CANVAS_HW, MODES, InitialNoise

PROG = "vdit-generate"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt")
    src.add_argument("--prompts-file", help="file with one prompt per line")
    add_expand_arguments(p, expand_help="rewrite short prompts into the caption grammar the model was trained on "
                                        "(vdit.demo.prompts; prints each expanded caption and any unknown words)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", default="64x64", help="HxW in pixels")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    p.add_argument("--shift", type=float, default=None,
                   help="sampler time shift (default: the one the weights were trained with, from their config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="videos per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--noise", choices=MODES, default="independent",
                   help="initial noise: independent (each size its own draw), shared (a centred crop of one "
                        "canvas per seed, so a seed keeps its subject across sizes) or resampled (the canvas scaled "
                        "to the size); vdit.sampling.noise")
    p.add_argument("--noise-canvas", default="x".join(map(str, DEFAULT_CANVAS_HW)),
                   help="HxW of the canvas of --noise shared / resampled (frames: --frames); keep it fixed to "
                        "compare sizes")
    p.add_argument("--out", default="vdit_video.mp4",
                   help="output .mp4 / .gif, or a folder (PNG frames); several videos get _<i> suffixes")
    p.add_argument("--sheet", default=None, help="contact-sheet PNG (default: <out>_sheet.png)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="safetensors weights, or a shipped model by name: dense (the default demo model), sta "
                        "(fine-tuned to sliding-tile attention) or latent (on the autoencoder's latents)")
    p.add_argument("--config", default=None, help="JSON config (default: config.json beside the weights)")
    common.add_attention_arguments(p, default_help="the weights' own (dense for the shipped model)")
    common.add_cache_arguments(p)
    common.add_device_argument(p)
    p.add_argument("--sp-mode", choices=("ulysses", "ring", "hybrid"), default="ulysses",
                   help="sequence-parallel scheme under torchrun")
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses group size for --sp-mode hybrid")
    p.add_argument("--sp-layout", choices=("tokens", "work"), default="tokens",
                   help="split each batch's tokens over the sequence-parallel ranks by count or by attention work "
                        "(balances ring attention on batches of mixed lengths)")
    return p.parse_args(argv)


def output_paths(out: str, count: int) -> list[str]:
    """``[out]`` for one video, else ``<stem>_<i><suffix>`` for each of ``count``."""
    if count == 1:
        return [out]
    stem, suffix = os.path.splitext(out)
    return [f"{stem}_{i}{suffix}" for i in range(count)]


def check_writable(path: str) -> None:
    """A UsageError unless ``path``'s directory exists and is writable."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: directory {parent} does not exist or is not writable")


class Job(NamedTuple):
    """What to generate and where to write it: each prompt's --batch videos of (--frames, height, width) go to
    ``paths`` (prompt-major), their contact sheet to ``sheet``."""

    prompts: list[str]
    height: int
    width: int
    paths: list[str]
    sheet: str
    attention: dict  # keywords of vdit.demo.growth.with_attention
    cache: object = None  # the sampler's vdit.sampling.StepCache, None when off
    noise: object = None  # the sampler's vdit.sampling.InitialNoise, None for independent noise


def plan(args: argparse.Namespace) -> Job:
    """The :class:`Job` of the arguments, checked before any work (a UsageError on bad input)."""
    height, width = parse_size(args.size, "--size")
    attention, cache = common.attention_options(args), common.cache_option(args)
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        if not os.path.isfile(args.prompts_file):
            raise UsageError(f"prompts file not found: {args.prompts_file}")
        with open(args.prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise UsageError(f"no prompts in {args.prompts_file}")
    if args.expand_prompt:  # printed on rank 0 only under torchrun
        prompts = expand_prompts(prompts, seed=args.seed, echo=print if os.environ.get("RANK", "0") == "0" else None,
                                 method=args.expand_method)
    if args.batch < 1 or args.steps < 1 or args.frames < 1:
        raise UsageError("--batch, --steps and --frames must be positive")
    if args.shift is not None and not args.shift > 0:
        raise UsageError(f"--shift must be positive, got {args.shift}")
    paths = output_paths(args.out, len(prompts) * args.batch)
    sheet = args.sheet or os.path.splitext(args.out)[0] + "_sheet.png"
    for path in paths + [sheet]:
        check_writable(path)
    return Job(prompts, height, width, paths, sheet, attention, cache, noise_option(args, height, width))


def noise_option(args: argparse.Namespace, height: int, width: int) -> InitialNoise | None:
    """The sampler's initial noise of --noise / --noise-canvas (None: independent); a UsageError when the
    canvas does not contain --size."""
    if args.noise == "independent":
        return None
    canvas_h, canvas_w = parse_size(args.noise_canvas, "--noise-canvas")
    if height > canvas_h or width > canvas_w:
        raise UsageError(f"--noise-canvas {args.noise_canvas} must contain --size {height}x{width}")
    return InitialNoise(args.noise, (args.frames, canvas_h, canvas_w))


def sample(model: TextToVideo, args: argparse.Namespace, job: Job, *, progress: bool = True,
           sequence_parallel=None, stats: list | None = None) -> tuple[list[torch.Tensor], list[str]]:
    """Every video of ``job`` (float32 (3, frames, height, width) in [-1, 1], seeds --seed, --seed + 1, ... per
    prompt) and its contact-sheet label; each run's step-cache statistics go to ``stats`` (a list) if given.
    A size the model cannot generate raises UsageError."""
    videos, labels = [], []
    for prompt in job.prompts:
        for b in range(args.batch):
            try:
                video, = generate(model, [prompt], frames=args.frames, height=job.height, width=job.width,
                                  steps=args.steps, guidance=args.guidance, seed=args.seed + b, method=args.sampler,
                                  shift=args.shift, progress=progress, sequence_parallel=sequence_parallel,
                                  cache=job.cache, stats=stats, noise=job.noise)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            videos.append(video)
            labels.append(prompt if args.batch == 1 else f"{prompt} (seed {args.seed + b})")
    return videos, labels


def write(videos: list[torch.Tensor], labels: list[str], job: Job) -> None:
    """Save each video (3, T, H, W) to its path in ``job`` and their contact sheet, naming each file written."""
    for video, path in zip(videos, job.paths):
        save_video(video, path)
        print(f"wrote {path}")
    contact_sheet(videos, job.sheet, labels=labels)
    print(f"wrote {job.sheet}")


def main(argv: list[str] | None = None) -> int:
    """Generate as the command line ``argv`` (default: ``sys.argv[1:]``) says; returns the exit status, 0."""
    args = parse_args(argv)
    job = plan(args)
    with common.process_group(args.device) as ranks:
        sequence_parallel, parallel = None, ""
        if ranks.world_size > 1:
            from vdit.distributed import build_mesh

            try:
                sequence_parallel = build_mesh(ranks.device.type, ranks.world_size, args.sp_mode,
                                               args.ulysses_size, args.sp_layout).sequence_parallel
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            parallel = f" x {sequence_parallel.size} ranks ({sequence_parallel.mode})"
        weights = SHIPPED_WEIGHTS.get(args.weights, args.weights)
        model = with_attention(TextToVideo.load(weights, args.config, device=ranks.device), **job.attention)
        start, stats = time.perf_counter(), []
        videos, labels = sample(model, args, job, progress=ranks.rank == 0, sequence_parallel=sequence_parallel,
                                stats=stats)
        elapsed = time.perf_counter() - start
    if ranks.rank == 0:
        write(videos, labels, job)
        print(f"generated {len(videos)} video(s) of {args.frames}x{job.height}x{job.width} with {args.steps} "
              f"{args.sampler} steps in {elapsed:.1f} s on {ranks.device}{parallel} "
              f"(vdit backend: {default_backend()}; {common.attention_summary(model.dit.config)})")
        if job.cache is not None:
            print(cache_summary(stats, job.cache, elapsed))
    return 0


def cache_summary(stats: list, cache, seconds: float) -> str:
    """One line: the step cache's threshold, the share of video evaluations and of block evaluations it skipped
    over every run in ``stats`` (vdit.sampling.CacheStats), and the sampling time."""
    evaluations = sum(s.evaluations for s in stats)
    skipped = sum(s.skipped for s in stats)
    blocks = max((s.num_blocks for s in stats), default=1)
    share = skipped / max(evaluations, 1)
    return (f"step cache {cache.method} (threshold {cache.threshold:g}): skipped {skipped}/{evaluations} video "
            f"evaluations, {share * (blocks - 1) / blocks:.0%} of block evaluations, sampling took {seconds:.1f} s")


cli = common.entry_point(PROG, main)

if __name__ == "__main__":
    cli()
