"""Ulysses sequence parallelism: all-to-all from token shards to head shards and back.

Each rank holds a contiguous token range with all heads; after the first all-to-all it holds every
token of the batch for H/W heads, runs ordinary varlen attention there, and the second all-to-all
returns its token range with all heads. Communication per attention: q, k, v and out, each crossing
the group once: 4 * total * H * D * (W - 1) / W elements over all ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from vdit.distributed.sharding import world
from vdit.distributed.stats import record


def _tokens_to_heads(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """(n_r, H, D) token shard -> (sum(sizes), H/W, D): every rank's tokens (``sizes[j]`` from rank j,
    in rank order) for this rank's head chunk."""
    rank, size = world(group)
    n, H, D = x.shape
    chunk = H // size
    send = x.reshape(n, size, chunk, D).transpose(0, 1).contiguous()  # (W, n_r, H/W, D): block j -> rank j
    out = x.new_empty((sum(sizes), chunk, D))
    record("all_to_all", (size - 1) * n * chunk * D * x.element_size())  # every head chunk but our own leaves
    dist.all_to_all_single(out.view(-1), send.view(-1), [s * chunk * D for s in sizes], [n * chunk * D] * size,
                           group=group)
    return out


def _heads_to_tokens(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Inverse of :func:`_tokens_to_heads`: (sum(sizes), H/W, D) -> (sizes[rank], H, D)."""
    rank, size = world(group)
    _, chunk, D = x.shape
    n = sizes[rank]
    out = x.new_empty((size, n, chunk, D))
    record("all_to_all", (sum(sizes) - n) * chunk * D * x.element_size())  # other ranks' tokens leave
    dist.all_to_all_single(out.view(-1), x.contiguous().view(-1), [n * chunk * D] * size,
                           [s * chunk * D for s in sizes], group=group)
    return out.transpose(0, 1).reshape(n, size * chunk, D)


class TokensToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _tokens_to_heads(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_tokens(grad.contiguous(), ctx.sizes, ctx.group), None, None


class HeadsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _heads_to_tokens(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _tokens_to_heads(grad.contiguous(), ctx.sizes, ctx.group), None, None


def head_chunk(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of the heads of a full (replicated) (total, H, D) tensor."""
    rank, size = world(group)
    chunk = x.shape[1] // size
    return x[:, rank * chunk:(rank + 1) * chunk]
