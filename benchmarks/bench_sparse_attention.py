"""Spacetime block-sparse attention on CPU (fp32): vdit's sliding-tile kernel against dense attention on
the same tokens, measured in the same run.

Cases:
    one video of 16x32x32 tokens (16,384), H=8, D=64, tile (4,4,4) (256 tiles), window (3,3,3): 27 of 256
        tiles visible per query tile;
    a packed batch of four different grids (16x32x32, 8x24x40, 5x16x16, 1x32x32), same tile and window;
    a sweep of windows from 1 tile to the whole grid on the single video (forward), for the plot of time
        against the fraction of visible tiles.
Baselines: dense vdit ``varlen_attention`` (C++ kernel) on the same tokens, the per-sequence SDPA loop
(dense), and FlexAttention (torch.compile, CPU forward) with the equivalent block mask (a mask_mod that
allows the key tiles of the op's own lists, ``SparsePattern.window_tiles``, so it follows the window rule).
Under ``--quick`` the video is 8x32x32 tokens.

    pytest benchmarks/bench_sparse_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import quick
from vdit.ops import SparsePattern, varlen_attention
from vdit.ops.tiles import tile_layout
from vdit.packing import cu_seqlens_from_lengths

HEADS, HEAD_DIM = 8, 64
TILE, WINDOW = (4, 4, 4), (3, 3, 3)
VIDEO = (8, 32, 32) if quick() else (16, 32, 32)
BATCH = [VIDEO, (8, 24, 40), (5, 16, 16), (1, 32, 32)]
SWEEP = [(1, 1, 1), (1, 3, 3), (3, 3, 3), (3, 5, 5), (3, 8, 8), (8, 8, 8)] if VIDEO[0] == 8 else \
    [(1, 1, 1), (3, 3, 3), (3, 5, 5), (5, 5, 5), (3, 8, 8), (5, 8, 8), (8, 8, 8)]


def _inputs(grids):
    g = torch.Generator().manual_seed(0)
    grids = torch.tensor(grids, dtype=torch.int32)
    lengths = grids.prod(1).tolist()
    q, k, v = (torch.randn(sum(lengths), HEADS, HEAD_DIM, generator=g) for _ in range(3))
    return q, k, v, cu_seqlens_from_lengths(lengths), grids


def _pattern(window) -> SparsePattern:
    return SparsePattern("sliding_tile", TILE, window=window)


def visible_fraction(grids, window) -> float:
    """Visible key tiles per query tile over all tiles, token-weighted over the batch, counted in the key-tile
    lists the op attends (SparsePattern.window_tiles)."""
    grids = torch.tensor(grids, dtype=torch.int32)
    layout = tile_layout(grids, TILE)
    visible = (_pattern(window).window_tiles(grids)[:, 0] >= 0).sum(1).double()  # per query tile
    seen = total = 0.0
    for grid, a, b in zip(layout.grids, layout.first_tile, layout.first_tile[1:]):
        tokens = grid[0] * grid[1] * grid[2]
        seen += tokens * float(visible[a:b].mean())
        total += tokens * (b - a)
    return seen / total


def _flex(q, k, v, grid, window):
    """FlexAttention on one video (tile order) with the sliding-tile mask: a mask_mod over the tiles of each
    token, allowing the key tiles that the op's own lists (SparsePattern.window_tiles) name."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    grids = torch.tensor([grid], dtype=torch.int32)
    layout = tile_layout(grids, TILE)
    kv_tiles = _pattern(window).window_tiles(grids)[:, 0].long()  # (tiles, K), -1 in unused slots
    tiles = kv_tiles.shape[0]
    allowed = torch.zeros(tiles, tiles + 1, dtype=torch.bool)  # the last column takes the unused slots
    allowed[torch.arange(tiles)[:, None].expand_as(kv_tiles), torch.where(kv_tiles >= 0, kv_tiles, tiles)] = True
    allowed = allowed[:, :tiles].contiguous()
    tile_of = torch.repeat_interleave(torch.arange(tiles), (layout.offsets[1:] - layout.offsets[:-1]).long())

    def mask_mod(b, h, qi, ki):
        return allowed[tile_of[qi], tile_of[ki]]

    n = q.shape[0]
    mask = create_block_mask(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=64)
    flex = torch.compile(flex_attention, dynamic=False)
    args = tuple(t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
    return lambda: flex(*args, block_mask=mask)


def _sdpa_loop(q, k, v, cu):
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs)


def _case(impl, grids, window):
    q, k, v, cu, g = _inputs(grids)
    if impl == "vdit cpu sliding-tile":
        pattern = _pattern(window)
        return (q, k, v), lambda q, k, v: pattern.attend(q, k, v, cu, g, backend="cpu")
    if impl == "dense vdit cpu (varlen_attention)":
        longest = int((cu[1:] - cu[:-1]).max())
        return (q, k, v), lambda q, k, v: varlen_attention(q, k, v, cu, cu, longest, longest, backend="cpu")
    if impl == "SDPA per sequence (dense)":
        return (q, k, v), lambda q, k, v: _sdpa_loop(q, k, v, cu)
    raise ValueError(impl)


def _run(benchmark, fn, inputs, mode, rounds=3):
    if mode == "fwd":
        with torch.no_grad():
            benchmark.pedantic(fn, args=inputs, rounds=rounds, warmup_rounds=1, iterations=1)
        return
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    grad = torch.randn_like(leaves[0])
    benchmark.pedantic(lambda: torch.autograd.grad(fn(*leaves), leaves, grad), rounds=rounds, warmup_rounds=1,
                       iterations=1)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", ["one video", "four videos"])
@pytest.mark.parametrize("impl", ["vdit cpu sliding-tile", "dense vdit cpu (varlen_attention)",
                                  "SDPA per sequence (dense)"])
def test_sliding_tile_attention(benchmark, impl, batch, mode):
    grids = [VIDEO] if batch == "one video" else BATCH
    inputs, fn = _case(impl, grids, WINDOW)
    benchmark.group = (f"sliding_tile_attention fp32 {batch} {'+'.join('x'.join(map(str, g)) for g in grids)} "
                       f"H{HEADS} D{HEAD_DIM} tile {TILE} window {WINDOW} {mode}")
    benchmark.extra_info.update(impl=impl, visible=visible_fraction(grids, WINDOW))
    _run(benchmark, fn, inputs, mode)


def test_flex_attention_block_mask(benchmark):
    q, k, v, cu, g = _inputs([VIDEO])
    try:
        fn = _flex(q, k, v, VIDEO, WINDOW)
        with torch.no_grad():
            out = fn()[0].transpose(0, 1)
    except Exception as exc:  # a baseline that does not run on this CPU build is reported, not failed
        pytest.skip(f"FlexAttention does not run here: {type(exc).__name__}: {exc}")
    expected = _pattern(WINDOW).attend(q, k, v, cu, g, backend="cpu")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # same answer as ours
    benchmark.group = (f"sliding_tile_attention fp32 one video {'x'.join(map(str, VIDEO))} H{HEADS} D{HEAD_DIM} "
                       f"tile {TILE} window {WINDOW} fwd")
    benchmark.extra_info.update(impl="FlexAttention (block mask)", visible=visible_fraction([VIDEO], WINDOW))
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("window", SWEEP, ids=lambda w: "x".join(map(str, w)))
def test_window_sweep(benchmark, window):
    inputs, fn = _case("vdit cpu sliding-tile", [VIDEO], window)
    benchmark.group = f"sliding-tile window sweep {'x'.join(map(str, VIDEO))} window {window}"
    benchmark.extra_info.update(impl="vdit cpu sliding-tile", window=list(window),
                                visible=visible_fraction([VIDEO], window))
    _run(benchmark, fn, inputs, "fwd")


def test_window_sweep_dense_reference(benchmark):
    inputs, fn = _case("dense vdit cpu (varlen_attention)", [VIDEO], WINDOW)
    benchmark.group = f"sliding-tile window sweep {'x'.join(map(str, VIDEO))} dense"
    benchmark.extra_info.update(impl="dense vdit cpu (varlen_attention)", window="dense", visible=1.0)
    _run(benchmark, fn, inputs, "fwd")
