"""Native-size packed batches for a swapped diffusers video transformer: :func:`forward_packed`.

diffusers' Wan and HunyuanVideo take one (B, C, F, H, W) tensor per call, so every batch is one shape.
``vdit.swap.forward_packed(model, latents, timestep, text)`` runs a list of latents of different sizes
(frames, resolution, aspect ratio) in one forward: the videos' tokens are packed one after another, the
model's own modules run on them, and attention, RoPE and adaLN use each video's offsets (see
:mod:`vdit.swap.packed_inputs`). Outputs equal calling the model on each latent alone (fp32 tolerance), and
so do gradients. Which models have a packed forward is the ``packed`` field of their row in
:data:`vdit.swap.diffusers.ADAPTERS`.
"""
from __future__ import annotations

import torch
from torch import nn

from vdit.swap.diffusers import ADAPTERS
from vdit.swap.packed_inputs import PackedBatch, check_latents, check_timestep, pack_text
from vdit.swap.state import ATTR


def _handler(model: nn.Module):
    """The model's packed forward, or ValueError naming what is missing (a known class, the swap)."""
    name = type(model).__name__
    adapter = ADAPTERS.get(name)
    handler = getattr(adapter, "packed", None)
    if handler is None:
        known = sorted(n for n, a in ADAPTERS.items() if a.packed is not None)
        raise ValueError(f"forward_packed: model class {name} has no packed forward (supported: {', '.join(known)})")
    if getattr(model, ATTR, None) is None:
        raise ValueError(f"forward_packed: model is not swapped; call vdit.swap(model) on the {name} first")
    return handler


def _in_channels(model: nn.Module) -> int:
    return int(model.config.in_channels)


def forward_packed(model: nn.Module, latents, timestep: torch.Tensor, encoder_hidden_states,
                   **model_kwargs) -> list[torch.Tensor]:
    """Run a swapped diffusers video transformer on latents of different sizes in one packed forward.

    Args:
        model: a :func:`vdit.swap`-ped ``WanTransformer3DModel`` or ``HunyuanVideoTransformer3DModel``
            (sparse attention if it was swapped with ``sparse=``; gradient checkpointing per block if enabled).
        latents: list of B tensors (C, F_i, H_i, W_i), one C (the model's ``in_channels``), one dtype and
            device; each size divisible by the model's patch size.
        timestep: (B,) (or a scalar, used for every latent).
        encoder_hidden_states: (B, L, D), or a list of B (L_i, D) for per-sample text lengths.
        **model_kwargs: per-sample model inputs as the model's forward takes them, batched over the B latents
            (HunyuanVideo: ``pooled_projections`` (B, P), ``encoder_attention_mask`` (B, L) or None,
            ``guidance`` (B,)).
    Returns:
        List of B tensors (C_out, F_i, H_i, W_i): the model's output for each latent, as
        ``model(latent[None], timestep[i:i+1], text_i[None], ...)`` returns it.
    Raises:
        ValueError / TypeError naming the argument (latents of different channel counts, sizes not divisible
        by the patch size, a timestep or text count that does not match, an unswapped model or a model class
        without a packed forward), before anything runs.
    """
    handler = _handler(model)
    latents = check_latents(latents, _in_channels(model), handler.patch(model))
    batch = len(latents)
    timestep = check_timestep(timestep, batch)
    text = pack_text(encoder_hidden_states, batch)
    kwargs = handler.check(model, model_kwargs, batch)
    state = getattr(model, ATTR)
    packed = PackedBatch(latents, timestep, text, kwargs, state.sparse)
    return handler.forward(model, packed)
