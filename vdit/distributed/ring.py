"""Ring sequence parallelism: each rank keeps its query range while key/value shards travel around the
ring; partial results merge exactly through their log-sum-exp.

For the pair (query shard of rank r, key/value shard of rank s) only tokens of the same sequence
interact. Since both shards are contiguous ranges of the packed batch, the tokens of each sequence
inside them are again contiguous, so the pair is one ordinary varlen attention call with offsets cut
from the global ``cu_seqlens``. Causal self-attention: shards s < r see all keys, s == r is the causal
diagonal (same ranges, so the bottom-right alignment is exact), s > r is skipped.

Blocks go straight from their owner to the ranks that need them: at step s rank r attends owner
(r - s)'s block, which that owner sends it directly, and only when the two ranges share a sequence (and,
causal, the keys do not lie after the queries). A packed batch of many short sequences thus moves only the
blocks that are used, instead of relaying every block around the whole ring.

The backward recomputes each pair with the merged output and log-sum-exp (as FlashAttention's
backward does). A block's partial key/value gradients go straight back to its owner as soon as they are
computed, in the input dtype (the bytes of the block itself), overlapped with the next block's compute, and
only where the block moved; each owner accumulates its own block's partials in fp32. A rank's gradient
memory is thus its own block in fp32 plus one block in flight, not a buffer for every owner.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from vdit._cache import reserve_offsets
from vdit.distributed.sharding import range_lengths, range_offsets, start_p2p, world
from vdit.ops import varlen_attention
from vdit.ops._shared import compute_dtype
from vdit.ops.attention import varlen_attention_backward


class Step(NamedTuple):
    """One ring step of this rank: whose key/value block it holds, and the block pair's offsets (int32, on
    the data's device) and longest sequences, cut from the batch's global offsets."""

    owner: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool


class BatchPlan:
    """What every layer of one batch shares, read on the host once: the global offsets (host ints), their
    totals and longest sequences, and per ring (its size, this rank, causal, kv_replicated) the ring's steps
    (:class:`Step`, offsets on the data's device), so that layers after the first make no host
    synchronisation and no host-to-device copy."""

    def __init__(self, cu_q: list[int], cu_k: list[int], bounds_q: list[int] | None = None,
                 bounds_k: list[int] | None = None):
        self.cu_q, self.cu_k = cu_q, cu_k
        self.total_q, self.total_k = cu_q[-1], cu_k[-1]
        self._bounds = (bounds_q, bounds_k)  # the group's range boundaries (vdit.distributed.sharding)
        self.max_q = max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0)
        self.max_k = max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0)
        self._steps: dict = {}
        self._needed: dict = {}
        self.extras: dict = {}  # what other schemes derive from the batch once (vdit.distributed.halo plans)

    def bounds(self, size: int, keys: bool = False) -> list[int]:
        """Range boundaries of the queries (or ``keys``) in a ring of ``size``: the group's own, or every
        (group size / size)-th of them for a ring across Ulysses groups (each holds its group's ranges)."""
        full, total = (self._bounds[1], self.total_k) if keys else (self._bounds[0], self.total_q)
        if full is None:
            return [r * total // size for r in range(size + 1)]
        return full[::(len(full) - 1) // size]

    def needed(self, size: int, causal: bool, kv_replicated: bool) -> list[list[bool]]:
        """``needed[r][o]``: rank r's queries attend some key of owner o's block (a sequence in both ranges;
        with ``causal`` also o <= r), in a ring of ``size``."""
        key = (size, causal, kv_replicated)
        if key not in self._needed:
            bq, bk = self.bounds(size), self.bounds(size, keys=True)
            q_lengths = [range_lengths(self.cu_q, bq[r], bq[r + 1]) for r in range(size)]
            k_lengths = ([range_lengths(self.cu_k, 0, self.total_k)] * size if kv_replicated else
                         [range_lengths(self.cu_k, bk[o], bk[o + 1]) for o in range(size)])
            self._needed[key] = [[any(a and b for a, b in zip(q_lengths[r], k_lengths[o])) and not (causal and o > r)
                                  for o in range(size)] for r in range(size)]
        return self._needed[key]

    def ring_steps(self, rank: int, size: int, causal: bool, kv_replicated: bool, device) -> list[Step | None]:
        """For each ring step of ``rank`` in a ring of ``size``: its :class:`Step`, or None when the block
        is not needed (no shared sequence, or causal attention with the keys after the queries)."""
        key = (rank, size, causal, kv_replicated, str(device))
        if key not in self._steps:
            reserve_offsets(size)  # each layer cycles through the ring's pairs: the caches must hold them all
            needed = self.needed(size, causal, kv_replicated)
            bq, bk = self.bounds(size), self.bounds(size, keys=True)
            cq = range_offsets(self.cu_q, bq[rank], bq[rank + 1])
            cq_device = torch.tensor(cq, dtype=torch.int32, device=device)
            steps = []
            for step in range(1 if kv_replicated else size):
                owner = (rank - step) % size
                if not needed[rank][owner]:
                    steps.append(None)
                    continue
                k0, k1 = (0, self.total_k) if kv_replicated else (bk[owner], bk[owner + 1])
                ck = range_offsets(self.cu_k, k0, k1)
                steps.append(Step(owner, cq_device, torch.tensor(ck, dtype=torch.int32, device=device),
                                  max(b - a for a, b in zip(cq, cq[1:])), max(b - a for a, b in zip(ck, ck[1:])),
                                  causal and owner == rank))
            self._steps[key] = steps
        return self._steps[key]


def _block_forward(q, k, v, step: Step, scale):
    return varlen_attention(q, k, v, step.cu_q, step.cu_k, step.max_q, step.max_k, softmax_scale=scale,
                            causal=step.causal, return_lse=True)


def _block_backward(dout, q, k, v, out, lse, step: Step, scale):
    return varlen_attention_backward(dout, q, k, v, out, lse, step.cu_q, step.cu_k, softmax_scale=scale,
                                     causal=step.causal)


def _merge(out, lse, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets: (Hq, n) lse, (n, Hq, D) outputs."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w_a = torch.exp(lse - safe).transpose(0, 1)[..., None]
    w_b = torch.exp(lse_b - safe).transpose(0, 1)[..., None]
    return out * w_a + out_b.to(out.dtype) * w_b, new


class _Transfer:
    """One step's point-to-point transfers, started in the background: this rank's own key/value block to
    the rank that needs it, the block it needs from another; ``wait()`` returns the received tensors ([]
    when it receives none). Started before the previous block's compute, so the transfer overlaps it
    wherever the backend progresses point-to-point transfers asynchronously (NCCL, gloo)."""

    def __init__(self, send: list[torch.Tensor], dst: int | None, like: list[torch.Tensor], src: int | None,
                 recv_tokens: int, group):
        self.sent = [t.contiguous() for t in send] if dst is not None else []  # kept alive until wait()
        self.received = [t.new_empty((recv_tokens, *t.shape[1:])) for t in like] if src is not None else []
        self.requests = start_p2p([(dst, t) for t in self.sent], [(src, r) for r in self.received], group,
                                  "ring_p2p")

    def wait(self) -> list[torch.Tensor]:
        for req in self.requests:
            req.wait()
        return self.received


def _start_step(step: int, needed, k, v, group, sizes) -> _Transfer | None:
    """Start the transfers of ring step ``step``: this rank's block to rank + step if that rank needs it,
    and rank - step's block if this rank needs it; None when neither (or past the last step)."""
    rank, size = world(group)
    if step >= size:
        return None
    dst, src = (rank + step) % size, (rank - step) % size
    send, recv = needed[dst][rank], needed[rank][src]
    if not (send or recv):
        return None
    return _Transfer([k, v], dst if send else None, [k, v], src if recv else None, sizes[src], group)


def _start_return(step: int, partial: list[torch.Tensor] | None, needed, like: list[torch.Tensor], group,
                  ) -> _Transfer | None:
    """Start ring step ``step``'s gradient return: ``partial`` (this rank's dK, dV of owner rank - step's
    block, None when it computed none) goes back to that owner, and the partial of this rank's own block
    computed by rank + step comes in (shaped like ``like``, this rank's k and v); None when neither."""
    rank, size = world(group)
    owner, helper = (rank - step) % size, (rank + step) % size
    recv = needed[helper][rank]
    if partial is None and not recv:
        return None
    return _Transfer(partial or [], owner if partial is not None else None, like, helper if recv else None,
                     like[0].shape[0], group)


def _blocks(k, v, steps: list, needed, group, sizes):
    """Yield (step index, that step's key/value block, or None when this rank receives none) in ring
    order. Step i + 1's transfer starts before step i's block is yielded, so it overlaps the caller's
    compute on it."""
    upcoming = _start_step(1, needed, k, v, group, sizes) if len(steps) > 1 else None
    yield 0, (k, v)  # this rank's own block
    for index in range(1, len(steps)):
        current = upcoming
        upcoming = _start_step(index + 1, needed, k, v, group, sizes) if index + 1 < len(steps) else None
        received = current.wait() if current is not None else []
        yield index, (tuple(received) or None)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BatchPlan, scale, causal, kv_replicated, group):
        rank, size = world(group)
        pairs = plan.ring_steps(rank, size, causal, kv_replicated, q.device)
        needed = plan.needed(size, causal, kv_replicated)
        cd = compute_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=cd, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=cd, device=q.device)
        bounds = plan.bounds(size, keys=True)
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        for index, block in _blocks(k, v, pairs, needed, group, sizes):
            if pairs[index] is not None:
                o_b, l_b = _block_forward(q, *block, pairs[index], scale)
                out, lse = _merge(out, lse, o_b, l_b.to(cd))
        out = out.to(q.dtype)
        lse = lse.to(compute_dtype(q.dtype))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pairs, ctx.needed, ctx.scale, ctx.group = pairs, needed, scale, group
        ctx.sizes, ctx.kv_replicated = sizes, kv_replicated
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cd = compute_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        if ctx.kv_replicated:
            if ctx.pairs[0] is None:  # no query of this rank sees any key
                return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None, None
            dq, dk, dv = _block_backward(dout, q, k, v, out, lse, ctx.pairs[0], ctx.scale)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None
        # This rank's own block's gradients, accumulated in fp32 from its own pair and the partials coming back.
        dk, dv = torch.zeros(k.shape, dtype=cd, device=k.device), torch.zeros(v.shape, dtype=cd, device=v.device)
        pending = None
        for index, block in _blocks(k, v, ctx.pairs, ctx.needed, ctx.group, ctx.sizes):
            pair, partial = ctx.pairs[index], None
            if pair is not None:
                kb, vb = block
                dq_b, dk_b, dv_b = _block_backward(dout, q, kb, vb, out, lse, pair, ctx.scale)
                dq += dq_b.to(cd)
                if index == 0:
                    dk += dk_b.to(cd)
                    dv += dv_b.to(cd)
                else:
                    partial = [dk_b.to(k.dtype), dv_b.to(v.dtype)]
            started = _start_return(index, partial, ctx.needed, [k, v], ctx.group) if index > 0 else None
            if pending is not None:  # the previous step's return overlapped this step's compute
                _accumulate(pending, dk, dv)
            pending = started
        if pending is not None:
            _accumulate(pending, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _accumulate(transfer: _Transfer, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Wait for ``transfer`` and add the partial gradients it brought (if any) to ``dk`` / ``dv`` (fp32)."""
    received = transfer.wait()
    if received:
        dk += received[0].to(dk.dtype)
        dv += received[1].to(dv.dtype)
