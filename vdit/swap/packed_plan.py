"""Packing planner for :func:`vdit.swap.forward_packed`: which videos share a batch.

A packed batch costs about its token count in the per-token layers (projections, MLPs) and the sum of its
videos' squared token counts in self-attention. :func:`plan_batches` keeps every batch under a token budget
and hands videos out largest-attention-first to the batch with the least attention work so far (LPT
scheduling), so the batches of one plan cost about the same and no step waits on one heavy batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def video_tokens(size: Sequence[int], patch: Sequence[int]) -> int:
    """Tokens of a latent of ``size`` (F, H, W) (or (C, F, H, W)) under ``patch`` (pt, ph, pw)."""
    size = tuple(size)[-3:]
    return math.prod(n // p for n, p in zip(size, patch))


def plan_batches(sizes: Sequence[Sequence[int]], token_budget: int,
                 patch: Sequence[int] = (1, 2, 2)) -> list[list[int]]:
    """Split videos into packed batches of at most ``token_budget`` tokens with balanced attention work.

    Args:
        sizes: per video its latent size (F, H, W) or (C, F, H, W).
        token_budget: most tokens per batch (> 0); a video larger than the budget gets a batch of its own.
        patch: the model's patch size (pt, ph, pw).
    Returns:
        Lists of indices into ``sizes``, one per batch (every index once), each sorted by decreasing tokens.
    Raises:
        ValueError naming ``token_budget`` when it is not a positive int.
    """
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
    tokens = [video_tokens(s, patch) for s in sizes]
    count = max(1, math.ceil(sum(min(n, token_budget) for n in tokens) / token_budget))
    batches: list[list[int]] = [[] for _ in range(count)]
    used, work = [0] * count, [0] * count
    for i in sorted(range(len(tokens)), key=lambda i: -tokens[i]):
        fits = [b for b in range(len(batches)) if used[b] + tokens[i] <= token_budget or not batches[b]]
        if not fits:
            batches.append([])
            used.append(0)
            work.append(0)
            fits = [len(batches) - 1]
        b = min(fits, key=lambda b: (work[b], used[b]))
        batches[b].append(i)
        used[b] += tokens[i]
        work[b] += tokens[i] ** 2
    return [b for b in batches if b]


def batch_work(batch: Sequence[int], sizes: Sequence[Sequence[int]], patch: Sequence[int] = (1, 2, 2)) -> tuple:
    """(tokens, attention work = sum of squared token counts) of one planned batch."""
    tokens = [video_tokens(sizes[i], patch) for i in batch]
    return sum(tokens), sum(n * n for n in tokens)
