"""RotaryEmbedding3d: 3D (t, h, w) rotary position embedding of q and k, with model presets."""
from __future__ import annotations

import torch
from torch import nn

from vdit.ops import rope_3d_qk


class RotaryEmbedding3d(nn.Module):
    """Rotate q and k by (t, h, w) token positions; no parameters.

    Args:
        head_dim: Dh.
        dims: (dt, dh, dw) channels per axis, each even, sum <= head_dim (the rest pass through).
        theta: frequency base; interleaved: how channels pair up (see :func:`vdit.ops.rope_3d`).

    ``forward(q, k, positions, q_norm_weight=None, k_norm_weight=None, eps=1e-6)``: q (total, Hq, Dh) or
    (B, L, Hq, Dh), k likewise, positions (total, 3) / (L, 3) / (B, L, 3) -> (q, k) rotated; with norm
    weights the heads are RMS-normalized first, in the same pass.

    Presets (:meth:`hunyuan_video`, :meth:`wan`, :meth:`cogvideox`) reproduce the axis splits, bases and
    channel pairings of those models; positions are the integer (t, h, w) latent-patch grid
    (:func:`vdit.packing.grid_positions` / :func:`vdit.packing.dense_positions`).
    """

    def __init__(self, head_dim: int, dims, theta: float = 10000.0, interleaved: bool = True):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if len(dims) != 3 or any(d < 0 or d % 2 for d in dims) or sum(dims) > head_dim:
            raise ValueError(f"dims must be 3 even ints summing to <= head_dim={head_dim}, got {dims}")
        self.head_dim, self.dims, self.theta, self.interleaved = head_dim, dims, float(theta), interleaved

    @staticmethod
    def even_split(head_dim: int) -> tuple[int, int, int]:
        """A near-even split of head_dim into three even chunks (e.g. 64 -> (20, 22, 22), 32 -> (12, 10, 10))."""
        hw = 2 * ((head_dim // 3 + 1) // 2)
        return head_dim - 2 * hw, hw, hw

    # ---- model presets --------------------------------------------------------------------------

    @classmethod
    def hunyuan_video(cls, head_dim: int = 128) -> RotaryEmbedding3d:
        """HunyuanVideo: axis channels (16, 56, 56), theta 256, interleaved pairs.

        HunyuanVideo's QK-norm is a per-head RMSNorm with weights, so pass its weights to ``forward``
        to fuse it. head_dim must be >= 128 (the model uses 128).
        """
        return cls(head_dim, (16, 56, 56), theta=256.0, interleaved=True)

    @classmethod
    def wan(cls, head_dim: int = 128) -> RotaryEmbedding3d:
        """Wan 2.x: h and w get 2 * (head_dim // 6) channels each, t the rest (128 -> (44, 42, 42)),
        theta 10000, interleaved pairs.

        Wan's QK-norm is one RMSNorm over all heads together (not per head): apply it before this
        module and call ``forward`` without norm weights.
        """
        hw = 2 * (head_dim // 6)
        return cls(head_dim, (head_dim - 2 * hw, hw, hw), theta=10000.0, interleaved=True)

    @classmethod
    def cogvideox(cls, head_dim: int = 64) -> RotaryEmbedding3d:
        """CogVideoX: t gets head_dim // 4 channels, h and w 3 * head_dim // 8 each (64 -> (16, 24, 24)),
        theta 10000, interleaved pairs.

        CogVideoX's QK-norm is a LayerNorm, not fused here: apply it before this module. Its h / w
        positions are the latent grid (or a resize-crop of it: use float positions from
        :func:`vdit.packing.grid_positions` with ``scale`` / ``offset``).
        """
        hw = head_dim // 8 * 3
        return cls(head_dim, (head_dim // 4, hw, hw), theta=10000.0, interleaved=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                eps: float = 1e-6):
        return rope_3d_qk(q, k, positions, dims=self.dims, theta=self.theta, interleaved=self.interleaved,
                          q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, dims={self.dims}, theta={self.theta}, interleaved={self.interleaved}"


PRESETS = {
    "hunyuan_video": RotaryEmbedding3d.hunyuan_video,
    "wan": RotaryEmbedding3d.wan,
    "cogvideox": RotaryEmbedding3d.cogvideox,
}
