"""The Triton block-sparse attention kernels (vdit/kernels/triton/sparse_attention/), called directly.

block_sparse_attention_forward / block_sparse_attention_backward against the float64 oracle
(vdit.ops.reference.block_sparse_attention_tiles, gradients by autograd): out, lse, dq, dk, dv on packed
batches of videos in tile order built with vdit.ops.tiles (grids not divisible by the tile, a 1-frame
video, tiles larger than a kernel block, per-head windows, grouped-query heads, -1 slots in the middle
of a row, rows with no tile at all, key tiles nobody attends), a window covering the whole grid against
dense attention, the work list, alignment, head-dim padding, and determinism. Without a GPU the kernels
run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), in fp16 and fp32 only (the interpreter's bf16
tl.dot is wrong), with small blocks on small shapes. Outputs are NaN-poisoned (conftest's autouse
fixture), so a row a kernel forgets fails.

The op contract (validation, dispatch, autograd) is tested with the ops layer in tests/ops/.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import HAS_GPU, assert_close, cu_seqlens_of
from tests.kernels.test_attention import DEVICE, DTYPES, GRAD_SCALE  # the dense kernel tests' dtypes and tolerances
from vdit.ops import reference
from vdit.ops.tiles import query_lists, sliding_window_tiles, tile_layout, to_global

try:
    import triton  # noqa: F401
except ImportError:
    S = None
else:
    from vdit.kernels.triton import sparse_attention as S
pytestmark = pytest.mark.skipif(S is None, reason="could not import 'triton'")

# A batch that covers the edge cases: grids not divisible by the tile (5, 6, 7), a 1-frame video, a larger one.
GRIDS = [[5, 6, 7], [1, 4, 4], [4, 8, 8]]


def _layout(grids, tile):
    return tile_layout(torch.tensor(grids, dtype=torch.int32), tile)


def _window_lists(layout, window, hq):
    """Global kv_tiles (num_tiles, Hq, K) of a sliding window: one (3,) window for all heads or (Hq, 3)."""
    window = torch.tensor(window)
    window = window[None] if window.dim() == 1 else window
    lists = to_global(layout, sliding_window_tiles(layout, window))
    return lists.expand(-1, hq, -1).contiguous().to(DEVICE)


def _inputs(total, hq, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(total, h, d, generator=g).to(DEVICE, dtype) for h in (hq, hk, hk))
    dout = torch.randn(total, hq, d, generator=g).to(DEVICE, dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, offsets, kv_tiles, scale):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference.block_sparse_attention_tiles(qd, kd, vd, offsets, kv_tiles, softmax_scale=scale,
                                                      return_lse=True)
    out.backward(dout.double())
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad


def _run(q, k, v, dout, layout, kv_tiles, scale, fwd_config=None, bwd_config=None, edge_config=None):
    hq, hk = q.shape[1], k.shape[1]
    offsets = layout.offsets.to(DEVICE)
    q_tiles = query_lists(kv_tiles.expand(-1, hq, -1), layout.num_tiles, hq, hk)
    out, lse = S.block_sparse_attention_forward(q, k, v, offsets, kv_tiles, layout.max_tile, scale, config=fwd_config,
                                                edge_config=edge_config)
    grads = S.block_sparse_attention_backward(dout, q, k, v, out, lse, offsets, kv_tiles, q_tiles, layout.max_tile,
                                              scale, dkdv_config=bwd_config, dq_config=bwd_config,
                                              edge_config=edge_config)
    return (out, lse, *grads)


def _check(layout, kv_tiles, hq, hk, d, dtype, scale=None, seed=0, fwd_config=None, bwd_config=None,
           edge_config=None):
    """Run both kernels and compare every output with the float64 oracle; returns the kernels' outputs."""
    total = int(layout.offsets[-1])
    q, k, v, dout = _inputs(total, hq, hk, d, dtype, seed)
    scale = d ** -0.5 if scale is None else scale
    got = _run(q, k, v, dout, layout, kv_tiles, scale, fwd_config, bwd_config, edge_config)
    out, lse, dq, dk, dv = got
    r_out, r_lse, r_dq, r_dk, r_dv = _reference(q, k, v, dout, layout.offsets, kv_tiles, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (hq, total)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3
    assert_close(out, r_out, dtype)
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(r_lse).cpu())
    assert_close(lse, r_lse, torch.float32, scale=4.0)  # lse is fp32 whatever the input dtype
    for grad, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert torch.isfinite(grad).all()
        assert_close(grad, want, dtype, scale=GRAD_SCALE[dtype])
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_over_a_packed_batch(dtype):
    # 482 tokens in tiles of (2, 4, 4) = 32 tokens (edge tiles partial), more than one 16-row block each.
    layout = _layout(GRIDS, (2, 4, 4))
    assert layout.max_tile > S.INTERPRETER_CONFIG.block_m or HAS_GPU
    _check(layout, _window_lists(layout, [1, 3, 3], 2), 2, 1, 16, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_windows_grouped_query(dtype):
    # Four query heads on two kv heads, each head its own window (so rows have -1 tails of different
    # lengths); dk / dv sum both query heads of a group inside one program.
    layout = _layout([[3, 5, 6], [1, 4, 4]], (2, 2, 4))
    windows = [[1, 1, 1], [2, 3, 1], [1, 2, 2], [3, 3, 3]]
    _check(layout, _window_lists(layout, windows, 4), 4, 2, 16, dtype, scale=0.4)


def test_unused_slots_empty_rows_and_unattended_key_tiles():
    # Hand-written lists over one video of 2 x 3 x 3 tiles: -1 slots in the middle of rows, a row with no
    # tile at all (its queries: out 0, lse -inf, dq 0), and key tile 8 that no query lists (dk = dv = 0).
    layout = _layout([[3, 5, 6]], (2, 2, 2))
    n = layout.num_tiles
    assert n == 18
    g = torch.Generator().manual_seed(5)
    kv = torch.stack([torch.randperm(n, generator=g)[:5] for _ in range(n * 2)]).view(n, 2, 5).to(torch.int32)
    kv[kv == 8] = -1
    kv[:, :, 2] = -1
    kv[3, 1] = -1  # tile 3, head 1 sees nothing
    kv[7, 0, 1] = -1
    out, lse, dq, dk, dv = _check(layout, kv.to(DEVICE), 2, 2, 16, torch.float32)
    start, end = int(layout.offsets[3]), int(layout.offsets[4])
    assert torch.all(out[start:end, 1] == 0) and torch.all(torch.isneginf(lse[1, start:end]))
    assert torch.all(dq[start:end, 1] == 0) and torch.isfinite(lse[0, start:end]).all()
    k0, k1 = int(layout.offsets[8]), int(layout.offsets[9])
    assert torch.all(dk[k0:k1] == 0) and torch.all(dv[k0:k1] == 0)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (64, 64)])
def test_tiles_larger_than_a_block(block_m, block_n):
    # Tile (2, 8, 8) = 128 tokens: several query blocks per tile and several key blocks per listed tile
    # (and, at 64x64, blocks larger than the partial edge tiles). The dk / dv kernel tiles keys by
    # block_n and loops over queries by block_m.
    layout = _layout([[3, 8, 10], [2, 8, 8]], (2, 8, 8))
    assert layout.max_tile == 128
    cfg = S.Config(block_m, block_n, 4, 1)
    _check(layout, _window_lists(layout, [2, 1, 1], 1), 1, 1, 16, torch.float32, fwd_config=cfg, bwd_config=cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_covering_the_grid_is_dense_attention(dtype):
    # Every tile of its video visible: per video this is dense attention (tile order permutes queries
    # and keys alike), so it must match varlen_attention as well as the sparse oracle.
    grids = [[3, 5, 6], [1, 4, 4], [2, 3, 3]]
    layout = _layout(grids, (2, 4, 4))
    kv = _window_lists(layout, [9, 9, 9], 2)
    out, lse, dq, dk, dv = _check(layout, kv, 2, 1, 16, dtype)
    lengths = [t * h * w for t, h, w in grids]
    total = sum(lengths)
    q, k, v, dout = _inputs(total, 2, 1, 16, dtype)
    cu = cu_seqlens_of(lengths, DEVICE)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = reference.varlen_attention(qd, kd, vd, cu, cu, softmax_scale=16 ** -0.5, return_lse=True)
    r_out.backward(dout.double())
    assert_close(out, r_out.detach(), dtype)
    assert_close(lse, r_lse.detach(), torch.float32, scale=4.0)
    for grad, want in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert_close(grad, want, dtype, scale=GRAD_SCALE[dtype])


def test_one_list_for_all_heads_broadcasts():
    # kv_tiles (num_tiles, 1, K) (the oracle's "Hq or 1") reads the same row for every head.
    layout = _layout([[3, 5, 6]], (2, 4, 4))
    kv = _window_lists(layout, [1, 2, 2], 1)
    assert kv.shape[1] == 1
    _check(layout, kv, 3, 1, 16, torch.float32)
    _check(layout, kv.expand(-1, 3, -1), 3, 1, 16, torch.float32)  # an expanded (stride 0) head dim


@pytest.mark.parametrize("head_dim", [12, 40])
def test_head_dims_that_are_not_multiples_of_8_are_padded(head_dim):
    # 12 is zero-padded to 16 by the launcher (a copy); 40 runs as it is, padded to BLOCK_D 64 in-kernel.
    layout = _layout([[3, 5, 6]], (2, 4, 4))
    _check(layout, _window_lists(layout, [1, 3, 1], 2), 2, 2, head_dim, torch.float32)


def test_head_dims_above_256_raise():
    layout = _layout([[1, 2, 2]], (1, 2, 2))
    q, k, v, _ = _inputs(4, 1, 1, 264, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        S.block_sparse_attention_forward(q, k, v, layout.offsets, _window_lists(layout, [1, 1, 1], 1), 4, 1.0)


def test_misaligned_inputs_and_expanded_dout():
    # A contiguous view 4 bytes into its buffer is copied (the kernels promise 16-byte aligned rows);
    # an expanded dout (as autograd may pass) is made contiguous.
    layout = _layout([[3, 5, 6]], (2, 4, 4))
    kv = _window_lists(layout, [1, 3, 3], 2)
    total = int(layout.offsets[-1])
    q, k, v, _ = _inputs(total, 2, 1, 16, torch.float32)
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)
    q_view = buf[1:].view(q.shape)
    q_view.copy_(q)
    assert q_view.data_ptr() % 16 != 0
    dout = torch.ones(1, 1, 1, dtype=q.dtype, device=q.device).expand(q.shape)
    out, lse, dq, dk, dv = _run(q_view, k, v, dout, layout, kv, 0.3)
    r_out, r_lse, r_dq, r_dk, r_dv = _reference(q, k, v, dout.contiguous(), layout.offsets, kv, 0.3)
    assert_close(out, r_out)
    assert_close(lse, r_lse)
    for grad, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert_close(grad, want, scale=GRAD_SCALE[torch.float32])


def test_backward_is_deterministic():
    # Grouped-query (both query heads feed one kv head's dk / dv): no atomics, so bitwise equal.
    layout = _layout([[3, 5, 6]], (2, 4, 4))
    kv = _window_lists(layout, [2, 3, 3], 2)
    q, k, v, dout = _inputs(int(layout.offsets[-1]), 2, 1, 16, torch.float16, seed=3)
    first = _run(q, k, v, dout, layout, kv, 0.25)
    second = _run(q, k, v, dout, layout, kv, 0.25)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_tiles():
    offsets = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    q, k, v, dout = _inputs(0, 2, 1, 16, torch.float32)
    kv = torch.full((0, 2, 1), -1, dtype=torch.int32, device=DEVICE)
    qt = query_lists(kv, 0, 2, 1)  # no lists: one offset, 1
    out, lse = S.block_sparse_attention_forward(q, k, v, offsets, kv, 0, 1.0)
    assert out.shape == q.shape and lse.shape == (2, 0)
    dq, dk, dv = S.block_sparse_attention_backward(dout, q, k, v, out, lse, offsets, kv, qt, 0, 1.0)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("block_rows", [16, 64])
def test_work_items_cover_every_block_once_heaviest_first(block_rows):
    # Tiles of very different sizes (a 1-token edge tile next to 128-token ones); the list's length
    # depends on shapes only, and its order on the listed tiles' sizes.
    layout = _layout([[5, 9, 17], [1, 1, 1], [2, 8, 8]], (2, 8, 8))
    kv = _window_lists(layout, [[1, 1, 1], [3, 2, 2]], 2)
    total = int(layout.offsets[-1])
    items = S.work_items(layout.offsets, kv, total, block_rows)
    assert items.dtype == torch.int32 and items.shape[1] == 2
    valid = items[:, 0] >= 0
    count = int(valid.sum())
    assert torch.all(valid[:count]) and not torch.any(valid[count:])
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).tolist()
    assert items.shape[0] - count <= layout.num_tiles
    got = sorted(map(tuple, items[valid].tolist()))
    assert got == sorted((t, b) for t, n in enumerate(sizes) for b in range(-(-n // block_rows)))

    def cost(t):
        return sum(sizes[j] for j in kv[t].flatten().tolist() if j >= 0)

    costs = [cost(t) for t, _ in items[valid].tolist()]
    assert costs == sorted(costs, reverse=True)


def test_work_items_of_the_transposed_lists_weigh_the_query_rows_each_key_tile_sees():
    # dk / dv's items come from the CSR transposed lists: a key tile's cost is the query rows of every (query
    # tile, head) listing it, over its kv heads, as the padded key lists' cost is for the forward.
    layout = _layout([[5, 9, 17], [1, 1, 1], [2, 8, 8]], (2, 8, 8))
    kv = _window_lists(layout, [[1, 1, 1], [3, 2, 2], [2, 1, 3], [1, 3, 1]], 4)
    q_tiles = query_lists(kv, layout.num_tiles, 4, 2)
    total = int(layout.offsets[-1])
    items = S.work_items(layout.offsets, q_tiles, total, 16, 4, csr_heads=2)
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).tolist()
    valid = items[:, 0] >= 0
    assert sorted(map(tuple, items[valid].tolist())) == sorted(
        (t, b) for t, n in enumerate(sizes) for b in range(-(-n // 16)))

    def cost(j):
        return sum(sizes[t] for t in range(layout.num_tiles) for h in range(4) if j in kv[t, h].tolist())

    costs = [cost(t) for t, _ in items[valid].tolist()]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_partial_edge_tiles_run_in_a_second_launch_of_smaller_blocks(dtype, monkeypatch):
    # 32-token tiles in 32-row blocks, and the partial edge tiles of at most 16 tokens (grid 5x6x7: 16, 8,
    # 12 and 6 tokens) in a second launch of 16-row blocks, as 4x4x4 tiles run on a GPU (64 and 16 rows):
    # per-head windows, grouped-query heads, -1 slots. Each kernel launches twice, each (tile, block) in
    # exactly one launch, and every output equals the oracle (the outputs are NaN-poisoned, so a row that
    # neither launch writes fails).
    from vdit.kernels.triton.sparse_attention import backward, forward

    layout = _layout(GRIDS, (2, 4, 4))
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).tolist()
    assert max(sizes) == 32 and any(0 < n <= 16 for n in sizes) and any(16 < n < 32 for n in sizes)
    kernels = {"fwd": forward, "bwd_dq": backward, "bwd_dkdv": backward}
    names = {"fwd": "sparse_fwd_kernel", "bwd_dq": "sparse_bwd_dq_kernel", "bwd_dkdv": "sparse_bwd_dkdv_kernel"}
    recorders = {}
    for kernel, module in kernels.items():
        recorders[kernel] = _Recorder(getattr(module, names[kernel]))
        monkeypatch.setattr(module, names[kernel], recorders[kernel])
    kv = _window_lists(layout, [[1, 3, 3], [3, 1, 1], [2, 2, 3], [1, 1, 1]], 4)
    kv[::3, 1, 0] = -1
    _check(layout, kv, 4, 2, 16, dtype, fwd_config=S.Config(32, 32, 4, 1), bwd_config=S.Config(32, 32, 4, 1),
           edge_config=S.Config(16, 16, 4, 1))
    for kernel, recorder in recorders.items():
        rows = "BLOCK_N" if kernel == "bwd_dkdv" else "BLOCK_M"
        assert [launch[rows] for launch in recorder.launches] == [32, 16], kernel
        items = [tuple(item) for launch in recorder.launches for item in launch["WORK"].tolist() if item[0] >= 0]
        # The second launch's list holds one item per tile of at most 16 tokens: its grid is num_tiles long.
        assert recorder.launches[1]["WORK"].shape[0] == layout.num_tiles
        big = sorted((t, b) for t, n in enumerate(sizes) if n > 16 for b in range(-(-n // 32)))
        small = sorted((t, 0) for t, n in enumerate(sizes) if 0 < n <= 16)
        assert sorted(items) == sorted(big + small) and len(set(items)) == len(items), kernel


def test_the_edge_launch_takes_the_tiles_of_at_most_its_row_block():
    from vdit.kernels.triton.sparse_attention.configs import EDGE_TILE, edge_config, program_rows, table_config

    for arch in (90, 80, 86):
        for head_dim in (64, 96, 128, 256):
            for dtype in ("fp16", "bf16"):
                for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
                    edge = edge_config(kernel, arch, head_dim, dtype, 64)
                    assert program_rows(kernel, edge) == EDGE_TILE, (arch, head_dim, dtype, kernel)
                    assert program_rows(kernel, edge) < program_rows(kernel, table_config(kernel, arch, head_dim,
                                                                                          dtype, 64))
                    # Tiles larger than SMALL_TILE (their own tables) and fp32 (small tiles already): one launch.
                    assert edge_config(kernel, arch, head_dim, dtype, 384) is None
                    assert edge_config(kernel, arch, head_dim, dtype, None) is None
                    assert edge_config(kernel, arch, head_dim, "fp32", 64) is None
    # Under the interpreter (CPU tensors) the launchers make no second launch of their own.
    from vdit.kernels.triton.sparse_attention.configs import select_edge_config

    assert select_edge_config("fwd", torch.device("cpu"), 64, torch.float16, 64) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_edge_launch_on_gpu(dtype, head_dim):
    # 4x4x4 tiles on a grid whose edges are partial on two axes (16- and 4-token tiles): the shipped small-tile
    # and edge configurations together (GPU only).
    layout = _layout([[9, 13, 16], [1, 4, 4], [5, 8, 9]], (4, 4, 4))
    kv = _window_lists(layout, [[3, 3, 3], [1, 3, 3], [2, 1, 3], [3, 3, 1]], 4)
    _check(layout, kv, 4, 2, head_dim, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_shipped_configs_on_gpu(dtype, head_dim):
    # The real per-architecture tiles: (6, 8, 8) = 384-token tiles (several blocks of every kernel),
    # partial edge tiles, per-head windows, grouped-query heads (GPU only).
    layout = _layout([[13, 30, 45], [1, 8, 8], [7, 17, 9]], (6, 8, 8))
    kv = _window_lists(layout, [[3, 3, 3], [1, 3, 3], [2, 1, 3], [3, 3, 1]], 4)
    _check(layout, kv, 4, 2, head_dim, dtype)


# ---- GPU shape: row blocks sized to the tiles, flat key loop, no re-specialization per packing, device guard --

def test_compact_lists_keep_the_order_and_count_the_used_entries():
    kv = torch.tensor([[[3, -1, 0, 7]], [[-1, -1, -1, -1]], [[5, 2, -1, 1]]], dtype=torch.int32)
    got = S.compact_lists(kv, 6)  # 7 is out of range: an unused slot
    assert got.dtype == torch.int32 and got.shape == (3, 1, 5) and got.is_contiguous()
    assert got[:, 0, 0].tolist() == [2, 0, 3]
    assert got.tolist() == [[[2, 3, 0, -1, -1]], [[0, -1, -1, -1, -1]], [[3, 5, 2, 1, -1]]]
    # One list expanded over the heads (stride 0) stays one list.
    assert S.compact_lists(kv.expand(-1, 4, -1), 6).shape == (3, 1, 5)
    assert S.compact_lists(kv.repeat(1, 2, 1), 6).shape == (3, 2, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flat_key_loop(dtype):
    # Key blocks as large as the largest tile (32 tokens): the forward and dq take the flat loop, over
    # partial edge tiles, per-head windows with -1 slots in the middle, and grouped-query heads.
    from vdit.kernels.triton.sparse_attention.configs import flat_loop

    layout = _layout(GRIDS, (2, 4, 4))
    cfg = S.Config(16, 32, 4, 1)
    assert flat_loop(layout.max_tile, cfg) and not flat_loop(layout.max_tile, S.INTERPRETER_CONFIG)
    kv = _window_lists(layout, [[1, 3, 3], [3, 1, 1], [2, 2, 3], [1, 1, 1]], 4)
    kv[::3, 1, 0] = -1
    _check(layout, kv, 4, 2, 16, dtype, fwd_config=cfg, bwd_config=cfg)


def test_drains_inside_loops_are_counted_from_the_ttgir():
    from vdit.bench.sparse_cost_model import drains_in_loops, loops

    nested = """tt.func public @k() attributes {noinline = false} {
      %a = scf.for %i = %c0 to %n step %c1 iter_args(%x = %y) -> (i32) : i32 {
        %b = scf.for %j = %c0 to %m step %c1 iter_args(%z = %x) -> (i32) : i32 {
          %t = ttg.async_wait %k, %v {num = 0 : i32} loc(#loc1)
          scf.yield %z : i32 loc(#loc2)
        } loc(#loc3)
        %w = ttg.async_wait {num = 0 : i32} loc(#loc4)
        scf.yield %b : i32 loc(#loc5)
      } loc(#loc6)
      tt.return loc(#loc7)
    } loc(#loc8)"""
    assert loops(nested) == 2 and drains_in_loops(nested) == 1
    flat = nested.replace("        %w = ttg.async_wait {num = 0 : i32} loc(#loc4)\n", "") + (
        "\n    %w = ttg.async_wait {num = 0 : i32} loc(#loc9)")
    assert drains_in_loops(flat) == 0


def test_row_blocks_follow_the_largest_tile():
    from vdit.kernels.triton.sparse_attention.configs import SMALL_TILE, program_rows, table_config

    for arch in (90, 80, 86):
        for head_dim in (64, 96, 128, 256):
            for dtype in ("fp16", "bf16"):
                for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
                    rows = [program_rows(kernel, table_config(kernel, arch, head_dim, dtype, m)) for m in (4, 48, 64)]
                    assert rows == [SMALL_TILE] * 3, (arch, head_dim, dtype, kernel)
                    big = table_config(kernel, arch, head_dim, dtype, 384)
                    assert big == table_config(kernel, arch, head_dim, dtype, None) == table_config(
                        kernel, arch, head_dim, dtype, 0)  # unknown: the general table
                    assert big == S.CONFIGS[kernel][{86: 80}.get(arch, arch)][max(64, head_dim if head_dim != 96
                                                                                  else 128)]
            # 4 warps for the forward on sm_90 (two CTAs per SM); fp32 keeps its own small tiles.
            assert table_config("fwd", 90, 128, "bf16", 64).num_warps == 4
            assert table_config("fwd", arch, head_dim, "fp32", 64) == table_config("fwd", arch, head_dim, "fp32")
    with pytest.raises(ValueError, match="kernel"):
        table_config("bwd", 90, 128, "bf16", 64)
    with pytest.raises(ValueError, match="arch"):
        table_config("fwd", 70, 128, "bf16", 64)


def test_every_small_tile_config_is_compiled_ahead_of_time():
    # The static GPU gate compiles aot_specs(): each configuration a launcher can pick must be among them.
    from vdit.kernels.triton.sparse_attention.configs import ARCH_TABLE, edge_config, table_config

    specs = {(s.label.split()[0], s.constexprs["HEAD_DIM"], s.label.split()[2], s.constexprs["BLOCK_M"],
              s.constexprs["BLOCK_N"], s.num_warps, s.num_stages, arch) for s in S.aot_specs() for arch in s.archs}
    for arch in ARCH_TABLE:
        for head_dim in (64, 128, 256):
            for dtype in ("fp16", "bf16", "fp32"):
                for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
                    for max_tile in (64, 384):
                        for c in (table_config(kernel, arch, head_dim, dtype, max_tile),
                                  edge_config(kernel, arch, head_dim, dtype, max_tile)):
                            if c is None:
                                continue
                            key = (f"sparse_{kernel}", head_dim, dtype, c.block_m, c.block_n, c.num_warps,
                                   c.num_stages, arch)
                            assert key in specs, key


def test_useful_mma_rows_of_the_benchmark_videos():
    # One 33x45x80 video in 4x4x4 tiles: 2160 tiles, 118800 tokens, each tile one row block.
    from vdit.bench import sparse_cost_model as cm
    from vdit.kernels.triton.sparse_attention.configs import table_config

    sizes = cm.tile_sizes((33, 45, 80), (4, 4, 4))
    assert len(sizes) == 9 * 12 * 20 and sum(sizes) == 33 * 45 * 80 and max(sizes) == 64
    before = cm.useful_row_fraction(sizes, 128)
    one_launch = cm.useful_row_fraction(sizes, table_config("fwd", 90, 128, "bf16", max(sizes)).block_m)
    assert before == pytest.approx(118800 / (2160 * 128)) and one_launch == pytest.approx(118800 / (2160 * 64))
    # The edge launch: 1760 tiles of 64 tokens in 64-row blocks, 380 of 16 and 20 of 4 in 16-row blocks.
    assert sorted(set(sizes)) == [4, 16, 64] and sizes.count(16) == 380 and sizes.count(4) == 20
    for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
        after = cm.figures((33, 45, 80), (4, 4, 4), kernel)["after"]["useful_rows"]
        assert after == pytest.approx(118800 / (1760 * 64 + 400 * 16)) and after >= 0.9, kernel
    assert cm.useful_row_fraction(cm.tile_sizes((30, 48, 80), (4, 4, 4)), 64) == pytest.approx(0.9375)
    assert cm.useful_row_fraction(cm.tile_sizes((30, 48, 80), (6, 8, 8)), 128) == 1.0
    walk = cm.key_walk((30, 48, 80), (6, 8, 8), 64)
    assert walk["slots"] == 27 and walk["key_blocks"] == 27 * 6 and walk["kv_loads"] == 2 * 27 * 6
    # Two CTAs of 4 warps and 255 registers fit an SM's register file; 113 KB of shared memory twice too.
    assert cm.ctas_per_sm(255, 112 * 1024, 4, 90) == 2 and cm.ctas_per_sm(215, 128 * 1024, 8, 90) == 1


def test_launchers_pass_the_largest_tile_to_the_config_choice(monkeypatch):
    seen = []

    def select(kernel, device, head_dim, dtype, max_tile=None):
        seen.append((kernel, max_tile))
        return S.INTERPRETER_CONFIG

    monkeypatch.setattr(S, "select_config", select)
    layout = _layout([[3, 5, 6]], (2, 4, 4))
    _check(layout, _window_lists(layout, [1, 3, 1], 2), 2, 2, 12, torch.float32)  # head dim 12: the padded path
    assert sorted(seen) == [("bwd_dkdv", layout.max_tile), ("bwd_dq", layout.max_tile), ("fwd", layout.max_tile)]


class _Recorder:
    """Stands in for a kernel: records each launch's arguments by name, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(zip(self.kernel.arg_names, args), **kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _int_specialization(kernel, args, honour_do_not_specialize=True):
    """Triton's runtime specialization of the int arguments of one launch ({name: key}), as JITFunction.run
    computes it (== 1 becomes a constant, % 16 == 0 a divisibility hint) unless do_not_specialize names it."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, native_specialize_impl

    names = (kernel.do_not_specialize if isinstance(kernel, JITFunction)
             else kernel.kwargs.get("do_not_specialize") or ())
    names = names if honour_do_not_specialize else ()
    keys = {}
    for name, value in args.items():
        if isinstance(value, int) and not isinstance(value, bool) and name in kernel.arg_names:
            keys[name] = native_specialize_impl(BaseBackend, value, False, name not in names, True)
    return keys


def test_packing_does_not_respecialize_the_kernels(monkeypatch):
    # Two packings whose token counts, tile counts and list lengths differ (482 vs 48 tokens: % 16 != 0 and
    # == 0; 1 tile; lists of 27 and 1 slots): every kernel keeps one specialization for its int arguments.
    from vdit.kernels.triton.sparse_attention import backward, forward

    recorders = {}
    for module, name in ((forward, "sparse_fwd_kernel"), (backward, "sparse_bwd_dq_kernel"),
                         (backward, "sparse_bwd_dkdv_kernel")):
        recorders[name] = _Recorder(getattr(module, name))
        monkeypatch.setattr(module, name, recorders[name])
    for grids, tile, window in ((GRIDS, (2, 4, 4), [3, 3, 3]), ([[3, 4, 4]], (3, 4, 4), [1, 1, 1])):
        layout = _layout(grids, tile)
        _check(layout, _window_lists(layout, window, 2), 2, 1, 16, torch.float32)
    for name, rec in recorders.items():
        first, second = rec.launches
        varied = {k for k in first if isinstance(first[k], int) and first[k] != second[k]}
        assert {"total", "num_tiles"} <= varied and varied & {"list_len", "list_stride_t"}, name
        # Without do_not_specialize these two packings would compile two variants.
        assert _int_specialization(rec.kernel, first, False) != _int_specialization(rec.kernel, second, False)
        assert _int_specialization(rec.kernel, first) == _int_specialization(rec.kernel, second), name


def test_launches_make_the_tensors_device_current():
    import contextlib
    import types

    guard = S.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(S.on_device(torch.empty(1)), contextlib.nullcontext)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_that_is_not_current():
    layout = _layout([[3, 5, 6]], (2, 4, 4))
    kv = _window_lists(layout, [1, 3, 3], 2).to("cuda:1")
    total = int(layout.offsets[-1])
    q, k, v, dout = (t.to("cuda:1") for t in _inputs(total, 2, 1, 64, torch.float16))
    assert torch.cuda.current_device() == 0
    offsets = layout.offsets.to("cuda:1")
    q_tiles = query_lists(kv, layout.num_tiles, 2, 1)
    out, lse = S.block_sparse_attention_forward(q, k, v, offsets, kv, layout.max_tile, 0.125)
    grads = S.block_sparse_attention_backward(dout, q, k, v, out, lse, offsets, kv, q_tiles, layout.max_tile, 0.125)
    r_out, r_lse, *r_grads = _reference(q, k, v, dout, offsets, kv, 0.125)
    assert_close(out, r_out, torch.float16)
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(r_lse).cpu())
    for grad, want in zip(grads, r_grads):
        assert grad.device == q.device
        assert_close(grad, want, torch.float16, scale=GRAD_SCALE[torch.float16])
