"""Fully sharded data parallelism (FSDP2) for vdit models: parameters, gradients and optimizer state split
over the ranks instead of replicated, each transformer block gathered just before it runs.

``torch.distributed.fsdp.fully_shard`` is applied to each block and then to the root, over a 1-D mesh of
all ranks (the data-parallel x sequence-parallel world: every rank's gradients are averaged over all of
them, which is what DDP over the world did). With ``mixed_precision`` the blocks compute in bf16 from fp32
master weights and reduce gradients in fp32 (``MixedPrecisionPolicy``), in place of autocast.

Start-up that scales with the world (:func:`materialize`): every rank builds the model on the meta device
(shapes, no storage), shards it, allocates only its shards (``to_empty``) and receives their values from rank
0, which alone holds the whole model, on its host, and sends it one tensor at a time. The EMA is allocated
alike and copied from the model's shards (:func:`copy_shards`). No rank ever holds the whole model on its
device, where building it there first and sharding afterwards needs the full model, twice with the EMA, on
every GPU before step 0.

The root does not let FSDP cast its inputs (``cast_forward_inputs=False``): FSDP would cast every float
input, the diffusion timesteps too (t = 0.9137 becomes 0.9140625 in bf16, and the sinusoidal time embedding
of 1000 t moves by a third of a step). A forward pre-hook casts the inputs the model computes on in bf16
(videos, text embeddings) and leaves the ones named in ``exact_inputs`` (the timesteps) in fp32.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

EXACT_INPUTS = ("timesteps",)


def _cast(value, dtype: torch.dtype):
    """``value`` with its floating-point tensors (also inside lists and tuples) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def cast_inputs_hook(model: nn.Module, dtype: torch.dtype, exact_inputs: Iterable[str] = EXACT_INPUTS):
    """A forward pre-hook (``with_kwargs=True``) for ``model`` that casts the floating-point inputs of its
    ``forward`` to ``dtype``, except the arguments named in ``exact_inputs``, which keep their precision."""
    signature, exact = inspect.signature(model.forward), frozenset(exact_inputs)

    def hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name not in exact:
                bound.arguments[name] = _cast(value, dtype)
        return bound.args, bound.kwargs

    return hook


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], device_type: str, *,
                mixed_precision: bool = False, exact_inputs: Iterable[str] = EXACT_INPUTS) -> nn.Module:
    """``model`` with ``fully_shard`` applied to each of ``blocks`` and then to ``model`` itself, over every
    rank of the world (all ranks call this together, with models of the same architecture). Returns
    ``model`` (sharded in place: its parameters become DTensors holding this rank's shard).

    With ``mixed_precision``, the inputs of ``model.forward`` named in ``exact_inputs`` (default: the
    (B,) ``timesteps``) reach the model in their own dtype; its other float inputs are cast to bf16."""
    mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("shard",))
    if not mixed_precision:
        policy = root_policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    if mixed_precision:
        model.register_forward_pre_hook(cast_inputs_hook(model, torch.bfloat16, exact_inputs), with_kwargs=True)
    return model


def _non_persistent_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, buffer name) of every buffer of ``model`` that its state dict leaves out."""
    return [(m, name) for m in model.modules() for name in m._non_persistent_buffers_set]


def reset_buffers(model: nn.Module) -> None:
    """Recompute the buffers no state dict carries (after ``to_empty`` they hold garbage): every module of
    ``model`` that has one must define ``reset_buffers()``; raises TypeError naming a module that does not."""
    missing = sorted({type(m).__name__ for m, _ in _non_persistent_buffers(model) if not hasattr(m, "reset_buffers")})
    if missing:
        raise TypeError(f"cannot materialize {', '.join(missing)}: non-persistent buffers without reset_buffers()")
    with torch.no_grad():
        for m in {id(m): m for m, _ in _non_persistent_buffers(model)}.values():
            m.reset_buffers()


def _allocate(model: nn.Module, device: torch.device | str) -> None:
    """Storage on ``device`` for a meta-device model's (local) tensors, its non-persistent buffers filled."""
    model.to_empty(device=device)
    reset_buffers(model)


def materialize(model: nn.Module, device: torch.device | str, full: nn.Module | None) -> nn.Module:
    """Give a model built on the meta device and sharded by :func:`shard_model` its values: each rank allocates
    its shards on ``device`` and rank 0 sends ``full`` (the same architecture with its values, on rank 0's host;
    None on the other ranks) one tensor at a time, each rank keeping its shard. All ranks call this together.
    Returns ``model``.

    Peak memory on ``device`` per rank is the rank's shards plus one tensor of ``full``, not the whole model."""
    if (dist.get_rank() == 0) != (full is not None):
        raise ValueError("materialize: pass the full model on rank 0 and None on every other rank")
    _allocate(model, device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def copy_shards(dst: nn.Module, src: nn.Module) -> nn.Module:
    """Copy ``src``'s parameters and persistent buffers into ``dst``, shard by shard (both sharded alike by
    :func:`shard_model`, e.g. an EMA and its model; no communication). Returns ``dst``."""
    with torch.no_grad():
        for (name, a), (other, b) in zip(dst.state_dict().items(), src.state_dict().items()):
            if name != other:
                raise ValueError(f"copy_shards: {name} against {other}: the models differ")
            local = a.to_local() if hasattr(a, "to_local") else a
            local.copy_(b.to_local() if hasattr(b, "to_local") else b)
    return dst


def sharded_pair(build: Callable[[], nn.Module], blocks: Callable[[nn.Module], Iterable[nn.Module]],
                 device: torch.device | str, full: nn.Module | None = None, *, load: bool = True,
                 mixed_precision: bool = False) -> tuple[nn.Module, nn.Module]:
    """A model and its EMA as sharded training starts them: ``build()`` twice on the meta device, each sharded by
    :func:`shard_model` over ``blocks(module)``, only this rank's shards allocated on ``device``. With ``load``
    the model's values come from ``full`` (:func:`materialize`: rank 0's whole model, None on the other ranks)
    and the EMA copies the model's shards; without, both are left for a sharded checkpoint to fill. All ranks
    call this together. Returns (model, ema)."""
    with torch.device("meta"):
        model, ema = build(), build()
    for m in (model, ema):
        shard_model(m, blocks(m), torch.device(device).type, mixed_precision=mixed_precision)
    if not load:
        for m in (model, ema):
            _allocate(m, device)
        return model, ema
    materialize(model, device, full)
    _allocate(ema, device)
    return model, copy_shards(ema, model)


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total
