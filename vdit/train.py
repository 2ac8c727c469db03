"""vdit-train: flow-matching training of the demo text-to-video model on the shapes dataset.

Batches are packed videos of mixed sizes filled up to a token budget. Checkpoints (safetensors + JSON)
are written to --out every --save-every steps and at the end; running the same command again resumes
from the last checkpoint exactly (model, EMA, optimizer, data position; noise is drawn per video).

    python -m vdit.train --out runs/demo --steps 4000
    torchrun --nproc_per_node 2 -m vdit.train --out runs/demo-ddp    # data parallel (DDP; gloo on CPU)
    torchrun --nproc_per_node 4 -m vdit.train --out runs/demo-sp --sequence-parallel 2   # 2 x 2

Under torchrun the global batch is the same as in one process and its videos are dealt round-robin
to the data-parallel groups; the loss is normalized globally, so any layout takes the same steps as one
process. With --sequence-parallel N, groups of N consecutive ranks split each video's tokens
(vdit.distributed; --sp-mode ulysses, ring or hybrid).
"""
from __future__ import annotations

import argparse
import copy
import json
import dataclasses
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from vdit.checkpoint import CheckpointError, load_into, load_tensors, read_json, save_tensors, write_json
from vdit.data.shapes import ShapesDataset, vocabulary
from vdit.models import VideoDiTConfig
from vdit.pipelines.text_to_video import TextEncoderConfig, TextToVideo
from vdit.sampling import time_shift
from vdit.training import ema_update, flow_matching_loss

STATE_FILE, EMA_FILE, OPTIM_FILE = "state.json", "ema.safetensors", "optimizer.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vdit-train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="checkpoint directory (resumed if it holds a checkpoint)")
    p.add_argument("--steps", type=int, default=4000, help="total optimizer steps")
    p.add_argument("--tokens-per-batch", type=int, default=2048, help="patch-token budget of one packed batch")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warmup steps")
    p.add_argument("--decay-steps", type=int, default=0,
                   help="decay the learning rate linearly to 0 over the last this many of --steps (0: constant); "
                        "the schedule follows --steps, so a resumed run with fewer steps starts decaying earlier")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    p.add_argument("--timestep-shift", type=float, default=1.0,
                   help="train on t = time_shift(u, shift): > 1 puts more steps at high noise, where a video's layout "
                        "and colours are decided; use the sampler's shift")
    p.add_argument("--timestep-sampling", choices=("logit-normal", "uniform"), default="logit-normal",
                   help="distribution of u: sigmoid(N(0, 1)) (concentrated at mid noise) or U(0, 1) (the density of "
                        "the sampler's own time grid, which covers t near 1 where large videos get their layout)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="probability of an empty prompt (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", default="1x8x8", help="pt x ph x pw (3 * pt*ph*pw must not exceed --hidden-size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-videos", type=int, default=1,
                   help="at least this many videos per batch (>= the number of data-parallel ranks)")
    p.add_argument("--sequence-parallel", type=int, default=1, help="ranks that split each batch's tokens")
    p.add_argument("--sp-mode", choices=("ulysses", "ring", "hybrid"), default="ulysses")
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses group size for --sp-mode hybrid")
    p.add_argument("--fractional-positions", action="store_true",
                   help="give the tokens a learned embedding of their (t, h, w) place in the clip (VideoDiTConfig."
                        "fractional_positions); with --init-weights it is added to the loaded model at zero")
    p.add_argument("--prompt-velocity", action="store_true",
                   help="measure those positions in a frame moving at a velocity read from the prompt (VideoDiTConfig."
                        "prompt_velocity; implies --fractional-positions); with --init-weights it is added at zero")
    p.add_argument("--text-embedding-skip", action="store_true",
                   help="add each word's own embedding to the text encoder's output through a learned map "
                        "(TextEncoderConfig.embedding_skip); with --init-weights it is added at zero")
    p.add_argument("--added-lr-scale", type=float, default=1.0,
                   help="learning-rate multiplier for the parameters of the modules named by the three flags above "
                        "in this command (they start at zero in a trained model and have to catch up with it)")
    p.add_argument("--init-weights", default=None,
                   help="start a new run from these TextToVideo weights (config.json beside them) instead of a "
                        "random initialization; ignored when --out already holds a checkpoint")
    p.add_argument("--log-file", default=None, help="append one JSON line per step (step, loss, videos)")
    return p.parse_args(argv)


def new_model(args) -> TextToVideo:
    patch = tuple(int(v) for v in args.patch_size.split("x"))
    text = TextEncoderConfig(embedding_skip=args.text_embedding_skip)
    cfg = VideoDiTConfig(in_channels=3, patch_size=patch, hidden_size=args.hidden_size, depth=args.depth,
                         heads=args.heads, context_dim=text.dim,
                         fractional_positions=args.fractional_positions or args.prompt_velocity,
                         prompt_velocity=args.prompt_velocity)
    return TextToVideo(cfg, vocabulary(), text)


# Modules that --fractional-positions, --prompt-velocity and --text-embedding-skip add to a model (at zero).
ADDED_MODULES = ("dit.position_embed.", "dit.prompt_velocity.", "text_encoder.skip.")


def with_added_modules(model: TextToVideo, *, fractional_positions: bool = False, prompt_velocity: bool = False,
                       embedding_skip: bool = False) -> TextToVideo:
    """``model`` with a FractionalPositionEmbedding, a PromptVelocity (with the former) and/or a text-encoder
    embedding skip added, where asked for and not there yet; all start at zero, so the function stays unchanged."""
    config = model.config_dict()
    config["dit"]["fractional_positions"] |= fractional_positions or prompt_velocity
    config["dit"]["prompt_velocity"] |= prompt_velocity
    config["text_encoder"]["embedding_skip"] |= embedding_skip
    if config == model.config_dict():
        return model
    grown = TextToVideo.from_config(config).to(next(model.parameters()).device)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(ADDED_MODULES) for k in missing), (missing, unexpected)
    return grown.train(model.training)


def optimizer(model: TextToVideo, args) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW and the parameter names in its order. The parameters of the modules named by this command's
    --fractional-positions / --prompt-velocity / --text-embedding-skip form a second group whose learning rate
    is scaled by ``args.added_lr_scale`` (from the arguments alone, so a resumed run gets the same groups)."""
    flags = (args.fractional_positions, args.prompt_velocity, args.text_embedding_skip)
    scaled = tuple(prefix for prefix, flag in zip(ADDED_MODULES, flags) if flag)
    named = list(model.named_parameters())
    base = [(n, p) for n, p in named if not n.startswith(scaled)]  # startswith(()) is False: no flags, no group
    added = [(n, p) for n, p in named if n.startswith(scaled)]
    groups = [{"params": [p for _, p in base], "lr_scale": 1.0}]
    if added:
        groups.append({"params": [p for _, p in added], "lr_scale": args.added_lr_scale})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    return opt, [n for n, _ in base + added]


def next_batch(dataset: ShapesDataset, index: int, budget: int, patch, seed: int, dropout: float,
               rank: int = 0, world_size: int = 1, min_videos: int = 1):
    """Sample indices from ``index`` on until the token budget is reached (and at least ``min_videos``).

    Returns (indices of this rank's videos, their videos, captions, element count of the whole batch,
    videos in the whole batch, next index); rank r of ``world_size`` gets the batch's videos r, r + W, ...
    """
    indices, tokens, elements = [], 0, 0
    while True:
        spec, _ = dataset.spec(index)
        n = (spec.frames // patch[0]) * (spec.height // patch[1]) * (spec.width // patch[2])
        if len(indices) >= min_videos and tokens + n > budget:
            break
        indices.append(index)
        tokens += n
        elements += 3 * spec.frames * spec.height * spec.width
        index += 1
    mine = indices[rank::world_size]
    videos, captions = [], []
    for i in mine:
        video, caption, _ = dataset[i]
        videos.append(video)
        captions.append("" if random.Random(f"dropout/{seed}/{i}").random() < dropout else caption)
    return mine, videos, captions, elements, len(indices), index


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``args.warmup`` steps, constant,
    then, when ``args.decay_steps`` > 0, linear decay to 0 at ``args.steps`` (a cool-down that averages out
    the last steps' gradient noise, like the EMA but in the weights trained on)."""
    scale = min(1.0, (step + 1) / max(1, args.warmup))
    if args.decay_steps > 0:
        scale = min(scale, max(0.0, (args.steps - step) / args.decay_steps))
    return args.lr * scale


def per_video_noise(seed: int, indices, videos, device, shift: float = 1.0, sampling: str = "logit-normal"):
    """Timesteps (B,) and noise for each video, drawn from a generator keyed by (seed, sample index), so a
    video gets the same noise whichever rank or batch it lands in. Timesteps are t = time_shift(u, shift)
    (vdit.sampling.time_shift) with u logit-normal (``sampling="logit-normal"``) or uniform."""
    ts, noise = [], []
    for i, v in zip(indices, videos):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        u = torch.sigmoid(torch.randn(1, generator=g)) if sampling == "logit-normal" else torch.rand(1, generator=g)
        ts.append(time_shift(u, shift))
        noise.append(torch.randn(v.shape, generator=g).to(device))
    return torch.cat(ts).to(device), noise


def _parameters(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    out, params = {}, _parameters(opt)
    for i, name in enumerate(names):
        for key, value in opt.state.get(params[i], {}).items():
            out[f"{key}/{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    params = _parameters(opt)
    for i, name in enumerate(names):
        state = {key.split("/", 1)[0]: v for key, v in tensors.items() if key.split("/", 1)[1] == name}
        if state:
            opt.state[params[i]] = state


def save_checkpoint(out, model, ema, opt, names, step, data_index, args):
    model.save(out)
    save_tensors(os.path.join(out, EMA_FILE), ema.state_dict())
    save_tensors(os.path.join(out, OPTIM_FILE), {**optimizer_tensors(opt, names), "rng/torch": torch.get_rng_state()})
    write_json(os.path.join(out, STATE_FILE), {"step": step, "data_index": data_index, "args": vars(args)})


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (WORLD_SIZE > 1), else (0, 1, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), world_size, device


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rank, world_size, device = init_distributed(torch.device(args.device))
    sp_size = args.sequence_parallel
    if sp_size < 1 or world_size % sp_size:
        raise SystemExit(f"vdit-train: error: --sequence-parallel ({sp_size}) must divide the {world_size} ranks")
    dp_size, dp_rank = world_size // sp_size, rank // sp_size
    if args.min_videos < dp_size:
        raise SystemExit(f"vdit-train: error: --min-videos ({args.min_videos}) must be >= the number of "
                         f"data-parallel groups ({dp_size}), so that every group gets a video")
    sequence_parallel = None
    if sp_size > 1:
        from vdit.distributed import SequenceParallel

        groups = [dist.new_group(list(range(g * sp_size, (g + 1) * sp_size))) for g in range(dp_size)]
        sequence_parallel = SequenceParallel(groups[dp_rank], args.sp_mode, args.ulysses_size)
    state_path = os.path.join(args.out, STATE_FILE)
    if os.path.exists(state_path):
        model = TextToVideo.load(os.path.join(args.out, TextToVideo.WEIGHTS_FILE), device=device).train()
    elif args.init_weights:
        # Fine-tuning / continuing from exported weights: the architecture comes from their config.
        model = TextToVideo.load(args.init_weights, device=device).train()
        model = with_added_modules(model, fractional_positions=args.fractional_positions,
                                   prompt_velocity=args.prompt_velocity, embedding_skip=args.text_embedding_skip)
        if rank == 0:
            print(f"initialized from {args.init_weights}", file=sys.stderr)
    else:
        model = new_model(args).to(device)
    model.sampling_shift = args.timestep_shift  # saved in config.json: generate() samples at the training shift
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt, names = optimizer(model, args)
    step, data_index = 0, 0
    if os.path.exists(state_path):
        state = read_json(state_path)
        step, data_index = state["step"], state["data_index"]
        load_into(ema, load_tensors(os.path.join(args.out, EMA_FILE)), "", EMA_FILE)
        optim = load_tensors(os.path.join(args.out, OPTIM_FILE))
        torch.set_rng_state(optim.pop("rng/torch"))
        load_optimizer(opt, names, {k: v.to(device) for k, v in optim.items()})
        print(f"resuming from {args.out} at step {step}", file=sys.stderr)
    dataset = ShapesDataset(seed=args.seed)
    patch = model.dit.config.patch_size
    params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"vdit-train: {params / 1e6:.2f}M parameters on {device} x {world_size} rank(s), "
              f"{args.tokens_per_batch} tokens per batch", file=sys.stderr)
    net = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True, disable=rank != 0)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    while step < args.steps:
        start = time.perf_counter()
        indices, videos, captions, elements, batch_videos, data_index = next_batch(
            dataset, data_index, args.tokens_per_batch, patch, args.seed, args.caption_dropout, dp_rank, dp_size,
            args.min_videos)
        videos = [v.to(device) for v in videos]
        t, noise = per_video_noise(args.seed, indices, videos, device, args.timestep_shift,
                                   args.timestep_sampling)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args) * group["lr_scale"]
        with autocast:
            loss = flow_matching_loss(lambda x, tt, _c, _cu: net(x, tt, captions, sequence_parallel), videos, None,
                                      None, t=t, noise=noise, normalizer=elements)
        opt.zero_grad(set_to_none=True)
        # The loss is a share of the global mean and DDP averages over all ranks, of which each sequence-
        # parallel group's sp_size ranks together carry sp_size copies of its gradient: scale by dp_size.
        (loss * dp_size).backward()
        if world_size > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= sp_size
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        tokens = sum((v.shape[1] // patch[0]) * (v.shape[2] // patch[1]) * (v.shape[3] // patch[2]) for v in videos)
        tokens *= dp_size  # approximately: the data-parallel groups share the batch
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        if rank == 0 and args.log_file:
            with open(args.log_file, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "videos": batch_videos}) + "\n")
        if rank == 0 and (step % args.save_every == 0 or step == args.steps):
            save_checkpoint(args.out, model, ema, opt, names, step, data_index, args)
    bar.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def cli() -> None:
    try:
        sys.exit(main())
    except CheckpointError as exc:
        print(f"vdit-train: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
