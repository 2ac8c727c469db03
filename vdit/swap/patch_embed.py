"""Replacements for ``nn.Conv3d`` / ``nn.Conv2d`` used as patch embeddings (kernel_size == stride).

The host model keeps calling the module as a convolution and flattens the result itself, so the
replacement returns the convolution's layout: a zero-copy view (B, D, T', H', W') of vdit's (B, N, D)
tokens. The host's usual ``.flatten(2).transpose(1, 2)`` then gives back the contiguous tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vdit.nn import PatchEmbed3d
from vdit.nn.patch_embed import patch_conv_reason  # noqa: F401  (re-exported: vdit.swap uses it)
from vdit.ops import patch_embed_3d

# Attributes host code reads off a convolution (e.g. ``self.proj.kernel_size``, ``.weight.dtype``).
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
               "padding_mode", "transposed", "output_padding")


class ConvPatchEmbed(PatchEmbed3d):
    """vdit patch embedding that behaves like the ``nn.Conv3d`` / ``nn.Conv2d`` it replaces.

    Shares the convolution's ``weight`` (D, C, *kernel) and ``bias`` (D,) Parameters (same state_dict
    keys). ``forward(x)``: x (B, C, T, H, W) for a Conv3d or (B, C, H, W) for a Conv2d (unbatched
    inputs too) -> the convolution's output (B, D, T', H', W') / (B, D, H', W'), a view of (B, N, D)
    tokens. Inputs whose size the kernel does not divide (the convolution drops the remainder) run
    the original convolution.
    """

    @classmethod
    def from_conv(cls, conv: nn.Module) -> ConvPatchEmbed:
        reason = patch_conv_reason(conv)
        if reason:
            raise ValueError(f"not a patch-embedding convolution: {reason}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.weight, module.bias = conv.weight, conv.bias
        module.spatial = len(conv.kernel_size)  # 3 for Conv3d, 2 for Conv2d
        module.patch_size = tuple(conv.kernel_size) if module.spatial == 3 else (1, *conv.kernel_size)
        for name in _CONV_ATTRS:
            if hasattr(conv, name):
                setattr(module, name, getattr(conv, name))
        module.original = conv  # plain attribute via __dict__ would register it; keep it out of state_dict
        return module

    def __setattr__(self, name, value):
        if name == "original":  # the replaced conv must not become a submodule (state_dict keys)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == self.spatial + 1
        if unbatched:
            x = x.unsqueeze(0)
        sizes = x.shape[2:]
        kernel = self.weight.shape[2:]
        if x.dim() != self.spatial + 2 or any(s % k for s, k in zip(sizes, kernel)):
            out = self._conv(x)
        else:
            weight = self.weight if self.spatial == 3 else self.weight.unsqueeze(2)
            x5 = x if self.spatial == 3 else x.unsqueeze(2)
            tokens = patch_embed_3d(x5, weight, self.bias)  # (B, N, D)
            grid = tuple(s // k for s, k in zip(sizes, kernel))
            out = tokens.transpose(1, 2).unflatten(2, grid)  # (B, D, *grid), no copy
        return out.squeeze(0) if unbatched else out

    def _conv(self, x):
        conv = F.conv3d if self.spatial == 3 else F.conv2d
        return conv(x, self.weight, self.bias, stride=self.weight.shape[2:])

    def extra_repr(self) -> str:
        kind = "Conv3d" if self.spatial == 3 else "Conv2d"
        return f"{super().extra_repr()}, replaces {kind}"
