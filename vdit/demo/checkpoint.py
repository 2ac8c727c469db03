"""Safe checkpoint files: tensors in safetensors (never pickle), configuration in JSON.

A checkpoint directory holds ``config.json`` and one or more ``*.safetensors`` files; loading checks
that the configuration is known and that the tensors match the model exactly, with clear errors for
truncated or corrupted files. Training checkpoints (:func:`save_checkpoint`) also hold what it takes to
resume a run exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted or does not match the model."""


def save_tensors(path: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Write tensors (optionally cast floating ones to ``dtype``) atomically to ``path``."""
    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
           for k, v in tensors.items()}
    tmp = path + ".tmp"
    save_file(out, tmp)
    os.chmod(tmp, 0o644)  # safetensors writes 0600; weights may be shipped as package data
    os.replace(tmp, path)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any failure into a :class:`CheckpointError` naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights file {path} (corrupted or truncated?): {exc}") from None


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Copy ``prefix``-ed tensors into ``module``; every parameter must be present with the right shape."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: {prefix}{k} has shape {tuple(v.shape)}, "
                                  f"the model expects {tuple(own[k].shape)}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"config file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"config file {path} is not valid JSON: {exc}") from None


def dataclass_from_dict(cls, data: dict, source: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"{source}: unknown {cls.__name__} keys {unknown}")
    return cls(**data)


STATE_FILE, EMA_FILE, OPTIM_FILE = "state.json", "ema.safetensors", "optimizer.safetensors"


def _parameters(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters, group after group (the order of ``names`` below)."""
    return [p for group in opt.param_groups for p in group["params"]]


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-parameter state as ``{"<key>/<parameter name>": tensor}`` (AdamW: ``exp_avg``, ``exp_avg_sq`` of the
    parameter's shape, ``step`` 0-d), keyed by name so that runs with other parameter groups can load it."""
    out, params = {}, _parameters(opt)
    for i, name in enumerate(names):
        for key, value in opt.state.get(params[i], {}).items():
            out[f"{key}/{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Load :func:`optimizer_tensors` into ``opt`` by parameter name; parameters without state start afresh."""
    params = _parameters(opt)
    for i, name in enumerate(names):
        state = {key.split("/", 1)[0]: v for key, v in tensors.items() if key.split("/", 1)[1] == name}
        if state:
            opt.state[params[i]] = state


def save_checkpoint(out: str, model, ema: torch.nn.Module, opt: torch.optim.Optimizer, names: list[str], step: int,
                    data_index: int, args) -> None:
    """Write ``model.save(out)``, the EMA weights, the optimizer and torch RNG state, and state.json (``step``,
    ``data_index``: the next dataset sample, ``vars(args)``) into ``out``."""
    model.save(out)
    save_tensors(os.path.join(out, EMA_FILE), ema.state_dict())
    save_tensors(os.path.join(out, OPTIM_FILE), {**optimizer_tensors(opt, names), "rng/torch": torch.get_rng_state()})
    write_json(os.path.join(out, STATE_FILE), {"step": step, "data_index": data_index, "args": vars(args)})


def has_checkpoint(out: str) -> bool:
    """Whether ``out`` holds a training checkpoint to resume."""
    return os.path.exists(os.path.join(out, STATE_FILE))


def resume_checkpoint(out: str, ema: torch.nn.Module, opt: torch.optim.Optimizer, names: list[str],
                      device: torch.device | str) -> tuple[int, int]:
    """Load :func:`save_checkpoint`'s EMA and optimizer state (onto ``device``) from ``out`` and restore torch's
    RNG state; returns (step, data_index). The model's weights are the caller's to load."""
    state = read_json(os.path.join(out, STATE_FILE))
    load_into(ema, load_tensors(os.path.join(out, EMA_FILE)), "", EMA_FILE)
    optim = load_tensors(os.path.join(out, OPTIM_FILE))
    torch.set_rng_state(optim.pop("rng/torch"))
    load_optimizer(opt, names, {k: v.to(device) for k, v in optim.items()})
    return state["step"], state["data_index"]


SHARDED_PREFIX = "sharded-"  # FSDP runs: one torch.distributed.checkpoint folder per save, named by step


def save_sharded(out: str, model, ema: torch.nn.Module, opt: torch.optim.Optimizer, step: int, data_index: int,
                 args, rank: int, *, export: bool = False) -> None:
    """Checkpoint of an FSDP run (every rank calls it): model, EMA and optimizer state written shard by shard
    with ``torch.distributed.checkpoint`` into ``out/sharded-<step>`` (resumable at any world size), then from
    rank 0 ``config.json`` and ``state.json`` (``sharded``: that folder), older folders removed. With
    ``export`` the full weights are gathered too and rank 0 writes ``model.safetensors`` / ``ema.safetensors``
    (what vdit-generate loads)."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    folder = f"{SHARDED_PREFIX}{step}"
    dcp.save({"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
              "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=os.path.join(out, folder))
    if export:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, ema_weights = get_model_state_dict(model, options=full), get_model_state_dict(ema, options=full)
        if rank == 0:
            model.save(out, state_dict=weights)
            save_tensors(os.path.join(out, EMA_FILE), ema_weights)
    dist.barrier()  # every shard is written before state.json points at the folder
    if rank == 0:
        write_json(os.path.join(out, model.CONFIG_FILE), model.config_dict())
        write_json(os.path.join(out, STATE_FILE), {"step": step, "data_index": data_index, "sharded": folder,
                                                   "args": vars(args)})
        for name in os.listdir(out):
            if name.startswith(SHARDED_PREFIX) and name != folder:
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    dist.barrier()


def sharded_state(out: str) -> dict | None:
    """The state.json of a checkpoint saved by :func:`save_sharded`, or None (no checkpoint, or a
    single-file one)."""
    if not has_checkpoint(out):
        return None
    state = read_json(os.path.join(out, STATE_FILE))
    return state if "sharded" in state else None


def load_sharded(out: str, model, ema: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """Load :func:`save_sharded`'s model, EMA and optimizer state into the (already sharded) ``model``,
    ``ema`` and ``opt``, resharding to this world size; returns (step, data_index)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    meta = sharded_state(out)
    if meta is None:
        raise CheckpointError(f"{out} holds no sharded (FSDP) checkpoint")
    state = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
             "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=os.path.join(out, meta["sharded"]))
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return meta["step"], meta["data_index"]
