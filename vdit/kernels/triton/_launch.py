"""What the Triton launchers guarantee their kernels, written once: 16-byte aligned contiguous inputs and
head dims that are multiples of 8 (so every head row starts 16-byte aligned)."""
from __future__ import annotations

import torch


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned. The kernels promise the compiler aligned rows (vectorized
    loads); a contiguous view into a larger buffer can start anywhere, so such a view is copied. (Inputs
    are validated as contiguous, but autograd may hand a backward an expanded gradient.)"""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def pad_head_dim(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its last (head) dim zero-padded to a multiple of 8 (unchanged if it is one): zero columns
    change no score, and the outputs are cut back to the real head dim."""
    pad = -t.shape[-1] % 8
    return torch.nn.functional.pad(t, (0, pad)) if pad else t
