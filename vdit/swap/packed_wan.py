"""Packed forward of diffusers' ``WanTransformer3DModel`` (text-to-video): videos of different sizes in one call.

The model's own modules run on the packed tokens (projections, QK norms, FFN, text/time embedders, LoRA layers
included); what mixes tokens goes through vdit's varlen ops: adaLN per sample (:func:`vdit.ops.adaln_modulate`,
:func:`vdit.ops.gated_residual` with cu_seqlens), RoPE per video grid (:func:`vdit.ops.rope_3d_qk`),
self-attention per video (:func:`vdit.ops.varlen_attention`, or the swap's :class:`vdit.SparsePattern` per
video in tile order) and cross-attention of each video to its own text (cu_seqlens_q / cu_seqlens_k).
Image-conditioned Wan (I2V: ``image_dim`` / ``added_kv_proj_dim``) and per-token timesteps (Wan 2.2 TI2V) are
not packed.
"""
from __future__ import annotations

import torch

from vdit.ops import adaln_modulate, gated_residual, rope_3d_qk
from vdit.swap.packed_inputs import (
    PackedBatch,
    PackedHandler,
    VideoTokens,
    cross_attention,
    embed_videos,
    run_blocks,
    self_attention,
    unpatchify,
)

THETA = 10000.0  # WanRotaryPosEmbed's default frequency base (the swap's RoPE reads the same)


def patch_size(model) -> tuple[int, int, int]:
    return tuple(model.config.patch_size)


def check_kwargs(model, kwargs: dict, batch: int) -> dict:
    """Wan takes no extras in a packed call; I2V models are refused (ValueError naming the option)."""
    if model.config.image_dim is not None or model.config.added_kv_proj_dim is not None:
        raise ValueError("forward_packed: image-conditioned Wan (image_dim / added_kv_proj_dim) is not supported")
    extra = {k: v for k, v in kwargs.items() if v is not None}
    if extra:
        raise TypeError(f"forward_packed: WanTransformer3DModel takes no {sorted(extra)} in a packed call")
    return {}


class _Context:
    """What every block needs besides the tensors: token offsets, RoPE dims, sparse routing, module paths."""

    def __init__(self, model, video: VideoTokens, packed: PackedBatch):
        self.video, self.text, self.sparse = video, packed.text, packed.sparse
        self.dims = (model.rope.t_dim, model.rope.h_dim, model.rope.w_dim)
        self.paths = {id(block.attn1): f"blocks.{i}.attn1" for i, block in enumerate(model.blocks)}


def _heads(attn, t, norm=None):
    """(total, H * Dh) -> (total, H, Dh), after ``norm`` (Wan's QK RMSNorm spans all heads)."""
    return (norm(t) if norm is not None else t).unflatten(-1, (attn.heads, -1))


def _self_attention(attn, h, ctx: _Context):
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections
    q, k, v = _get_qkv_projections(attn, h, None)
    q, k, v = _heads(attn, q, attn.norm_q), _heads(attn, k, attn.norm_k), _heads(attn, v)
    q, k = rope_3d_qk(q, k, ctx.video.positions, dims=ctx.dims, theta=THETA)
    out, _ = self_attention(q, k, v, ctx.video, ctx.sparse, ctx.paths[id(attn)])
    return attn.to_out[1](attn.to_out[0](out.flatten(1).type_as(q)))


def _cross_attention(attn, h, text, ctx: _Context):
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections
    q, k, v = _get_qkv_projections(attn, h, text)
    q, k, v = _heads(attn, q, attn.norm_q), _heads(attn, k, attn.norm_k), _heads(attn, v)
    out = cross_attention(q, k, v, ctx.video, ctx.text)
    return attn.to_out[1](attn.to_out[0](out.flatten(1).type_as(q)))


def _block(block, x, text, proj, ctx: _Context):
    """``WanTransformerBlock.forward`` on packed tokens: x (total, C), text (total_text, C), proj (B, 6, C)."""
    cu = ctx.video.cu
    mod = (block.scale_shift_table + proj.float()).to(x.dtype)  # (B, 6, C)
    shift, scale, gate, c_shift, c_scale, c_gate = (m.contiguous() for m in mod.unbind(1))
    h = adaln_modulate(x, shift, scale, cu, eps=block.norm1.eps)
    x = gated_residual(x, _self_attention(block.attn1, h, ctx), gate, cu)
    h = block.norm2(x.float()).type_as(x)
    x = x + _cross_attention(block.attn2, h, text, ctx)
    h = adaln_modulate(x, c_shift, c_scale, cu, eps=block.norm3.eps)
    return gated_residual(x, block.ffn(h).to(x.dtype), c_gate, cu)


def forward(model, packed: PackedBatch) -> list[torch.Tensor]:
    """Per latent (C_out, F_i, H_i, W_i), as ``model(latent[None], t[i:i+1], text_i[None])`` gives them."""
    tokens, video = embed_videos(model.patch_embedding, packed.latents, packed.sparse)
    temb, proj, text, _ = model.condition_embedder(packed.timestep, packed.text.tokens[None], None)
    ctx = _Context(model, video, packed)
    proj = proj.unflatten(1, (6, -1))  # (B, 6, C)
    x, = run_blocks(model, model.blocks, lambda block, x, text, proj: _block(block, x, text, proj, ctx),
                    (tokens,), text[0], proj)
    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).unbind(1)  # (B, C) each
    x = adaln_modulate(x, shift.to(x.dtype).contiguous(), scale.to(x.dtype).contiguous(), video.cu,
                       eps=model.norm_out.eps)
    return unpatchify(model.proj_out(x), video, patch_size(model))


HANDLER = PackedHandler(patch=patch_size, check=check_kwargs, forward=forward)
