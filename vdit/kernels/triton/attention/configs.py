"""Tile configurations of the Triton attention kernels, per kernel, architecture, head dim and dtype,
and the opt-in autotuner that picks among them.

Every configuration listed here ships: ``forward.aot_specs`` / ``backward.aot_specs`` compile each one
ahead of time for its architecture (the static GPU check), and it must spill nothing and fit in
shared memory there.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
import triton

from vdit.kernels import MAX_GPU_HEAD_DIM as MAX_HEAD_DIM


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile configuration of one kernel. For the forward and dq kernels BLOCK_M is the query tile of a
    program and BLOCK_N the key tile of the inner loop; for dk/dv BLOCK_N is the program's key tile
    and BLOCK_M the query tile of the inner loop."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# CONFIGS[kernel][arch][block_d]: fp16/bf16 tile configurations, best first (the launcher uses the
# first; further entries are tuning candidates). arch 90: Hopper (sm_90, wgmma; also sm_100), 227 KB
# of shared memory; 80: A100 (sm_80), 163 KB; 86: sm_86/89/12x, 99 KB (the sm_80 entries where they
# fit). block_d 16 and 32 use the 64 entries. Tiles are as large as the register file allows without
# spilling (dk/dv keeps two fp32 accumulators of BLOCK_N x BLOCK_D per program, which caps its key
# tile at head dim 128 and above), and on sm_90 no entry may make ptxas serialize its wgmma (C7515).
C = Config
CONFIGS: dict[str, dict[int, dict[int, list[Config]]]] = {
    "fwd": {
        90: {64: [C(128, 64, 4, 3), C(128, 128, 8, 3)], 128: [C(128, 64, 8, 3), C(128, 128, 8, 3)],
             256: [C(128, 64, 8, 2), C(64, 64, 8, 2)]},
        80: {64: [C(128, 64, 8, 3), C(64, 64, 4, 3)], 128: [C(128, 64, 8, 3), C(64, 64, 8, 3)],
             256: [C(64, 32, 8, 2), C(64, 64, 8, 2)]},
        86: {64: [C(128, 64, 8, 3), C(64, 64, 4, 3)], 128: [C(64, 64, 8, 3), C(64, 32, 4, 3)],
             256: [C(64, 32, 8, 2), C(32, 32, 4, 2)]},
    },
    "bwd_dkdv": {
        90: {64: [C(64, 128, 8, 2), C(32, 128, 8, 2)], 128: [C(32, 128, 8, 2), C(32, 64, 8, 2)],
             256: [C(16, 64, 8, 2)]},  # other d256 tiles spill or fall back from wgmma (key tile < 64)
        80: {64: [C(32, 128, 8, 2), C(32, 64, 8, 2)], 128: [C(64, 64, 8, 2), C(32, 64, 8, 2)],
             256: [C(32, 64, 8, 1), C(16, 64, 8, 2)]},
        86: {64: [C(32, 128, 8, 2), C(32, 64, 8, 2)], 128: [C(64, 64, 8, 2), C(32, 64, 8, 2)],
             256: [C(16, 64, 8, 1), C(16, 64, 8, 2)]},
    },
    "bwd_dq": {
        90: {64: [C(128, 64, 8, 2), C(128, 32, 8, 2)], 128: [C(128, 64, 8, 2), C(128, 32, 8, 2)],
             256: [C(128, 32, 8, 2), C(64, 32, 8, 1)]},
        80: {64: [C(128, 64, 8, 2), C(128, 32, 8, 2)], 128: [C(64, 64, 4, 2), C(64, 64, 8, 2)],
             256: [C(64, 32, 8, 1), C(64, 64, 8, 2)]},
        86: {64: [C(128, 64, 8, 2), C(128, 32, 8, 2)], 128: [C(64, 64, 4, 2), C(64, 32, 8, 2)],
             256: [C(64, 32, 8, 1), C(32, 32, 4, 1)]},
    },
}

# fp32 inputs run exact fp32 dot products on the FMA units (no tensor cores, no tf32), which need far
# more registers per tile: small tiles. Keyed like CONFIGS; every entry also fits sm_86's 99 KB.
FP32_CONFIGS: dict[str, dict[int, dict[int, list[Config]]]] = {
    "fwd": {
        90: {64: [C(32, 32, 8, 1), C(16, 16, 8, 1)], 128: [C(16, 16, 8, 1), C(32, 16, 8, 1)],
             256: [C(16, 16, 4, 1), C(16, 16, 8, 1)]},
        80: {64: [C(32, 32, 8, 1), C(16, 16, 8, 1)], 128: [C(16, 16, 8, 1), C(16, 16, 4, 1)],
             256: [C(16, 16, 4, 1), C(16, 16, 8, 1)]},
    },
    "bwd_dkdv": {
        # d256 on sm_90 has one candidate: every other tile tried spills (16x16x4/8 warps x 1/2 stages, 16x32, 32x16).
        90: {64: [C(16, 16, 8, 1), C(16, 16, 4, 1)], 128: [C(32, 32, 8, 1), C(16, 16, 8, 1)],
             256: [C(16, 16, 8, 1)]},
        # On sm_80 the d256 dk/dv tile needs a second stage to keep its accumulators out of local memory.
        80: {64: [C(16, 16, 8, 1), C(32, 16, 8, 1)], 128: [C(32, 32, 8, 1), C(16, 32, 8, 1)],
             256: [C(16, 16, 8, 2), C(32, 16, 8, 1)]},
    },
    "bwd_dq": {
        90: {64: [C(16, 32, 4, 1), C(16, 16, 8, 1)], 128: [C(16, 16, 8, 1), C(16, 16, 4, 1)],
             256: [C(16, 16, 4, 1), C(32, 16, 8, 1)]},
        80: {64: [C(16, 32, 4, 1), C(16, 16, 8, 1)], 128: [C(16, 16, 8, 1), C(32, 16, 8, 1)],
             256: [C(16, 16, 4, 1), C(32, 16, 8, 1)]},
    },
}
for _kernel, _tables in FP32_CONFIGS.items():
    _tables[86] = dict(_tables[80])
# sm_86 allocates registers differently: its d256 dk/dv tile is 16x32 (the sm_80 tiles spill there).
FP32_CONFIGS["bwd_dkdv"][86][256] = [C(16, 32, 8, 1)]
del C, _kernel, _tables

# Under TRITON_INTERPRET=1 (CPU tensors) the tiles only need to be correct; small tiles exercise the
# multi-tile and masked paths on the small shapes the tests use. (Two, so the tuner can be tested.)
INTERPRETER_CONFIGS = [Config(32, 32, 4, 1), Config(16, 32, 4, 1)]

# TMA: on Hopper (and datacenter Blackwell) the fp16 / bf16 forward loads K and V through one tensor
# descriptor per program, bounded by its sequence, so no load needs a mask. VDIT_TRITON_TMA=0 turns it
# off, =1 forces it (also for CPU tensors under the interpreter, which is how the tests run that path).
TMA_ENV = "VDIT_TRITON_TMA"
TMA_ARCH = 90


def use_tma(device: torch.device, dtype) -> bool:
    """Whether the forward uses TMA descriptors on ``device`` for ``dtype`` (see TMA_ENV). Only the
    tensor-core (fp16 / bf16) kernels do: the fp32 kernels' small FMA tiles spill with descriptor loads."""
    if dtype in (torch.float32, "fp32"):
        return False
    forced = os.environ.get(TMA_ENV, "")
    if forced:
        return forced != "0"
    return arch_of(device) == TMA_ARCH


def ensure_allocator() -> None:
    """Device-side descriptors need a little global scratch per launch, which Triton asks an allocator
    for; install a torch-backed one unless the application has set its own."""
    from triton.runtime import _allocation  # the allocator slot has no public getter

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


# Opt-in tuning: with VDIT_TRITON_AUTOTUNE=1 the first call for each (kernel, device kind, block_d,
# dtype, causal) times every candidate of its list on that call's inputs and keeps the fastest.
AUTOTUNE_ENV = "VDIT_TRITON_AUTOTUNE"
_TUNED: dict[tuple, Config] = {}


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernels handle this head dim (a multiple of 8 in [8, 256])."""
    return 0 < head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def precision_of(dtype) -> str:
    """``input_precision`` of tl.dot: exact fp32 for fp32 inputs (no tf32); ignored for fp16/bf16."""
    return "ieee" if dtype in (torch.float32, "fp32") else "tf32"


def block_d_of(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest tl.dot inner dimension)."""
    return max(16, triton.next_power_of_2(head_dim))


def arch_of(device: torch.device) -> int | None:
    """Key of CONFIGS for a device (None: CPU tensors, the interpreter). Ampere or newer."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major in (9, 10):  # Hopper, datacenter Blackwell: 227 KB of shared memory per block
        return 90
    if (major, minor) in ((8, 0), (8, 7)):  # A100, Orin: 163 KB
        return 80
    return 86  # sm_86, sm_89, sm_12x: 99 KB


def candidate_configs(kernel: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> list[Config]:
    """Configurations of ``kernel`` ("fwd", "bwd_dkdv", "bwd_dq") for this device, head dim and dtype,
    best first."""
    arch = arch_of(device)
    if arch is None:
        return INTERPRETER_CONFIGS
    block_d = max(64, block_d_of(head_dim))
    return (FP32_CONFIGS if dtype == torch.float32 else CONFIGS)[kernel][arch][block_d]


def select_config(kernel: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> Config:
    """The configuration ``kernel`` uses without tuning: the first candidate."""
    return candidate_configs(kernel, device, head_dim, dtype)[0]


def _seconds(run, config: Config, device: torch.device, reps: int = 3) -> float:
    run(config)  # compiles, warms up
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(config)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        run(config)
    return (time.perf_counter() - t0) / reps


def choose_config(kernel: str, q: torch.Tensor, causal: bool, override: Config | None, run) -> Config:
    """``override``, else the tuned configuration (VDIT_TRITON_AUTOTUNE=1), else the first candidate.
    ``run(config)`` launches the kernel with a configuration (it must be safe to repeat)."""
    if override is not None:
        return override
    candidates = candidate_configs(kernel, q.device, q.shape[2], q.dtype)
    if len(candidates) == 1 or os.environ.get(AUTOTUNE_ENV, "0") in ("", "0"):
        return candidates[0]
    key = (kernel, q.device.type, arch_of(q.device), block_d_of(q.shape[2]), q.dtype, bool(causal))
    if key not in _TUNED:
        times = [_seconds(run, c, q.device) for c in candidates]
        _TUNED[key] = candidates[times.index(min(times))]
    return _TUNED[key]




SHIPPED_HEAD_DIMS = (64, 128, 256)
PADDED_HEAD_DIM = 96  # a head dim below its BLOCK_D (masked head-dim loads), compiled as a representative


def shipped(kernel: str):
    """Every (arch, head_dim, dtype, config) of ``kernel`` that ships, for its ahead-of-time specs, plus
    the padded head dim at its BLOCK_D's first fp16 entry on sm_90. sm_86 is compiled for itself (ptxas
    allocates registers per architecture) and checked against its 99 KB of shared memory."""
    for arch in (80, 90, 86):
        for head_dim in SHIPPED_HEAD_DIMS:
            for dtype in ("fp16", "bf16", "fp32"):
                for config in (FP32_CONFIGS if dtype == "fp32" else CONFIGS)[kernel][arch][head_dim]:
                    yield arch, head_dim, dtype, config
    yield 90, PADDED_HEAD_DIM, "fp16", CONFIGS[kernel][90][block_d_of(PADDED_HEAD_DIM)][0]
