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


def _per_sample_text(encoder_hidden_states) -> list[torch.Tensor]:
    return list(encoder_hidden_states.unbind(0)) if isinstance(encoder_hidden_states, torch.Tensor) \
        else list(encoder_hidden_states)


def _doubled(kwargs: dict, negative: dict) -> dict:
    """Model kwargs of the conditional samples followed by those of the unconditional ones (batched dim 0)."""
    out = {}
    for name, value in kwargs.items():
        other = negative.get(name, value)
        if isinstance(value, torch.Tensor):
            out[name] = torch.cat([value, other])
        elif isinstance(value, (list, tuple)):
            out[name] = list(value) + list(other)
        else:
            out[name] = value
    return out


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) flow-matching noise levels from 1 to 0, shifted as ``shift * s / (1 + (shift - 1) * s)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


@torch.no_grad()
def sample_packed(model: nn.Module, noise, encoder_hidden_states, *, steps: int = 30, shift: float = 1.0,
                  guidance_scale: float = 1.0, negative_encoder_hidden_states=None, negative_model_kwargs=None,
                  **model_kwargs) -> list[torch.Tensor]:
    """Denoise latents of different sizes together: one :func:`forward_packed` per flow-matching Euler step.

    Step k moves every latent from noise level s_k to s_{k+1}: ``x += (s_{k+1} - s_k) * v`` with the model's
    velocity v at timestep ``1000 * s_k`` (the convention of diffusers' FlowMatchEulerDiscreteScheduler).
    With ``guidance_scale != 1`` classifier-free guidance's conditional and unconditional passes share the
    packed forward (2B sequences): ``v = v_uncond + guidance_scale * (v_cond - v_uncond)``.

    Args:
        model: a swapped model (see :func:`forward_packed`); noise: list of B (C, F_i, H_i, W_i) at s = 1.
        encoder_hidden_states: (B, L, D) or a list of B (L_i, D); negative_encoder_hidden_states: the same for
            the unconditional pass (needed when ``guidance_scale != 1``).
        steps, shift: the noise schedule (:func:`flow_sigmas`).
        negative_model_kwargs: model kwargs of the unconditional pass that differ (default: the same).
        **model_kwargs: per-sample model inputs, as :func:`forward_packed` takes them.
    Returns:
        The B denoised latents (C, F_i, H_i, W_i).
    """
    cfg = guidance_scale != 1.0
    if cfg and negative_encoder_hidden_states is None:
        raise ValueError("negative_encoder_hidden_states is needed for guidance_scale != 1")
    sigmas = flow_sigmas(steps, shift)
    x, batch = [n.clone() for n in noise], len(noise)
    text = _per_sample_text(encoder_hidden_states)
    kwargs = model_kwargs
    if cfg:
        text = text + _per_sample_text(negative_encoder_hidden_states)
        kwargs = _doubled(model_kwargs, negative_model_kwargs or {})
    for k in range(steps):
        latents = x + x if cfg else x
        timestep = torch.full((len(latents),), float(sigmas[k]) * 1000, device=x[0].device)
        v = forward_packed(model, latents, timestep, text, **kwargs)
        if cfg:
            v = [u + guidance_scale * (c - u) for c, u in zip(v[:batch], v[batch:])]
        x = [xi + float(sigmas[k + 1] - sigmas[k]) * vi.to(xi.dtype) for xi, vi in zip(x, v)]
    return x
