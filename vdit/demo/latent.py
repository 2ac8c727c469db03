"""The latent space of a latent demo model: the causal autoencoder as a text-to-video model's first and last stage.

A latent :class:`vdit.demo.pipeline.TextToVideo` diffuses the autoencoder's latents instead of pixels: training
encodes each video (the posterior mean), normalizes every channel to zero mean and unit variance (diffusion noise
is N(0, 1), so latents of another scale would shift the balance of signal and noise at every t) and trains on
those; sampling draws normalized latents and decodes them.

Frame counts: the causal autoencoder codes 1 + 4k frames (with temporal stride 4). A request for another count
diffuses the latent of the next such count and drops the surplus frames at the end, so ``frames=16`` samples
5 latent frames, decodes 17 and returns the first 16.

    space = LatentSpace(autoencoder, mean, std)    # mean / std: (C_z,) statistics of the training latents
    space.video_shape(16, 64, 96)                  # (16, 5, 16, 24): what the transformer diffuses
    z = space.encode([video])                      # list of (C_z, t, h, w), normalized
    x = space.decode(z, frames=16)                 # list of (3, 16, H, W), not clamped
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vdit.demo.autoencoder import AutoencoderConfig, CausalVideoAutoencoder


class LatentSpace(nn.Module):
    """A frozen :class:`CausalVideoAutoencoder` with per-channel latent statistics.

    Args:
        autoencoder: the compression network; its parameters are frozen (``requires_grad=False``).
        mean, std: (C_z,) per-channel mean and standard deviation of the training latents
            (:func:`latent_statistics`); latents are diffused as ``(z - mean) / std``.
    """

    def __init__(self, autoencoder: CausalVideoAutoencoder, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        channels = autoencoder.config.latent_channels
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        for name, value in (("mean", mean), ("std", std)):
            if value.shape != (channels,) or not torch.isfinite(value).all():
                raise ValueError(f"latent {name} must hold {channels} finite values (the autoencoder's latent "
                                 f"channels), got shape {tuple(value.shape)}")
        if not (std > 0).all():
            raise ValueError(f"latent std must be positive, got {std.tolist()}")
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        # Buffers: they move with .to() and are saved beside the weights; the JSON config keeps them too.
        self.register_buffer("mean", mean.view(-1, 1, 1, 1))
        self.register_buffer("std", std.view(-1, 1, 1, 1))

    @property
    def channels(self) -> int:
        return self.autoencoder.config.latent_channels

    def train(self, mode: bool = True) -> LatentSpace:
        """The autoencoder stays in eval mode: it is a fixed part of the model, never trained with the DiT."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    def coded_frames(self, frames: int) -> int:
        """The smallest frame count >= ``frames`` that the autoencoder codes (1 + k * temporal_stride)."""
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        st = self.autoencoder.config.temporal_stride
        return 1 + -(-(frames - 1) // st) * st

    def video_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C_z, t, h, w): the latent the transformer diffuses for a (3, frames, height, width) video; a ValueError
        naming the strides when height or width is not a multiple of the spatial stride."""
        return self.autoencoder.latent_shape(self.coded_frames(frames), height, width)

    @torch.no_grad()
    def encode(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalized latents (C_z, t, h, w) of ``videos`` ((3, T, H, W) each, T = 1 + 4k; each coded alone)."""
        return [(z - self.mean) / self.std for z in self.autoencoder.encode(list(videos))]

    @torch.no_grad()
    def decode(self, latents: Sequence[torch.Tensor], frames: int | None = None) -> list[torch.Tensor]:
        """Videos (3, T, H, W) of normalized ``latents`` (C_z, t, h, w) each, cut to their first ``frames`` frames
        when given (see the module docstring). Values are not clamped."""
        videos = self.autoencoder.decode([z * self.std + self.mean for z in latents])
        return videos if frames is None else [v[:, :frames] for v in videos]

    def config_dict(self) -> dict:
        """{"autoencoder": its AutoencoderConfig, "mean": [...], "std": [...]}: JSON for :meth:`from_config`."""
        return {"autoencoder": self.autoencoder.config_dict(), "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist()}

    @classmethod
    def from_config(cls, config: dict) -> LatentSpace:
        """A latent space of ``config`` (:meth:`config_dict`) with a freshly initialized autoencoder (load the
        weights after). KeyError / TypeError / ValueError on a bad config: the caller names the file."""
        unknown = sorted(set(config) - {"autoencoder", "mean", "std"})
        if unknown:
            raise ValueError(f"unknown latent keys {unknown}")
        return cls(CausalVideoAutoencoder(AutoencoderConfig(**config["autoencoder"])), config["mean"], config["std"])


@torch.no_grad()
def latent_statistics(autoencoder: CausalVideoAutoencoder, videos: Sequence[torch.Tensor]
                      ) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (C_z values each) of the posterior-mean latents of ``videos``
    ((3, T, H, W) each), weighting every latent position alike."""
    latents = [z.flatten(1) for z in autoencoder.encode(list(videos))]
    flat = torch.cat(latents, dim=1).double()
    return flat.mean(1).tolist(), flat.std(1).clamp_min(1e-6).tolist()
