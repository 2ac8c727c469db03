"""The block-sparse attention GPU check (benchmarks/gpu_sparse_check.py): a smoke test of every installed
kernel against the fp32 reference, and timings beside what the static cost model predicts.

Smoke: forward (out, lse) and backward (dq, dk, dv), each dtype, sliding-tile and top-k, on one packed batch
of videos with partial edge tiles and global tokens, every kernel the registry says is installed.

Timing: sliding-tile and top-k at :data:`SPARSITIES` with tiles :data:`TILES`, on one 30x48x80 video and a
packed mix of four sizes, against the installed dense kernels. The model (docs/sparse-gpu-cost-model.md):
a sparse kernel runs its MMAs at the rate of vdit's dense Triton kernel, so its time is the dense Triton
time x the MMA area it issues (each listed (query tile, key tile) pair costs its row blocks x its key
blocks, partial blocks whole, with the configuration the launcher picks) / the dense useful area (sum of
L^2). What it leaves out (pipeline prologues and drains per listed tile, list reads, occupancy) shows as
measured / model > 1.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from vdit.bench.accuracy import installed_kernels, mismatch, tolerance
from vdit.bench.gpu_timing import percentile
from vdit.bench.sparse_cost_model import useful_row_fraction
from vdit.kernels.triton.sparse_attention.configs import flat_loop, table_config
from vdit.ops import block_sparse_attention, sliding_tile_attention, topk_tiles, varlen_attention
from vdit.ops.tiles import sliding_window_tiles, tile_layout, to_global
from vdit.packing import cu_seqlens_from_lengths

PATTERNS = ("sliding_tile", "topk")
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)  # fraction of key tiles a query tile skips
TILES = ((4, 4, 4), (6, 8, 8))
BATCHES = {"one video": ((30, 48, 80),),
           "four videos": ((21, 30, 52), (16, 30, 40), (9, 24, 32), (5, 16, 24))}
DENSE_KERNELS = ("flash-attn", "torch-varlen", "triton")
MODES = ("fwd", "fwd+bwd")
BWD_KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")


@dataclasses.dataclass(frozen=True)
class SmokeCase:
    """One packed batch of the smoke test: videos with partial edge tiles, global tokens, GQA heads."""

    grids: tuple = ((5, 9, 10), (4, 8, 12), (3, 6, 5))
    global_tokens: tuple = (5, 0, 3)
    tile: tuple = (4, 4, 4)
    window: tuple = (2, 2, 3)
    topk: int = 3
    heads: tuple = (4, 2)  # query heads, key / value heads
    head_dim: int = 64


def packed_inputs(grids, heads, head_dim, dtype, device, global_tokens=(), seed: int = 0):
    """q (total, Hq, D), k, v (total, Hk, D) leaves needing grad, cu_seqlens, grids int32 (B, 3) on ``device``."""
    g = torch.Generator().manual_seed(seed)
    extra = global_tokens or (0,) * len(grids)
    lengths = [t * h * w + e for (t, h, w), e in zip(grids, extra)]
    hq, hk = heads
    q, k, v = (torch.randn(sum(lengths), n, head_dim, generator=g).to(device, dtype).requires_grad_()
               for n in (hq, hk, hk))
    return q, k, v, cu_seqlens_from_lengths(lengths, device), torch.tensor(grids, dtype=torch.int32, device=device)


def smoke_call(pattern: str, case: SmokeCase, cu, grids, kv_tiles):
    """f(q, k, v, backend) -> (out, lse) of ``pattern`` on ``case``'s batch."""
    options = dict(global_tokens=list(case.global_tokens) or None, return_lse=True)
    if pattern == "sliding_tile":
        return lambda q, k, v, b: sliding_tile_attention(q, k, v, cu, grids, case.tile, case.window, backend=b,
                                                         **options)
    return lambda q, k, v, b: block_sparse_attention(q, k, v, cu, grids, case.tile, kv_tiles, backend=b, **options)


def _results(call, inputs, backend, dout):
    out, lse = call(*inputs, backend)
    return (out, lse, *torch.autograd.grad(out, inputs, dout.to(out.dtype)))


def check_smoke(pattern: str, case: SmokeCase, device, dtype, backends: Sequence[str] | None = None) -> list[tuple]:
    """(pattern, backend, dtype name, problem or None) for each kernel of ``pattern``'s op (``backends`` or
    every installed one) against the fp32 reference on ``case``: out, lse, dq, dk, dv."""
    op = "sliding_tile_attention" if pattern == "sliding_tile" else "block_sparse_attention"
    q, k, v, cu, grids = packed_inputs(case.grids, case.heads, case.head_dim, dtype, device, case.global_tokens)
    kv_tiles = None if pattern == "sliding_tile" else topk_tiles(  # chosen once, from the rounded inputs
        q.detach(), k.detach(), cu, grids, case.tile, case.topk, global_tokens=list(case.global_tokens) or None)
    call = smoke_call(pattern, case, cu, grids, kv_tiles)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = _results(call, exact, "torch", dout)
    names = backends if backends is not None else [
        name for name, why in installed_kernels(op, device, dtype, case.head_dim).items() if why is None]
    rows = []
    for backend in names:
        try:
            got = _results(call, (q, k, v), backend, dout)
        except Exception as exc:  # a kernel that fails to compile or launch is one failed row, not the end
            rows.append((pattern, backend, str(dtype).replace("torch.", ""), f"raised {type(exc).__name__}: {exc}"))
            continue
        problems = [f"{what} {why}" for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected)
                    if (why := mismatch(a, b, tolerance(dtype, _kind(what)))) is not None]
        rows.append((pattern, backend, str(dtype).replace("torch.", ""), "; ".join(problems) or None))
    return rows


def _kind(what: str) -> str:
    return "out" if what == "out" else "lse" if what == "lse" else "grad"


# ---- timing cases ----------------------------------------------------------------------------------------

def tile_grid(grid, tile) -> tuple[int, int, int]:
    """Tiles per axis of a video grid (T, H, W) cut in ``tile``."""
    return tuple(math.ceil(n / t) for n, t in zip(grid, tile))


def window_for_sparsity(tiles: Sequence[int], sparsity: float, slack: float = 1.1) -> tuple[int, int, int]:
    """The sliding window (tiles per axis) for a video of ``tiles`` tiles: among the windows whose visible
    fraction prod(w) / prod(n) is within a factor ``slack`` of 1 - sparsity, the one closest to the grid's
    shape (w_i / n_i nearest (1 - sparsity) ** (1/3) on every axis); where none is, the closest fraction."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    target, total = 1.0 - sparsity, math.prod(tiles)
    per_axis = target ** (1 / 3)

    def off(w):  # how far the window's visible fraction is from the target, as a log ratio
        return abs(math.log(math.prod(w) / total / target))

    def shape(w):
        return max(abs(wi / ni - per_axis) for wi, ni in zip(w, tiles))

    windows = [(a, b, c) for a in range(1, tiles[0] + 1) for b in range(1, tiles[1] + 1)
               for c in range(1, tiles[2] + 1)]
    close = [w for w in windows if off(w) <= math.log(slack)]
    return min(close, key=lambda w: (shape(w), off(w))) if close else min(windows, key=lambda w: (off(w), shape(w)))


def topk_for_sparsity(tiles: Sequence[int], sparsity: float) -> int:
    """The key tiles each query tile keeps on a video of ``tiles`` tiles: round((1 - sparsity) x tiles), >= 1."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return max(1, round((1.0 - sparsity) * math.prod(tiles)))


@dataclasses.dataclass(frozen=True)
class TimingCase:
    batch: str
    grids: tuple
    tile: tuple
    pattern: str  # "sliding_tile", "topk"
    sparsity: float

    @property
    def largest_tiles(self) -> tuple[int, int, int]:
        """The tile grid of the batch's largest video: the window and top-k are chosen on it."""
        return max((tile_grid(g, self.tile) for g in self.grids), key=math.prod)

    @property
    def window(self) -> tuple[int, int, int]:
        return window_for_sparsity(self.largest_tiles, self.sparsity)

    @property
    def topk(self) -> int:
        return topk_for_sparsity(self.largest_tiles, self.sparsity)

    def describe(self) -> str:
        what = f"window {'x'.join(map(str, self.window))}" if self.pattern == "sliding_tile" else f"top-{self.topk}"
        return f"{self.pattern} {what}"


def timing_cases() -> list[TimingCase]:
    """Every TimingCase of BATCHES, TILES, PATTERNS and SPARSITIES: batch, then tile, pattern, sparsity."""
    return [TimingCase(name, tuple(grids), tuple(tile), pattern, s) for name, grids in BATCHES.items()
            for tile in TILES for pattern in PATTERNS for s in SPARSITIES]


def dense_call(q, k, v, cu, backend: str):
    """f() -> out of dense ``varlen_attention`` on ``backend`` over the same packed tokens."""
    longest = int((cu[1:] - cu[:-1]).max())
    return lambda: varlen_attention(q, k, v, cu, cu, longest, longest, backend=backend)


def sparse_call(case: TimingCase, q, k, v, cu, grids, backend: str = "auto"):
    """(f() -> out of ``case``'s sparse op, local key-tile lists (tiles, Hq or 1, K) it attends); top-k lists
    are chosen once here, outside what is timed."""
    layout = tile_layout(grids, case.tile)
    if case.pattern == "sliding_tile":
        lists = sliding_window_tiles(layout, torch.tensor([case.window]))
        return lambda: sliding_tile_attention(q, k, v, cu, grids, case.tile, case.window, backend=backend), lists
    lists = topk_tiles(q.detach(), k.detach(), cu, grids, case.tile, case.topk)
    return lambda: block_sparse_attention(q, k, v, cu, grids, case.tile, lists, backend=backend), lists


# ---- the cost model's prediction ----------------------------------------------------------------------

def issued_area(sizes: torch.Tensor, lists: torch.Tensor, block_m: int, block_n: int) -> float:
    """MMA area (rows x columns) a kernel issues over global key-tile ``lists`` (tiles, Hl, K), -1 unused, of
    tiles of ``sizes`` tokens, summed over the Hl list heads: each listed pair costs its query tile rounded up
    to block_m rows x its key tile rounded up to block_n columns."""
    used = lists >= 0
    key_sizes = torch.where(used, sizes[lists.clamp_min(0)], 0).double()
    key_cols = (torch.ceil(key_sizes / block_n) * block_n).sum(-1)  # (tiles, Hl)
    query_rows = torch.ceil(sizes.double() / block_m) * block_m
    return float((query_rows[:, None] * key_cols).sum())


def model_figures(grids, tile, local_lists: torch.Tensor, arch: int, head_dim: int, dtype: str) -> dict:
    """The model's figures for lists ``local_lists`` (tiles, Hl, K) over videos ``grids`` in ``tile``:
    ``visible`` (attended / dense key-query pairs), ``ratio`` {"fwd", "fwd+bwd"} (issued MMA area / dense area;
    fwd+bwd averages the forward, dq and dk / dv kernels' configurations), ``useful_rows`` and ``loop`` (the
    forward's configuration: docs/sparse-gpu-cost-model.md)."""
    layout = tile_layout(torch.tensor(grids, dtype=torch.int32), tile)
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).long()
    lists = to_global(layout, local_lists.cpu()).long()
    heads = lists.shape[1]
    dense = float(sum(math.prod(g) ** 2 for g in grids))
    ratios = {}
    for kernel in BWD_KERNELS:
        config = table_config(kernel, arch, head_dim, dtype, layout.max_tile)
        ratios[kernel] = issued_area(sizes, lists, config.block_m, config.block_n) / heads / dense
    forward = table_config("fwd", arch, head_dim, dtype, layout.max_tile)
    return dict(visible=issued_area(sizes, lists, 1, 1) / heads / dense,
                ratio={"fwd": ratios["fwd"], "fwd+bwd": sum(ratios.values()) / len(ratios)},
                useful_rows=useful_row_fraction(sizes.tolist(), forward.block_m),
                loop="flat" if flat_loop(layout.max_tile, forward) else "nested")


# ---- the report -------------------------------------------------------------------------------------------

def time_cell(summary: dict | None) -> str:
    """Median milliseconds and the half-spread of p10..p90 relative to it, or "-" (not run)."""
    if not summary:
        return "-"
    spread = (summary["p90"] - summary["p10"]) / 2 / summary["median"] if summary["median"] else 0.0
    return f"{summary['median']:.2f} ±{spread:.0%}"


def model_cell(summary: dict | None, model_ms: float | None) -> str:
    """The model's milliseconds and measured / model, or "-"."""
    if model_ms is None:
        return "-"
    if not summary:
        return f"{model_ms:.2f}"
    return f"{model_ms:.2f} ({summary['median'] / model_ms:.2f}x)"


def report_row(row: dict) -> str:
    """One table line of a measured row: batch, tile, kernel, sparsity, visible, per mode measured and model,
    useful rows, loop."""
    cells = [row["batch"], row.get("tile") or "-", row["kernel"], f"{row.get('sparsity', 0.0):.0%}",
             f"{row.get('visible', 1.0):.1%}"]
    for mode in MODES:
        summary = row["times"].get(mode)
        cells += [time_cell(summary), model_cell(summary, row.get("model", {}).get(mode))]
    cells += [f"{row['useful_rows']:.1%}" if "useful_rows" in row else "-", row.get("loop", "-")]
    return "| " + " | ".join(cells) + " |"


def report(gpu: str, setting: str, rows: Sequence[dict]) -> str:
    """The markdown report: title, how to read it, one line per row, the median measured / model per tile."""
    lines = [f"# Block-sparse attention on {gpu}", "", setting, "",
             "Times: median of CUDA-event runs after a warm-up (± half the p10..p90 spread). model: the cost "
             "model's time, dense vdit Triton x issued MMA area / dense area (docs/sparse-gpu-cost-model.md), "
             "and measured / model in brackets: 1.00x confirms it, above 1 is what it leaves out. visible: "
             "attended / dense query-key pairs. rows, loop: the forward's useful MMA rows and key loop.", "",
             "| batch | tile | kernel | sparsity | visible | fwd ms | model | fwd+bwd ms | model | rows | loop |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [report_row(r) for r in rows]
    lines += ["", "Measured / model, median over the sparse rows:", ""]
    for tile in sorted({r["tile"] for r in rows if r.get("tile")}):
        for mode in MODES:
            ratios = [r["times"][mode]["median"] / r["model"][mode] for r in rows
                      if r.get("tile") == tile and r["times"].get(mode) and r.get("model", {}).get(mode)]
            if ratios:
                lines.append(f"- tile {tile} {mode}: {percentile(ratios, 50):.2f}x over {len(ratios)} rows")
    return "\n".join(lines) + "\n"
