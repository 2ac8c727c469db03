"""Packed forward of diffusers' ``HunyuanVideoTransformer3DModel``: videos of different sizes in one call.

Each sample's sequence is [video_i tokens, text_i tokens]: the joint attention of the dual- and single-stream
blocks runs per sample with the text as global tokens (dense :func:`vdit.ops.varlen_attention` over each
sequence, or the swap's :class:`vdit.SparsePattern` with ``global_tokens``). Padded text is dropped after the
token refiner, which is exact: the host masks padded text keys out of the joint attention and discards the
text outputs. The model's own modules run on the packed tokens (LoRA layers included); adaLN modulation and
gates per sample through :func:`vdit.ops.adaln_modulate` / :func:`vdit.ops.gated_residual` with cu_seqlens;
RoPE per video grid through :func:`vdit.ops.rope_3d`. Image-conditioned variants (``image_condition_type``)
are not packed.
"""
from __future__ import annotations

import torch

from vdit.ops import adaln_modulate, gated_residual, rope_3d
from vdit.packing import cu_seqlens_from_lengths
from vdit.swap.packed_inputs import (
    PackedBatch,
    PackedHandler,
    PackedText,
    VideoTokens,
    embed_videos,
    run_blocks,
    self_attention,
    unpatchify,
)


def patch_size(model) -> tuple[int, int, int]:
    return (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)


def _per_sample(value, name: str, batch: int, shape: tuple | None = None):
    if not isinstance(value, torch.Tensor) or value.shape[0] != batch or (shape and value.dim() != len(shape)):
        want = f"({batch}, {', '.join(shape[1:])})" if shape else f"({batch},)"
        raise ValueError(f"{name} must be {want}, one row per latent, got {getattr(value, 'shape', value)}")
    return value


def check_kwargs(model, kwargs: dict, batch: int) -> dict:
    """``pooled_projections`` (B, P); ``encoder_attention_mask`` (B, L) (or a list of (L_i,)) with the padding
    at the tail, or None; ``guidance`` (B,) for guidance-distilled models. ValueError naming the argument."""
    if model.config.image_condition_type is not None:
        raise ValueError("forward_packed: HunyuanVideo with image_condition_type is not supported")
    unknown = sorted(set(kwargs) - {"pooled_projections", "encoder_attention_mask", "guidance", "attention_kwargs"})
    if unknown or kwargs.get("attention_kwargs") is not None:
        raise TypeError(f"forward_packed: HunyuanVideoTransformer3DModel takes no {unknown or ['attention_kwargs']}")
    out = {"pooled_projections": _per_sample(kwargs.get("pooled_projections"), "pooled_projections", batch,
                                             ("B", "P"))}
    guidance = kwargs.get("guidance")
    if model.time_text_embed.guidance_embedder is not None or guidance is not None:
        out["guidance"] = _per_sample(guidance, "guidance", batch)
    mask = kwargs.get("encoder_attention_mask")
    if mask is not None:
        masks = list(mask) if isinstance(mask, (list, tuple)) or mask.dim() == 2 else None
        if masks is None or len(masks) != batch:
            raise ValueError(f"encoder_attention_mask must be (B, L) or a list of B (L_i,), one per latent "
                             f"({batch}), got {getattr(mask, 'shape', len(mask))}")
        for i, m in enumerate(masks):
            n = int(m.sum())
            if not bool(m[:n].bool().all()):
                raise ValueError(f"encoder_attention_mask[{i}] must keep a prefix (padding at the tail), as the "
                                 "model's joint attention assumes")
        out["encoder_attention_mask"] = masks
    return out


def _refined_text(model, packed: PackedBatch) -> PackedText:
    """The token refiner (``model.context_embedder``) per sample with its mask, as the host runs it; then only
    each sample's valid (unpadded) tokens, packed."""
    text, masks = packed.text, packed.kwargs.get("encoder_attention_mask")
    items = []
    for i, _n in enumerate(text.lengths):
        mask = None if masks is None else masks[i][None]
        raw = text.tokens[int(text.cu[i]):int(text.cu[i + 1])][None]
        refined = model.context_embedder(raw, packed.timestep[i:i + 1], mask)[0]
        items.append(refined if mask is None else refined[:int(mask.sum())])
    lengths = [t.shape[0] for t in items]
    return PackedText(torch.cat(items), cu_seqlens_from_lengths(lengths, items[0].device), lengths)


class _Context:
    """Offsets of the video and text tokens, RoPE, sparse routing and module paths shared by the blocks."""

    def __init__(self, model, video: VideoTokens, text: PackedText, sparse):
        self.video, self.text, self.sparse = video, text, sparse
        self.dims, self.theta = tuple(model.config.rope_axes_dim), float(model.rope.theta)
        self.paths = {id(m.attn): f"{name}.{i}.attn" for name in ("transformer_blocks", "single_transformer_blocks")
                      for i, m in enumerate(getattr(model, name))}


def _qkv(attn, h, to_q, to_k, to_v, norm_q, norm_k):
    q, k, v = (f(h).unflatten(-1, (attn.heads, -1)) for f in (to_q, to_k, to_v))
    return (norm_q(q) if norm_q is not None else q), (norm_k(k) if norm_k is not None else k), v


def _joint_attention(attn, hv, ht, ctx: _Context):
    """The attention processor's math on packed tokens: video hv (total, C) with RoPE, text ht (total_text, C)
    through the added projections when the module has them (dual-stream), else the same ones (single-stream)."""
    q, k, v = _qkv(attn, hv, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    q = rope_3d(q, ctx.video.positions, dims=ctx.dims, theta=ctx.theta)
    k = rope_3d(k, ctx.video.positions, dims=ctx.dims, theta=ctx.theta)
    if attn.add_q_proj is not None:
        text_qkv = _qkv(attn, ht, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                        attn.norm_added_k)
    else:
        text_qkv = _qkv(attn, ht, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    out_v, out_t = self_attention(q, k, v, ctx.video, ctx.sparse, ctx.paths[id(attn)], ctx.text, text_qkv)
    out_v, out_t = out_v.flatten(1).to(q.dtype), out_t.flatten(1).to(q.dtype)
    if getattr(attn, "to_out", None) is not None:
        out_v = attn.to_out[1](attn.to_out[0](out_v))
    if getattr(attn, "to_add_out", None) is not None:
        out_t = attn.to_add_out(out_t)
    return out_v, out_t


def _params(norm, temb, chunks: int):
    """An adaLN-Zero module's per-sample parameters from its own ``linear`` / ``silu``: ``chunks`` x (B, C)."""
    return [p.contiguous() for p in norm.linear(norm.silu(temb)).chunk(chunks, dim=1)]


def _dual_block(block, xv, xt, temb, ctx: _Context):
    """``HunyuanVideoTransformerBlock.forward`` on packed video xv (total, C) and text xt (total_text, C)."""
    cv, ct = ctx.video.cu, ctx.text.cu
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _params(block.norm1, temb, 6)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = _params(block.norm1_context, temb, 6)
    hv = adaln_modulate(xv, shift, scale, cv, eps=block.norm1.norm.eps)
    ht = adaln_modulate(xt, c_shift, c_scale, ct, eps=block.norm1_context.norm.eps)
    out_v, out_t = _joint_attention(block.attn, hv, ht, ctx)
    xv, xt = gated_residual(xv, out_v, gate, cv), gated_residual(xt, out_t, c_gate, ct)
    hv = adaln_modulate(xv, shift_mlp, scale_mlp, cv, eps=block.norm2.eps)
    ht = adaln_modulate(xt, c_shift_mlp, c_scale_mlp, ct, eps=block.norm2_context.eps)
    return gated_residual(xv, block.ff(hv), gate_mlp, cv), gated_residual(xt, block.ff_context(ht), c_gate_mlp, ct)


def _single_block(block, xv, xt, temb, ctx: _Context):
    """``HunyuanVideoSingleTransformerBlock.forward`` on packed video xv (total, C) and text xt (total_text, C)."""
    shift, scale, gate = _params(block.norm, temb, 3)
    out = []
    hv = adaln_modulate(xv, shift, scale, ctx.video.cu, eps=block.norm.norm.eps)
    ht = adaln_modulate(xt, shift, scale, ctx.text.cu, eps=block.norm.norm.eps)
    attn_v, attn_t = _joint_attention(block.attn, hv, ht, ctx)
    for x, h, a, cu in ((xv, hv, attn_v, ctx.video.cu), (xt, ht, attn_t, ctx.text.cu)):
        mlp = block.act_mlp(block.proj_mlp(h))
        out.append(gated_residual(x, block.proj_out(torch.cat([a, mlp], dim=1)), gate, cu))
    return tuple(out)


def forward(model, packed: PackedBatch) -> list[torch.Tensor]:
    """Per latent (C_out, F_i, H_i, W_i), as ``model(latent[None], t[i:i+1], text_i[None], mask_i[None],
    pooled_i[None], guidance[i:i+1])`` gives them."""
    kw = packed.kwargs
    temb, _ = model.time_text_embed(packed.timestep, kw["pooled_projections"], kw.get("guidance"))
    tokens, video = embed_videos(model.x_embedder.proj, packed.latents, packed.sparse)
    text = _refined_text(model, packed)
    ctx = _Context(model, video, text, packed.sparse)
    state = (tokens, text.tokens)
    state = run_blocks(model, model.transformer_blocks, lambda b, xv, xt, e: _dual_block(b, xv, xt, e, ctx),
                       state, temb)
    xv, _ = run_blocks(model, model.single_transformer_blocks,
                       lambda b, xv, xt, e: _single_block(b, xv, xt, e, ctx), state, temb)
    norm = model.norm_out
    scale, shift = norm.linear(norm.silu(temb).to(xv.dtype)).chunk(2, dim=1)
    xv = adaln_modulate(xv, shift.contiguous(), scale.contiguous(), video.cu, eps=norm.norm.eps)
    return unpatchify(model.proj_out(xv), video, patch_size(model), channels_first=True)


HANDLER = PackedHandler(patch=patch_size, check=check_kwargs, forward=forward)
