"""Reading SDPA masks: which of them are key-padding masks, and the keys they keep."""
from __future__ import annotations

import torch

DROP = -1.0e4  # additive-bias entries at or below this are treated as "masked out"


def key_padding(attn_mask: torch.Tensor, B: int, Hq: int, Lq: int, Lk: int):
    """(B, Lk) bool key mask if ``attn_mask`` is a key-padding mask for SDPA shape (B, Hq, Lq, Lk), else a
    reason string."""
    m = attn_mask
    if m.dim() > 4 or m.shape[-1] != Lk:
        return "mask shape"
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[0] not in (1, B) or m.shape[1] not in (1, Hq) or m.shape[2] not in (1, Lq):
        return "mask shape"
    if m.dtype == torch.bool:
        keep = m
    elif m.is_floating_point():
        keep = m == 0
        if not bool(torch.logical_or(keep, m <= DROP).all()):
            return "float mask with values other than 0 / <= -1e4"
    else:
        return "mask dtype"
    first = keep[:, :1, :1, :]
    if (keep.shape[1] > 1 or keep.shape[2] > 1) and not bool((keep == first).all()):
        return "mask differs across heads or query rows"
    return first[:, 0, 0, :].expand(B, Lk)
