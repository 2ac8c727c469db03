"""PatchEmbed3d (drop-in for ``nn.Conv3d(kernel=stride=patch)`` + flatten) and PatchUnembed3d
(final ``nn.Linear`` + unpatchify)."""
from __future__ import annotations

import math

import torch
from torch import nn

from vdit.ops import patch_embed_3d, patch_embed_3d_varlen, patch_unembed_3d, patch_unembed_3d_varlen


def patch_conv_reason(conv: nn.Module, *, allow_pointwise: bool = False) -> str | None:
    """Why ``conv`` (an nn.Conv2d / nn.Conv3d) is not a patch embedding, or None if it is one.

    A 1x1 convolution is exact as a patch embedding too, but a model swap leaves it alone (it is a
    pointwise projection, not a patchifier) unless ``allow_pointwise``.
    """
    if tuple(conv.kernel_size) != tuple(conv.stride):
        return f"kernel_size {tuple(conv.kernel_size)} != stride {tuple(conv.stride)}"
    if math.prod(conv.kernel_size) == 1 and not allow_pointwise:
        return "1x1 pointwise convolution, not a patch embedding"
    if isinstance(conv.padding, str) or any(conv.padding):
        return f"padding {conv.padding}"
    if any(d != 1 for d in conv.dilation) or conv.groups != 1:
        return f"dilation {tuple(conv.dilation)} / groups {conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    return None


class PatchEmbed3d(nn.Module):
    """Spacetime patch embedding with ``nn.Conv3d``'s parameters (``weight`` (D, C, pt, ph, pw), ``bias`` (D,)),
    so Conv3d checkpoints load unchanged.

    ``forward(x)``: x (B, C, T, H, W) -> (B, N, D); or a list of (C, Ti, Hi, Wi) videos ->
    (tokens (total, D), cu_seqlens int32 (B + 1,), grids int32 (B, 3)).
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.weight = nn.Parameter(torch.empty(hidden_size, in_channels, *self.patch_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The initialization nn.Conv3d uses.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d) -> PatchEmbed3d:
        """A PatchEmbed3d sharing ``conv``'s parameters; needs kernel_size == stride, no padding/dilation/groups."""
        reason = patch_conv_reason(conv, allow_pointwise=True)
        if reason is not None:
            raise ValueError(f"from_conv3d needs kernel_size == stride and no padding, dilation or groups "
                             f"({reason}), got {conv}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.patch_size = tuple(conv.kernel_size)
        module.weight = conv.weight
        module.bias = conv.bias
        return module

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            return patch_embed_3d_varlen(x, self.weight, self.bias)
        return patch_embed_3d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, patch_size={self.patch_size}, "
                f"bias={self.bias is not None}")


class PatchUnembed3d(nn.Module):
    """Final projection to patch pixels + unpatchify, with ``nn.Linear(hidden_size, C*pt*ph*pw)``'s parameters.

    ``forward(tokens, grid)``: tokens (B, N, D), grid (Tp, Hp, Wp) -> (B, C, T, H, W).
    ``forward(tokens, cu_seqlens=..., grids=...)``: packed (total, D) -> list of (C, Ti, Hi, Wi).
    """

    def __init__(self, hidden_size: int, out_channels: int, patch_size, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.patch_size = tuple(patch_size)
        features = out_channels * math.prod(self.patch_size)
        linear = nn.Linear(hidden_size, features, bias=bias, device=device, dtype=dtype)
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, tokens, grid=None, *, cu_seqlens=None, grids=None):
        if cu_seqlens is not None:
            return patch_unembed_3d_varlen(tokens, self.weight, self.bias, cu_seqlens, grids, self.patch_size)
        return patch_unembed_3d(tokens, self.weight, self.bias, grid, self.patch_size)
