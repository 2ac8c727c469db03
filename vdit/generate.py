"""vdit-generate: text-to-video with the demo model (shipped weights by default).

    python -m vdit.generate --prompt "a red circle moves to the left on a black background" --out red.mp4
    torchrun --nproc_per_node 2 -m vdit.generate --prompt "..." --out red.mp4 --sp-mode ring   # sequence parallel

Under torchrun every rank runs the sampler on its share of each video's tokens (vdit.distributed) and
rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

from vdit.checkpoint import CheckpointError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
DEFAULT_WEIGHTS = os.path.join(ASSETS, "model.safetensors")


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit status 2."""


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--size must look like HxW (e.g. 64x64), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vdit-generate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt")
    src.add_argument("--prompts-file", help="file with one prompt per line")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", default="64x64", help="HxW in pixels")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    p.add_argument("--shift", type=float, default=None,
                   help="sampler time shift (default: the one the weights were trained with, from their config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="videos per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--out", default="vdit_video.mp4",
                   help="output .mp4 / .gif, or a folder (PNG frames); several videos get _<i> suffixes")
    p.add_argument("--sheet", default=None, help="contact-sheet PNG (default: <out>_sheet.png)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="safetensors weights (default: shipped demo model)")
    p.add_argument("--config", default=None, help="JSON config (default: config.json beside the weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sp-mode", choices=("ulysses", "ring", "hybrid"), default="ulysses",
                   help="sequence-parallel scheme under torchrun")
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses group size for --sp-mode hybrid")
    return p.parse_args(argv)


def output_paths(out: str, count: int) -> list[str]:
    if count == 1:
        return [out]
    stem, suffix = os.path.splitext(out)
    return [f"{stem}_{i}{suffix}" for i in range(count)]


def check_writable(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: directory {parent} does not exist or is not writable")


def main(argv=None) -> int:
    args = parse_args(argv)
    from vdit.io import contact_sheet, save_video
    from vdit.pipelines.text_to_video import TextToVideo, generate

    height, width = parse_size(args.size)
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        if not os.path.isfile(args.prompts_file):
            raise UsageError(f"prompts file not found: {args.prompts_file}")
        with open(args.prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise UsageError(f"no prompts in {args.prompts_file}")
    if args.batch < 1 or args.steps < 1 or args.frames < 1:
        raise UsageError("--batch, --steps and --frames must be positive")
    if args.shift is not None and not args.shift > 0:
        raise UsageError(f"--shift must be positive, got {args.shift}")
    paths = output_paths(args.out, len(prompts) * args.batch)
    sheet = args.sheet or os.path.splitext(args.out)[0] + "_sheet.png"
    for path in paths + [sheet]:
        check_writable(path)
    sequence_parallel, rank = None, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from vdit.distributed import SequenceParallel

        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        sequence_parallel = SequenceParallel(None, args.sp_mode, args.ulysses_size)
    try:
        model = TextToVideo.load(args.weights, args.config, device=args.device)
        start = time.perf_counter()
        videos, labels = [], []
        for prompt in prompts:
            for b in range(args.batch):
                try:
                    video, = generate(model, [prompt], frames=args.frames, height=height, width=width,
                                      steps=args.steps, guidance=args.guidance, seed=args.seed + b, method=args.sampler,
                                      shift=args.shift, progress=rank == 0, sequence_parallel=sequence_parallel)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
                videos.append(video)
                labels.append(prompt if args.batch == 1 else f"{prompt} (seed {args.seed + b})")
        elapsed = time.perf_counter() - start
        ranks = f" x {sequence_parallel.size} ranks ({sequence_parallel.mode})" if sequence_parallel else ""
        if sequence_parallel is not None:
            dist.barrier()  # all ranks leave together (errors above are raised on every rank alike)
    finally:
        if sequence_parallel is not None:
            # Tear the group down explicitly, on errors too: a rank that exits while its peers still hold open
            # gloo connections can abort (SIGABRT) during interpreter shutdown.
            dist.destroy_process_group()
    if rank != 0:
        return 0
    for video, path in zip(videos, paths):
        save_video(video, path)
        print(f"wrote {path}")
    contact_sheet(videos, sheet, labels=labels)
    print(f"wrote {sheet}")
    from vdit.backends import default_backend

    print(f"generated {len(videos)} video(s) of {args.frames}x{height}x{width} with {args.steps} {args.sampler} steps "
          f"in {elapsed:.1f} s on {args.device}{ranks} (vdit backend: {default_backend()})")
    return 0


def cli() -> None:
    try:
        sys.exit(main())
    except (UsageError, CheckpointError) as exc:
        print(f"vdit-generate: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
