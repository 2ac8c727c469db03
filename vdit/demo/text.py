"""A small text encoder for the demo model: a word-level tokenizer and a packed transformer.

VideoDiT takes any packed batch of text embeddings (tokens (total, D) + cu_seqlens); this encoder is
one such source, small enough to train jointly with the demo model on the CPU.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from vdit.nn import VarlenSelfAttention
from vdit.packing import cu_seqlens_from_lengths

UNK, EMPTY = "<unk>", "<empty>"


class WordTokenizer:
    """Lower-cased word-level tokenizer over a fixed vocabulary.

    Unknown words map to ``<unk>``; the empty prompt maps to the single token ``<empty>``, whose
    embedding is the unconditional input of classifier-free guidance.
    """

    def __init__(self, words: Sequence[str]):
        self.vocab = [UNK, EMPTY, *sorted(set(words) - {UNK, EMPTY})]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        if not words:
            return [self.index[EMPTY]]
        return [self.index.get(w, self.index[UNK]) for w in words]

    def encode_batch(self, texts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed token ids (total,) int64 and cu_seqlens int32 (B + 1,)."""
        ids = [self.encode(t) for t in texts]
        flat = torch.tensor([i for seq in ids for i in seq], dtype=torch.int64, device=device)
        return flat, cu_seqlens_from_lengths([len(s) for s in ids], device)


class TextEncoder(nn.Module):
    """Token + position embeddings and ``depth`` pre-norm transformer blocks over packed prompts.

    ``forward(ids, cu_seqlens)``: ids (total,) int64, cu_seqlens int32 (B + 1,) -> (total, dim).

    ``embedding_skip`` adds a linear map of each token's own word embedding to its output. Trained jointly
    with a DiT that does not use a word yet, the blocks get no gradient that tells such words apart and
    mix them into their context, so words the DiT must tell apart (the motion words of the demo's captions)
    reach it nearly equal. The skip hands the DiT each word's identity directly. Its map starts at zero, so
    adding it to a trained encoder leaves the encoder's function unchanged.
    """

    def __init__(self, vocab_size: int, dim: int = 128, depth: int = 2, heads: int = 4, max_len: int = 64,
                 embedding_skip: bool = False):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_TextBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.skip = None
        if embedding_skip:
            self.skip = nn.Linear(dim, dim)
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)

    def forward(self, ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        starts = cu_seqlens[:-1].long()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), lengths, output_size=ids.shape[0])
        position = torch.arange(ids.shape[0], device=ids.device) - starts[seq]
        words = self.embed(ids)
        x = words + self.pos(position.clamp_max(self.max_len - 1))
        max_seqlen = int(lengths.max()) if len(lengths) else 0
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen)
        x = self.norm(x)
        return x if self.skip is None else x + self.skip(words)


class _TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = VarlenSelfAttention(dim, heads, qk_norm=None)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))
