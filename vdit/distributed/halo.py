"""Sliding-tile attention under ring sequence parallelism by halo exchange.

A sliding-tile window reaches a bounded number of tiles around each query tile, and the tokens are in tile
order, so the key tiles a rank's queries attend lie in one contiguous token range around the rank's own: its
range plus a halo on each side, sized by the window (about ``window_t // 2`` tile planes of the video before and
after). Each rank receives only those halo rows of k and v, from the ranks that own them, and attends its own
query tiles over the buffer ``[halo before | own rows | halo after]`` with explicit tile lists
(:func:`vdit.ops.sparse_attention.block_sparse_attention_tiles`); in the backward the halo rows' key/value
gradients go back to their owners. No k/v travels around the ring and no rank computes another rank's queries.

Why it is exact: the buffer holds every key tile the rank's query tiles list (the halo is taken from the lists
themselves). A query tile cut by a range boundary sits in the buffer whole: the other rank's rows of it get
zero queries and their outputs are dropped, so they receive no output gradient and contribute no key/value
gradient (dS = P * (dP - D) with dP = dO V^T = 0 and D = rowsum(dO * O) = 0 on those rows).
"""
from __future__ import annotations

import bisect
import dataclasses

import torch

from vdit.distributed.sharding import start_p2p, world
from vdit.ops.sparse_attention import block_sparse_attention_tiles
from vdit.ops.tiles import sliding_window_tiles, tile_layout, to_global


@dataclasses.dataclass
class HaloPlan:
    """One rank's halo for a batch, tile size and window.

    Attributes:
        own: (start, end) of the rank's token range; buffer: (start, end) of its buffer (own range and halo).
        offsets: int32 (buffer tiles + 1,) token offsets of the buffer's tiles, from 0 (on the data's device).
        lists: int32 (buffer tiles, Hw, K) the key tiles (buffer indices) of each of the rank's query tiles,
            -1 for the halo's own query tiles (not computed here) and unused slots.
        recv: (source rank, start, end) of the halo rows received, in token order.
        send: (destination rank, start, end) of this rank's rows another rank takes as its halo.
    """

    own: tuple[int, int]
    buffer: tuple[int, int]
    offsets: torch.Tensor
    lists: torch.Tensor
    recv: list[tuple[int, int, int]]
    send: list[tuple[int, int, int]]

    def moved_rows(self) -> int:
        """Rows this rank receives (forward) and sends back (backward), each for k and for v."""
        return sum(b - a for _, a, b in self.recv)


def halo_plan(cu: list[int], grids: torch.Tensor, tile: tuple, window: torch.Tensor, bounds: list[int], rank: int,
              device) -> HaloPlan:
    """The :class:`HaloPlan` of ``rank`` (every rank computes every rank's buffer, so sends and receives pair up).

    Args:
        cu: the batch's offsets (host ints); grids: int (B, 3) token grids; tile: (tt, th, tw); window: int
            (Hw, 3) window rows (one, or one per head); bounds: every rank's range boundaries; device: the data's.
    """
    layout = tile_layout(grids.cpu(), tile, "cpu")
    lists = to_global(layout, sliding_window_tiles(layout, window.cpu()))  # (tiles, Hw, K), -1 unused
    offsets = layout.offsets.tolist()
    # The span of key tiles each query tile lists: a rank's halo is the union over its query tiles.
    valid = lists >= 0
    lo = torch.where(valid, lists, lists.new_full((), 2 ** 30)).flatten(1).min(1).values.tolist()
    hi = torch.where(valid, lists, lists.new_full((), -1)).flatten(1).max(1).values.tolist()

    def tiles_of(start: int, end: int) -> tuple[int, int]:
        """The tiles [first, last) holding tokens [start, end) (empty range: none)."""
        if start >= end:
            return 0, 0
        return bisect.bisect_right(offsets, start) - 1, bisect.bisect_right(offsets, end - 1)

    buffers = []
    for r in range(len(bounds) - 1):
        first, last = tiles_of(bounds[r], bounds[r + 1])
        if first == last:
            buffers.append((bounds[r], bounds[r], first, first))
            continue
        u0 = min([first] + [lo[t] for t in range(first, last) if hi[t] >= 0])
        u1 = max([last] + [hi[t] + 1 for t in range(first, last) if hi[t] >= 0])
        buffers.append((offsets[u0], offsets[u1], u0, u1))
    s, e = bounds[rank], bounds[rank + 1]
    k0, k1, u0, u1 = buffers[rank]
    first, last = tiles_of(s, e)
    mine = torch.full((u1 - u0, lists.shape[1], lists.shape[2]), -1, dtype=torch.int32, device="cpu")
    if first < last:
        rows = lists[first:last]
        mine[first - u0:last - u0] = torch.where(rows >= 0, rows - u0, -1).to(torch.int32)
    recv = [(o, max(k0, bounds[o]), min(k1, bounds[o + 1])) for o in range(len(bounds) - 1)
            if o != rank and max(k0, bounds[o]) < min(k1, bounds[o + 1])]
    send = [(r, max(b0, s), min(b1, e)) for r, (b0, b1, _, _) in enumerate(buffers)
            if r != rank and max(b0, s) < min(b1, e)]
    starts = [o - k0 for o in offsets[u0:u1 + 1]] if u0 < u1 else [0]  # a rank without tokens: no tiles
    buffer_offsets = torch.tensor(starts, dtype=torch.int32, device=device)
    return HaloPlan((s, e), (k0, k1), buffer_offsets, mine.to(device), recv, send)


def _exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]], group) -> None:
    """Each (peer, tensor) of ``sends`` to that peer and each of ``recvs`` filled from it, waited for."""
    sends = [(p, t.contiguous()) for p, t in sends]  # kept alive until the transfers are done
    for request in start_p2p(sends, recvs, group, "halo_p2p"):
        request.wait()


class HaloExchange(torch.autograd.Function):
    """(k, v) of this rank's range -> (k, v) of its buffer; the backward returns the halo's gradients to their
    owners and adds the gradients other ranks computed for this rank's rows."""

    @staticmethod
    def forward(ctx, k, v, plan: HaloPlan, group):
        s = plan.own[0]
        pieces = {p: (k.new_empty((b - a, *k.shape[1:])), v.new_empty((b - a, *v.shape[1:])))
                  for p, a, b in plan.recv}
        sends = [(p, t[a - s:b - s]) for p, a, b in plan.send for t in (k, v)]
        _exchange(sends, [(p, t) for p, pair in pieces.items() for t in pair], group)
        before = [pieces[p] for p, a, _ in plan.recv if a < s]
        after = [pieces[p] for p, a, _ in plan.recv if a >= s]
        ctx.plan, ctx.group = plan, group
        return (torch.cat([x for x, _ in before] + [k] + [x for x, _ in after]),
                torch.cat([y for _, y in before] + [v] + [y for _, y in after]))

    @staticmethod
    def backward(ctx, dk_buffer, dv_buffer):
        plan = ctx.plan
        (s, e), (k0, _) = plan.own, plan.buffer
        dk, dv = dk_buffer[s - k0:e - k0].clone(), dv_buffer[s - k0:e - k0].clone()
        sends = [(p, t[a - k0:b - k0]) for p, a, b in plan.recv for t in (dk_buffer, dv_buffer)]
        partials = [(p, a, b, dk.new_empty((b - a, *dk.shape[1:])), dv.new_empty((b - a, *dv.shape[1:])))
                    for p, a, b in plan.send]
        _exchange(sends, [(p, t) for p, _, _, x, y in partials for t in (x, y)], ctx.group)
        for _, a, b, x, y in partials:
            dk[a - s:b - s] += x
            dv[a - s:b - s] += y
        return dk, dv, None, None


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HaloPlan, group) -> torch.Tensor:
    """Sliding-tile attention of this rank's queries (n_r, Hq, D) over its buffer: (n_r, Hq, D)."""
    _, size = world(group)
    (s, e), (k0, k1) = plan.own, plan.buffer
    if size == 1:
        kb, vb = k, v
    else:
        kb, vb = HaloExchange.apply(k, v, plan, group)
    if s == e:  # no query here; the exchange above still ran, so every rank joined it
        return q + (kb.sum() + vb.sum()) * 0
    qb = torch.cat([q.new_zeros((s - k0, *q.shape[1:])), q, q.new_zeros((k1 - e, *q.shape[1:]))])
    return block_sparse_attention_tiles(qb, kb, vb, plan.offsets, plan.lists)[s - k0:e - k0]
