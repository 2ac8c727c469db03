"""Sharding of a packed token sequence over a process group, and collectives with autograd.

Contract: each rank holds one contiguous range of the packed tokens, ``[bounds[r], bounds[r + 1])``, with
``bounds`` from :func:`shard_bounds` for the batch's ``cu_seqlens`` and a layout:

* ``"tokens"`` (default): equal token counts, ``[r*total//W, (r+1)*total//W)``;
* ``"work"``: equal attention work: a token of a sequence of n tokens attends n keys, so ranks holding a
  long video's tokens hold fewer of them. This balances ring attention (whose work per rank is its
  queries times their sequences' lengths), at the price of uneven token counts for the per-token layers.

A range may cut through a sequence and may hold no token of some sequence; ``cu_seqlens`` always
describe the whole batch and are identical on every rank. ``bounds=None`` everywhere means the
``"tokens"`` layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from vdit.distributed.stats import record


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (default: the whole world)."""
    return dist.get_rank(group), dist.get_world_size(group)


def start_p2p(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]], group, kind: str) -> list:
    """Start point-to-point transfers in ``group``: each (group rank, tensor) of ``sends`` to that rank and each of
    ``recvs`` filled from it, batched (``batch_isend_irecv``); the bytes sent are counted as ``kind``
    (vdit.distributed.stats). The tensors must be contiguous and stay alive until the returned requests are
    waited on. Two ranks list their transfers to each other in the same order. Returns the requests ([] when
    nothing moves)."""
    if not sends and not recvs:
        return []
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    ops = [dist.P2POp(dist.isend, t, ranks[p], group) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, ranks[p], group) for p, t in recvs]
    record(kind, sum(t.numel() * t.element_size() for _, t in sends))
    return dist.batch_isend_irecv(ops)


def shard_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Token range ``[start, end)`` of ``rank``."""
    return rank * total // world_size, (rank + 1) * total // world_size


def shard_sizes(total: int, world_size: int, bounds: list[int] | None = None) -> list[int]:
    """Token count of every rank's range (``bounds``: see the module docstring; None: equal counts)."""
    bounds = bounds or [r * total // world_size for r in range(world_size + 1)]
    return [b - a for a, b in zip(bounds, bounds[1:])]


LAYOUTS = ("tokens", "work")


def shard_bounds(cu: list[int], world_size: int, layout: str = "tokens", causal: bool = False) -> list[int]:
    """The ``world_size + 1`` range boundaries of a packed batch with offsets ``cu`` (host ints) in
    ``layout`` (``"tokens"`` or ``"work"``, module docstring): rank r holds ``[bounds[r], bounds[r + 1])``.
    With ``causal`` the work layout counts the keys a causal query sees (its position in its sequence
    plus one), which balances each rank's total; it is contiguous, not a zigzag, so the ring's steps
    are not balanced one by one."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    total = cu[-1]
    if layout == "tokens":
        return [r * total // world_size for r in range(world_size + 1)]
    lengths = [b - a for a, b in zip(cu, cu[1:])]

    def work(n: int, first: int) -> int:  # work of the first `first` tokens of an n-token sequence
        return first * (first + 1) // 2 if causal else first * n

    bounds = [0]
    for r in range(1, world_size):
        # The first token whose work before it reaches r / W of the total (integers: scaled by W).
        goal, done, t = r * sum(work(n, n) for n in lengths), 0, total
        for start, n in zip(cu, lengths):
            if n and (done + work(n, n)) * world_size >= goal:
                low, high = 0, n  # smallest j with (done + work(n, j)) * W >= goal
                while low < high:
                    mid = (low + high) // 2
                    low, high = (low, mid) if (done + work(n, mid)) * world_size >= goal else (mid + 1, high)
                t = start + low
                break
            done += work(n, n)
        bounds.append(max(t, bounds[-1]))
    return bounds + [total]


def balanced_split(costs: list[int], parts: int) -> list[list[int]]:
    """Indices of ``costs`` dealt to ``parts`` ranks so that their summed costs are close (longest first, each
    to the least loaded rank; ties to the lower rank), each rank's indices ascending. Deterministic: every
    rank computes the same split. With at least ``parts`` items every rank gets one."""
    loads, split = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(parts), key=lambda r: (loads[r], r))
        loads[r] += costs[i]
        split[r].append(i)
    return [sorted(part) for part in split]


def _score(loads: list[list[float]], means: list[float]) -> tuple[float, float]:
    """(largest load / mean over every group and criterion, sum of the squared excesses over the mean): the
    first is what the split minimises, the second breaks its ties so the search can cross plateaus."""
    ratios = [load[c] / means[c] for load in loads for c in range(len(means)) if means[c] > 0]
    return max(ratios), sum(max(0.0, r - 1.0) ** 2 for r in ratios)


def _best_exchange(split, loads, items, means):
    """The move (``j`` None) or swap of one item ``i`` of group ``g`` with item ``j`` of group ``h`` that lowers
    :func:`_score` the most, as (score, g, h, i, j); None when none lowers it."""
    best, choice, zero = _score(loads, means), None, [0.0] * len(means)
    for g in range(len(split)):
        for h in range(len(split)):
            for i in split[g] if g != h else ():
                for j in [None] + split[h]:
                    cj = zero if j is None else items[j]
                    trial = list(loads)
                    trial[g] = [loads[g][c] - items[i][c] + cj[c] for c in range(len(means))]
                    trial[h] = [loads[h][c] + items[i][c] - cj[c] for c in range(len(means))]
                    score = _score(trial, means)
                    if score < best and best[0] - score[0] > -1e-12:
                        best, choice = score, (g, h, i, j, trial)
    return choice


def _improve(split: list[list[int]], loads, items, means, rounds: int) -> None:
    """Local search in place: up to ``rounds`` best single moves or swaps between two groups."""
    for _ in range(rounds):
        choice = _best_exchange(split, loads, items, means)
        if choice is None:
            return
        g, h, i, j, trial = choice
        loads[:] = trial
        split[g].remove(i)
        split[h].append(i)
        if j is not None:
            split[h].remove(j)
            split[g].append(j)


def cost_balanced_split(tokens: list[int], parts: int, a: float = 0.0, b: float = 1.0,
                        rounds: int = 64) -> list[list[int]]:
    """Indices of videos of ``tokens`` tokens dealt to ``parts`` data-parallel groups so that both the token
    counts and the compute cost ``a * n + b * n**2`` (per-token layers plus attention) are even.

    Balancing tokens alone leaves the group holding the longest videos with far more attention work; balancing
    work alone leaves uneven token counts (the per-token layers, activation memory). Greedy first (costliest
    video to the group whose larger relative load stays smallest), then up to ``rounds`` moves or swaps out of
    the most loaded group. Deterministic: every rank computes the same split; each group's indices ascending.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    items = [[float(n), a * n + b * n * n] for n in tokens]
    means = [sum(item[c] for item in items) / parts for c in range(2)]
    if not any(means):
        return balanced_split(list(tokens), parts)
    loads = [[0.0, 0.0] for _ in range(parts)]
    split: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(items)), key=lambda i: (-items[i][1], -items[i][0], i)):
        g = min(range(parts), key=lambda g: (max((loads[g][c] + items[i][c]) / means[c] for c in range(2)
                                                 if means[c] > 0), g))
        loads[g] = [loads[g][c] + items[i][c] for c in range(2)]
        split[g].append(i)
    _improve(split, loads, items, means, rounds)
    return [sorted(part) for part in split]


def range_lengths(cu: list[int], start: int, end: int) -> list[int]:
    """Each sequence's token count inside the range [start, end) of a packed batch with offsets ``cu`` (host ints)."""
    return [max(0, min(b, end) - max(a, start)) for a, b in zip(cu[:-1], cu[1:])]


def range_offsets(cu: list[int], start: int, end: int) -> list[int]:
    """(B + 1) host offsets of each sequence's tokens inside the range [start, end) (see :func:`range_lengths`)."""
    offsets = [0]
    for n in range_lengths(cu, start, end):
        offsets.append(offsets[-1] + n)
    return offsets


def local_offsets(cu: list[int], start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 (B + 1,) offsets on ``device`` of each sequence's tokens inside the range [start, end) of the
    packed batch whose offsets are ``cu`` (host ints)."""
    return torch.tensor(range_offsets(cu, start, end), dtype=torch.int32, device=device)


def shard_packed(x: torch.Tensor, group=None, bounds: list[int] | None = None) -> torch.Tensor:
    """This rank's range of a full packed tensor ``x`` (total, ...) along dim 0 (a view; no communication);
    ``bounds``: the layout's range boundaries (:func:`shard_bounds`), None for equal token counts."""
    rank, size = world(group)
    start, end = (bounds[rank], bounds[rank + 1]) if bounds else shard_range(x.shape[0], size, rank)
    return x[start:end]


class _GatherPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, total, group, bounds):
        rank, size = world(group)
        sizes = shard_sizes(total, size, bounds)
        check_shard_sizes(x.shape[0], total, group, x.device, bounds)
        ctx.group, ctx.total, ctx.bounds = group, total, bounds
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(size)]
        record("all_gather", (size - 1) * padded.numel() * padded.element_size())
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss may use every token: the gradient of a shard is the sum over ranks of the
        # gradients that flowed into its range (a reduce-scatter).
        grad = grad.contiguous()
        size = dist.get_world_size(ctx.group)
        record("all_reduce", 2 * (size - 1) * grad.numel() * grad.element_size() // size)  # ring all-reduce
        dist.all_reduce(grad, group=ctx.group)
        return shard_packed(grad, ctx.group, ctx.bounds), None, None, None


def gather_packed(x_shard: torch.Tensor, total: int, group=None, bounds: list[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`shard_packed` (same ``bounds``): all-gather the shards into the full (total, ...) tensor.

    Differentiable: the gradient of each rank's shard is the sum over ranks of the gradient of its range.
    """
    return _GatherPacked.apply(x_shard, total, group, bounds)


class _ReplicatedInput(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (an input every rank holds in
    full, of which each rank uses a part)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        size = dist.get_world_size(ctx.group)
        record("all_reduce", 2 * (size - 1) * grad.numel() * grad.element_size() // size)  # ring all-reduce
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def replicated(x: torch.Tensor, group=None) -> torch.Tensor:
    return _ReplicatedInput.apply(x, group)


def check_shard_sizes(local_tokens: int, total: int, group=None, device: torch.device | str = "cpu",
                      bounds: list[int] | None = None) -> None:
    """Every rank must hold its contract range of ``total`` tokens (``bounds``: the layout's, None for equal
    counts); raises on every rank otherwise. ``device``: the data's (the collective's tensors live there;
    NCCL takes CUDA tensors only)."""
    rank, size = world(group)
    mine = torch.tensor([local_tokens, total], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine, group=group)
    expected = shard_sizes(total, size, bounds)
    wrong = [(r, int(t[0])) for r, t in enumerate(everyone) if int(t[0]) != expected[r] or int(t[1]) != total]
    if wrong:
        raise ValueError(f"shards do not follow the contract for total = {total} tokens over {size} ranks "
                         f"(expected sizes {expected}); rank: size of the offenders {wrong}")


def check_consistent(group, device: torch.device | str, **values: torch.Tensor | int) -> None:
    """Raise the same ValueError on every rank if any value differs across ranks (instead of hanging later).

    Tensors are compared by content (a checksum computed on ``device``, the data's, where the collective
    runs); every rank must call this with the same names.
    """
    rank, size = world(group)
    local = []
    for v in values.values():
        if isinstance(v, torch.Tensor):
            flat = v.detach().to(device, torch.float64).flatten()
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=device)
            local.append(torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(), (flat * weights).sum()]))
        else:
            local.append(torch.tensor([float(v)], dtype=torch.float64, device=device))
    mine = torch.cat(local)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine, group=group)
    bad = [r for r, other in enumerate(everyone) if not torch.equal(other, everyone[0])]
    if bad:
        raise ValueError(f"{', '.join(values)} must be identical on every rank of the group; "
                         f"ranks {bad} differ from rank 0")
