"""TextToVideo: tokenizer + text encoder + VideoDiT (+ the autoencoder of a latent model), saved and loaded as
safetensors + JSON."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from torch import nn

from vdit.demo.checkpoint import (
    CheckpointError,
    dataclass_from_dict,
    load_into,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from vdit.demo.latent import LatentSpace
from vdit.demo.text import TextEncoder, WordTokenizer
from vdit.models import VideoDiT, VideoDiTConfig

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")  # the shipped demo model
DEFAULT_WEIGHTS = os.path.join(ASSETS, "model.safetensors")  # its config.json lies beside it
# The shipped video compression network (vdit.demo.autoencoder; vdit/demo/assets/README.md).
SHIPPED_AUTOENCODER = os.path.join(os.path.dirname(ASSETS), "autoencoder")
# The shipped weights by name (--weights dense / sta / latent): the demo model, the same model fine-tuned to
# sliding-tile attention (tiles of 4x4x4 tokens, windows of 4x2x2 tiles), and its text encoder and blocks
# fine-tuned on the shipped autoencoder's latents (vdit/demo/assets/README.md).
SHIPPED_WEIGHTS = {"dense": DEFAULT_WEIGHTS,
                   "sta": os.path.join(os.path.dirname(ASSETS), "demo-sta", "model.safetensors"),
                   "latent": os.path.join(os.path.dirname(ASSETS), "demo-latent", "model.safetensors")}


@dataclasses.dataclass
class TextEncoderConfig:
    """Hyper-parameters of the demo's :class:`vdit.demo.text.TextEncoder` (``dim`` = the DiT's context_dim)."""

    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_len: int = 64
    embedding_skip: bool = False  # see vdit.demo.text.TextEncoder


class TextToVideo(nn.Module):
    """The demo text-to-video model: ``encode(prompts)`` -> packed context; ``dit`` predicts velocities.

    ``sampling_shift`` is the time shift (vdit.sampling.time_shift) :func:`generate` uses by default: the one
    the weights were trained with, since a sampler that spends its steps where the model never trained (t
    near 1 for a small training shift) gets compositions that do not hold from frame to frame.

    ``latent``: a latent model's :class:`vdit.demo.latent.LatentSpace` (its autoencoder, frozen): the DiT then
    diffuses normalized latents, whose channel count its ``in_channels`` and ``out_channels`` must equal, and
    :func:`generate` decodes them. None: the DiT diffuses pixels.
    """

    CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
    DEFAULT_SAMPLING_SHIFT = 3.0  # configs written before the key existed were trained and sampled at 3

    def __init__(self, dit_config: VideoDiTConfig, vocabulary: Sequence[str],
                 text_config: TextEncoderConfig | None = None, sampling_shift: float = DEFAULT_SAMPLING_SHIFT,
                 latent: LatentSpace | None = None):
        super().__init__()
        if not sampling_shift > 0:
            raise ValueError(f"sampling_shift must be > 0, got {sampling_shift}")
        channels = latent.channels if latent is not None else 3
        if (dit_config.in_channels, dit_config.out_channels) != (channels, channels):
            space = f"the autoencoder's {channels} latent channels" if latent is not None else "3 (RGB pixels)"
            raise ValueError(f"dit in_channels / out_channels ({dit_config.in_channels} / {dit_config.out_channels})"
                             f" must equal {space}")
        self.sampling_shift = float(sampling_shift)
        self.text_config = text_config or TextEncoderConfig()
        if dit_config.context_dim != self.text_config.dim:
            raise ValueError(f"dit context_dim {dit_config.context_dim} must equal the text encoder dim "
                             f"{self.text_config.dim}")
        self.tokenizer = WordTokenizer(vocabulary)
        self.text_encoder = TextEncoder(len(self.tokenizer), **dataclasses.asdict(self.text_config))
        self.dit = VideoDiT(dit_config)
        self.latent = latent

    def video_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of what the DiT diffuses for a (3, frames, height, width) video: the video itself, or a latent
        model's latent (:meth:`vdit.demo.latent.LatentSpace.video_shape`)."""
        if self.latent is not None:
            return self.latent.video_shape(frames, height, width)
        return self.dit.config.out_channels, frames, height, width

    def to_model_space(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Training targets of ``videos`` ((3, T, H, W) each): the videos, or a latent model's normalized latents
        (frame counts 1 + 4k)."""
        return list(videos) if self.latent is None else self.latent.encode(videos)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed text embeddings (total, dim) and cu_seqlens int32 (B + 1,) of ``prompts``."""
        device = next(self.parameters()).device
        ids, cu = self.tokenizer.encode_batch(prompts, device)
        return self.text_encoder(ids, cu), cu

    def forward(self, videos: Sequence[torch.Tensor], timesteps: torch.Tensor, prompts: Sequence[str],
                sequence_parallel=None, *, gather: bool = True):
        """Velocity predictions for noisy ``videos`` (list of (C, T, H, W)) at ``timesteps`` (B,) given ``prompts``
        (``sequence_parallel``: see :class:`vdit.models.VideoDiT`). With sequence parallelism and ``gather=False``
        this rank's share only, a :class:`vdit.models.shard.ShardedVelocity` (for a loss on the shard)."""
        context, cu = self.encode(prompts)
        if sequence_parallel is not None and not gather:
            return self.dit.forward_shard(videos, timesteps, context, cu, sequence_parallel)
        return self.dit(videos, timesteps, context, cu, sequence_parallel=sequence_parallel)

    def config_dict(self) -> dict:
        """The JSON-serializable configuration that :meth:`from_config` rebuilds the model from."""
        config = {"dit": dataclasses.asdict(self.dit.config), "text_encoder": dataclasses.asdict(self.text_config),
                  "vocabulary": self.tokenizer.vocab[2:], "sampling_shift": self.sampling_shift}
        if self.latent is not None:
            config["latent"] = self.latent.config_dict()
        return config

    def save(self, directory: str, *, weights_name: str | None = None, dtype: torch.dtype | None = None,
             state_dict: dict | None = None) -> None:
        """Write ``config.json`` and the weights (``model.safetensors`` by default) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        write_json(os.path.join(directory, self.CONFIG_FILE), self.config_dict())
        save_tensors(os.path.join(directory, weights_name or self.WEIGHTS_FILE), state_dict or self.state_dict(), dtype)

    @classmethod
    def from_config(cls, config: dict, source: str = "config") -> TextToVideo:
        """A freshly initialized model of ``config`` (a :meth:`config_dict`); bad configs raise CheckpointError
        naming ``source``."""
        unknown = sorted(set(config) - {"dit", "text_encoder", "vocabulary", "sampling_shift", "latent"})
        if unknown:
            raise CheckpointError(f"{source}: unknown keys {unknown}")
        try:
            dit = dataclass_from_dict(VideoDiTConfig, config["dit"], source)
            text = dataclass_from_dict(TextEncoderConfig, config["text_encoder"], source)
            latent = LatentSpace.from_config(config["latent"]) if config.get("latent") is not None else None
            return cls(dit, config["vocabulary"], text, config.get("sampling_shift", cls.DEFAULT_SAMPLING_SHIFT),
                       latent)
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid configuration: {exc}") from None

    @classmethod
    def load(cls, weights: str, config: str | None = None, *, device="cpu") -> TextToVideo:
        """Load from a safetensors file and its JSON config (default: config.json beside the weights)."""
        config = config or os.path.join(os.path.dirname(weights), cls.CONFIG_FILE)
        tensors = load_tensors(weights)
        model = cls.from_config(read_json(config), config)
        load_into(model, tensors, "", weights)
        return model.to(device).eval()


def generate(model: TextToVideo, prompts: Sequence[str], *, frames: int = 16, height: int = 64, width: int = 64,
             steps: int = 30, guidance: float = 4.0, seed: int | Sequence[int] = 0, method: str = "euler",
             shift: float | None = None, progress: bool = True, sequence_parallel=None, cache=None,
             stats: list | None = None, noise=None, sizes: Sequence[tuple[int, int]] | None = None
             ) -> list[torch.Tensor]:
    """Generate one video per prompt with ``model``: list of float32 (3, frames, height, width) in [-1, 1].

    A latent model samples latents (:meth:`TextToVideo.video_shape`) and decodes them with its autoencoder;
    ``noise`` and ``seed`` then act on the latents (a noise canvas is given in pixels and moved to the latent grid).

    ``shift`` is the sampler's time shift; None uses ``model.sampling_shift`` (the training shift).
    ``cache``: step caching (a :class:`vdit.sampling.StepCache`, a method name or None, see FlowSampler); where
    ``stats`` is a list, the run's :class:`vdit.sampling.CacheStats` (None without a cache) is appended to it.
    ``noise``: the initial noise (``"independent"``, ``"shared"``, ``"resampled"`` or a
    :class:`vdit.sampling.InitialNoise`; None: independent). ``seed``: prompt i uses ``seed + i``, or give one
    seed per prompt. ``sizes``: one (height, width) per prompt instead of ``height`` x ``width`` for all (one
    packed batch of several sizes; with shared noise and equal seeds, the same subject at every size).

    With ``sequence_parallel`` (a :class:`vdit.distributed.SequenceParallel`), every rank of the group runs
    this call with the same arguments and the transformer blocks split the tokens; all ranks return the
    same videos. Raises ValueError when a size (frames, height, width) is not divisible by the model's patch
    size (times a latent model's autoencoder strides).
    """
    from vdit.sampling import BoundStepModel, FlowSampler, InitialNoise, StepCache

    cfg = model.dit.config
    sizes = [(height, width)] * len(prompts) if sizes is None else [tuple(s) for s in sizes]
    if len(sizes) != len(prompts):
        raise ValueError(f"sizes must give one (height, width) per prompt: {len(sizes)} for {len(prompts)} prompts")
    shapes = [model_shape(model, frames, h, w) for h, w in sizes]
    with torch.no_grad():
        context, cu = model.encode(list(prompts))
        uncond, cu_uncond = model.encode([""] * len(prompts))
    def velocity(videos, t, context, cu_context):
        return model.dit(videos, t, context, cu_context, sequence_parallel=sequence_parallel)

    if model.latent is not None and isinstance(noise, InitialNoise) and noise.canvas is not None:
        noise = dataclasses.replace(noise, canvas=model.video_shape(*noise.canvas)[1:])  # pixels -> latents
    shift = model.sampling_shift if shift is None else shift
    cache = StepCache.of(cache)
    if cache is not None:  # the sampler runs the DiT's three stages itself
        velocity = BoundStepModel(model.dit, sequence_parallel=sequence_parallel)
    sampler = FlowSampler(velocity, steps=steps, method=method, shift=shift, guidance=guidance, progress=progress,
                          cache=cache, noise=noise)
    videos = sampler(shapes, context, cu, uncond_context=uncond, uncond_cu_seqlens=cu_uncond, seed=seed,
                     patch_size=cfg.patch_size)
    if stats is not None:
        stats.append(sampler.cache_stats)
    if model.latent is not None:
        with torch.no_grad():
            videos = model.latent.decode(videos, frames)
    return [v.clamp(-1, 1).float().cpu() for v in videos]


def model_shape(model: TextToVideo, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """:meth:`TextToVideo.video_shape` of a requested size, checked against the DiT's patch size (times a latent
    model's autoencoder strides): a one-line ValueError naming the size and what must divide it."""
    patch = model.dit.config.patch_size
    if model.latent is None:
        if any(s <= 0 or s % p for s, p in zip((frames, height, width), patch)):
            raise ValueError(f"frames x height x width = {frames}x{height}x{width} must be positive multiples of the "
                             f"patch size {'x'.join(map(str, patch))}")
        return model.video_shape(frames, height, width)
    ss = model.latent.autoencoder.config.spatial_stride
    if min(frames, height, width) < 1 or height % (ss * patch[1]) or width % (ss * patch[2]):
        raise ValueError(f"frames x height x width = {frames}x{height}x{width}: frames must be positive and height x "
                         f"width multiples of {ss * patch[1]}x{ss * patch[2]} (autoencoder stride {ss} x patch "
                         f"{patch[1]}x{patch[2]})")
    shape = model.video_shape(frames, height, width)
    if shape[1] % patch[0]:
        raise ValueError(f"frames = {frames} gives {shape[1]} latent frames, not a multiple of the patch's "
                         f"{patch[0]}")
    return shape
