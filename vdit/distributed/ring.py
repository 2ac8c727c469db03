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

import torch
import torch.distributed as dist

from vdit.distributed.sharding import local_offsets, shard_range, shard_sizes, world
from vdit.distributed.stats import record
from vdit.ops import varlen_attention
from vdit.ops.attention import varlen_attention_backward
from vdit.ops.reference import compute_dtype


def _block_forward(q, k, v, cu_q, cu_k, scale, causal):
    return varlen_attention(q, k, v, cu_q.to(q.device), cu_k.to(q.device), softmax_scale=scale, causal=causal,
                            return_lse=True)


def _block_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal):
    return varlen_attention_backward(dout, q, k, v, out, lse, cu_q.to(q.device), cu_k.to(q.device),
                                     softmax_scale=scale, causal=causal)


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


def _pairs(rank, size, total_q, total_k, cu_q, cu_k, kv_replicated, causal):
    """For each ring step: (owner of the key/value block, local q offsets, local k offsets, causal) or None."""
    q0, q1 = shard_range(total_q, size, rank)
    cq = local_offsets(cu_q, q0, q1)
    steps = []
    for step in range(1 if kv_replicated else size):
        owner = (rank - step) % size
        k0, k1 = (0, total_k) if kv_replicated else shard_range(total_k, size, owner)
        if causal and owner > rank:
            steps.append(None)
            continue
        steps.append((owner, cq, local_offsets(cu_k, k0, k1), causal and owner == rank))
    return steps


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, scale, causal, kv_replicated, group):
        rank, size = world(group)
        cu_q_list, cu_k_list = cu_q.tolist(), cu_k.tolist()
        total_q, total_k = cu_q_list[-1], cu_k_list[-1]
        pairs = _pairs(rank, size, total_q, total_k, cu_q_list, cu_k_list, kv_replicated, causal)
        cd = compute_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=cd, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=cd, device=q.device)
        kb, vb = k, v
        sizes = shard_sizes(total_k, size)
        for step, pair in enumerate(pairs):
            transfer = _next_block(step, len(pairs), [kb, vb], group, sizes)
            if pair is not None:
                _, cq, ck, blk_causal = pair
                o_b, l_b = _block_forward(q, kb, vb, cq, ck, scale, blk_causal)
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
            _, cq, ck, blk_causal = ctx.pairs[0]
            dq, dk, dv = _block_backward(dout, q, k, v, out, lse, cq, ck, ctx.scale, blk_causal)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None
        sizes = shard_sizes(ctx.total_k, size)
        longest = max(sizes)
        # Partial key/value gradients for every owner, padded so one reduce-scatter returns them.
        dkv = torch.zeros((size, 2, longest, *k.shape[1:]), dtype=cd, device=k.device)
        kb, vb = k, v
        for step, pair in enumerate(ctx.pairs):
            transfer = _next_block(step, len(ctx.pairs), [kb, vb], ctx.group, sizes)
            if pair is not None:
                owner, cq, ck, blk_causal = pair
                dq_b, dk_b, dv_b = _block_backward(dout, q, kb, vb, out, lse, cq, ck, ctx.scale, blk_causal)
                dq += dq_b.to(cd)
                dkv[owner, 0, : kb.shape[0]] += dk_b.to(cd)
                dkv[owner, 1, : vb.shape[0]] += dv_b.to(cd)
            if transfer is not None:
                kb, vb = transfer.wait()
        mine = torch.empty((2, longest, *k.shape[1:]), dtype=cd, device=k.device)
        record("reduce_scatter", dkv.numel() * dkv.element_size() * (size - 1) // size)
        dist.reduce_scatter_tensor(mine.view(-1, *k.shape[1:]), dkv.view(-1, *k.shape[1:]), group=ctx.group)
        n = sizes[rank]
        return (dq.to(q.dtype), mine[0, :n].to(k.dtype), mine[1, :n].to(v.dtype), None, None, None, None, None, None)
