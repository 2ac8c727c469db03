"""Apply rotary embeddings given as cos/sin tables with vdit's 3D RoPE op.

Host models hand their attention precomputed tables ``cos, sin`` of shape (L, Dh) (up to broadcast
dims), built from 3D token positions with the same frequency schedule as :func:`vdit.ops.rope_3d`
(axis chunk of d channels: angle = pos * theta ** (-2j / d), pairs interleaved). vdit's op computes the
angles itself from (L, 3) positions, so :class:`TableRope` recovers the positions from the tables once
per table (phase unwrapping from the lowest frequency up), checks that the tables rebuilt from them
match the given ones, and caches the result. Tables that do not match (another schedule, layout or
theta) make :meth:`TableRope.positions` return None, and the caller runs the original code.
"""
from __future__ import annotations

import math

import torch

from vdit.ops import rope_3d
from vdit.ops._shared import rope_3d_angles


class TableRope:
    """Position recovery + application for one model's RoPE layout.

    Args:
        dims: (dt, dh, dw) channels per axis in the table (channels past their sum must be cos 1, sin 0).
        theta: frequency base.
    """

    def __init__(self, dims, theta: float):
        self.dims, self.theta = tuple(int(d) for d in dims), float(theta)
        self._key: tuple | None = None  # (cos, sin) tensors of the cached entry (kept alive: identity check)
        self._positions: torch.Tensor | None = None

    def positions(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """(L, 3) float32 positions behind tables (.., L, .., Dh) with one non-1 dim before the last, or None.
        None under torch.compile: reading positions from the tables' values is a data-dependent decision, so a
        compiled model runs the host's own RoPE code there (which the compiler fuses itself)."""
        if torch.compiler.is_compiling():
            return None
        if self._key is not None and self._key[0] is cos and self._key[1] is sin:
            return self._positions
        pos = self._recover(cos, sin)
        self._key, self._positions = (cos, sin), pos
        return pos

    def _recover(self, cos, sin):
        if cos.shape != sin.shape or cos.dim() < 2 or not cos.is_floating_point():
            return None
        lead = [s for s in cos.shape[:-1] if s != 1]
        if len(lead) > 1:  # per-sample tables: not a single (L, 3) grid
            return None
        Dh = cos.shape[-1]
        if sum(self.dims) > Dh:
            return None
        c = cos.reshape(-1, Dh).double()
        s = sin.reshape(-1, Dh).double()
        pos, start = [], 0
        for d in self.dims:
            if d == 0:
                pos.append(torch.zeros(c.shape[0], dtype=torch.float64, device=c.device))
                continue
            angles = torch.atan2(s[:, start:start + d:2], c[:, start:start + d:2])  # (L, d/2)
            freqs = self.theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=c.device) / d)
            p = angles[:, -1] / freqs[-1]  # lowest frequency: no wrap while |p * f| < pi
            for j in range(d // 2 - 2, -1, -1):
                wraps = torch.round((p * freqs[j] - angles[:, j]) / (2 * math.pi))
                p = (angles[:, j] + 2 * math.pi * wraps) / freqs[j]
            pos.append(p)
            start += d
        positions = torch.stack(pos, dim=1)
        snapped = torch.round(positions)
        positions = torch.where((positions - snapped).abs() < 1e-4, snapped, positions)
        # Rebuild the tables (interleaved pairs, pass-through tail) and compare.
        angles = torch.cat(rope_3d_angles(positions, self.dims, self.theta, torch.float64), dim=1)
        angles = angles.repeat_interleave(2, dim=1)
        tail = Dh - angles.shape[1]
        want_c = torch.cat([torch.cos(angles), angles.new_ones(angles.shape[0], tail)], dim=1)
        want_s = torch.cat([torch.sin(angles), angles.new_zeros(angles.shape[0], tail)], dim=1)
        tol = max(1e-4, 16 * torch.finfo(cos.dtype).eps)
        if float((want_c - c).abs().max()) > tol or float((want_s - s).abs().max()) > tol:
            return None
        return positions.float()

    def apply(self, x: torch.Tensor, positions: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Rotate x (B, L, H, Dh) (``seq_dim`` 1) or (B, H, L, Dh) (``seq_dim`` 2); returns x's layout."""
        if seq_dim == 2:
            return rope_3d(x.transpose(1, 2), positions, dims=self.dims, theta=self.theta).transpose(1, 2)
        return rope_3d(x, positions, dims=self.dims, theta=self.theta)
