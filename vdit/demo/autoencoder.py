"""The demo's video compression network: a small causal 3D convolutional autoencoder (a KL-regularized VAE).

It maps a video (3, T, H, W) in [-1, 1] to a spacetime latent (C_z, 1 + (T - 1) / 4, H / 8, W / 8) and back, as
Sora's compression network does for its diffusion transformer. Time is causal, as in MAGVIT-v2's and Wan's causal
VAEs: every convolution pads time on the left only and every norm works per position (over channels), so latent
frame j depends on frames 0 .. 4j alone. The first frame is therefore encoded on its own, as an image, and each
later latent frame covers the next 4 frames: T = 1 + 4k frames give 1 + k latent frames, and a 1-frame image
gives 1 latent frame. Other T raise a ValueError naming ``video`` (pad or trim a clip to 1 + 4k frames first;
silently padding would make the decoder return frames the input never had).

Regularization: a diagonal Gaussian posterior with a small KL weight (see the trainer), which keeps the latent
scale bounded and smooth for the diffusion model without the codebook machinery of a VQ bottleneck.

    ae = CausalVideoAutoencoder(AutoencoderConfig())
    z = ae.encode(video[None])            # (1, 16, 1 + (T - 1) // 4, H // 8, W // 8): the posterior mean
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


@dataclasses.dataclass
class AutoencoderConfig:
    """Architecture of a :class:`CausalVideoAutoencoder`.

    Args:
        channels: convolution widths per spatial level; each level halves H and W, so ``len(channels)`` levels
            compress space by ``2 ** len(channels)`` (3 levels: 8x).
        temporal_levels: how many of the first levels also halve time (causally); 2 gives 4x.
        latent_channels: channels of the latent.
        blocks: residual blocks per level (same length as ``channels``); full-resolution blocks are the costly
            ones, so the default has none there.
    """

    channels: tuple[int, ...] = (16, 48, 64)
    temporal_levels: int = 2
    latent_channels: int = 16
    blocks: tuple[int, ...] = (0, 1, 1)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)  # JSON gives lists
        self.blocks = tuple(int(b) for b in self.blocks)
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be non-empty and positive, got {self.channels}")
        if not 0 <= self.temporal_levels <= len(self.channels):
            raise ValueError(f"temporal_levels must be in 0..{len(self.channels)}, got {self.temporal_levels}")
        if len(self.blocks) != len(self.channels) or min(self.blocks) < 0:
            raise ValueError(f"blocks must give a count >= 0 per level of channels {self.channels}, got {self.blocks}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")

    @property
    def temporal_stride(self) -> int:
        return 2 ** self.temporal_levels

    @property
    def spatial_stride(self) -> int:
        return 2 ** len(self.channels)


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


class Upsample(nn.Module):
    """Pointwise conv to ``cout * st * 4`` channels (the blocks after it mix neighbours), then depth-to-spacetime:
    each position becomes 2 x 2 pixels and, with ``temporal``, 2 frames, of which the very first is dropped (latent
    frame 0 decodes to 1 frame, the image; 1 + k frames give 1 + 2k)."""

    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        self.st, self.cout = (2 if temporal else 1), cout
        self.conv = CausalConv3d(cin, cout * self.st * 4, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, T, H, W) -> (B, cout, st * T - st + 1, 2H, 2W)."""
        B, _, T, H, W = x.shape
        y = self.conv(x).view(B, self.cout, self.st, 2, 2, T, H, W)
        y = y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, self.cout, T * self.st, 2 * H, 2 * W)
        return y[:, :, self.st - 1:]


def _head(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(ChannelNorm(cin), nn.SiLU(), CausalConv3d(cin, cout))


class Encoder(nn.Module):
    """Video (B, 3, T, H, W) -> moments (B, 2 * C_z, 1 + (T - 1) / st, H / ss, W / ss) (mean, log-variance)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [CausalConv3d(3, ch[0])]
        for i, c in enumerate(ch):
            layers += [ResBlock(c) for _ in range(cfg.blocks[i])]
            stride = (2 if i < cfg.temporal_levels else 1, 2, 2)
            layers.append(CausalConv3d(c, ch[min(i + 1, len(ch) - 1)], stride=stride))
        layers += [ResBlock(ch[-1]), _head(ch[-1], 2 * cfg.latent_channels)]
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            self.net[-1][-1].bias[cfg.latent_channels:] = LOGVAR_INIT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Latent (B, C_z, t, h, w) -> video (B, 3, 1 + (t - 1) * st, h * ss, w * ss)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [CausalConv3d(cfg.latent_channels, ch[-1]), ResBlock(ch[-1])]
        for i in reversed(range(len(ch))):
            layers.append(Upsample(ch[min(i + 1, len(ch) - 1)], ch[i], i < cfg.temporal_levels))
            layers += [ResBlock(ch[i]) for _ in range(cfg.blocks[i])]
        layers.append(_head(ch[0], 3))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


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

    def moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, (B, C_z, t, h, w) each, of ``video`` (B, 3, T, H, W)."""
        self._check(video, 3, "video")
        self.latent_shape(*video.shape[2:])
        mean, logvar = self.encoder(video).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, video, generator: torch.Generator | None = None):
        """Latents (B, C_z, t, h, w) of ``video`` (B, 3, T, H, W), or a list of (C_z, t, h, w) for a list of
        (3, T, H, W). The posterior mean; a sample of the posterior when ``generator`` is given."""
        if isinstance(video, (list, tuple)):
            return [self.encode(v[None] if torch.is_tensor(v) else v, generator)[0] for v in video]
        return _sample(*self.moments(video), generator)

    def decode(self, latent):
        """Videos (B, 3, 1 + (t - 1) * temporal_stride, h * ss, w * ss) of ``latent`` (B, C_z, t, h, w), or a list
        of (3, T, H, W) for a list of (C_z, t, h, w). Values are not clamped (clamp to [-1, 1] to display)."""
        if isinstance(latent, (list, tuple)):
            return [self.decode(z[None] if torch.is_tensor(z) else z)[0] for z in latent]
        self._check(latent, self.config.latent_channels, "latent")
        return self.decoder(latent)

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction (B, 3, T, H, W), posterior mean, log-variance (B, C_z, t, h, w)); the
        decoder sees a posterior sample drawn with ``generator`` (the mean when None)."""
        mean, logvar = self.moments(video)
        return self.decoder(_sample(mean, logvar, generator)), mean, logvar

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


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of ``reconstruction`` (clamped to [-1, 1]) against ``target`` in [-1, 1], same shapes: the
    usual 8-bit-image definition, 10 log10(1 / MSE) on the [0, 1] scale."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).square().mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))
