"""Growing a trained demo model: adding optional modules at zero, so that its function stays unchanged; and
moving a pixel model onto an autoencoder's latents (:func:`with_latent_space`).

``vdit-train --init-weights W --fractional-positions / --prompt-velocity / --text-embedding-skip`` continues
from trained weights with modules they lack; each of these modules starts with a zero output projection, so
the grown model computes exactly what the loaded one did until training moves it.
"""
from __future__ import annotations

import dataclasses

from vdit.demo.latent import LatentSpace
from vdit.demo.pipeline import TextToVideo
from vdit.ops import SparsePattern

# Parameter-name prefixes of the modules that the three flags add, in the order of the flags.
ADDED_MODULES = ("dit.position_embed.", "dit.prompt_velocity.", "text_encoder.skip.")


def with_added_modules(model: TextToVideo, *, fractional_positions: bool = False, prompt_velocity: bool = False,
                       embedding_skip: bool = False) -> TextToVideo:
    """``model`` with a FractionalPositionEmbedding, a PromptVelocity (which brings the former) and/or a
    text-encoder embedding skip added where asked for and not there yet, on ``model``'s device and in its
    train/eval mode; ``model`` itself when nothing is to be added. The added modules start at zero, so the
    grown model maps (videos (C, T, H, W) each, timesteps (B,), prompts) to the same velocities."""
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


ATTENTION_KEYS = ("attention", "tile", "window", "topk")  # the VideoDiTConfig fields of the self-attention


def with_attention(model: TextToVideo, *, attention: str | SparsePattern | None = None, tile=None, window=None,
                   topk: int | None = None) -> TextToVideo:
    """``model`` with its self-attention replaced (VideoDiTConfig ``attention`` / ``tile`` / ``window`` /
    ``topk``; None keeps the model's own value), on its device and in its train/eval mode; ``model`` itself
    when nothing changes. ``attention`` may be a :class:`vdit.ops.SparsePattern` instead, which sets all four
    (one window for every head: a VideoDiTConfig holds no per-head windows). The new config validates through
    SparsePattern (:meth:`VideoDiTConfig.sparse_pattern`); bad values raise CheckpointError.

    The attention weights carry over unchanged, so dense weights run block-sparse without retraining.
    ``"topk_tile"`` adds a per-head coarse gate at zero (see :class:`vdit.nn.TileSparseAttention`), so
    a dense model switched to it computes pure top-k block-sparse attention; leaving ``"topk_tile"`` drops
    that gate and what it had learnt.
    """
    asked = {"attention": attention, "tile": tile, "window": window, "topk": topk}
    if isinstance(attention, SparsePattern):
        asked = _pattern_fields(attention, tile, window, topk)
    config = model.config_dict()
    for key, value in asked.items():
        if value is not None:
            config["dit"][key] = tuple(int(v) for v in value) if key in ("tile", "window") else value
    if config == model.config_dict():
        return model
    switched = TextToVideo.from_config(config).to(next(model.parameters()).device)
    missing, unexpected = switched.load_state_dict(model.state_dict(), strict=False)
    gate = ".attn.coarse_gate."
    assert all(gate in k for k in missing + unexpected), (missing, unexpected)
    return switched.train(model.training)


def _pattern_fields(pattern: SparsePattern, tile, window, topk) -> dict:
    """The VideoDiTConfig fields of a SparsePattern given as with_attention's ``attention``."""
    if (tile, window, topk) != (None, None, None):
        raise ValueError("with_attention: a SparsePattern as attention sets tile, window and topk; give none of them")
    if pattern.mode == "sliding_tile" and not isinstance(pattern.window, tuple):
        raise ValueError(f"with_attention: a VideoDiTConfig holds one window [t, h, w], not {pattern.describe()!r}")
    return {"attention": pattern.mode, "tile": pattern.tile, "window": pattern.window, "topk": pattern.topk}


def with_latent_space(model: TextToVideo, latent: LatentSpace, patch_size) -> tuple[TextToVideo, list[str]]:
    """A latent model diffusing ``latent``'s latents with patches of ``patch_size`` (pt, ph, pw), on ``model``'s
    device and in its train/eval mode, and the names of the tensors that start afresh.

    Everything whose shape carries over keeps ``model``'s weights: the text encoder, the conditioning MLPs and
    every transformer block (they work on tokens, whatever a token covers). The patch embedding and the final
    projection, whose shapes depend on the channels and the patch, are newly initialized; so the result is a
    fine-tuning start, not the same function.
    """
    config = dataclasses.replace(model.dit.config, in_channels=latent.channels, out_channels=latent.channels,
                                 patch_size=tuple(int(p) for p in patch_size))
    moved = TextToVideo(config, model.tokenizer.vocab[2:], model.text_config, model.sampling_shift, latent)
    moved = moved.to(next(model.parameters()).device)
    target = moved.state_dict()
    kept = {k: v for k, v in model.state_dict().items() if k in target and target[k].shape == v.shape}
    missing, unexpected = moved.load_state_dict(kept, strict=False)
    assert not unexpected, unexpected
    fresh = [k for k in missing if not k.startswith("latent.")]
    return moved.train(model.training), fresh
