"""Safe checkpoint files: tensors in safetensors (never pickle), configuration in JSON.

A checkpoint directory holds ``config.json`` and one or more ``*.safetensors`` files; loading checks
that the configuration is known and that the tensors match the model exactly, with clear errors for
truncated or corrupted files.
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
            raise CheckpointError(f"{source}: {prefix}{k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
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
