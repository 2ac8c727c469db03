"""Ring sequence parallelism: each rank keeps its query range while key/value shards travel around the
ring; partial results merge exactly through their log-sum-exp.

For the pair (query shard of rank r, key/value shard of rank s) only tokens of the same sequence
interact. Since both shards are contiguous ranges of the packed batch, the tokens of each sequence
inside them are again contiguous, so the pair is one ordinary varlen attention call with offsets cut
from the global ``cu_seqlens``. Causal self-attention: shards s < r see all keys, s == r is the causal
diagonal (same ranges, so the bottom-right alignment is exact), s > r is skipped.

The backward recomputes each pair with the merged output and log-sum-exp (as FlashAttention's
backward does) and reduce-scatters the key/value gradients back to their owners.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from vdit.distributed.sharding import shard_range, shard_sizes, world
from vdit.distributed.stats import record
from vdit.ops import varlen_attention
from vdit.ops.attention import varlen_attention_backward
from vdit.ops.reference import compute_dtype


class Step(NamedTuple):
    """One ring step of this rank: whose key/value block it holds, and the block pair's offsets (int32, on
    the data's device) and longest sequences, cut from the batch's global offsets."""

    owner: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool


def _local(cu: list[int], start: int, end: int) -> list[int]:
    """Offsets of each sequence's tokens inside the range [start, end) of a batch with offsets ``cu``."""
    out = [0]
    for a, b in zip(cu[:-1], cu[1:]):
        out.append(out[-1] + max(0, min(b, end) - max(a, start)))
    return out


class BatchPlan:
    """What every layer of one batch shares, read on the host once: the global offsets (host ints), their
    totals and longest sequences, and per ring layout the ring's steps (:class:`Step`, offsets on the data's
    device), so that layers after the first make no host synchronisation and no host-to-device copy."""

    def __init__(self, cu_q: list[int], cu_k: list[int]):
        self.cu_q, self.cu_k = cu_q, cu_k
        self.total_q, self.total_k = cu_q[-1], cu_k[-1]
        self.max_q = max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0)
        self.max_k = max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0)
        self._steps: dict = {}

    def ring_steps(self, rank: int, size: int, causal: bool, kv_replicated: bool, device) -> list[Step | None]:
        """For each ring step of ``rank`` in a ring of ``size``: its :class:`Step`, or None when causal
        attention skips it (the key block lies after the queries)."""
        key = (rank, size, causal, kv_replicated, str(device))
        if key not in self._steps:
            q0, q1 = shard_range(self.total_q, size, rank)
            cq = _local(self.cu_q, q0, q1)
            cq_device = torch.tensor(cq, dtype=torch.int32, device=device)
            steps = []
            for step in range(1 if kv_replicated else size):
                owner = (rank - step) % size
                if causal and owner > rank:
                    steps.append(None)
                    continue
                k0, k1 = (0, self.total_k) if kv_replicated else shard_range(self.total_k, size, owner)
                ck = _local(self.cu_k, k0, k1)
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


class _RingPass:
    """Send ``tensors`` to rank r+1 and receive rank r-1's (leading sizes ``sizes_from``) in the background;
    ``wait()`` returns the received tensors. Started before the current block's compute, so the transfer
    overlaps it wherever the backend progresses point-to-point transfers asynchronously (NCCL, gloo)."""

    def __init__(self, tensors, group, sizes_from):
        rank, size = world(group)
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        self.received = [t.new_empty((n, *t.shape[1:])) for t, n in zip(tensors, sizes_from)]
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
        self.sent = [t.contiguous() for t in tensors]  # keep the send buffers alive until wait()
        ops = [dist.P2POp(dist.isend, t, ranks[nxt], group) for t in self.sent]
        ops += [dist.P2POp(dist.irecv, r, ranks[prv], group) for r in self.received]
        record("ring_p2p", sum(t.numel() * t.element_size() for t in self.sent))
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self):
        for req in self.requests:
            req.wait()
        return self.received


def _next_block(step, steps, tensors, group, sizes):
    """Start passing the current key/value block on, unless this is the last step."""
    if step + 1 >= steps:
        return None
    rank, size = world(group)
    n = sizes[(rank - step - 1) % size]
    return _RingPass(tensors, group, [n] * len(tensors))


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BatchPlan, scale, causal, kv_replicated, group):
        rank, size = world(group)
        total_k = plan.total_k
        pairs = plan.ring_steps(rank, size, causal, kv_replicated, q.device)
        cd = compute_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=cd, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=cd, device=q.device)
        kb, vb = k, v
        sizes = shard_sizes(total_k, size)
        for step, pair in enumerate(pairs):
            transfer = _next_block(step, len(pairs), [kb, vb], group, sizes)
            if pair is not None:
                o_b, l_b = _block_forward(q, kb, vb, pair, scale)
                out, lse = _merge(out, lse, o_b, l_b.to(cd))
            if transfer is not None:
                kb, vb = transfer.wait()
        out = out.to(q.dtype)
        lse = lse.to(compute_dtype(q.dtype))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pairs, ctx.scale, ctx.group, ctx.total_k, ctx.kv_replicated = pairs, scale, group, total_k, kv_replicated
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        rank, size = world(ctx.group)
        cd = compute_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        if ctx.kv_replicated:
            dq, dk, dv = _block_backward(dout, q, k, v, out, lse, ctx.pairs[0], ctx.scale)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None
        sizes = shard_sizes(ctx.total_k, size)
        longest = max(sizes)
        # Partial key/value gradients for every owner, padded so one reduce-scatter returns them.
        dkv = torch.zeros((size, 2, longest, *k.shape[1:]), dtype=cd, device=k.device)
        kb, vb = k, v
        for step, pair in enumerate(ctx.pairs):
            transfer = _next_block(step, len(ctx.pairs), [kb, vb], ctx.group, sizes)
            if pair is not None:
                owner = pair.owner
                dq_b, dk_b, dv_b = _block_backward(dout, q, kb, vb, out, lse, pair, ctx.scale)
                dq += dq_b.to(cd)
                dkv[owner, 0, : kb.shape[0]] += dk_b.to(cd)
                dkv[owner, 1, : vb.shape[0]] += dv_b.to(cd)
            if transfer is not None:
                kb, vb = transfer.wait()
        mine = torch.empty((2, longest, *k.shape[1:]), dtype=cd, device=k.device)
        record("reduce_scatter", dkv.numel() * dkv.element_size() * (size - 1) // size)
        dist.reduce_scatter_tensor(mine.view(-1, *k.shape[1:]), dkv.view(-1, *k.shape[1:]), group=ctx.group)
        n = sizes[rank]
        return (dq.to(q.dtype), mine[0, :n].to(k.dtype), mine[1, :n].to(v.dtype), None, None, None, None, None)
