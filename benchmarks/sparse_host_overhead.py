"""Host overhead per call of the block-sparse attention path on CPU: what a repeated call (same shapes,
second and later calls) spends outside the kernel, i.e. what a GPU would wait on before its kernel
launches.

For the ops, the overhead is the call's time minus the kernel's alone (the registered forward operator
called on the same q, k, v, offsets and lists); both are medians of many calls in the same run. The head
dim is small so that the kernel is cheap. The nn module and the swapped SDPA call are timed whole.

    python -m benchmarks.sparse_host_overhead [--calls 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from vdit.nn import TileSparseAttention
from vdit.ops import SparsePattern, block_sparse_attention, sliding_tile_attention
from vdit.ops.sparse_attention import SPEC, _global_lists
from vdit.ops.tiles import sliding_window_tiles, tile_layout
from vdit.packing import cu_seqlens_from_lengths
from vdit.swap.sparse import SparseRouting, sparse_sdpa

GRIDS = [[3, 8, 12], [2, 6, 8]]  # two videos of a packed batch (384 + 96 tokens)
TILE, WINDOW, HEADS, HEAD_DIM = (1, 4, 4), (1, 2, 2), 2, 4


def _median_ms(fn, calls: int) -> float:
    for _ in range(3):  # first calls build the caches
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _op_cases(calls: int) -> list[tuple[str, float, float]]:
    """(case, call ms, kernel-alone ms) for the two ops."""
    grids = torch.tensor(GRIDS, dtype=torch.int32)
    total = int(grids.prod(1).sum())
    cu = cu_seqlens_from_lengths(grids.prod(1).tolist())
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM) for _ in range(3))
    layout = tile_layout(grids, TILE)
    kv_tiles = sliding_window_tiles(layout, torch.tensor([WINDOW]))
    lists = _global_lists(layout, kv_tiles, HEADS)
    forward = SPEC.family("cpu").op("block_sparse_attention_fwd")
    kernel = _median_ms(lambda: forward(q, k, v, layout.offsets, lists, layout.max_tile, HEAD_DIM ** -0.5), calls)
    rows = [
        ("sliding_tile_attention, same grids tensor", lambda: sliding_tile_attention(q, k, v, cu, grids, TILE, WINDOW)),
        ("sliding_tile_attention, new grids tensor each call",
         lambda: sliding_tile_attention(q, k, v, cu, grids.clone(), TILE, WINDOW)),
        ("block_sparse_attention, given kv_tiles", lambda: block_sparse_attention(q, k, v, cu, grids, TILE, kv_tiles)),
    ]
    return [(name, _median_ms(fn, calls), kernel) for name, fn in rows]


def _whole_cases(calls: int) -> list[tuple[str, float]]:
    """(case, call ms) for the nn module (both modes) and one swapped SDPA call (unmasked, masked)."""
    grids = torch.tensor(GRIDS, dtype=torch.int32)
    total = int(grids.prod(1).sum())
    cu = cu_seqlens_from_lengths(grids.prod(1).tolist())
    x = torch.randn(total, HEADS * HEAD_DIM)
    rows = []
    with torch.no_grad():
        for mode in ("sliding_tile", "topk_tile"):
            module = TileSparseAttention(HEADS * HEAD_DIM, HEADS, pattern=SparsePattern.of(mode, TILE, WINDOW, 4))
            rows.append((f"TileSparseAttention {mode}", _median_ms(lambda m=module: m(x, cu, grids=grids), calls)))
        rows += _swap_cases("grid 3x8x12 + 8 text tokens", (3, 8, 12), 8, calls, attention=True)
        # Wan2.1-1.3B's 480p grid (81 frames, 480 x 832: 21 x 30 x 52 tokens) with the README's tiles and
        # window, attention left out and 1 head of dim 1 (the gathers nearly free): what is left is what
        # packing a call costs (the tile-order permutation, the indices).
        rows += _swap_cases("Wan-1.3B grid 21x30x52 + 16 text tokens, no attention op, 1 head of dim 1",
                            (21, 30, 52), 16, max(calls // 4, 5), attention=False, tile=(3, 6, 4), window=(3, 3, 5),
                            heads=1, head_dim=1)
    return rows


class _NoAttention:
    """A pattern whose attention returns q: what is left of a swapped call is its packing and gathers."""

    def __init__(self, pattern: SparsePattern):
        self._pattern = pattern

    def __getattr__(self, name):
        return getattr(self._pattern, name)

    def attend(self, q, *args, **kwargs):
        return q


def _swap_cases(label: str, grid: tuple, text: int, calls: int, attention: bool, tile=TILE,
                window=WINDOW, heads=HEADS, head_dim=HEAD_DIM) -> list[tuple[str, float]]:
    """(case, call ms) of one swapped SDPA call, unmasked and with a key-padding mask (3 text tokens dropped)."""
    length = grid[0] * grid[1] * grid[2] + text
    q, k, v = (torch.randn(2, heads, length, head_dim) for _ in range(3))
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[1, -3:] = False
    routing = SparseRouting(SparsePattern("sliding_tile", tile, window=window))
    if not attention:
        routing.pattern = _NoAttention(routing.pattern)
    routing.grid = grid
    rows = []
    for name, mask in (("", None), (", key-padding mask", keep[:, None, None])):
        call = _median_ms(lambda m=mask: sparse_sdpa(q, k, v, m, False, None, routing, "x"), calls)
        rows.append((f"swapped SDPA call, {label}{name}", call))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU ISA {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, 1 thread, "
          f"head dim {HEAD_DIM}, {HEADS} heads, medians of {args.calls} calls")
    print("| case | call (ms) | kernel alone (ms) | host overhead (ms) |\n|---|---|---|---|")
    for name, call, kernel in _op_cases(args.calls):
        print(f"| {name} | {call:.3f} | {kernel:.3f} | {call - kernel:.3f} |")
    for name, call in _whole_cases(args.calls):
        print(f"| {name} | {call:.3f} | - | - |")


if __name__ == "__main__":
    main()
