"""The demo's video compression network: a small causal 3D convolutional autoencoder (a KL-regularized VAE, or
lookup-free quantization).

It maps a video (3, T, H, W) in [-1, 1] to a spacetime latent (C_z, 1 + (T - 1) / 4, H / s, W / s) and back, as
Sora's compression network does for its diffusion transformer. Time is causal, as in MAGVIT-v2's and Wan's causal
VAEs: the first frame is repeated to fill a whole 4-frame block, every convolution pads time on the left only and
every norm works per position (over channels), so latent frame j depends on frames 0 .. 4j alone. The first frame
is therefore encoded on its own, as an image, and each later latent frame covers the next 4 frames: T = 1 + 4k
frames give 1 + k latent frames, and a 1-frame image gives 1 latent frame. Other T raise a ValueError naming
``video`` (pad or trim a clip to 1 + 4k frames first; silently padding would make the decoder return frames the
input never had).

Design: every 4 x s x s block of pixels (s = ``spatial_stride``: 4 by default and in the shipped model, 8 also
measured) is mapped linearly to one latent-resolution position (space-and-time to depth, like a patch embedding),
and all the large convolutions run at the latent resolution, where a position costs 1/(4 s^2) of a full-resolution
one; the decoder mirrors this with a per-position MLP and adds a thin full-resolution refinement.

Bottleneck (``AutoencoderConfig.bottleneck``): ``"kl"``, a diagonal Gaussian posterior with a small KL weight
(see the trainer), which keeps the latent scale bounded and smooth for the diffusion model; or ``"lfq"``,
MAGVIT-v2's lookup-free quantization, where each latent channel is the sign of the encoder's output (a codebook
of 2^C_z codes with no table to look up), trained through a straight-through estimator with a commitment and an
entropy penalty (:func:`lfq_penalties`). The shipped model is KL: at equal steps it reconstructs 0.7-2.1 dB better
(docs/autoencoder.md, "KL against lookup-free quantization").

    ae = CausalVideoAutoencoder(AutoencoderConfig())
    z = ae.encode(video[None])            # (1, 16, 1 + (T - 1) // 4, H // 4, W // 4): the posterior mean
    x = ae.decode(z)                      # (1, 3, T, H, W)
    zs = ae.encode([v0, v1])              # a list of videos of different sizes -> a list of latents
    ae.save("dir"); ae = CausalVideoAutoencoder.load("dir")
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
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

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in float32
# The log-variance starts here (posterior std 0.05), not at 0: it is mostly the encoder head's bias, which AdamW
# moves by about lr per step, so from std 1 the noise on the decoder's input shrinks slowly (std ~0.4 at step 500).
LOGVAR_INIT = -6.0
BOTTLENECKS = ("kl", "lfq")


@dataclasses.dataclass
class AutoencoderConfig:
    """Architecture of a :class:`CausalVideoAutoencoder`; the defaults are the shipped model's (1.26 M parameters).

    Args:
        temporal_stride, spatial_stride: the compression of time and of height and width; one latent position
            codes a ``temporal_stride x spatial_stride x spatial_stride`` block of pixels.
        width: convolution width at the latent resolution, where all the large layers run.
        blocks: residual blocks in the encoder and again in the decoder.
        latent_channels: channels of the latent.
        refine: width of the decoder's full-resolution refinement (two 3x3x3 convolutions added to the
            depth-to-spacetime output, which smooth the seams between blocks); 0 leaves it out.
        expand: hidden width of the decoder's per-position MLP before its map to the pixel block; 0 maps the
            ``width`` features linearly, which confines every decoded block to a ``width``-dimensional subspace
            of its 768 pixel values (too few for sharp edges at every position).
        bottleneck: ``"kl"`` (Gaussian posterior; latents are real-valued) or ``"lfq"`` (lookup-free
            quantization; latents are codes of -1 and +1), see the module docstring.
    """

    temporal_stride: int = 4
    spatial_stride: int = 4
    width: int = 96
    blocks: int = 1
    latent_channels: int = 16
    refine: int = 32
    expand: int = 384
    bottleneck: str = "kl"

    def __post_init__(self):
        for name in ("temporal_stride", "spatial_stride", "width", "latent_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("blocks", "refine", "expand"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {self.bottleneck!r}")

    @property
    def block_features(self) -> int:
        """Pixel values in one latent position's block: 3 x temporal_stride x spatial_stride ** 2."""
        return 3 * self.temporal_stride * self.spatial_stride ** 2


class CausalConv3d(nn.Conv3d):
    """A 3D convolution over (T, H, W) that sees the current and earlier frames only: time is zero-padded on the
    left by ``kernel - 1`` frames, space symmetrically. With time stride 2, 1 + 2k frames give 1 + k."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        self.pads = (kernel // 2, kernel // 2, kernel // 2, kernel // 2, kernel - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, T, H, W) -> (B, cout, T', H', W')."""
        return super().forward(F.pad(x, self.pads))


class ChannelNorm(nn.Module):
    """RMS norm over channels at each (t, h, w) with a learned gain: unlike GroupNorm it mixes nothing across
    frames, which keeps the network causal and an image's encoding independent of the frames after it."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels, 1, 1, 1))
        self.scale = math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> same shape."""
        return F.normalize(x, dim=1) * self.scale * self.gain


class ResBlock(nn.Module):
    """norm, SiLU, causal conv, twice, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ChannelNorm(channels), nn.SiLU(), CausalConv3d(channels, channels),
                                  ChannelNorm(channels), nn.SiLU(), CausalConv3d(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> same shape."""
        return x + self.body(x)


def _head(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(ChannelNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, kernel))


def to_blocks(video: torch.Tensor, st: int, ss: int) -> torch.Tensor:
    """Space-and-time to depth: (B, 3, 1 + k st, H, W) -> (B, 3 st ss^2, 1 + k, H / ss, W / ss). The first frame is
    repeated to fill a whole block of ``st`` frames, so that latent frame 0 sees it alone (the causal image)."""
    B, C, T, H, W = video.shape
    x = torch.cat([video[:, :, :1].expand(B, C, st - 1, H, W), video], dim=2)
    x = x.reshape(B, C, T // st + 1, st, H // ss, ss, W // ss, ss)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, C * st * ss * ss, T // st + 1, H // ss, W // ss)


def from_blocks(x: torch.Tensor, st: int, ss: int) -> torch.Tensor:
    """The inverse of :func:`to_blocks`: (B, 3 st ss^2, t, h, w) -> (B, 3, 1 + (t - 1) st, h ss, w ss), dropping the
    first block's ``st - 1`` repeated frames."""
    B, _, t, h, w = x.shape
    x = x.reshape(B, 3, st, ss, ss, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, 3, t * st, h * ss, w * ss)[:, :, st - 1:]


class Encoder(nn.Module):
    """Video (B, 3, T, H, W) -> (B, 2 C_z, 1 + (T - 1) / st, H / ss, W / ss), the posterior's mean and log-variance
    (``kl``), or (B, C_z, ...), the values whose signs are the codes (``lfq``): a linear map of each pixel block
    (like a patch embedding), then causal residual blocks at the latent resolution."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.st, self.ss = cfg.temporal_stride, cfg.spatial_stride
        outputs = 2 * cfg.latent_channels if cfg.bottleneck == "kl" else cfg.latent_channels
        self.net = nn.Sequential(CausalConv3d(cfg.block_features, cfg.width, kernel=1),
                                 *[ResBlock(cfg.width) for _ in range(cfg.blocks)],
                                 _head(cfg.width, outputs))
        if cfg.bottleneck == "kl":
            with torch.no_grad():
                self.net[-1][-1].bias[cfg.latent_channels:] = LOGVAR_INIT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_blocks(x, self.st, self.ss))


class Decoder(nn.Module):
    """Latent (B, C_z, t, h, w) -> video (B, 3, 1 + (t - 1) st, h ss, w ss): causal residual blocks at the latent
    resolution, a linear map to each position's pixel block, and a small full-resolution residual refinement."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.st, self.ss = cfg.temporal_stride, cfg.spatial_stride
        head = ([_head(cfg.width, cfg.expand, kernel=1), nn.SiLU(), CausalConv3d(cfg.expand, cfg.block_features, 1)]
                if cfg.expand else [_head(cfg.width, cfg.block_features, kernel=1)])
        self.net = nn.Sequential(CausalConv3d(cfg.latent_channels, cfg.width),
                                 *[ResBlock(cfg.width) for _ in range(cfg.blocks)], *head)
        self.refine = (nn.Sequential(CausalConv3d(3, cfg.refine), nn.SiLU(), CausalConv3d(cfg.refine, 3))
                       if cfg.refine else None)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = from_blocks(self.net(z), self.st, self.ss)
        return x if self.refine is None else x + self.refine(x)


def _sign_codes(z: torch.Tensor) -> torch.Tensor:
    """The codes of ``z``: +1 where z >= 0, else -1, in z's dtype (no gradient)."""
    return torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def quantize(z: torch.Tensor) -> torch.Tensor:
    """Lookup-free quantization: the sign of ``z`` (0 counts as +1), any shape; the gradient passes straight
    through to ``z`` (the straight-through estimator)."""
    return z + (_sign_codes(z) - z).detach()


def _sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A draw of N(mean, exp(logvar)) with ``generator`` (same shapes), or ``mean`` when it is None."""
    if generator is None:
        return mean
    eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
    return mean + torch.exp(0.5 * logvar) * eps


class CausalVideoAutoencoder(nn.Module):
    """The causal 3D autoencoder: :meth:`encode` videos to latents, :meth:`decode` latents to videos.

    Videos are (B, 3, T, H, W) tensors or lists of (3, T, H, W) tensors of different sizes (each coded alone), with
    T = 1 + k * temporal_stride (1 is an image) and H, W multiples of spatial_stride.
    """

    CONFIG_FILE, WEIGHTS_FILE = "config.json", "autoencoder.safetensors"

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C_z, t, h, w) of the latent of a (3, frames, height, width) video; a ValueError for sizes the strides
        do not divide."""
        st, ss = self.config.temporal_stride, self.config.spatial_stride
        if frames < 1 or (frames - 1) % st:
            raise ValueError(f"video: frame count must be 1 + {st}k (1, {1 + st}, {1 + 2 * st}, ...), got {frames}")
        if height < 1 or width < 1 or height % ss or width % ss:
            raise ValueError(f"video: height and width must be positive multiples of {ss}, got {height}x{width}")
        return self.config.latent_channels, 1 + (frames - 1) // st, height // ss, width // ss

    def _check(self, x: torch.Tensor, channels: int, name: str) -> None:
        if not torch.is_tensor(x) or x.ndim != 5:
            raise ValueError(f"{name} must be a (B, C, T, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != channels:
            raise ValueError(f"{name} must have {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")

    def _encoder_output(self, video: torch.Tensor) -> torch.Tensor:
        self._check(video, 3, "video")
        self.latent_shape(*video.shape[2:])
        return self.encoder(video)

    def moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, (B, C_z, t, h, w) each, of ``video`` (B, 3, T, H, W) (``kl`` only)."""
        if self.config.bottleneck != "kl":
            raise ValueError(f"moments: a {self.config.bottleneck} autoencoder has no Gaussian posterior")
        mean, logvar = self._encoder_output(video).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, video, generator: torch.Generator | None = None):
        """Latents (B, C_z, t, h, w) of ``video`` (B, 3, T, H, W), or a list of (C_z, t, h, w) for a list of
        (3, T, H, W). ``kl``: the posterior mean, or a sample of the posterior when ``generator`` is given;
        ``lfq``: the codes, -1 or +1 (``generator`` is not used)."""
        if isinstance(video, (list, tuple)):
            return [self.encode(v[None] if torch.is_tensor(v) else v, generator)[0] for v in video]
        if self.config.bottleneck == "lfq":
            return quantize(self._encoder_output(video))
        return _sample(*self.moments(video), generator)

    def decode(self, latent):
        """Videos (B, 3, 1 + (t - 1) * temporal_stride, h * ss, w * ss) of ``latent`` (B, C_z, t, h, w), or a list
        of (3, T, H, W) for a list of (C_z, t, h, w). Values are not clamped (clamp to [-1, 1] to display)."""
        if isinstance(latent, (list, tuple)):
            return [self.decode(z[None] if torch.is_tensor(z) else z)[0] for z in latent]
        self._check(latent, self.config.latent_channels, "latent")
        return self.decoder(latent)

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass: (reconstruction (B, 3, T, H, W), the bottleneck's penalties as 0-d sums over the latent's
        elements). ``kl``: {"kl": KL divergence}, the decoder seeing a posterior sample drawn with ``generator``
        (the mean when None); ``lfq``: :func:`lfq_penalties`, the decoder seeing the codes."""
        if self.config.bottleneck == "lfq":
            z = self._encoder_output(video)
            return self.decoder(quantize(z)), lfq_penalties(z)
        mean, logvar = self.moments(video)
        return self.decoder(_sample(mean, logvar, generator)), {"kl": kl_divergence(mean, logvar)}

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def save(self, directory: str) -> None:
        """Write ``config.json`` and ``autoencoder.safetensors`` (float32) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        write_json(os.path.join(directory, self.CONFIG_FILE), self.config_dict())
        save_tensors(os.path.join(directory, self.WEIGHTS_FILE), self.state_dict(), torch.float32)

    @classmethod
    def load(cls, directory: str, device: torch.device | str = "cpu") -> CausalVideoAutoencoder:
        """The autoencoder saved by :meth:`save` in ``directory``, in eval mode; a CheckpointError for a missing,
        unknown or corrupted file."""
        path = os.path.join(directory, cls.CONFIG_FILE)
        try:
            config = dataclass_from_dict(AutoencoderConfig, read_json(path), path)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as exc:  # the values are wrong: AutoencoderConfig's own check
            raise CheckpointError(f"{path}: invalid autoencoder config: {exc}") from None
        model = cls(config)
        load_into(model, load_tensors(os.path.join(directory, cls.WEIGHTS_FILE)), "", cls.WEIGHTS_FILE)
        return model.to(device).eval()


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all elements (a 0-d tensor); any shapes, equal."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum()


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12)) + (1 - p) * torch.log((1 - p).clamp_min(1e-12)))


def lfq_penalties(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The penalties of lookup-free quantization on the encoder's output ``z`` (B, C_z, t, h, w), 0-d sums:

    - ``commit``: sum of (z - sign(z))^2 (the codes held fixed), which pulls the encoder's output to its codes;
    - ``entropy``: per-position entropy minus codebook entropy (MAGVIT-v2): each position should be sure of its
      code, and the codes used across the video's positions should be diverse. Each channel is one bit, with
      p(+1) = sigmoid(4 z) (a softmax over the codes +-1 with logits -(z -+ 1)^2); both entropies are taken per
      bit and summed over bits, the codebook one from the bits' mean probability over positions (a factorized
      form: exact for independent bits, and it avoids scoring all 2^C_z codes).
    """
    codes = _sign_codes(z)
    p = torch.sigmoid(4 * z)
    positions = z.numel() // z.shape[1]
    mean_p = p.transpose(0, 1).flatten(1).mean(1)
    entropy = _binary_entropy(p).sum() - positions * _binary_entropy(mean_p).sum()
    return {"commit": (z - codes).square().sum(), "entropy": entropy}


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of ``reconstruction`` (clamped to [-1, 1]) against ``target`` in [-1, 1], same shapes: the
    usual 8-bit-image definition, 10 log10(1 / MSE) on the [0, 1] scale."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).square().mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))
