"""Fully sharded data parallelism (FSDP2) for vdit models: parameters, gradients and optimizer state split
over the ranks instead of replicated, each transformer block gathered just before it runs.

``torch.distributed.fsdp.fully_shard`` is applied to each block and then to the root, over a 1-D mesh of
all ranks (the data-parallel x sequence-parallel world: every rank's gradients are averaged over all of
them, which is what DDP over the world did). With ``mixed_precision`` the blocks compute in bf16 from fp32
master weights and reduce gradients in fp32 (``MixedPrecisionPolicy``), in place of autocast.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], device_type: str, *,
                mixed_precision: bool = False) -> nn.Module:
    """``model`` with ``fully_shard`` applied to each of ``blocks`` and then to ``model`` itself, over every
    rank of the world (all ranks call this together, with models of the same architecture). Returns
    ``model`` (sharded in place: its parameters become DTensors holding this rank's shard)."""
    mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("shard",))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total
