"""Sequence-parallel attention on CPU (gloo): time and bytes sent per rank for 1, 2, 4 ranks.

    torchrun --nproc_per_node 2 benchmarks/distributed_scaling.py      # prints markdown rows (rank 0)
    python benchmarks/distributed_scaling.py --plan                      # ring transfers and work per rank
    torchrun --nproc_per_node 4 benchmarks/distributed_scaling.py --sparse   # bytes of sliding-tile attention

Batch: a mixed packed batch of four latent videos (patch 1x2x2) of 1536, 768, 384 and 96 tokens,
8 heads of dim 64, fp32; forward + backward of one self-attention, median of 3 runs after a warm-up.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from vdit.distributed import build_mesh, sequence_parallel_attention, shard_packed
from vdit.distributed.stats import count_communication
from vdit.ops import varlen_attention

LENGTHS = [1536, 768, 384, 96]
HEADS, DIM = 8, 64


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    total = sum(LENGTHS)
    cu = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(LENGTHS).cumsum(0)
    q, k, v, g = (torch.randn(total, HEADS, DIM) for _ in range(4))
    modes = ["single"] if world == 1 else ["ulysses", "ring"] + (["hybrid"] if world >= 4 else [])
    # hybrid's Ulysses and ring groups, made up front on every rank
    subgroups = build_mesh("cpu", world, "hybrid", 2).sequence_parallel.subgroups if "hybrid" in modes else None
    for mode in modes:
        times, sent = [], None
        for it in range(4):
            if mode == "single":
                qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
                gs = g
            else:
                qs, ks, vs = (shard_packed(t).clone().requires_grad_() for t in (q, k, v))
                gs = shard_packed(g)
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            with count_communication() as counter:
                if mode == "single":
                    out = varlen_attention(qs, ks, vs, cu, cu, max(LENGTHS), max(LENGTHS))
                else:
                    out = sequence_parallel_attention(qs, ks, vs, cu, cu, mode=mode, ulysses_size=2,
                                                      subgroups=subgroups if mode == "hybrid" else None)
                out.backward(gs)
            if world > 1:
                dist.barrier()
            if it:
                times.append(time.perf_counter() - start)
            sent = counter.total
        if rank == 0:
            print(f"| {world} | {mode} | {statistics.median(times) * 1e3:.0f} | {sent / 2**20:.2f} |", flush=True)
    if world > 1:
        dist.destroy_process_group()


SPARSE_GRIDS = [(6, 16, 16), (3, 16, 16), (6, 8, 8), (6, 4, 4)]  # the LENGTHS videos' token grids


def sparse_bytes() -> None:
    """Print (rank 0) the bytes each rank sends, at most over ranks, for one forward + backward of sliding-tile
    attention (tile 2x4x4, window 3x3x3) on the benchmark batch, per scheme, beside dense attention's."""
    from vdit.distributed import SequenceParallel
    from vdit.distributed.sparse import sparse_attention
    from vdit.ops import SparsePattern

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    total = sum(LENGTHS)
    cu = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(LENGTHS).cumsum(0)
    grids = torch.tensor(SPARSE_GRIDS)
    pattern = SparsePattern("sliding_tile", (2, 4, 4), window=(3, 3, 3))
    q, k, v, g = (torch.randn(total, HEADS, DIM) for _ in range(4))
    modes = ["ulysses", "ring"] + (["hybrid"] if world >= 4 else [])
    mesh = build_mesh("cpu", world, "hybrid", 2).sequence_parallel if "hybrid" in modes else None
    for mode in modes:
        sp = mesh if mode == "hybrid" else SequenceParallel(mode=mode)
        sent = {}
        for kind in ("dense", "sparse"):
            qs, ks, vs = (shard_packed(t).clone().requires_grad_() for t in (q, k, v))
            with count_communication() as counter:
                if kind == "dense":
                    out = sp.attention(qs, ks, vs, cu, cu)
                else:
                    out, _ = sparse_attention(sp, pattern, qs, ks, vs, cu, grids)
                out.backward(shard_packed(g))
            mine = torch.tensor([counter.total], dtype=torch.int64)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            sent[kind] = int(mine)
        if rank == 0:
            print(f"| {world} | {mode} | {sent['dense'] / 2**20:.2f} | {sent['sparse'] / 2**20:.2f} | "
                  f"{sent['sparse'] / sent['dense']:.2f} |", flush=True)


def ring_plan_table(lengths=LENGTHS, sizes=(2, 4, 8)) -> str:
    """Markdown: per ring size, the block transfers of one ring attention forward (relayed around the ring,
    as before, against sent directly to the ranks that need them) and the attention work per rank
    (query-key pairs) as max / mean and max / min, for equal token counts per rank (before) and for the
    ``"work"`` layout (after). From the batch plan alone: no process group needed."""
    from vdit.distributed.ring import BatchPlan
    from vdit.distributed.sharding import range_lengths, shard_bounds

    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    rows = ["| ranks | block transfers, relayed (before) | direct, equal tokens | direct, work layout | work per rank "
            "max / mean, max / min: equal tokens (before) | work layout |", "|---|---|---|---|---|---|"]
    for size in sizes:
        balance, direct = [], []
        for layout in ("tokens", "work"):
            bounds = shard_bounds(cu, size, layout)
            q = [range_lengths(cu, bounds[r], bounds[r + 1]) for r in range(size)]
            work = [sum(a * (e - s_) for a, s_, e in zip(q[r], cu, cu[1:])) for r in range(size)]
            balance.append(f"{max(work) / (sum(work) / size):.2f}, {max(work) / max(min(work), 1):.1f}")
            needed = BatchPlan(cu, cu, bounds, bounds).needed(size, False, False)
            direct.append(sum(needed[r][o] for r in range(size) for o in range(size) if r != o))
        rows.append(f"| {size} | {size * (size - 1)} | {direct[0]} | {direct[1]} | {balance[0]} | {balance[1]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if os.environ.get("WORLD_SIZE") is None and "--plan" in sys.argv:
        print(ring_plan_table())
    elif "--sparse" in sys.argv:
        dist.init_process_group("gloo")
        sparse_bytes()
        dist.destroy_process_group()
    else:
        main()
