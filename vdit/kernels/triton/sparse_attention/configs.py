"""Tile configurations of the block-sparse attention kernels, per kernel, architecture, head dim, dtype and
tile size.

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
                 80: {64: C(32, 16, 4, 1), 128: C(32, 32, 8, 1), 256: C(32, 16, 8, 1)}},
}

# SMALL_TILE_CONFIGS: the fp16 / bf16 entries when every tile holds at most SMALL_TILE tokens (4x4x4 tiles and
# their partial edge tiles). A program's row block covers one tile and no more: with the 128-row blocks of
# CONFIGS a 64-token tile leaves over half of every query-block MMA row idle (docs/sparse-gpu-cost-model.md).
# The sm_90 entries take 4 warps and at most 113 KB of shared memory, so that two CTAs fit on an SM (a CTA
# of 4 warps fits twice in the register file whatever its register count up to 255). For "bwd_dkdv" the
# program's key block BLOCK_N is the one sized to the tile. Entries equal to CONFIGS' are the tables' own.
SMALL_TILE = 64
SMALL_TILE_CONFIGS: dict[str, dict[int, dict[int, Config]]] = {
    "fwd": {90: {64: C(64, 64, 4, 3), 128: C(64, 64, 4, 3), 256: C(64, 32, 4, 2)},
            80: {64: C(64, 64, 4, 3), 128: C(64, 64, 4, 2), 256: C(64, 32, 8, 2)}},
    "bwd_dq": {90: {64: C(64, 64, 4, 2), 128: C(64, 64, 4, 2), 256: C(64, 32, 4, 2)},
               80: {64: C(64, 32, 8, 2), 128: C(64, 64, 8, 2), 256: C(64, 32, 8, 1)}},
    "bwd_dkdv": {90: {64: C(64, 64, 4, 2), 128: C(32, 64, 4, 2), 256: C(16, 64, 8, 2)},
                 80: {64: C(32, 64, 8, 2), 128: C(64, 64, 8, 2), 256: C(16, 64, 8, 2)}},
}
# EDGE_TILE_CONFIGS: with SMALL_TILE_CONFIGS, the tiles of at most EDGE_TILE tokens (the partial edge tiles of
# 4x4x4 tiles: 16 and 4 tokens on a 33x45x80 grid) run in a second launch of 16-row program blocks, so that
# no 64-row block carries a 16-token tile (useful MMA rows 85.9 % -> 99.8 % on 33x45x80). 16 rows is below
# wgmma's 64-row M tile: these run mma.sync, on 5 % or fewer of the rows. "bwd_dkdv" sizes its key block
# BLOCK_N to the edge tile and keeps a 64-row query block BLOCK_M for its inner loop. The edge launch's grid is
# num_tiles x heads programs whatever the layout (its list is sized from shapes); on a grid with no tile of at
# most 16 tokens (30x48x80: its edge tiles hold 32) all of them are padding programs that return at once.
EDGE_TILE = 16
EDGE_TILE_CONFIGS: dict[str, dict[int, dict[int, Config]]] = {
    "fwd": {90: {64: C(16, 64, 4, 3), 128: C(16, 64, 4, 3), 256: C(16, 32, 4, 2)},
            80: {64: C(16, 64, 4, 3), 128: C(16, 64, 4, 2), 256: C(16, 32, 4, 2)}},
    "bwd_dq": {90: {64: C(16, 64, 4, 2), 128: C(16, 64, 4, 2), 256: C(16, 32, 4, 2)},
               80: {64: C(16, 64, 4, 2), 128: C(16, 64, 4, 2), 256: C(16, 32, 4, 1)}},
    "bwd_dkdv": {90: {64: C(64, 16, 4, 2), 128: C(64, 16, 4, 2), 256: C(16, 16, 4, 2)},
                 80: {64: C(64, 16, 4, 2), 128: C(64, 16, 4, 2), 256: C(32, 16, 4, 1)}},
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


def small_tiles(max_tile: int | None) -> bool:
    """Whether a batch whose largest tile holds ``max_tile`` tokens runs the SMALL_TILE_CONFIGS (None or 0:
    unknown, the general tables). Only speed depends on it: the work lists cover any tile sizes."""
    return max_tile is not None and 0 < max_tile <= SMALL_TILE


def table_config(kernel: str, arch: int, head_dim: int, dtype: str, max_tile: int | None = None) -> Config:
    """The tile configuration of ``kernel`` ("fwd", "bwd_dq", "bwd_dkdv") for a device architecture
    (``attention.configs.arch_of``: 90, 80, 86), head dim, dtype ("fp16", "bf16", "fp32") and largest
    tile (``max_tile`` tokens): the row blocks of fp16 / bf16 follow the tile size (``small_tiles``)."""
    if dtype == "fp32":
        table = FP32_CONFIGS
    else:
        table = SMALL_TILE_CONFIGS if small_tiles(max_tile) else CONFIGS
    return _entry(table, kernel, arch, head_dim)


def edge_config(kernel: str, arch: int, head_dim: int, dtype: str, max_tile: int | None = None) -> Config | None:
    """The configuration of the second launch, which takes the tiles of at most its :func:`program_rows` tokens
    off the :func:`table_config` launch, or None when there is none (fp32, or tiles beyond SMALL_TILE)."""
    if dtype == "fp32" or not small_tiles(max_tile):
        return None
    return _entry(EDGE_TILE_CONFIGS, kernel, arch, head_dim)


def _entry(table: dict, kernel: str, arch: int, head_dim: int) -> Config:
    """``table``'s entry for ``kernel``, a device architecture and a head dim, the first two checked."""
    if kernel not in CONFIGS:
        raise ValueError(f"kernel must be one of {sorted(CONFIGS)}, got {kernel!r}")
    if arch not in ARCH_TABLE:
        raise ValueError(f"arch must be one of {sorted(ARCH_TABLE)}, got {arch!r}")
    return table[kernel][ARCH_TABLE[arch]][max(64, block_d_of(head_dim))]


def program_rows(kernel: str, config: Config) -> int:
    """The rows of a program's own block under ``config``: the query block (forward, dq) or the key block (dk /
    dv). A launch split by tile size gives the edge launch the tiles of at most this many tokens."""
    return config.block_n if kernel == "bwd_dkdv" else config.block_m


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def select_config(kernel: str, device: torch.device, head_dim: int, dtype: torch.dtype,
                  max_tile: int | None = None) -> Config:
    """The tile configuration of ``kernel`` ("fwd", "bwd_dq", "bwd_dkdv") for a device, head dim, dtype and
    largest tile (:func:`table_config`); the interpreter's small tiles on CPU tensors."""
    arch = arch_of(device)
    if arch is None:
        return INTERPRETER_CONFIG
    return table_config(kernel, arch, head_dim, _DTYPE_NAMES[dtype], max_tile)


def select_edge_config(kernel: str, device: torch.device, head_dim: int, dtype: torch.dtype,
                       max_tile: int | None = None) -> Config | None:
    """:func:`edge_config` for a device (None under the interpreter: its tiles are already small)."""
    arch = arch_of(device)
    return None if arch is None else edge_config(kernel, arch, head_dim, _DTYPE_NAMES[dtype], max_tile)


def flat_loop(max_tile: int | None, config: Config) -> bool:
    """Whether the forward and dq kernels walk their key tiles in one flat loop of key blocks: every tile
    holds at most config.block_n tokens (``max_tile`` bounds them; vdit.ops derives it from the grids)."""
    return max_tile is not None and 0 < max_tile <= config.block_n


# max_tile values on both sides of every block size and of SMALL_TILE: each (config, flat loop) pair a
# launcher can pick shows up for one of them.
_PROBE_TILES = (None, 1, 16, 17, 32, 33, 64, 65, 128, 129)


def shipped(kernel: str):
    """Every (archs, head_dim, dtype, config, flat) of ``kernel`` the launchers can pick (``flat``: the
    forward's and dq's flat key loop, always False for dk / dv), for its ahead-of-time specs, plus the
    padded head dim at its fp16 sm_90 entries."""
    for table_arch, archs in SHIPPED_ARCHS.items():
        for head_dim in SHIPPED_HEAD_DIMS:
            for dtype in ("fp16", "bf16", "fp32"):
                for cfg, flat in _distinct(table_arch, head_dim, dtype, kernel):
                    yield archs, head_dim, dtype, cfg, flat
    for cfg, flat in _distinct(90, PADDED_HEAD_DIM, "fp16", kernel):
        yield SHIPPED_ARCHS[90], PADDED_HEAD_DIM, "fp16", cfg, flat


def _distinct(arch: int, head_dim: int, dtype: str, kernel: str) -> list[tuple[Config, bool]]:
    """The (configuration, flat loop) pairs ``table_config``, ``edge_config`` and ``flat_loop`` pick for any
    tile size."""
    pairs = []
    for max_tile in _PROBE_TILES:
        for cfg in (table_config(kernel, arch, head_dim, dtype, max_tile),
                    edge_config(kernel, arch, head_dim, dtype, max_tile)):
            pair = (cfg, kernel != "bwd_dkdv" and flat_loop(max_tile, cfg)) if cfg is not None else None
            if pair is not None and pair not in pairs:
                pairs.append(pair)
    return pairs
