"""Tile configurations of the block-sparse attention kernels, per kernel, architecture, head dim and dtype.

Every entry ships: ``forward.aot_specs`` / ``backward.aot_specs`` compile each one ahead of time for the
architectures it runs on (no spills, no stack frame, shared memory within the limit, and on sm_90 a
pipelined wgmma wherever the M tile is at least 64 rows).
"""
from __future__ import annotations

import torch

from vdit.kernels.triton.attention.configs import Config, arch_of, block_d_of

# CONFIGS[kernel][arch][block_d]: the fp16 / bf16 tile configuration. For "fwd" and "bwd_dq" BLOCK_M is
# the program's query block and BLOCK_N the key block of the inner loop; for "bwd_dkdv" BLOCK_N is the
# program's key block and BLOCK_M the query block of the inner loop. arch as attention.configs.arch_of:
# 90 Hopper (wgmma, 227 KB of shared memory), 80 A100 (163 KB); the 99 KB parts (86: sm_86 / 89 / 12x)
# run the 80 entries, chosen to fit and not spill there too. block_d 16 and 32 use the 64 entries.
# Started from the dense kernels' tables; the entries that differ spilled (a program of these kernels
# also carries its list walk around the inner loop) or did not fit sm_86.
C = Config
CONFIGS: dict[str, dict[int, dict[int, Config]]] = {
    "fwd": {90: {64: C(128, 64, 4, 3), 128: C(128, 64, 8, 3), 256: C(128, 32, 8, 2)},
            80: {64: C(128, 64, 8, 3), 128: C(128, 64, 8, 2), 256: C(64, 32, 8, 2)}},
    "bwd_dq": {90: {64: C(128, 64, 8, 2), 128: C(128, 64, 8, 2), 256: C(128, 32, 8, 2)},
               80: {64: C(128, 32, 8, 2), 128: C(64, 64, 8, 2), 256: C(64, 32, 8, 1)}},
    "bwd_dkdv": {90: {64: C(64, 128, 8, 2), 128: C(32, 128, 8, 2), 256: C(16, 64, 8, 2)},
                 80: {64: C(32, 128, 8, 2), 128: C(64, 64, 8, 2), 256: C(16, 64, 8, 2)}},
}
# fp32: exact fp32 dot products on the FMA units (no tensor cores, no tf32), small tiles. ptxas is
# erratic here (neighbouring 16x16 / 32x32 tiles spill); each entry is one that does not, on every
# architecture it ships for.
FP32_CONFIGS: dict[str, dict[int, dict[int, Config]]] = {
    "fwd": {90: {64: C(32, 32, 4, 1), 128: C(16, 16, 8, 1), 256: C(16, 16, 4, 1)},
            80: {64: C(32, 32, 8, 2), 128: C(16, 16, 8, 2), 256: C(16, 16, 4, 2)}},
    "bwd_dq": {90: {64: C(16, 32, 4, 1), 128: C(16, 16, 8, 1), 256: C(16, 16, 4, 1)},
               80: {64: C(16, 32, 4, 1), 128: C(16, 16, 8, 1), 256: C(16, 16, 8, 1)}},
    "bwd_dkdv": {90: {64: C(16, 16, 8, 1), 128: C(32, 32, 8, 1), 256: C(16, 16, 8, 1)},
                 80: {64: C(32, 16, 8, 1), 128: C(32, 32, 8, 1), 256: C(32, 16, 8, 1)}},
}
del C

# The table each device architecture (attention.configs.arch_of) reads, and the architectures each
# table is compiled for.
ARCH_TABLE = {90: 90, 80: 80, 86: 80}
SHIPPED_ARCHS = {90: (90,), 80: (80, 86)}

# Under TRITON_INTERPRET=1 (CPU tensors) tiles only need to be correct; small ones exercise tiles larger
# than a block and partial blocks on the tests' small shapes.
INTERPRETER_CONFIG = Config(16, 16, 4, 1)

SHIPPED_HEAD_DIMS = (64, 128, 256)
PADDED_HEAD_DIM = 96  # a head dim below its BLOCK_D (masked head-dim loads), compiled as a representative


def select_config(kernel: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> Config:
    """The tile configuration of ``kernel`` ("fwd", "bwd_dq", "bwd_dkdv") for a device, head dim, dtype."""
    arch = arch_of(device)
    if arch is None:
        return INTERPRETER_CONFIG
    table = FP32_CONFIGS if dtype == torch.float32 else CONFIGS
    return table[kernel][ARCH_TABLE[arch]][max(64, block_d_of(head_dim))]


def shipped(kernel: str):
    """Every (archs, head_dim, dtype, config) of ``kernel`` the launchers can pick, for its ahead-of-time
    specs, plus the padded head dim at its fp16 sm_90 entry."""
    for table_arch, archs in SHIPPED_ARCHS.items():
        for head_dim in SHIPPED_HEAD_DIMS:
            for dtype in ("fp16", "bf16", "fp32"):
                table = FP32_CONFIGS if dtype == "fp32" else CONFIGS
                yield archs, head_dim, dtype, table[kernel][table_arch][head_dim]
    yield SHIPPED_ARCHS[90], PADDED_HEAD_DIM, "fp16", CONFIGS[kernel][90][block_d_of(PADDED_HEAD_DIM)]
