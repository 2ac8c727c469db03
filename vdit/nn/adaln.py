"""AdaLNModulation: per-sample shift / scale / gate vectors from a conditioning vector (DiT adaLN-Zero)."""
from __future__ import annotations

import torch
from torch import nn


class AdaLNModulation(nn.Module):
    """``SiLU -> Linear(cond_dim, chunks * hidden_size)``, split into ``chunks`` tensors (B, hidden_size).

    The projection starts at zero (adaLN-Zero), so every gated block starts as the identity.
    ``forward(c)``: c (B, cond_dim) -> tuple of ``chunks`` tensors (B, hidden_size).
    """

    def __init__(self, cond_dim: int, hidden_size: int, chunks: int = 6):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(cond_dim, chunks * hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(nn.functional.silu(c)).chunk(self.chunks, dim=-1)
