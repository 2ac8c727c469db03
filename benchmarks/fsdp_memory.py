"""Training-state memory per rank of the ``xl`` VideoDiT (1.02B parameters) under DDP and FSDP2: parameters,
gradients, AdamW state and EMA, from the tensors each rank holds (the model is built on the meta device:
nothing is allocated, the shard shapes are FSDP2's own).

    torchrun --nproc_per_node 4 benchmarks/fsdp_memory.py     # prints a markdown row (rank 0)

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


def main() -> None:
    dist.init_process_group("gloo")
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
