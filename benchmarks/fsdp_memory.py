"""Training-state memory per rank of the ``xl`` VideoDiT (1.02B parameters) under DDP and FSDP2: parameters,
gradients, AdamW state and EMA, from the tensors each rank holds (the model is built on the meta device:
nothing is allocated, the shard shapes are FSDP2's own).

    torchrun --nproc_per_node 4 benchmarks/fsdp_memory.py     # prints a markdown row (rank 0)
    torchrun --nproc_per_node 4 benchmarks/fsdp_memory.py --startup meta --depth 3   # start-up peak, measured
    torchrun --nproc_per_node 4 benchmarks/fsdp_memory.py --startup build --depth 3

``--startup`` measures instead the resident memory each rank gains while it starts (a fresh process per way,
the peak from /proc/self/status): ``build`` builds the model on every rank, copies it for the EMA and shards
both (how vdit-train started before); ``meta`` builds on the meta device, shards, allocates the shards and
receives their values from rank 0 (vdit.distributed.fsdp.materialize, how it starts now). Rank 0 also holds
the whole model on its host in ``meta``; the table gives the other ranks' largest growth.

fp32 everywhere (what vdit-train keeps; bf16 compute under FSDP's MixedPrecisionPolicy adds only the
gathered block being computed): per parameter 4 bytes each for the weight, its gradient, the EMA, and 8 for
AdamW's two moments = 20 bytes. DDP holds all of it on every rank; FSDP2 holds 1 / W of it (plus padding
of each parameter's first dimension to a multiple of W) and gathers one block at a time.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from vdit.distributed.fsdp import local_bytes, shard_model
from vdit.models import VideoDiT, VideoDiTConfig

BYTES_PER_PARAMETER_BYTE = 5  # weight + gradient + EMA + 2 AdamW moments, each as large as the weight


def memory_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the peak so far)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def startup(way: str, depth: int) -> None:
    """Print (rank 0) the model's size and the largest start-up growth of resident memory over ranks 1..W-1."""
    import copy

    from vdit.distributed.fsdp import sharded_pair

    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = VideoDiTConfig.preset("xl", depth=depth)
    resident = memory_kib("VmRSS")
    if way == "build":
        model = VideoDiT(cfg)
        ema = copy.deepcopy(model)
        for m in (model, ema):
            shard_model(m, m.blocks, "cpu")
    else:
        model, ema = sharded_pair(lambda: VideoDiT(cfg), lambda m: m.blocks, "cpu",
                                  VideoDiT(cfg) if rank == 0 else None)
    growth = torch.tensor([(memory_kib("VmHWM") - resident) * 1024 if rank > 0 else 0], dtype=torch.int64)
    everyone = [torch.zeros_like(growth) for _ in range(world)]
    dist.all_gather(everyone, growth)
    if rank == 0:
        gib = 2 ** 30
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"| {way} | {world} | {size / gib:.2f} GiB | {max(int(t) for t in everyone) / gib:.2f} GiB |")


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--startup", choices=("build", "meta"), default=None)
    p.add_argument("--depth", type=int, default=28, help="blocks of the xl preset (--startup only)")
    args = p.parse_args()
    dist.init_process_group("gloo")
    if args.startup:
        startup(args.startup, args.depth)
        dist.destroy_process_group()
        return
    world = dist.get_world_size()
    with torch.device("meta"):
        model = VideoDiT(VideoDiTConfig.preset("xl"))
    params = sum(p.numel() for p in model.parameters())
    ddp = BYTES_PER_PARAMETER_BYTE * local_bytes(model.parameters())
    shard_model(model, model.blocks, "cpu")
    mine = torch.tensor([BYTES_PER_PARAMETER_BYTE * local_bytes(model.parameters())], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    fsdp = max(int(t) for t in everyone)
    if dist.get_rank() == 0:
        gib = 2 ** 30
        print(f"| {world} | {params / 1e6:.0f}M | {ddp / gib:.2f} GiB | {fsdp / gib:.2f} GiB | {ddp / fsdp:.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
