"""RotaryEmbedding3d: 3D (t, h, w) rotary position embedding of q and k."""
from __future__ import annotations

import torch
from torch import nn

from vdit.ops import rope_3d_qk


class RotaryEmbedding3d(nn.Module):
    """Rotate q and k by (t, h, w) token positions; no parameters.

    Args:
        head_dim: Dh.
        dims: (dt, dh, dw) channels per axis, each even, sum <= head_dim (the rest pass through).
        theta: frequency base; interleaved: pair layout (see :func:`vdit.ops.rope_3d`).

    ``forward(q, k, positions, q_norm_weight=None, k_norm_weight=None)``: q (total, Hq, Dh) or
    (B, L, Hq, Dh), k likewise, positions (total, 3) / (L, 3) -> (q, k) rotated; with norm weights the
    heads are RMS-normalized first, in the same pass.
    """

    def __init__(self, head_dim: int, dims, theta: float = 10000.0, interleaved: bool = True):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if len(dims) != 3 or any(d % 2 for d in dims) or sum(dims) > head_dim:
            raise ValueError(f"dims must be 3 even ints summing to <= head_dim={head_dim}, got {dims}")
        self.head_dim, self.dims, self.theta, self.interleaved = head_dim, dims, float(theta), interleaved

    @staticmethod
    def even_split(head_dim: int) -> tuple[int, int, int]:
        """A near-even split of head_dim into three even chunks (e.g. 64 -> (20, 22, 22), 32 -> (12, 10, 10))."""
        hw = 2 * ((head_dim // 3 + 1) // 2)
        return head_dim - 2 * hw, hw, hw

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                eps: float = 1e-6):
        return rope_3d_qk(q, k, positions, dims=self.dims, theta=self.theta, interleaved=self.interleaved,
                          q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, dims={self.dims}, theta={self.theta}, interleaved={self.interleaved}"
