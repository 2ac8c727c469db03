"""vdit-train-autoencoder: train the demo's causal video autoencoder (vdit.demo.autoencoder) on the shapes videos.

Each step takes the next --batch samples of the shapes dataset (frame counts 1 + 4k, sides the stride divides, mixed
sizes, a --image-fraction of them cut to their first frame, coded alone), and minimizes the mean squared (--recon)
reconstruction error + --edge-weight x the error of the frames' horizontal and vertical differences (keeps edges
sharp, which PSNR on flat-coloured shapes depends on) + --kl-weight x the KL divergence per latent element
(--bottleneck lfq: + --commit-weight x the commitment and --entropy-weight x the entropy penalty per latent element
instead, vdit.demo.autoencoder.lfq_penalties). The posterior noise is drawn per sample from (seed, sample index),
so a resumed run takes exactly the steps of an uninterrupted one. Checkpoints (config.json +
autoencoder.safetensors, optimizer.safetensors, state.json) go to --out every --save-every steps and at the end;
running the same command again resumes. Every --eval-every steps the PSNR of --eval-videos held-out videos
(another dataset seed, never in the training stream) is logged.

The defaults are the shipped model's design (4x4x4 blocks, 16 channels, --expand 384 --refine 32) and data (5 to
17 frames). A run in the background (one CPU thread, low priority; the shipped run's phases and progress are in
docs/autoencoder.md):

    OMP_NUM_THREADS=1 nohup nice -n 19 python -m vdit.demo.cli.train_autoencoder --out runs/ae \\
        --steps 6000 > runs/ae.log 2>&1 &
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from vdit.demo.autoencoder import BOTTLENECKS, AutoencoderConfig, CausalVideoAutoencoder, psnr
from vdit.demo.checkpoint import load_optimizer, load_tensors, optimizer_tensors, read_json, save_tensors, write_json
from vdit.demo.cli import common
from vdit.demo.cli.common import UsageError
from vdit.demo.data import ShapesDataset

PROG = "vdit-train-autoencoder"
STATE_FILE, OPTIM_FILE, LOG_FILE = "state.json", "optimizer.safetensors", "log.jsonl"
HELD_OUT_SEED_OFFSET = 1_000_003  # the held-out videos come from dataset seed --seed + this


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="checkpoint directory (resumed if it holds a checkpoint)")
    p.add_argument("--steps", type=int, default=12000, help="total optimizer steps")
    p.add_argument("--batch", type=int, default=3, help="samples per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decay to lr x this at --steps")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--kl-weight", type=float, default=1e-6,
                   help="weight of the KL divergence per latent element (against the error per pixel; at 1e-4 the "
                        "posterior's standard deviation was still near 0.4 after 500 steps)")
    p.add_argument("--bottleneck", choices=BOTTLENECKS, default="kl",
                   help="kl: Gaussian posterior (shipped); lfq: lookup-free quantization (codes of +-1)")
    p.add_argument("--commit-weight", type=float, default=0.25, help="lfq: weight of the commitment per latent element")
    p.add_argument("--entropy-weight", type=float, default=0.1,
                   help="lfq: weight of the entropy penalty per latent element (MAGVIT-v2's weights: 0.25, 0.1)")
    p.add_argument("--edge-weight", type=float, default=0.5, help="weight of the error of the frames' differences")
    p.add_argument("--recon", choices=("mse", "l1"), default="mse",
                   help="reconstruction error: squared (what PSNR scores; on frames that are mostly background the "
                        "median-seeking L1 learns to leave small objects out) or absolute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temporal-stride", type=int, default=4, help="frames per latent frame (after the first)")
    p.add_argument("--spatial-stride", type=int, default=4, help="pixels per latent position along H and W")
    p.add_argument("--width", type=int, default=96, help="convolution width at the latent resolution")
    p.add_argument("--blocks", type=int, default=1, help="residual blocks in the encoder and in the decoder")
    p.add_argument("--refine", type=int, default=32, help="width of the full-resolution refinement (0: none)")
    p.add_argument("--expand", type=int, default=384, help="hidden width of the decoder's per-position MLP (0: none)")
    p.add_argument("--latent-channels", type=int, default=16)
    p.add_argument("--sides", default="32,40,48,56,64", help="training heights / widths (multiples of 8)")
    p.add_argument("--frame-counts", default="5,9,13,17", help="training frame counts (1 + 4k)")
    p.add_argument("--image-fraction", type=float, default=0.1, help="share of samples cut to their first frame")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-videos", type=int, default=8, help="held-out videos (9 to 17 frames, 32 to 64 pixels)")
    p.add_argument("--log-file", default=None, help=f"JSONL loss log (default: --out/{LOG_FILE})")
    common.add_device_argument(p)
    return p.parse_args(argv)


def int_list(text: str, option: str) -> tuple[int, ...]:
    """The comma-separated non-negative integers of ``option``; a UsageError otherwise."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise UsageError(f"{option} must be comma-separated non-negative integers, got {text!r}")
    return values


def model_config(args: argparse.Namespace) -> AutoencoderConfig:
    """The AutoencoderConfig of --temporal-stride, --spatial-stride, --width, --blocks, --refine, --latent-channels;
    a UsageError naming the option for a bad value."""
    try:
        return AutoencoderConfig(args.temporal_stride, args.spatial_stride, args.width, args.blocks,
                                 args.latent_channels, args.refine, args.expand, args.bottleneck)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise UsageError(f"--{name.replace('_', '-')}{str(exc)[len(name):]}") from None


def training_dataset(args: argparse.Namespace, config: AutoencoderConfig) -> ShapesDataset:
    """The shapes dataset at --sides / --frame-counts, checked against the model's strides."""
    sides, frames = int_list(args.sides, "--sides"), int_list(args.frame_counts, "--frame-counts")
    if min(sides) < 1 or any(s % config.spatial_stride for s in sides):
        raise UsageError(f"--sides must be positive multiples of {config.spatial_stride}, got {args.sides!r}")
    if min(frames) < 2 or any((f - 1) % config.temporal_stride for f in frames):
        raise UsageError(f"--frame-counts must be 1 + {config.temporal_stride}k with k >= 1, got {args.frame_counts!r}"
                         " (images come from --image-fraction)")
    return ShapesDataset(seed=args.seed, sides=sides, frame_counts=frames)


def sample(dataset: ShapesDataset, index: int, seed: int, image_fraction: float) -> torch.Tensor:
    """Training sample ``index``: the video (3, T, H, W), or its first frame (3, 1, H, W) for a seeded share."""
    video = dataset[index][0]
    if random.Random(f"image/{seed}/{index}").random() < image_fraction:
        return video[:, :1].contiguous()
    return video


def held_out_videos(args: argparse.Namespace, config: AutoencoderConfig) -> list[torch.Tensor]:
    """--eval-videos fixed videos from another dataset seed, 1 + 2..4 x temporal_stride frames, multiples of 8 px."""
    frames = tuple(1 + k * config.temporal_stride for k in (2, 3, 4))
    sides = tuple(s for s in (32, 40, 48, 56, 64) if s % config.spatial_stride == 0) or (config.spatial_stride,)
    dataset = ShapesDataset(seed=args.seed + HELD_OUT_SEED_OFFSET, sides=sides, frame_counts=frames)
    return [dataset[i][0] for i in range(args.eval_videos)]


def loss_terms(model: CausalVideoAutoencoder, video: torch.Tensor, generator: torch.Generator, recon: str = "mse"
               ) -> dict[str, torch.Tensor]:
    """Sums over one video (3, T, H, W), 0-d tensors: ``recon`` (reconstruction error) and ``edge`` (error of its
    horizontal and vertical pixel differences), squared (``recon="mse"``) or absolute, and the bottleneck's
    penalties (``kl``, or ``commit`` and ``entropy``), summed over the latent's elements."""
    reconstruction, penalties = model(video[None], generator)
    err = reconstruction - video[None]
    norm = torch.square if recon == "mse" else torch.abs
    edge = norm(err.diff(dim=-1)).sum() + norm(err.diff(dim=-2)).sum()
    return {"recon": norm(err).sum(), "edge": edge, **penalties}


def term_weights(args: argparse.Namespace) -> dict[str, float]:
    """The weight of each loss term: pixel terms per pixel, penalties per latent element."""
    return {"recon": 1.0, "edge": args.edge_weight, "kl": args.kl_weight, "commit": args.commit_weight,
            "entropy": args.entropy_weight}


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup over --warmup steps, then cosine decay to lr x --min-lr-ratio at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds: the model, the optimizer with its parameters' names, optimizer steps taken and the
    index of the next training sample."""

    model: CausalVideoAutoencoder
    opt: torch.optim.Optimizer
    names: list[str]
    step: int = 0
    data_index: int = 0


def start(args: argparse.Namespace, device: torch.device) -> TrainState:
    """A new model and AdamW, or the checkpoint in --out (its own architecture) when there is one."""
    resume = os.path.exists(os.path.join(args.out, STATE_FILE))
    if resume:
        model = CausalVideoAutoencoder.load(args.out, device).train()
    else:
        torch.manual_seed(args.seed)
        model = CausalVideoAutoencoder(model_config(args)).to(device)
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    state = TrainState(model, opt, names)
    if resume:
        meta = read_json(os.path.join(args.out, STATE_FILE))
        optim = load_tensors(os.path.join(args.out, OPTIM_FILE))
        load_optimizer(opt, names, {k: v.to(device) for k, v in optim.items()})
        state.step, state.data_index = meta["step"], meta["data_index"]
        print(f"{PROG}: resuming from {args.out} at step {state.step}", file=sys.stderr)
    return state


def save(args: argparse.Namespace, state: TrainState) -> None:
    """Write the model (config.json + autoencoder.safetensors), the optimizer and state.json (written last, so a
    checkpoint interrupted mid-write resumes from the previous one's step with these weights at worst)."""
    state.model.save(args.out)
    save_tensors(os.path.join(args.out, OPTIM_FILE), optimizer_tensors(state.opt, state.names))
    write_json(os.path.join(args.out, STATE_FILE), {"step": state.step, "data_index": state.data_index,
                                                    "args": vars(args)})


def train_step(args: argparse.Namespace, state: TrainState, dataset: ShapesDataset, device: torch.device) -> dict:
    """One AdamW step on the next --batch samples (a backward per sample; the terms are normalized by the whole
    batch's pixel and latent counts). Returns the step's loss terms as floats."""
    indices = range(state.data_index, state.data_index + args.batch)
    videos = [sample(dataset, i, args.seed, args.image_fraction).to(device) for i in indices]
    pixels = sum(v.numel() for v in videos)
    latents = sum(math.prod(state.model.latent_shape(*v.shape[1:])) for v in videos)
    for group in state.opt.param_groups:
        group["lr"] = learning_rate(state.step, args)
    state.opt.zero_grad(set_to_none=True)
    weights, totals = term_weights(args), {}
    for i, video in zip(indices, videos):
        generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + i)
        terms = loss_terms(state.model, video, generator, args.recon)
        # pixel terms per pixel of the batch, penalties per latent element
        terms = {k: v / (pixels if k in ("recon", "edge") else latents) for k, v in terms.items()}
        sum(weights[k] * v for k, v in terms.items()).backward()
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + v.item()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
    state.opt.step()
    state.step += 1
    state.data_index += args.batch
    loss = sum(weights[k] * v for k, v in totals.items())
    return {"loss": loss, **totals, "lr": state.opt.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(model: CausalVideoAutoencoder, videos: list[torch.Tensor], device: torch.device) -> dict:
    """Mean PSNR (dB) of the posterior-mean reconstructions of ``videos`` (3, T, H, W) each, and of their first
    frames coded alone as images."""
    model.eval()
    scores, images = [], []
    for video in videos:
        video = video.to(device)[None]
        scores.append(psnr(model.decode(model.encode(video)), video))
        images.append(psnr(model.decode(model.encode(video[:, :, :1])), video[:, :, :1]))
    model.train()
    return {"psnr": sum(scores) / len(scores), "psnr_image": sum(images) / len(images)}


def trim_log(path: str, step: int) -> None:
    """Drop the lines of the JSONL log ``path`` past ``step``: a run killed after its last checkpoint logged steps
    that the resumed run takes again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(args: argparse.Namespace, state: TrainState, device: torch.device) -> None:
    """Train ``state`` up to --steps with a progress bar, the JSONL log, held-out PSNR and checkpoints."""
    config = state.model.config
    dataset, held_out = training_dataset(args, config), held_out_videos(args, config)
    log = args.log_file or os.path.join(args.out, LOG_FILE)
    trim_log(log, state.step)
    params = sum(p.numel() for p in state.model.parameters())
    print(f"{PROG}: {params / 1e6:.2f}M parameters, {config.temporal_stride}x{config.spatial_stride}x"
          f"{config.spatial_stride} compression to {config.latent_channels} channels, on {device}", file=sys.stderr)
    bar = tqdm(total=args.steps, initial=state.step, desc="train", dynamic_ncols=True)
    while state.step < args.steps:
        start_time = time.perf_counter()
        terms = train_step(args, state, dataset, device)
        seconds = time.perf_counter() - start_time
        _log(log, {"step": state.step, **{k: round(v, 6) for k, v in terms.items()}, "seconds": round(seconds, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", s=f"{seconds:.2f}")
        if state.step % args.eval_every == 0 or state.step == args.steps:
            scores = evaluate(state.model, held_out, device)
            _log(log, {"step": state.step, **{k: round(v, 3) for k, v in scores.items()}})
            bar.write(f"step {state.step}: held-out PSNR {scores['psnr']:.2f} dB (images {scores['psnr_image']:.2f})")
        if state.step % args.save_every == 0 or state.step == args.steps:
            save(args, state)
    bar.close()


def main(argv: list[str] | None = None) -> int:
    """Train as the command line ``argv`` (default: ``sys.argv[1:]``) says; returns the exit status, 0."""
    args = parse_args(argv)
    for name in ("steps", "batch", "save_every", "eval_every", "eval_videos"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    training_dataset(args, model_config(args))  # bad sizes raise before any work
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    train(args, start(args, device), device)
    return 0


cli = common.entry_point(PROG, main)

if __name__ == "__main__":
    cli()
