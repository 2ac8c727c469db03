"""Pure-PyTorch reference implementations of every vdit op: the oracles the tests compare against.

They favour clarity over speed, compute in float32 (float64 for float64 inputs) and return the
input dtype. They do not validate their inputs; the public ops in ``vdit.ops`` do. Shapes use:
B batch, C channels, T/H/W video frames/height/width, (pt, ph, pw) patch size, N tokens per video,
F = C * pt * ph * pw patch features, D model width, total = packed tokens, Hq/Hk heads.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vdit.ops._shared import compute_dtype, rope_3d_angles, segment_ids

__all__ = [
    "patchify_3d", "unpatchify_3d", "patch_embed_3d", "patch_embed_3d_varlen", "varlen_attention",
    "varlen_attention_backward", "rope_3d", "rope_3d_qk", "rope_3d_angles", "adaln_modulate", "gated_residual",
    "segment_ids",
    "patch_unembed_3d", "patch_unembed_3d_varlen", "compute_dtype", "block_sparse_attention",
    "block_sparse_attention_tiles",
]


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------

def patchify_3d(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Cut videos into spacetime patches.

    Args:
        x: (B, C, T, H, W), any dtype; (pt, ph, pw) = ``patch_size`` divides (T, H, W).
    Returns:
        (B, N, F) with N = T/pt * H/ph * W/pw tokens in (t, h, w) row-major order (w fastest) and
        F = C*pt*ph*pw features in (c, i, j, k) order, the flattening order of a Conv3d weight
        (D, C, pt, ph, pw): ``tokens[b, (tt*Hp + hh)*Wp + ww, ((c*pt + i)*ph + j)*pw + k] =
        x[b, c, tt*pt + i, hh*ph + j, ww*pw + k]``.
    """
    B, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify_3d(tokens: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify_3d`.

    Args:
        tokens: (B, N, F) with N = Tp * Hp * Wp.
        grid: (Tp, Hp, Wp) = (T/pt, H/ph, W/pw).
        patch_size: (pt, ph, pw); pt*ph*pw divides F.
    Returns:
        (B, C, T, H, W) with C = F / (pt*ph*pw).
    """
    B, N, Fdim = tokens.shape
    Tp, Hp, Wp = grid
    pt, ph, pw = patch_size
    C = Fdim // (pt * ph * pw)
    x = tokens.reshape(B, Tp, Hp, Wp, C, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, C, Tp * pt, Hp * ph, Wp * pw)


def patch_embed_3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Patch embedding: ``F.conv3d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)``.

    Args:
        x: (B, C, T, H, W) float.
        weight: (D, C, pt, ph, pw), the patch size is ``weight.shape[2:]``.
        bias: (D,) or None.
    Returns:
        (B, N, D) in x's dtype (the matmul accumulates in the compute dtype).
    """
    D = weight.shape[0]
    tokens = patchify_3d(x, weight.shape[2:])
    cd = compute_dtype(x.dtype)
    out = tokens.to(cd) @ weight.reshape(D, -1).to(cd).t()
    if bias is not None:
        out = out + bias.to(cd)
    return out.to(x.dtype)


def patch_embed_3d_varlen(videos: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Patch embedding of videos of different sizes into one packed sequence.

    Args:
        videos: list of B tensors (C, Ti, Hi, Wi) with the same C, dtype and device.
        weight: (D, C, pt, ph, pw); bias: (D,) or None.
    Returns:
        tokens (total, D), cu_seqlens int32 (B + 1,) with cu_seqlens[i+1] - cu_seqlens[i] = Ni, and
        grids int32 (B, 3) holding (Ti/pt, Hi/ph, Wi/pw).
    """
    pt, ph, pw = weight.shape[2:]
    device = videos[0].device
    tokens = [patch_embed_3d(v.unsqueeze(0), weight, bias)[0] for v in videos]
    grids = torch.tensor([[v.shape[1] // pt, v.shape[2] // ph, v.shape[3] // pw] for v in videos],
                         dtype=torch.int32, device=device)
    lengths = torch.tensor([t.shape[0] for t in tokens], dtype=torch.int64, device=device)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return torch.cat(tokens, 0), cu_seqlens, grids


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     softmax_scale=None, causal=False, return_lse=False):
    """Attention over packed variable-length sequences (FlashAttention varlen semantics).

    Args:
        q: (total_q, Hq, Dh); k, v: (total_k, Hk, Dh) with Hq % Hk == 0. Query head h uses key/value
            head h // (Hq / Hk).
        cu_seqlens_q, cu_seqlens_k: int (B + 1,) prefix sums of the sequence lengths; sequence i is
            q[cu_q[i]:cu_q[i+1]] against k, v[cu_k[i]:cu_k[i+1]]. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: unused by the reference (kept for the common signature).
        softmax_scale: defaults to Dh ** -0.5.
        causal: query i of a sequence (Lq queries, Lk keys) sees keys j <= i + Lk - Lq (mask aligned
            to the bottom-right corner). A query that sees no key outputs 0 with lse = -inf.
        return_lse: also return the log-sum-exp of the scaled scores.
    Returns:
        out like q; with ``return_lse`` also lse (Hq, total_q) float32 (float64 for float64 input).
    """
    del max_seqlen_q, max_seqlen_k
    cd = compute_dtype(q.dtype)
    Hq, Hk = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(q.shape, dtype=cd, device=q.device)
    lse = torch.full((Hq, q.shape[0]), float("-inf"), dtype=cd, device=q.device)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        Lq, Lk = qe - qs, ke - ks
        if Lq == 0 or Lk == 0:
            continue
        qi = q[qs:qe].to(cd).transpose(0, 1)  # (Hq, Lq, Dh)
        ki = k[ks:ke].to(cd).transpose(0, 1).repeat_interleave(Hq // Hk, dim=0)
        vi = v[ks:ke].to(cd).transpose(0, 1).repeat_interleave(Hq // Hk, dim=0)
        scores = (qi @ ki.transpose(1, 2)) * scale  # (Hq, Lq, Lk)
        if causal:
            rows = torch.arange(Lq, device=q.device)[:, None]
            cols = torch.arange(Lk, device=q.device)[None, :]
            scores = scores.masked_fill(cols > rows + (Lk - Lq), float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # (Hq, Lq); -inf where a row sees no key
        p = torch.exp(scores - row_lse.clamp_min(torch.finfo(cd).min)[..., None])
        out[qs:qe] = (p @ vi).transpose(0, 1)
        lse[:, qs:qe] = row_lse
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, softmax_scale, causal=False):
    """Gradients (dq, dk, dv) of :func:`varlen_attention` given its output and log-sum-exp.

    ``out`` and ``lse`` may come from a larger key set than ``k``, ``v`` (ring attention passes the merged
    output of all key blocks): the probabilities are exp(scores - lse) and the softmax correction uses
    rowsum(dout * out), so each block's gradients come out exactly. Shapes as in varlen_attention;
    lse (Hq, total_q). Returns float32 tensors (float64 for float64 input).
    """
    cd = compute_dtype(q.dtype)
    scale, cu_q, cu_k = softmax_scale, cu_seqlens_q, cu_seqlens_k
    dq, dk, dv = (torch.zeros(t.shape, dtype=cd, device=t.device) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs or ke == ks:
            continue
        qi = q[qs:qe].to(cd).transpose(0, 1)
        ki = k[ks:ke].to(cd).transpose(0, 1).repeat_interleave(groups, 0)
        vi = v[ks:ke].to(cd).transpose(0, 1).repeat_interleave(groups, 0)
        do = dout[qs:qe].to(cd).transpose(0, 1)
        o = out[qs:qe].to(cd).transpose(0, 1)
        s = (qi @ ki.transpose(1, 2)) * scale
        if causal:
            Lq, Lk = qe - qs, ke - ks
            mask = torch.arange(Lk, device=q.device)[None] > torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
            s = s.masked_fill(mask, float("-inf"))
        row_lse = lse[:, qs:qe].to(cd)
        p = torch.exp(s - torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)[..., None])
        p = torch.where(torch.isinf(row_lse)[..., None], torch.zeros_like(p), p)
        dvi = p.transpose(1, 2) @ do
        dp = do @ vi.transpose(1, 2)
        ds = p * (dp - (do * o).sum(-1, keepdim=True))
        dq[qs:qe] = (ds @ ki).transpose(0, 1) * scale
        dki = (ds.transpose(1, 2) @ qi) * scale
        Hk = k.shape[1]
        dk[ks:ke] = dki.reshape(Hk, groups, ke - ks, -1).sum(1).transpose(0, 1)
        dv[ks:ke] = dvi.reshape(Hk, groups, ke - ks, -1).sum(1).transpose(0, 1)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Block-sparse spacetime attention
# --------------------------------------------------------------------------------------------

def block_sparse_attention_tiles(q, k, v, tile_offsets, kv_tiles, *, softmax_scale=None, return_lse=False):
    """Block-sparse attention over a packed batch in tile order, as the kernels see it.

    Args:
        q: (total, Hq, Dh); k, v: (total, Hk, Dh), Hq % Hk == 0, tokens in tile order.
        tile_offsets: int (num_tiles + 1,) token offset of each tile.
        kv_tiles: int (num_tiles, Hq or 1, K) global key-tile indices per query tile (and head), -1 unused.
            A query attends every key of every tile its tile lists (whole tiles, no token mask).
        softmax_scale: defaults to Dh ** -0.5.
    Returns:
        out like q (a query that sees no key outputs 0), with ``return_lse`` also lse (Hq, total) float32
        (float64 for float64 input), -inf where a query sees no key.
    """
    cd = compute_dtype(q.dtype)
    Hq, Hk = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    offsets = tile_offsets.long().cpu()
    num_tiles = offsets.numel() - 1
    token_tile = torch.repeat_interleave(torch.arange(num_tiles), offsets[1:] - offsets[:-1]).to(q.device)
    lists = kv_tiles.long().to(q.device)
    visible = torch.zeros(lists.shape[1], num_tiles, num_tiles + 1, dtype=torch.bool, device=q.device)
    rows = torch.arange(num_tiles, device=q.device)[:, None].expand(num_tiles, lists.shape[2])
    for h in range(lists.shape[1]):  # -1 slots land in the extra last column, which is dropped
        visible[h, rows, torch.where(lists[:, h] >= 0, lists[:, h], num_tiles)] = True
    mask = visible[:, :, :num_tiles][:, token_tile][:, :, token_tile]  # (Hq or 1, total, total)
    qh = q.to(cd).transpose(0, 1)
    kh = k.to(cd).transpose(0, 1).repeat_interleave(Hq // Hk, dim=0)
    vh = v.to(cd).transpose(0, 1).repeat_interleave(Hq // Hk, dim=0)
    scores = ((qh @ kh.transpose(1, 2)) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.clamp_min(torch.finfo(cd).min)[..., None])
    out = (p @ vh).transpose(0, 1).to(q.dtype)
    return (out, lse) if return_lse else out


def block_sparse_attention(q, k, v, cu_seqlens, grids, tile, kv_tiles, *, global_tokens=None, softmax_scale=None,
                           return_lse=False):
    """Block-sparse spacetime attention over packed videos in tile order (see :mod:`vdit.ops.tiles`).

    Args:
        q: (total, Hq, Dh); k, v: (total, Hk, Dh); each video's tokens in tile order.
        cu_seqlens: int32 (B + 1,); grids: int (B, 3) token grids; tile: (tt, th, tw).
        kv_tiles: int (total_query_tiles, Hq or 1, K): per query tile (videos in batch order, tiles in
            tile order) and head, key tiles local to the video, -1 unused.
        global_tokens: None or B ints: that many tokens follow each video's tokens in its sequence; every
            query of the sequence sees them and they see the whole sequence, stated as one more tile per
            video that every list names and whose list names every tile (``tiles.with_global_tiles``).
    Returns:
        As :func:`block_sparse_attention_tiles`.
    """
    from vdit.ops.tiles import lists_with_global_tiles, tile_layout, to_global, with_global_tiles

    del cu_seqlens
    layout = tile_layout(grids, tile)
    kv_tiles = kv_tiles.to(torch.int32)
    if global_tokens is not None:
        layout = with_global_tiles(layout, [int(g) for g in global_tokens])
        kv_tiles = lists_with_global_tiles(layout, kv_tiles)
    return block_sparse_attention_tiles(q, k, v, layout.offsets, to_global(layout, kv_tiles),
                                        softmax_scale=softmax_scale, return_lse=return_lse)


# --------------------------------------------------------------------------------------------
# 3D rotary position embedding (the angles are vdit.ops._shared.rope_3d_angles)
# --------------------------------------------------------------------------------------------

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def rope_3d(x, positions, *, dims, theta=10000.0, interleaved=True, norm_weight=None, eps=1e-6):
    """Rotate channels of ``x`` by 3D (t, h, w) positions.

    Args:
        x: (total, H, Dh) packed tokens or (B, L, H, Dh) dense tokens, float.
        positions: (total, 3) / (L, 3) or (B, L, 3); int or float coordinates (t, h, w).
        dims: (dt, dh, dw), each even, dt + dh + dw <= Dh. Channels [0, dt) rotate with t, [dt, dt+dh)
            with h, [dt+dh, dt+dh+dw) with w; the rest pass through unchanged.
        theta: base of the frequencies: a chunk of d channels uses angles pos * theta ** (-2j / d).
        interleaved: rotate channel pairs (2j, 2j+1) of a chunk (True) or (j, j + d/2) (False).
        norm_weight: optional (Dh,) RMSNorm weight applied per head before rotating (QK-norm).
        eps: RMSNorm epsilon.
    Returns:
        Tensor like x: pair (a, b) at angle phi becomes (a cos phi - b sin phi, a sin phi + b cos phi).
    """
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    if norm_weight is not None:
        xc = _rms_norm(xc, norm_weight.to(cd), eps)
    angles = rope_3d_angles(positions, dims, theta, cd)  # (..., L, d/2): broadcast over batch, heads
    pieces, start = [], 0
    for d, angle in zip(dims, angles):
        chunk = xc[..., start:start + d]
        cos = torch.cos(angle).unsqueeze(-2)  # (..., L, 1, d/2): broadcast over heads
        sin = torch.sin(angle).unsqueeze(-2)
        if interleaved:
            a, b = chunk[..., 0::2], chunk[..., 1::2]
            rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        else:
            a, b = chunk[..., : d // 2], chunk[..., d // 2:]
            rotated = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        pieces.append(rotated)
        start += d
    pieces.append(xc[..., start:])
    return torch.cat(pieces, dim=-1).to(x.dtype)


def rope_3d_qk(q, k, positions, *, dims, theta=10000.0, interleaved=True,
               q_norm_weight=None, k_norm_weight=None, eps=1e-6):
    """:func:`rope_3d` applied to q and k with the same positions.

    Args:
        q: (total, Hq, Dh) or (B, L, Hq, Dh); k: (total, Hk, Dh) or (B, L, Hk, Dh).
        q_norm_weight, k_norm_weight: optional (Dh,) RMSNorm weights applied before rotating.
    Returns:
        (q_rotated, k_rotated).
    """
    common = dict(dims=dims, theta=theta, interleaved=interleaved, eps=eps)
    return (rope_3d(q, positions, norm_weight=q_norm_weight, **common),
            rope_3d(k, positions, norm_weight=k_norm_weight, **common))


# --------------------------------------------------------------------------------------------
# adaLN modulation and gated residual
# --------------------------------------------------------------------------------------------

def _per_token(param: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Expand a per-sample (B, C) parameter to one row per token of x (packed, or (B, N, C))."""
    if cu_seqlens is None:
        return param[:, None, :]
    return param[segment_ids(cu_seqlens, x.shape[0])]


def adaln_modulate(x, shift, scale, cu_seqlens=None, *, eps=1e-6):
    """``LayerNorm(x) * (1 + scale[s]) + shift[s]``, LayerNorm without affine parameters.

    Args:
        x: (total, C) packed with ``cu_seqlens`` (int (B + 1,)), or (B, N, C) with cu_seqlens None.
        shift, scale: (B, C); s is the sequence (sample) a token belongs to.
    Returns:
        Tensor like x; statistics and modulation in float32 (float64 for float64 input).
    """
    cd = compute_dtype(x.dtype)
    y = F.layer_norm(x.to(cd), (x.shape[-1],), eps=eps)
    y = y * (1 + _per_token(scale.to(cd), x, cu_seqlens)) + _per_token(shift.to(cd), x, cu_seqlens)
    return y.to(x.dtype)


def gated_residual(x, y, gate, cu_seqlens=None):
    """``x + gate[s] * y``.

    Args:
        x, y: (total, C) packed with ``cu_seqlens`` or (B, N, C) with cu_seqlens None.
        gate: (B, C).
    Returns:
        Tensor like x.
    """
    cd = compute_dtype(x.dtype)
    return (x.to(cd) + _per_token(gate.to(cd), x, cu_seqlens) * y.to(cd)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Patch unembedding
# --------------------------------------------------------------------------------------------

def patch_unembed_3d(tokens, weight, bias, grid, patch_size):
    """Final projection + unpatchify: ``unpatchify_3d(tokens @ weight.T + bias, grid, patch_size)``.

    Args:
        tokens: (B, N, D); weight: (C*pt*ph*pw, D) (an ``nn.Linear(D, C*pt*ph*pw)`` weight);
        bias: (C*pt*ph*pw,) or None; grid: (Tp, Hp, Wp); patch_size: (pt, ph, pw).
    Returns:
        (B, C, Tp*pt, Hp*ph, Wp*pw) in tokens' dtype.
    """
    cd = compute_dtype(tokens.dtype)
    out = tokens.to(cd) @ weight.to(cd).t()
    if bias is not None:
        out = out + bias.to(cd)
    return unpatchify_3d(out.to(tokens.dtype), grid, patch_size)


def patch_unembed_3d_varlen(tokens, weight, bias, cu_seqlens, grids, patch_size):
    """Packed form of :func:`patch_unembed_3d`.

    Args:
        tokens: (total, D) packed; cu_seqlens: int (B + 1,); grids: int (B, 3) token grid per sample.
    Returns:
        list of B videos (C, Ti, Hi, Wi).
    """
    cu = cu_seqlens.tolist()
    return [patch_unembed_3d(tokens[cu[i]:cu[i + 1]][None], weight, bias, grid, patch_size)[0]
            for i, grid in enumerate(grids.tolist())]
