"""A static GPU cost model of the block-sparse attention kernels: what the tile layout and the compiled
kernels say about speed, without a GPU (docs/sparse-gpu-cost-model.md explains each figure).

* useful MMA rows: the fraction of a program's row-block MMA rows that hold a real token, useful rows /
  (row blocks x block rows), from the tile sizes of a video alone;
* the key walk of a query (tile, head) over a sliding-tile window: list slots, key tiles, key blocks, K / V
  tile loads, and how many software pipelines it starts (each start issues a load prologue and ends in a
  full drain, so a key block that starts one waits for its loads with nothing to overlap);
* CTAs per SM, from the registers and shared memory of the compiled kernel (``aot.spec_resources``);
* the pipeline drains (``ttg.async_wait`` with num = 0) inside the compiled forward's key loops (TTGIR).

``python -m vdit.bench.sparse_cost_model [--compile]`` prints them for the benchmark
cases, with the general (128-row) configurations before and the tile-sized ones after.
"""
from __future__ import annotations

import argparse
import functools
import math
import re

from vdit.kernels.triton.sparse_attention.configs import CONFIGS, edge_config, flat_loop, program_rows, table_config
from vdit.ops.tiles import window_starts

# (label, video grid (T, H, W) in tokens, tile (tt, th, tw)): the benchmark cases and the 33x45x80 video
# whose edge tiles are partial on two axes.
CASES = (("33x45x80 4x4x4", (33, 45, 80), (4, 4, 4)),
         ("30x48x80 4x4x4", (30, 48, 80), (4, 4, 4)),
         ("30x48x80 6x8x8", (30, 48, 80), (6, 8, 8)))
WINDOW = (3, 3, 3)  # the sliding-tile window of the key-walk figures, in tiles

# Per SM: 32-bit registers, shared memory (bytes, of which each CTA reserves 1 KB), resident warps.
SM_REGISTERS = 65536
SM_SHARED = {90: 228 * 1024, 80: 164 * 1024, 86: 100 * 1024}
SM_WARPS = {90: 64, 80: 64, 86: 48}
MAX_CTAS = 32


def axis_tiles(n: int, t: int) -> list[int]:
    """Token counts of the tiles along one axis of n tokens, tile t (the last one partial)."""
    return [t] * (n // t) + ([n % t] if n % t else [])


def tile_sizes(grid, tile) -> list[int]:
    """Token counts of every tile of one video (grid (T, H, W) tokens, tile (tt, th, tw))."""
    a, b, c = (axis_tiles(n, t) for n, t in zip(grid, tile))
    return [x * y * z for x in a for y in b for z in c]


def useful_row_fraction(sizes, block_rows: int, edge_rows: int | None = None) -> float:
    """Useful MMA rows / (row blocks x block_rows) of tiles of ``sizes`` tokens cut in row blocks; with
    ``edge_rows``, each tile of at most that many tokens takes one block of ``edge_rows`` rows instead (the
    second launch, ``configs.EDGE_TILE_CONFIGS``)."""
    rows = sum(edge_rows if edge_rows and s <= edge_rows else math.ceil(s / block_rows) * block_rows
               for s in sizes if s)
    return sum(sizes) / rows if rows else 1.0


def key_walk(grid, tile, block_n: int, window=WINDOW) -> dict:
    """Mean per query (tile, head) of a sliding-tile window: list slots, key tiles, key blocks of ``block_n``
    rows, K / V tile loads (two per key block), and pipeline starts today (one per key tile) and with one
    flat loop over the listed key blocks (one per query block)."""
    axes = [axis_tiles(n, t) for n, t in zip(grid, tile)]
    counts = [len(a) for a in axes]
    widths = [min(w, n) for w, n in zip(window, counts)]
    starts = [window_starts(n, w).tolist() for n, w in zip(counts, widths)]  # the op's own window rule
    # Along each axis, the key blocks a window covers are products of the tiles' sizes: sum over the window.
    per_axis = [[axes[d][s:s + widths[d]] for s in starts[d]] for d in range(3)]
    slots = math.prod(widths)
    blocks, queries = 0, 0
    for x in per_axis[0]:
        for y in per_axis[1]:
            for z in per_axis[2]:
                blocks += sum(math.ceil(a * b * c / block_n) for a in x for b in y for c in z)
                queries += 1
    key_blocks = blocks / queries
    return dict(slots=slots, key_tiles=slots, key_blocks=key_blocks, kv_loads=2 * key_blocks,
                pipelines_now=slots, pipelines_flat=1, exposed_blocks_now=slots / key_blocks)


def ctas_per_sm(registers: int, shared: int, num_warps: int, arch: int) -> int:
    """Resident CTAs per SM of a kernel using ``registers`` per thread and ``shared`` bytes per CTA (registers
    are allocated per warp in units of 256)."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = SM_REGISTERS // (per_warp * num_warps) if registers else MAX_CTAS
    by_shared = SM_SHARED[arch] // (shared + 1024)
    return max(0, min(by_regs, by_shared, SM_WARPS[arch] // num_warps, MAX_CTAS))


def shipped_spec(kernel: str, config, arch: int, head_dim: int, dtype: str, flat: bool = False):
    """The ``aot.KernelSpec`` of ``kernel`` ("fwd", "bwd_dq", "bwd_dkdv") with ``config`` and loop shape."""
    from vdit.kernels.triton.sparse_attention import aot_specs

    for spec in aot_specs():
        cx = spec.constexprs
        if (spec.label.startswith(f"sparse_{kernel} ") and cx["HEAD_DIM"] == head_dim and f" {dtype} " in spec.label
                and (cx["BLOCK_M"], cx["BLOCK_N"], spec.num_warps, spec.num_stages) == _key(config)
                and cx.get("FLAT", False) == flat and arch in spec.archs):
            return spec
    raise LookupError(f"no shipped spec of {kernel} d{head_dim} {dtype} {config} flat={flat} for sm_{arch}")


@functools.cache  # the cases share kernels: compile each once
def compiled(kernel: str, config, arch: int, head_dim: int, dtype: str, flat: bool = False) -> dict:
    """Registers, spills, shared memory, CTAs per SM, loops and drains inside loops of the shipped spec of
    ``kernel`` with ``config`` (compiles for sm_<arch>; no GPU needed, nor TRITON_INTERPRET)."""
    from vdit.kernels.triton.aot import compile_kernel, spec_resources

    spec = shipped_spec(kernel, config, arch, head_dim, dtype, flat)
    res = spec_resources(spec, arch)
    ttgir = compile_kernel(spec.kernel, spec.signature, spec.constexprs, arch, spec.num_warps, spec.num_stages,
                           spec.attrs()).asm["ttgir"]
    return dict(label=spec.label, registers=res.registers, spills=res.spills, shared=res.shared,
                ctas_per_sm=ctas_per_sm(res.registers, res.shared, config.num_warps, arch), loops=loops(ttgir),
                drains_in_loops=drains_in_loops(ttgir), wgmma_serialized=res.wgmma_serialized)


def drains_in_loops(ttgir: str) -> int:
    """The full pipeline drains inside an ``scf.for`` body of a TTGIR listing: the epilogue of a pipelined
    loop, ``ttg.async_wait {num = 0}`` with no token (wait for every load in flight). Inside the key loop one
    follows every key tile's inner loop; the flat loop drains once, after its last iteration. (A wait on
    tokens with num = 0 is a 2-stage loop's steady state: its loads were issued an iteration earlier.)"""
    stack, drains = [], 0
    for line in ttgir.splitlines():
        text = line.split(" loc(")[0].strip()
        if text.startswith("}") and stack:
            stack.pop()
        if re.search(r"ttg\.async_wait\s*\{num = 0 ", text) and "for" in stack:
            drains += 1
        if text.endswith("{"):
            stack.append("for" if "scf.for" in text else "region")
    return drains


def loops(ttgir: str) -> int:
    """The ``scf.for`` loops of a TTGIR listing."""
    return sum("scf.for" in line for line in ttgir.splitlines())


def _key(config) -> tuple:
    return config.block_m, config.block_n, config.num_warps, config.num_stages


def figures(grid, tile, kernel: str = "fwd", arch: int = 90, head_dim: int = 128, dtype: str = "bf16",
            compile_kernels: bool = False) -> dict:
    """{"before": ..., "after": ...[, "edge": ...]}: for the general configuration (CONFIGS) and the ones the
    launcher picks from the largest tile (the table's, and the edge launch's when there is one), the
    configuration, the useful MMA row fraction of one video (grid, tile; "after" counts both launches, "edge"
    its own tiles only) and, with ``compile_kernels``, the figures of :func:`compiled` (the "before" kernel is
    today's code with the general configuration; the code before the flat loop had the nested loop only)."""
    sizes = tile_sizes(grid, tile)
    max_tile = max(sizes)
    general = CONFIGS[kernel][arch][max(64, head_dim)]
    after = table_config(kernel, arch, head_dim, dtype, max_tile)
    edge = edge_config(kernel, arch, head_dim, dtype, max_tile)
    edge_rows = program_rows(kernel, edge) if edge else None
    cases = [("before", general, useful_row_fraction(sizes, program_rows(kernel, general))),
             ("after", after, useful_row_fraction(sizes, program_rows(kernel, after), edge_rows))]
    if edge:
        edge_sizes = [s for s in sizes if 0 < s <= edge_rows]
        cases.append(("edge", edge, useful_row_fraction(edge_sizes, edge_rows) if edge_sizes else None))
    out = {}
    for when, cfg, rows in cases:
        flat = when != "before" and kernel != "bwd_dkdv" and flat_loop(max_tile, cfg)
        row = dict(config=cfg, flat=flat, useful_rows=rows)
        if compile_kernels:
            row.update(compiled(kernel, cfg, arch, head_dim, dtype, flat))
        out[when] = row
    return out


def _line(label: str, kernel: str, when: str, row: dict) -> str:
    cfg = row["config"]
    text = (f"{label:14} {kernel:8} {when:6} {cfg.block_m:>3}x{cfg.block_n:<3} w{cfg.num_warps}s{cfg.num_stages} "
            f"{'flat  ' if row['flat'] else 'nested'} rows "
            f"{'  none' if row['useful_rows'] is None else format(row['useful_rows'], '6.1%')}")
    if "registers" in row:
        text += (f" regs {row['registers']:3} spill {row['spills']} smem {row['shared'] / 1024:5.1f}K"
                 f" CTAs {row['ctas_per_sm']} drains {row['drains_in_loops']}")
    return text


def report(arch: int = 90, head_dim: int = 128, dtype: str = "bf16", compile_kernels: bool = False) -> str:
    """The figures of every case in CASES and kernel, one line each, then each case's key walk."""
    lines = [(f"sm_{arch}, head dim {head_dim}, {dtype}; before: CONFIGS, after: sized from the largest tile "
              "(rows: both launches), edge: the second launch, over the tiles of at most its row block (rows: "
              "its own); rows: useful MMA rows, drains: in loops")]
    for label, grid, tile in CASES:
        for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
            for when, row in figures(grid, tile, kernel, arch, head_dim, dtype, compile_kernels).items():
                lines.append(_line(label, kernel, when, row))
    lines.append(f"key walk per query (tile, head), window {WINDOW} tiles, forward key blocks, before -> after:")
    for label, grid, tile in CASES:
        max_tile = max(tile_sizes(grid, tile))
        cfg = table_config("fwd", arch, head_dim, dtype, max_tile)
        walk = key_walk(grid, tile, cfg.block_n)
        after = 1 if flat_loop(max_tile, cfg) else walk["pipelines_now"]
        lines.append(f"{label:14} slots {walk['slots']}, key blocks {walk['key_blocks']:.0f}, K/V tile loads "
                     f"{walk['kv_loads']:.0f}, pipeline starts {walk['pipelines_now']} -> {after} "
                     f"({walk['exposed_blocks_now']:.0%} -> {after / walk['key_blocks']:.0%} of the key blocks)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="compile each kernel (minutes) for registers, "
                        "shared memory and CTAs per SM")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_SHARED))
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    parser.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"))
    args = parser.parse_args(argv)
    print(report(args.arch, args.head_dim, args.dtype, args.compile))


if __name__ == "__main__":
    main()
