"""vdit-train: flow-matching training of the demo text-to-video model on the shapes dataset.

Batches are packed videos of mixed sizes filled up to a token budget. Checkpoints (safetensors + JSON)
are written to --out every --save-every steps and at the end; running the same command again resumes
from the last checkpoint exactly (model, EMA, optimizer, data position; noise is drawn per video).

    vdit-train --out runs/demo --steps 4000                      # or: python -m vdit.demo.cli.train ...
    vdit-train --out runs/sta --init-weights vdit/demo/assets/demo/model.safetensors --attention sliding_tile \
        --tile 4,4,4 --window 4,2,2 --sides 96,112,128 --tokens-per-batch 4096   # fine-tune to sparse attention
    torchrun --nproc_per_node 2 -m vdit.demo.cli.train --out runs/demo-ddp    # data parallel (DDP; gloo on CPU)
    torchrun --nproc_per_node 4 -m vdit.demo.cli.train --out runs/demo-sp --sequence-parallel 2   # 2 x 2
    torchrun --nproc_per_node 2 -m vdit.demo.cli.train --out runs/sta-sp --attention sliding_tile --tile 4,4,4 \
        --sequence-parallel 2 --fsdp --activation-checkpointing selective   # sparse, sharded, attention kept
    vdit-train --out runs/latent --autoencoder vdit/demo/assets/autoencoder --patch-size 1x2x2 \
        --init-weights vdit/demo/assets/demo/model.safetensors   # a latent model from the pixel model's blocks

Under torchrun the global batch is the same as in one process and its videos are dealt to the
data-parallel groups by token count; the loss is normalized globally, so any rank grid takes the same steps as one
process. With --sequence-parallel N, groups of N consecutive ranks split each video's tokens
(vdit.distributed; --sp-mode ulysses, ring or hybrid).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from vdit.demo.autoencoder import CausalVideoAutoencoder
from vdit.demo.checkpoint import (
    CheckpointError,
    has_checkpoint,
    load_sharded,
    read_json,
    resume_checkpoint,
    save_checkpoint,
    save_sharded,
    sharded_state,
)
from vdit.demo.cli import common
from vdit.demo.cli.common import UsageError
from vdit.demo.data import ShapesDataset, vocabulary
from vdit.demo.growth import ADDED_MODULES, with_added_modules, with_attention, with_latent_space
from vdit.demo.latent import LatentSpace, latent_statistics
from vdit.demo.pipeline import TextEncoderConfig, TextToVideo
from vdit.distributed import ParallelMesh, build_mesh
from vdit.distributed.sharding import cost_balanced_split
from vdit.models import VideoDiTConfig
from vdit.sampling import time_shift
from vdit.training import ema_update, flow_matching_loss

PROG = "vdit-train"
LATENT_FRAME_COUNTS = (5, 9, 13, 17)  # 1 + 4k: what the causal autoencoder codes
LATENT_STATISTICS_VIDEOS = 64  # training videos whose latents give a new latent model's channel statistics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
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
                   help="train on t = time_shift(u, shift): > 1 puts more steps at high noise, where a video's "
                        "composition and colours are decided; use the sampler's shift")
    p.add_argument("--timestep-sampling", choices=("logit-normal", "uniform"), default="logit-normal",
                   help="distribution of u: sigmoid(N(0, 1)) (concentrated at mid noise) or U(0, 1) (the density of "
                        "the sampler's own time grid, which covers t near 1 where large videos get their composition)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="probability of an empty prompt (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", default="1x8x8", help="pt x ph x pw (3 * pt*ph*pw must not exceed --hidden-size)")
    common.add_device_argument(p)
    p.add_argument("--min-videos", type=int, default=1,
                   help="at least this many videos per batch (>= the number of data-parallel ranks)")
    p.add_argument("--sequence-parallel", type=int, default=1, help="ranks that split each batch's tokens")
    p.add_argument("--sp-mode", choices=("ulysses", "ring", "hybrid"), default="ulysses")
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses group size for --sp-mode hybrid")
    p.add_argument("--sp-layout", choices=("tokens", "work"), default="tokens",
                   help="split each batch's tokens over the sequence-parallel ranks by count or by attention work "
                        "(balances ring attention on batches of mixed lengths)")
    _add_growth_arguments(p)
    p.add_argument("--init-weights", default=None,
                   help="start a new run from these TextToVideo weights (config.json beside them) instead of a "
                        "random initialization; ignored when --out already holds a checkpoint")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients, optimizer state and EMA over the ranks (FSDP2; "
                        "bf16 compute with fp32 reduction on GPUs) and checkpoint shard by shard "
                        "(torch.distributed.checkpoint, resumable at another world size)")
    p.add_argument("--activation-checkpointing", nargs="?", const="full", choices=("full", "selective"),
                   default=None,
                   help="recompute each transformer block in the backward instead of keeping its activations; "
                        "selective: keep each block's self-attention (q, k, v, output, log-sum-exp) and recompute "
                        "the rest, so the backward repeats no attention and no sequence-parallel collective")
    p.add_argument("--sides", default=None,
                   help="comma-separated video heights / widths in pixels to train on "
                        "(default: the dataset's 32 to 64)")
    p.add_argument("--frame-counts", default=None,
                   help="comma-separated frame counts to train on (default: the dataset's 8 to 16; a latent model's "
                        f"{','.join(map(str, LATENT_FRAME_COUNTS))})")
    p.add_argument("--autoencoder", default=None,
                   help="a new run trains a latent model: the DiT diffuses this autoencoder's latents (a directory "
                        "of vdit-train-autoencoder; frozen, saved inside the model). With --init-weights of a pixel "
                        "model, its text encoder and transformer blocks carry over and the patch embedding and "
                        "final layer start afresh at --patch-size")
    p.add_argument("--square-crops", action="store_true",
                   help="train on the centre square crop of every video instead of its native size (the "
                        "comparison of Sora's native-size claim; vdit.demo.data.ShapesDataset)")
    common.add_attention_arguments(p, default_help="dense for a new model, the --init-weights' own otherwise "
                                                     "(a resumed run keeps its checkpoint's)")
    p.add_argument("--log-file", default=None,
                   help="append one JSON line per step (step, loss, videos, wall-clock seconds of the step)")
    return p.parse_args(argv)


def _add_growth_arguments(p: argparse.ArgumentParser) -> None:
    """The options that add modules to a model (at zero with --init-weights) and their learning rate."""
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


def new_model(args, latent: LatentSpace | None = None) -> TextToVideo:
    """A randomly initialized TextToVideo over the shapes dataset's vocabulary, of the architecture that
    --hidden-size, --depth, --heads, --patch-size and the module flags ask for; diffusing ``latent``'s latents
    when given, else pixels."""
    text = TextEncoderConfig(embedding_skip=args.text_embedding_skip)
    attention = {k: v for k, v in common.attention_options(args).items() if v is not None}
    channels = 3 if latent is None else latent.channels
    cfg = VideoDiTConfig(in_channels=channels, out_channels=channels, patch_size=patch_size(args),
                         hidden_size=args.hidden_size, depth=args.depth, heads=args.heads, context_dim=text.dim,
                         fractional_positions=args.fractional_positions or args.prompt_velocity,
                         prompt_velocity=args.prompt_velocity, **attention)
    return TextToVideo(cfg, vocabulary(), text, latent=latent)


def patch_size(args) -> tuple[int, int, int]:
    """--patch-size as (pt, ph, pw); a UsageError naming it when it is not three positive integers."""
    try:
        patch = tuple(int(v) for v in args.patch_size.split("x"))
    except ValueError:
        patch = ()
    if len(patch) != 3 or min(patch) < 1:
        raise UsageError(f"--patch-size must be three positive integers like 1x8x8, got {args.patch_size!r}")
    return patch


def latent_space(args, dataset: ShapesDataset) -> LatentSpace:
    """The --autoencoder with the channel statistics of its latents of the first training videos."""
    try:
        autoencoder = CausalVideoAutoencoder.load(args.autoencoder)
    except CheckpointError as exc:
        raise UsageError(f"--autoencoder: {exc}") from None
    patch = patch_size(args)
    st = autoencoder.config.temporal_stride
    if any((frames - 1) % st for frames in dataset.frame_counts):
        raise UsageError(f"--frame-counts must be 1 + {st}k for the autoencoder, got {dataset.frame_counts}")
    multiple = autoencoder.config.spatial_stride * max(patch[1], patch[2])
    if any(side % multiple for side in dataset.sides):
        raise UsageError(f"--sides must be multiples of {multiple} (autoencoder stride x --patch-size), got "
                         f"{dataset.sides}")
    videos = [dataset[i][0] for i in range(LATENT_STATISTICS_VIDEOS)]
    return LatentSpace(autoencoder, *latent_statistics(autoencoder, videos))


def optimizer(model: TextToVideo, args) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW and the parameter names in its order. The parameters of the modules named by this command's
    --fractional-positions / --prompt-velocity / --text-embedding-skip form a second group whose learning rate
    is scaled by ``args.added_lr_scale`` (from the arguments alone, so a resumed run gets the same groups)."""
    flags = (args.fractional_positions, args.prompt_velocity, args.text_embedding_skip)
    scaled = tuple(prefix for prefix, flag in zip(ADDED_MODULES, flags) if flag)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a latent model's autoencoder is frozen
    base = [(n, p) for n, p in named if not n.startswith(scaled)]  # startswith(()) is False: no flags, no group
    added = [(n, p) for n, p in named if n.startswith(scaled)]
    groups = [{"params": [p for _, p in base], "lr_scale": 1.0}]
    if added:
        groups.append({"params": [p for _, p in added], "lr_scale": args.added_lr_scale})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    return opt, [n for n, _ in base + added]


@dataclasses.dataclass
class TrainBatch:
    """This rank's share of one packed batch (:func:`next_batch`) and where the next batch starts."""

    indices: list[int]  # dataset indices of this rank's videos
    videos: list[torch.Tensor]  # (3, T, H, W) each
    captions: list[str]  # their captions, "" where dropped (for classifier-free guidance)
    elements: int  # element count of the whole batch: the loss is the mean over all of them
    batch_videos: int  # videos in the whole batch, all data-parallel ranks together
    next_index: int  # the dataset index the next batch starts from


def next_batch(dataset: ShapesDataset, index: int, budget: int, patch, seed: int, dropout: float,
               rank: int = 0, world_size: int = 1, min_videos: int = 1, shape_of=None) -> TrainBatch:
    """Sample indices from ``index`` on until the token budget is reached (and at least ``min_videos``).
    Tokens and elements count what the model diffuses: ``shape_of(frames, height, width)`` -> (C, T, H, W)
    (a latent model's :meth:`TextToVideo.video_shape`; default: the RGB video itself).

    Returns this data-parallel rank's :class:`TrainBatch`: the videos are dealt to the ``world_size``
    data-parallel ranks evening out both token counts and attention work (n^2 per video;
    vdit.distributed.sharding.cost_balanced_split), so no rank waits for one that holds all the long videos.
    """
    indices, tokens, elements, counts = [], 0, 0, []
    while True:
        spec, _ = dataset.spec(index)
        c, t, h, w = shape_of(spec.frames, spec.height, spec.width) if shape_of else (3, spec.frames, spec.height,
                                                                                    spec.width)
        n = (t // patch[0]) * (h // patch[1]) * (w // patch[2])
        if len(indices) >= min_videos and tokens + n > budget:
            break
        indices.append(index)
        counts.append(n)
        tokens += n
        elements += c * t * h * w
        index += 1
    mine = [indices[i] for i in cost_balanced_split(counts, world_size)[rank]]
    videos, captions = [], []
    for i in mine:
        video, caption, _ = dataset[i]
        videos.append(video)
        captions.append("" if random.Random(f"dropout/{seed}/{i}").random() < dropout else caption)
    return TrainBatch(mine, videos, captions, elements, len(indices), index)


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


def parallel_mesh(args: argparse.Namespace, ranks: common.Ranks) -> ParallelMesh:
    """The data-parallel x sequence-parallel rank grid that --sequence-parallel, --sp-mode, --ulysses-size and
    --sp-layout ask for: ``dp_size`` groups of ``sp_size`` consecutive ranks, each group splitting its videos'
    tokens, with every process group made now by every rank in the same order (vdit.distributed.build_mesh);
    a UsageError when the ranks cannot be arranged so."""
    sp_size = args.sequence_parallel
    if sp_size < 1 or ranks.world_size % sp_size:
        raise UsageError(f"--sequence-parallel ({sp_size}) must divide the {ranks.world_size} ranks")
    dp_size = ranks.world_size // sp_size
    if args.min_videos < dp_size:
        raise UsageError(f"--min-videos ({args.min_videos}) must be >= the number of data-parallel groups "
                         f"({dp_size}), so that every group gets a video")
    if ranks.world_size == 1:
        return ParallelMesh.single_process()
    # --sp-mode / --ulysses-size choose how a group of several ranks attends; groups of one ignore them.
    mode, ulysses_size = (args.sp_mode, args.ulysses_size) if sp_size > 1 else ("ulysses", None)
    try:
        return build_mesh(ranks.device.type, sp_size, mode, ulysses_size, args.sp_layout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds: the model, its EMA, the optimizer with its parameters' names, and the position
    (optimizer steps taken, index of the next dataset sample)."""

    model: TextToVideo
    ema: TextToVideo
    opt: torch.optim.Optimizer
    names: list[str]
    step: int = 0
    data_index: int = 0


def initial_model(args: argparse.Namespace, device: torch.device, rank: int, resume: bool) -> TextToVideo:
    """The model to train, in train mode on ``device``: the checkpoint's in --out when ``resume``, else the
    --init-weights with the modules this command's flags add (moved onto --autoencoder's latents if given),
    else a new one."""
    if resume:
        return TextToVideo.load(os.path.join(args.out, TextToVideo.WEIGHTS_FILE), device=device).train()
    latent = latent_space(args, training_dataset(args)) if args.autoencoder else None
    if not args.init_weights:
        return new_model(args, latent).to(device)
    # Fine-tuning / continuing from exported weights: the architecture comes from their config.
    model = TextToVideo.load(args.init_weights, device=device).train()
    if latent is not None:
        model, fresh = with_latent_space(model, latent, patch_size(args))
        if rank == 0:
            print(f"latent model: {len(fresh)} tensors start afresh ({', '.join(fresh)})", file=sys.stderr)
    model = with_added_modules(model, fractional_positions=args.fractional_positions,
                               prompt_velocity=args.prompt_velocity, embedding_skip=args.text_embedding_skip)
    model = with_attention(model, **common.attention_options(args))
    if rank == 0:
        print(f"initialized from {args.init_weights}", file=sys.stderr)
    return model


def start(args: argparse.Namespace, device: torch.device, rank: int, world_size: int = 1) -> TrainState:
    """The :class:`TrainState` to train from: resumed from the checkpoint in --out if it holds one."""
    resume = has_checkpoint(args.out)
    if resume and (sharded_state(args.out) is not None) != (args.fsdp and world_size > 1):
        kind = "sharded (--fsdp under torchrun)" if sharded_state(args.out) else "single-file (without --fsdp)"
        raise UsageError(f"{args.out} holds a {kind} checkpoint; resume it the way it was saved")
    if args.fsdp and world_size > 1:
        return start_sharded(args, device, rank, resume)
    model = initial_model(args, device, rank, resume)
    model.sampling_shift = args.timestep_shift  # saved in config.json: generate() samples at the training shift
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    state = TrainState(model, ema, *optimizer(model, args))
    if resume:
        state.step, state.data_index = resume_checkpoint(args.out, ema, state.opt, state.names, device)
        print(f"resuming from {args.out} at step {state.step}", file=sys.stderr)
    return state


def start_sharded(args: argparse.Namespace, device: torch.device, rank: int, resume: bool) -> TrainState:
    """:func:`start` for --fsdp: the model and its EMA sharded over the ranks (vdit.distributed.fsdp), the
    optimizer over the shards, resumed from the sharded checkpoint in --out if there is one.

    Every rank builds both on the meta device and allocates only its shards. Without a checkpoint, rank 0
    alone builds (or reads) the whole initial model, on its host, and sends it tensor by tensor; the EMA
    starts as a copy of the model's shards. With one, the shards come from the checkpoint."""
    import torch.distributed as dist

    from vdit.distributed.fsdp import sharded_pair

    full = None
    if resume:  # the architecture from the run's config; the weights come from the shards below
        config = read_json(os.path.join(args.out, TextToVideo.CONFIG_FILE))
    else:
        if rank == 0:
            full = initial_model(args, torch.device("cpu"), rank, False)
        shared = [full.config_dict() if full is not None else None]
        dist.broadcast_object_list(shared, src=0)
        config = shared[0]
    model, ema = sharded_pair(lambda: TextToVideo.from_config(config), lambda m: m.dit.blocks, device, full,
                              load=not resume, mixed_precision=device.type == "cuda")
    del full
    model.train()
    ema.eval().requires_grad_(False)
    for m in (model, ema):
        m.sampling_shift = args.timestep_shift
    state = TrainState(model, ema, *optimizer(model, args))
    if resume:
        state.step, state.data_index = load_sharded(args.out, model, ema, state.opt)
        if rank == 0:
            print(f"resuming from {args.out} at step {state.step} (sharded)", file=sys.stderr)
    return state


def train_step(args: argparse.Namespace, state: TrainState, net: torch.nn.Module, mesh: ParallelMesh,
               batch: TrainBatch) -> torch.Tensor:
    """One optimizer step and EMA update on this rank's share of a batch (its videos on the training device;
    the loss is the mean over every element of the whole batch). Returns the batch's loss, a 0-d tensor (the
    same on every rank)."""
    videos, captions = batch.videos, batch.captions
    device = videos[0].device
    t, noise = per_video_noise(args.seed, batch.indices, videos, device, args.timestep_shift, args.timestep_sampling)
    for group in state.opt.param_groups:
        group["lr"] = learning_rate(state.step, args) * group["lr_scale"]
    mixed = device.type == "cuda" and not args.fsdp  # FSDP casts through its MixedPrecisionPolicy instead
    autocast = torch.autocast("cuda", torch.bfloat16) if mixed else torch.autocast("cpu", enabled=False)
    sp = mesh.sequence_parallel
    with autocast:  # with sequence parallelism each rank's loss covers its own tokens (no gather of outputs)
        loss = flow_matching_loss(lambda x, tt, _c, _cu: net(x, tt, captions, sp, gather=False), videos, None,
                                  None, t=t, noise=noise, normalizer=batch.elements)
    state.opt.zero_grad(set_to_none=True)
    # Each rank's loss is its share of the global mean (its videos' share, and with sequence parallelism its
    # tokens' share of them); DDP averages the gradients over all world_size ranks: scale by world_size.
    (loss * mesh.world_size).backward()
    if mesh.world_size > 1:
        loss = loss.detach().clone()
        dist.all_reduce(loss)
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
    state.opt.step()
    state.step += 1
    ema_update(state.ema, state.model, min(args.ema, (1 + state.step) / (10 + state.step)))
    return loss


def log_and_save(args: argparse.Namespace, state: TrainState, ranks: common.Ranks, loss: float, batch_videos: int,
                 seconds: float) -> None:
    """The bookkeeping after a step: rank 0 appends the --log-file line (step, loss, videos, the step's
    wall-clock seconds); every --save-every steps and at the last step a checkpoint goes to --out (from rank 0,
    or from every rank, shard by shard, with --fsdp)."""
    rank = ranks.rank
    if args.log_file and rank == 0:
        with open(args.log_file, "a") as f:
            f.write(json.dumps({"step": state.step, "loss": loss, "videos": batch_videos,
                                "seconds": round(seconds, 4)}) + "\n")
    if not (state.step % args.save_every == 0 or state.step == args.steps):
        return
    if args.fsdp and ranks.world_size > 1:
        save_sharded(args.out, state.model, state.ema, state.opt, state.step, state.data_index, args, rank,
                     export=state.step == args.steps)
    elif rank == 0:
        save_checkpoint(args.out, state.model, state.ema, state.opt, state.names, state.step, state.data_index, args)


def dataset_sizes(args: argparse.Namespace) -> dict:
    """The ``sides`` / ``frame_counts`` keywords of ShapesDataset that --sides / --frame-counts ask for."""
    sizes = {}
    for option, key in (("sides", "sides"), ("frame_counts", "frame_counts")):
        text = getattr(args, option)
        if text is None:
            continue
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be comma-separated positive integers, got {text!r}")
        sizes[key] = values
    return sizes


def training_dataset(args: argparse.Namespace, latent: bool | None = None) -> ShapesDataset:
    """The dataset --seed, --sides, --frame-counts and --square-crops ask for (``latent``: for a latent model,
    whose autoencoder codes 1 + 4k frames: LATENT_FRAME_COUNTS by default; None: a latent model when
    --autoencoder is given)."""
    sizes = dataset_sizes(args)
    if args.autoencoder if latent is None else latent:
        sizes.setdefault("frame_counts", LATENT_FRAME_COUNTS)
    return ShapesDataset(seed=args.seed, square_crops=args.square_crops, **sizes)


def train(args: argparse.Namespace, state: TrainState, ranks: common.Ranks, mesh: ParallelMesh) -> None:
    """Train ``state`` from its step up to --steps on the ranks' grid ``mesh``, with a progress bar, the log and
    checkpoints on rank 0."""
    rank, world_size, device = ranks
    dataset = training_dataset(args, state.model.latent is not None)
    patch = state.model.dit.config.patch_size
    if rank == 0:
        params = sum(p.numel() for p in state.model.parameters())
        print(f"{PROG}: {params / 1e6:.2f}M parameters on {device} x {world_size} rank(s), "
              f"{args.tokens_per_batch} tokens per batch", file=sys.stderr)
    state.model.dit.enable_activation_checkpointing(args.activation_checkpointing is not None,
                                                    keep_attention=args.activation_checkpointing == "selective")
    ddp = world_size > 1 and not args.fsdp  # FSDP averages the gradients itself
    net = torch.nn.parallel.DistributedDataParallel(state.model) if ddp else state.model
    bar = tqdm(total=args.steps, initial=state.step, desc="train", dynamic_ncols=True, disable=rank != 0)
    while state.step < args.steps:
        start_time = time.perf_counter()
        batch = next_batch(dataset, state.data_index, args.tokens_per_batch, patch, args.seed, args.caption_dropout,
                           mesh.dp_rank, mesh.dp_size, args.min_videos, state.model.video_shape)
        state.data_index = batch.next_index
        batch.videos = state.model.to_model_space([v.to(device) for v in batch.videos])
        loss = train_step(args, state, net, mesh, batch).item()
        tokens = sum((v.shape[1] // patch[0]) * (v.shape[2] // patch[1]) * (v.shape[3] // patch[2])
                     for v in batch.videos)
        tokens *= mesh.dp_size  # approximately: the data-parallel groups share the batch
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / (time.perf_counter() - start_time):.0f}")
        log_and_save(args, state, ranks, loss, batch.batch_videos, time.perf_counter() - start_time)
    bar.close()


def main(argv: list[str] | None = None) -> int:
    """Train as the command line ``argv`` (default: ``sys.argv[1:]``) says; returns the exit status, 0."""
    args = parse_args(argv)
    dataset_sizes(args), common.attention_options(args), patch_size(args)  # bad values raise before any work
    if args.autoencoder and args.fsdp:
        raise UsageError("--autoencoder does not combine with --fsdp yet (the autoencoder would be sharded too)")
    torch.manual_seed(args.seed)
    with common.process_group(args.device) as ranks:
        mesh = parallel_mesh(args, ranks)
        train(args, start(args, ranks.device, ranks.rank, ranks.world_size), ranks, mesh)
    return 0


cli = common.entry_point(PROG, main)

if __name__ == "__main__":
    cli()
