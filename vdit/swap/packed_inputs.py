"""The packed batch that :func:`vdit.swap.forward_packed` hands a model's packed forward, and the steps every
per-model packed forward shares: patch embedding per video, RoPE positions per grid, dense or block-sparse
varlen self-attention, cross-attention with per-video text offsets, unpatchify per video and per-block
gradient checkpointing.

Token layout: the videos' tokens are packed one after another (video i at rows ``cu[i]:cu[i+1]`` of a
(total, C) tensor, raster order over its (T, H, W) token grid), so every per-token module (projections,
norms, MLPs, LoRA layers) runs once on the whole batch and only attention and the per-sample modulation need
the offsets.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from vdit.ops import patch_embed_3d_varlen, varlen_attention
from vdit.ops.tiles import tile_permutation
from vdit.packing import cu_seqlens_from_lengths, grid_positions
from vdit.swap.patch_embed import ConvPatchEmbed


@dataclasses.dataclass
class PackedText:
    """Per-sample text tokens packed: ``tokens`` (total_text, D), ``cu`` int32 (B + 1,), ``lengths`` [L_i]."""

    tokens: torch.Tensor
    cu: torch.Tensor
    lengths: list[int]


@dataclasses.dataclass
class PackedBatch:
    """A validated call of :func:`vdit.swap.forward_packed`.

    ``latents``: B tensors (C, F_i, H_i, W_i); ``timestep`` (B,); ``text``: the per-sample text
    (:class:`PackedText`); ``kwargs``: the model-specific extras (already checked by the model's handler);
    ``sparse``: the swapped model's :class:`vdit.swap.sparse.SparseRouting` or None.
    """

    latents: list[torch.Tensor]
    timestep: torch.Tensor
    text: PackedText
    kwargs: dict
    sparse: object = None


@dataclasses.dataclass
class VideoTokens:
    """Where the packed video tokens are: ``cu`` int32 (B + 1,), ``grids`` int32 (B, 3) token grids,
    ``lengths`` [N_i], ``positions`` (total, 3) raster (t, h, w) of every token, ``tile_order`` (total,)
    raster->tile permutation for the sparse pattern's tile (None when dense) and its inverse."""

    cu: torch.Tensor
    grids: torch.Tensor
    lengths: list[int]
    positions: torch.Tensor
    tile_order: torch.Tensor | None = None
    raster_order: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return max(self.lengths)


def pack_text(encoder_hidden_states, batch: int) -> PackedText:
    """(B, L, D) or a list of B (L_i, D) -> :class:`PackedText`; ValueError naming ``encoder_hidden_states``."""
    name = "encoder_hidden_states"
    if isinstance(encoder_hidden_states, torch.Tensor):
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"{name} must be ({batch}, L, D) or a list of {batch} (L_i, D) tensors, "
                             f"got shape {tuple(encoder_hidden_states.shape)}")
        items = list(encoder_hidden_states.unbind(0))
    elif isinstance(encoder_hidden_states, (list, tuple)):
        items = list(encoder_hidden_states)
        if len(items) != batch:
            raise ValueError(f"{name}: {len(items)} text tensors for {batch} latents")
    else:
        raise TypeError(f"{name} must be a tensor (B, L, D) or a list of (L_i, D) tensors, "
                        f"got {type(encoder_hidden_states).__name__}")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[-1] != items[0].shape[-1]:
            raise ValueError(f"{name}[{i}] must be (L_i, D) with the same D as the others, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    lengths = [t.shape[0] for t in items]
    return PackedText(torch.cat(items), cu_seqlens_from_lengths(lengths, items[0].device), lengths)


def check_latents(latents, in_channels: int, patch: tuple[int, int, int]) -> list[torch.Tensor]:
    """Validate ``latents`` (a non-empty list of (C, F, H, W), one C equal to the model's, sizes divisible by
    the patch); ValueError / TypeError naming ``latents[i]``."""
    if isinstance(latents, torch.Tensor) or not isinstance(latents, (list, tuple)) or len(latents) == 0:
        raise TypeError("latents must be a non-empty list of (C, F, H, W) tensors")
    for i, x in enumerate(latents):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"latents[{i}] must be a (C, F, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[0] != in_channels:
            raise ValueError(f"latents[{i}] has {x.shape[0]} channels, the model takes {in_channels} "
                             f"(latents[0] has {latents[0].shape[0]})")
        if any(n % p for n, p in zip(x.shape[1:], patch)):
            raise ValueError(f"latents[{i}] size (F, H, W) = {tuple(x.shape[1:])} is not divisible by the patch "
                             f"size {tuple(patch)}")
        if x.dtype != latents[0].dtype or x.device != latents[0].device:
            raise ValueError(f"latents[{i}] is {x.dtype} on {x.device}, latents[0] {latents[0].dtype} on "
                             f"{latents[0].device}")
    return list(latents)


def check_timestep(timestep, batch: int) -> torch.Tensor:
    """(B,) timesteps (a scalar is broadcast); ValueError naming ``timestep`` when the count does not match."""
    if not isinstance(timestep, torch.Tensor):
        raise TypeError(f"timestep must be a tensor ({batch},), got {type(timestep).__name__}")
    if timestep.dim() == 0:
        return timestep.expand(batch)
    if timestep.dim() != 1 or timestep.shape[0] != batch:
        raise ValueError(f"timestep must have one entry per latent ({batch},), got shape {tuple(timestep.shape)}")
    return timestep


def embed_videos(module: nn.Module, latents: list[torch.Tensor], sparse) -> tuple[torch.Tensor, VideoTokens]:
    """Patch-embed each video into one packed sequence: (total, D) tokens (raster order) and their
    :class:`VideoTokens`. A plain (or vdit-swapped) convolution runs :func:`vdit.ops.patch_embed_3d_varlen`
    in one pass; anything else (a LoRA-wrapped conv) is called per video, so its own forward runs."""
    if type(module) in (ConvPatchEmbed, nn.Conv3d):
        tokens, cu, grids = patch_embed_3d_varlen(latents, module.weight, module.bias)
    else:
        parts = [module(x[None]).flatten(2)[0].transpose(0, 1) for x in latents]
        kernel = getattr(module, "base_layer", module).weight.shape[2:]  # a LoRA wrapper holds the conv
        grids = torch.tensor([[n // p for n, p in zip(x.shape[1:], kernel)] for x in latents], dtype=torch.int32)
        tokens = torch.cat(parts)
        cu = cu_seqlens_from_lengths([p.shape[0] for p in parts], tokens.device)
        grids = grids.to(tokens.device)
    lengths = [math.prod(g) for g in grids.tolist()]
    video = VideoTokens(cu, grids, lengths, grid_positions(grids))
    if sparse is not None:
        video.tile_order = tile_permutation(grids, sparse.pattern.tile)
        video.raster_order = video.tile_order.argsort()
    return tokens, video


def self_attention(q, k, v, video: VideoTokens, sparse, path: str, extra: PackedText | None = None,
                   extra_qkv=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention of each video's tokens q, k, v (total, H, Dh), optionally joint with its ``extra``
    tokens (``extra_qkv`` = (q, k, v) (total_text, H, Dh), e.g. HunyuanVideo's text) appended to each
    sequence as global tokens. Dense: :func:`vdit.ops.varlen_attention`; with ``sparse`` (a SparseRouting):
    the pattern's block-sparse attention per video in tile order.

    Returns:
        (video out (total, H, Dh) in raster order, extra out (total_text, H, Dh) or None).
    """
    if extra is None:
        if sparse is None:
            return varlen_attention(q, k, v, video.cu, video.cu, video.max_len, video.max_len), None
        q, k, v = (t[video.tile_order] for t in (q, k, v))
        out = sparse.pattern.attend(q, k, v, video.cu, video.grids, path=path)
        return out[video.raster_order], None
    index, cu, n_video = _joint_index(video, extra, sparse is not None)
    q, k, v = (torch.cat([t, e])[index] for t, e in zip((q, k, v), extra_qkv))
    if sparse is None:
        longest = int((cu[1:] - cu[:-1]).max())
        out = varlen_attention(q, k, v, cu, cu, longest, longest)
    else:
        out = sparse.pattern.attend(q, k, v, cu, video.grids, path=path, global_tokens=extra.lengths)
    out = torch.empty_like(out).index_copy(0, index, out)
    return out[:n_video], out[n_video:]


def _joint_index(video: VideoTokens, extra: PackedText, tiled: bool):
    """Gather index building [video_i tokens (tile order if ``tiled``), extra_i tokens] per sample from
    cat([video tokens, extra tokens]); the joint cu_seqlens; the number of video tokens."""
    n_video = int(video.cu[-1])
    order = video.tile_order if tiled else torch.arange(n_video, device=video.cu.device)
    parts = []
    for i in range(len(video.lengths)):
        parts.append(order[int(video.cu[i]):int(video.cu[i + 1])])
        parts.append(torch.arange(int(extra.cu[i]), int(extra.cu[i + 1]), device=order.device) + n_video)
    lengths = [n + m for n, m in zip(video.lengths, extra.lengths)]
    return torch.cat(parts), cu_seqlens_from_lengths(lengths, video.cu.device), n_video


def cross_attention(q, k, v, video: VideoTokens, text: PackedText) -> torch.Tensor:
    """Each video's queries q (total, H, Dh) against its own text keys/values k, v (total_text, H, Dh)."""
    return varlen_attention(q, k, v, video.cu, text.cu, video.max_len, max(text.lengths))


def unpatchify(tokens: torch.Tensor, video: VideoTokens, patch, *, channels_first: bool = False) -> list[torch.Tensor]:
    """Packed (total, C * pt * ph * pw) output tokens -> per video (C, F, H, W). A token's features are ordered
    (pt, ph, pw, C) (Wan) or, with ``channels_first``, (C, pt, ph, pw) (HunyuanVideo)."""
    out = []
    pt, ph, pw = patch
    for i, (t, h, w) in enumerate(video.grids.tolist()):
        x = tokens[int(video.cu[i]):int(video.cu[i + 1])]
        if channels_first:
            x = x.reshape(t, h, w, -1, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)
        else:
            x = x.reshape(t, h, w, pt, ph, pw, -1).permute(6, 0, 3, 1, 4, 2, 5)
        out.append(x.reshape(x.shape[0], t * pt, h * ph, w * pw))
    return out


def run_blocks(model: nn.Module, blocks, step, state: tuple, *args) -> tuple:
    """``state = step(block, *state, *args)`` for each block (``state``: a tuple of tensors, e.g. (video tokens,
    text tokens)), through the model's gradient checkpointing function when ``model.gradient_checkpointing``
    is on and autograd records, as diffusers' forwards do."""
    checkpointing = torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False)
    for block in blocks:
        fn = _Step(step, block)
        state = model._gradient_checkpointing_func(fn, *state, *args) if checkpointing else fn(*state, *args)
        state = state if isinstance(state, tuple) else (state,)
    return state


class _Step:
    """``step`` bound to one block, callable as the checkpointing function expects (``module.__call__``)."""

    def __init__(self, step, block):
        self.step, self.block = step, block

    def __call__(self, *args):
        return self.step(self.block, *args)


@dataclasses.dataclass(frozen=True)
class PackedHandler:
    """The packed forward of one model class (the ``packed`` field of its :class:`vdit.swap.diffusers.Adapter`).

    ``patch(model)`` -> (pt, ph, pw) latent patch size; ``check(model, kwargs, batch)`` -> the model-specific
    keyword arguments of :func:`vdit.swap.forward_packed` validated for ``batch`` samples (raises naming the
    argument, before anything runs); ``forward(model, packed: PackedBatch)`` -> list of per-latent outputs.
    """

    patch: object
    check: object
    forward: object
