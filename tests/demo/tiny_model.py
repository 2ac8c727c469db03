"""The tiny demo model the CLI tests generate and train with."""
from __future__ import annotations

import torch

from vdit.demo.data import vocabulary
from vdit.demo.pipeline import TextEncoderConfig, TextToVideo
from vdit.models import VideoDiTConfig


def save_tiny_model(directory, *, random_dit: bool = False) -> str:
    """Save a tiny TextToVideo (patch 2x4x4, hidden 96, text encoder dim 32) into ``directory``; returns its
    weights file. ``random_dit``: replace the DiT's zero initializations with random values, so that generated
    videos depend on every layer (and step caching has something to skip)."""
    torch.manual_seed(0)
    model = TextToVideo(VideoDiTConfig.preset("tiny", context_dim=32, patch_size=(2, 4, 4), hidden_size=96),
                        vocabulary(), TextEncoderConfig(dim=32, depth=1, heads=2))
    if random_dit:
        for p in model.dit.parameters():
            torch.nn.init.normal_(p, std=0.1)
    model.save(str(directory))
    return str(directory / "model.safetensors")
