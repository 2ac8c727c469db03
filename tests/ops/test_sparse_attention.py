"""The spacetime block-sparse attention ops (vdit/ops/sparse_attention.py) and the tile layout
(vdit/ops/tiles.py, vdit.packing): every backend against the float64 reference, forward, lse and
gradients, for packed batches that mix grids not divisible by the tile, a 1-frame image, windows larger
than the grid (equal to dense attention), per-head windows, GQA and top-k lists with unused slots; the
tile order (raster order of tiles, raster order inside a tile, partial edge tiles) and the sliding-window
rule pinned token by token, and bad inputs rejected before any kernel runs.

The reference itself is checked against an independent formulation: a per-token mask built from the
window rule, applied to dense attention."""
import pytest
import torch

from tests.conftest import assert_close, backends_of
from vdit.ops import block_sparse_attention, reference, sliding_tile_attention, topk_tiles, varlen_attention
from vdit.ops.tiles import query_list_of, query_lists, tile_layout
from vdit.packing import PackedVideos, cu_seqlens_from_lengths, grid_positions, tile_permutation

GRIDS = [[5, 6, 7], [1, 4, 4], [4, 8, 8]]  # not divisible by the tile; a 1-frame image
TILE = (2, 4, 4)


def _batch(grids, hq, hk, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor(grids, dtype=torch.int32)
    total = int(grids.prod(1).sum())
    q, k, v = (torch.randn(total, h, d, generator=g, dtype=torch.float64).to(dtype).to(device) for h in (hq, hk, hk))
    return q, k, v, cu_seqlens_from_lengths(grids.prod(1).tolist(), device), grids.to(device)


def _window_mask(grids, tile, windows, heads):
    """(heads, total, total) bool in tile order, built token by token from the sliding-window rule: along each
    axis a query in tile a sees the key tiles [s, s + w) with s = clamp(a - (w - 1) // 2, 0, max(n - w, 0)),
    n the axis' tile count (a centred window, shifted inwards at the grid's edges)."""
    start = 0
    total = sum(t * h * w for t, h, w in grids)
    full = torch.zeros(heads, total, total, dtype=torch.bool)
    for grid in grids:
        pos = grid_positions(torch.tensor([grid]))[tile_permutation(torch.tensor([grid], dtype=torch.int32), tile)]
        tiles = pos // torch.tensor(tile)
        n = [-(-g // t) for g, t in zip(grid, tile)]
        for h in range(heads):
            w = windows[h] if len(windows) > 1 else windows[0]
            ok = torch.ones(len(pos), len(pos), dtype=torch.bool)
            for axis in range(3):
                a = tiles[:, axis]
                s = torch.clamp(torch.clamp(a - (w[axis] - 1) // 2, min=0), max=max(n[axis] - w[axis], 0))
                ok &= (tiles[None, :, axis] >= s[:, None]) & (tiles[None, :, axis] < s[:, None] + w[axis])
            full[h, start:start + len(pos), start:start + len(pos)] = ok
        start += len(pos)
    return full


def _masked_attention(q, k, v, mask):
    hq, hk = q.shape[1], k.shape[1]
    qh, kh, vh = (t.double().transpose(0, 1) for t in (q, k, v))
    kh, vh = (t.repeat_interleave(hq // hk, 0) for t in (kh, vh))
    s = (qh @ kh.transpose(1, 2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1).matmul(vh).transpose(0, 1)


def test_tile_permutation_semantics():
    grids = torch.tensor([[3, 5, 6], [1, 2, 3]], dtype=torch.int32)
    perm = tile_permutation(grids, (2, 2, 4))
    assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(3 * 5 * 6 + 6))
    pos = grid_positions(grids)[perm]
    # video 0, first tile (a, b, c) = (0, 0, 0): (t, h, w) row-major over t < 2, h < 2, w < 4
    assert pos[:16].tolist() == [[t, h, w] for t in range(2) for h in range(2) for w in range(4)]
    # its last tile (1, 2, 1) is partial: t = 2, h = 4, w = 4..5
    assert pos[3 * 5 * 6 - 2:3 * 5 * 6].tolist() == [[2, 4, 4], [2, 4, 5]]
    assert torch.equal(grid_positions(grids)[perm][perm.argsort()], grid_positions(grids))
    layout = tile_layout(grids, (2, 2, 4))
    assert layout.tile_grids == ((2, 3, 2), (1, 1, 1)) and layout.num_tiles == 13 and layout.max_tile == 16


def test_query_lists_transpose_the_key_lists_in_csr_form():
    # Grouped-query heads (4 on 2), -1 slots, a key tile nobody lists: list (j, hk) holds query_tile * Hq +
    # query_head of every (query tile, head of hk's group) listing j, ascending, and the buffer holds the
    # offsets, then exactly those entries.
    g = torch.Generator().manual_seed(0)
    kv = torch.randint(-1, 6, (7, 4, 5), generator=g, dtype=torch.int32)
    kv[kv == 4] = -1
    got = query_lists(kv, 7, 4, 2)
    assert got.dtype == torch.int32 and got.dim() == 1 and int(got[0]) == 7 * 2 + 1
    assert int(got[14]) == got.numel() == 15 + int((kv >= 0).sum())
    for j in range(7):
        for hk in range(2):
            want = sorted(t * 4 + h for t in range(7) for h in (2 * hk, 2 * hk + 1) for e in kv[t, h].tolist()
                          if e == j)
            assert query_list_of(got, j, hk, 2) == want, (j, hk)
    assert query_list_of(got, 4, 0, 2) == query_list_of(got, 4, 1, 2) == []


def test_packed_videos_tile_order_round_trip_is_differentiable():
    tokens = torch.randn(90 + 6, 4, requires_grad=True)
    grids = torch.tensor([[3, 5, 6], [1, 2, 3]], dtype=torch.int32)
    packed = PackedVideos(tokens, cu_seqlens_from_lengths([90, 6]), 90, grids, grid_positions(grids))
    tiled = packed.to_tile_order((2, 2, 4))
    assert tiled.tile == (2, 2, 4)
    assert torch.equal(tiled.positions, grid_positions(grids)[tile_permutation(grids, (2, 2, 4))])
    back = tiled.to_raster_order()
    assert back.tile is None and torch.equal(back.tokens, tokens) and torch.equal(back.positions, packed.positions)
    back.tokens.sum().backward()
    assert torch.equal(tokens.grad, torch.ones_like(tokens))


@pytest.mark.parametrize("windows", [[(1, 1, 1)], [(3, 3, 3)], [(1, 2, 1), (2, 1, 3), (3, 3, 1), (1, 1, 2)]],
                         ids=["1x1x1", "3x3x3", "per-head"])
def test_reference_matches_the_window_rule_token_by_token(windows):
    q, k, v, cu, grids = _batch(GRIDS, 4, 2, 8, torch.float64)
    window = torch.tensor(windows) if len(windows) > 1 else windows[0]
    out = sliding_tile_attention(q, k, v, cu, grids, TILE, window, backend="torch")
    expected = _masked_attention(q, k, v, _window_mask(GRIDS, TILE, windows, 4))
    torch.testing.assert_close(out, expected)


def _check(backend, device, dtype, out_fn, ref_fn, q, k, v):
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    out, lse = out_fn(q, k, v, backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = ref_fn(*leaves)
    r_grads = torch.autograd.grad(r_out, leaves, dout.cpu().double())
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, r_out, dtype, scale=2.0)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(r_lse))
    assert_close(lse[~torch.isneginf(lse)], r_lse[~torch.isneginf(r_lse)], torch.float32, scale=4.0)
    for got, want in zip(grads, r_grads):
        assert_close(got, want, dtype, scale=8.0)


@pytest.mark.parametrize("backend,device", backends_of("block_sparse_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 3, 3), (9, 9, 9), "per-head"])
def test_sliding_tile_attention_matches_the_reference(backend, device, dtype, window):
    q, k, v, cu, grids = _batch(GRIDS, 4, 2, 16, dtype)
    if window == "per-head":
        window = torch.tensor([(1, 2, 1), (2, 1, 3), (3, 3, 1), (1, 1, 2)])
    run = lambda q, k, v, b: sliding_tile_attention(q, k, v, cu.to(q.device), grids.to(q.device), TILE,  # noqa: E731
                                                    window, backend=b, return_lse=True)
    ref = lambda q, k, v: sliding_tile_attention(q, k, v, cu, grids, TILE, window, backend="torch",  # noqa: E731
                                                 return_lse=True)
    _check(backend, device, dtype, run, ref, q, k, v)


@pytest.mark.parametrize("backend,device", backends_of("block_sparse_attention"))
def test_block_sparse_lists_with_unused_slots_and_an_empty_row(backend, device):
    q, k, v, cu, grids = _batch(GRIDS, 4, 4, 16, torch.float32)
    layout = tile_layout(grids, TILE)
    g = torch.Generator().manual_seed(3)
    rows = []
    for a, b in zip(layout.first_tile, layout.first_tile[1:]):
        for _ in range(b - a):
            head_rows = []
            for _h in range(4):
                pick = torch.randperm(b - a, generator=g)[:3].tolist()
                pick += [-1] * (5 - len(pick))
                head_rows.append([pick[i] for i in torch.randperm(5, generator=g).tolist()])  # -1 anywhere
            rows.append(head_rows)
    kv = torch.tensor(rows, dtype=torch.int32)
    kv[2, 1] = -1  # a query tile and head that sees nothing: out 0, lse -inf, no gradient
    run = lambda q, k, v, b: block_sparse_attention(q, k, v, cu.to(q.device), grids.to(q.device), TILE,  # noqa: E731
                                                    kv.to(q.device), backend=b, return_lse=True)
    ref = lambda q, k, v: reference.block_sparse_attention(q, k, v, cu, grids, TILE, kv, return_lse=True)  # noqa: E731
    _check(backend, device, torch.float32, run, ref, q, k, v)
    out, lse = run(q.to(device), k.to(device), v.to(device), backend)
    start, end = (int(x) for x in layout.offsets[2:4])
    assert torch.equal(out[start:end, 1].cpu(), torch.zeros_like(out[start:end, 1].cpu()))
    assert torch.isneginf(lse[1, start:end]).all()


def test_whole_grid_window_is_dense_attention():
    q, k, v, cu, grids = _batch(GRIDS, 4, 2, 16, torch.float64)
    out = sliding_tile_attention(q, k, v, cu, grids, TILE, (9, 9, 9))
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, cu, backend="torch"))


def test_topk_tiles_keep_the_best_pooled_scores():
    q, k, v, cu, grids = _batch(GRIDS, 2, 1, 8, torch.float32)
    kv = topk_tiles(q, k, cu, grids, TILE, 3)
    layout = tile_layout(grids, TILE)
    assert kv.dtype == torch.int32 and kv.shape == (layout.num_tiles, 2, 3)
    assert kv[12].tolist() == [[0, -1, -1], [0, -1, -1]]  # the 1-frame image has one tile: padded
    a, b = layout.first_tile[0], layout.first_tile[1]
    from vdit.ops.sparse_attention import pooled_tiles
    pq, pk = pooled_tiles(q, layout)[a:b], pooled_tiles(k, layout)[a:b]
    scores = torch.einsum("ihd,jhd->hij", pq, pk.expand(-1, 2, -1))
    for t in range(b - a):
        for h in range(2):
            assert sorted(kv[t, h].tolist()) == sorted(scores[h, t].topk(3).indices.tolist())
    out = block_sparse_attention(q, k, v, cu, grids, TILE, kv)
    assert torch.isfinite(out).all()


def _bad(name):
    q, k, v, cu, grids = _batch(GRIDS, 4, 2, 8, torch.float32)
    layout = tile_layout(grids, TILE)
    kv = torch.zeros(layout.num_tiles, 1, 2, dtype=torch.int32)
    kv[:, 0, 1] = -1
    base = dict(q=q, k=k, v=v, cu_seqlens=cu, grids=grids, tile=TILE)
    cases = {
        "tile-too-large": (dict(tile=(8, 9, 9)), {}, ValueError, "less than one tile"),
        "tile-zero": (dict(tile=(0, 4, 4)), {}, ValueError, "tile must be positive"),
        "window-zero": ({}, dict(window=(0, 3, 3)), ValueError, "window sizes must be >= 1"),
        "window-negative": ({}, dict(window=(3, -1, 3)), ValueError, "window sizes must be >= 1"),
        "window-heads": ({}, dict(window=torch.ones(3, 3, dtype=torch.int64)), ValueError, r"window must be \(4, 3\)"),
        "window-float": ({}, dict(window=torch.ones(4, 3)), TypeError, "window must be 3 ints"),
        "grids-mismatch": (dict(grids=torch.tensor([[5, 6, 7], [1, 4, 4], [4, 8, 9]], dtype=torch.int32)), {},
                           ValueError, r"grids\[2\] = \(4, 8, 9\) holds 288 tokens but sequence 2"),
        "grids-float": (dict(grids=grids.float()), {}, TypeError, "grids must be int32 or int64"),
        "grids-shape": (dict(grids=grids[:2]), {}, ValueError, r"grids must be \(3, 3\)"),
        "kv-out-of-range": ({}, dict(kv_tiles=torch.full_like(kv, 12)), ValueError, "is not a tile of its video"),
        "kv-duplicate": ({}, dict(kv_tiles=torch.zeros_like(kv)), ValueError, "lists a key tile twice"),
        "kv-int64": ({}, dict(kv_tiles=kv.long()), TypeError, "kv_tiles must be int32"),
        "kv-rows": ({}, dict(kv_tiles=kv[:-1]), ValueError, r"kv_tiles must be \(21, 4 or 1, k\)"),
    }
    common, extra, exc, msg = cases[name]
    args = {**base, **common}
    if "kv_tiles" in extra:
        return (lambda: block_sparse_attention(**args, kv_tiles=extra["kv_tiles"])), exc, msg, (q, k, v)
    return (lambda: sliding_tile_attention(**args, window=extra.get("window", (3, 3, 3)))), exc, msg, (q, k, v)


@pytest.mark.parametrize("name", ["tile-too-large", "tile-zero", "window-zero", "window-negative", "window-heads",
                                  "window-float", "grids-mismatch", "grids-float", "grids-shape", "kv-out-of-range",
                                  "kv-duplicate", "kv-int64", "kv-rows"])
def test_rejects_bad_input_before_any_kernel_and_leaves_inputs_unmodified(name):
    call, exc, msg, tensors = _bad(name)
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=msg):
        call()
    for a, b in zip(tensors, before):
        assert torch.equal(a, b)


# ---- global tokens ------------------------------------------------------------------------------

GLOBALS = [5, 0, 3]  # per video of GRIDS: none for the 1-frame image


def _with_globals(q, k, v, grids, globals_):
    """Each video's tokens followed by its global tokens (fresh random ones), cu_seqlens of the result."""
    g = torch.Generator().manual_seed(7)
    parts = {name: [] for name in "qkv"}
    start, lengths = 0, []
    for grid, n_global in zip(grids.tolist(), globals_):
        n = grid[0] * grid[1] * grid[2]
        for name, t in zip("qkv", (q, k, v)):
            extra = torch.randn(n_global, *t.shape[1:], generator=g, dtype=torch.float64).to(t.dtype)
            parts[name] += [t[start:start + n], extra]
        start += n
        lengths.append(n + n_global)
    return (*(torch.cat(parts[name]) for name in "qkv"), cu_seqlens_from_lengths(lengths))


def _global_mask(grids, tile, windows, heads, globals_):
    """(heads, total, total) bool from first principles: video queries see their window (token-by-token
    rule above) and every global token of their sequence; global queries see their whole sequence."""
    video = _window_mask(grids, tile, windows, heads)
    sizes = [t * h * w for t, h, w in grids]
    total = sum(sizes) + sum(globals_)
    full = torch.zeros(heads, total, total, dtype=torch.bool)
    v0 = s0 = 0
    for n, g in zip(sizes, globals_):
        full[:, s0:s0 + n, s0:s0 + n] = video[:, v0:v0 + n, v0:v0 + n]
        full[:, s0:s0 + n + g, s0 + n:s0 + n + g] = True  # everyone sees the global tokens
        full[:, s0 + n:s0 + n + g, s0:s0 + n + g] = True  # global queries see everything
        v0, s0 = v0 + n, s0 + n + g
    return full


@pytest.mark.parametrize("windows", [[(1, 1, 1)], [(1, 2, 1), (2, 1, 3), (3, 3, 1), (1, 1, 2)]],
                         ids=["1x1x1", "per-head"])
def test_global_tokens_reference_matches_the_rule_token_by_token(windows):
    q, k, v, _, grids = _batch(GRIDS, 4, 2, 8, torch.float64)
    q, k, v, cu = _with_globals(q, k, v, grids, GLOBALS)
    window = torch.tensor(windows) if len(windows) > 1 else windows[0]
    out = sliding_tile_attention(q, k, v, cu, grids, TILE, window, global_tokens=GLOBALS, backend="torch")
    torch.testing.assert_close(out, _masked_attention(q, k, v, _global_mask(GRIDS, TILE, windows, 4, GLOBALS)))


@pytest.mark.parametrize("backend,device", backends_of("block_sparse_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_global_tokens_match_the_reference(backend, device, dtype):
    q, k, v, _, grids = _batch(GRIDS, 4, 2, 16, dtype)
    q, k, v, cu = _with_globals(q, k, v, grids, GLOBALS)
    counts = torch.tensor(GLOBALS)  # a tensor works as well as a list
    run = lambda q, k, v, b: sliding_tile_attention(q, k, v, cu.to(q.device), grids.to(q.device), TILE,  # noqa: E731
                                                    (1, 2, 1), global_tokens=counts, backend=b, return_lse=True)
    ref = lambda q, k, v: sliding_tile_attention(q, k, v, cu, grids, TILE, (1, 2, 1),  # noqa: E731
                                                 global_tokens=GLOBALS, backend="torch", return_lse=True)
    _check(backend, device, dtype, run, ref, q, k, v)


def test_global_tokens_with_a_whole_grid_window_are_dense_attention_and_topk_ignores_them():
    q, k, v, _, grids = _batch(GRIDS, 4, 4, 8, torch.float64)
    q, k, v, cu = _with_globals(q, k, v, grids, GLOBALS)
    out = sliding_tile_attention(q, k, v, cu, grids, TILE, (9, 9, 9), global_tokens=GLOBALS, backend="cpu")
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, cu, backend="torch"))
    kv = topk_tiles(q, k, cu, grids, TILE, 3, global_tokens=GLOBALS)
    layout = tile_layout(grids, TILE)
    assert kv.shape == (layout.num_tiles, 4, 3)  # video tiles only, and only video tiles are chosen
    limits = torch.repeat_interleave(torch.tensor([layout.video_tiles(b) for b in range(3)]),
                                     torch.tensor([layout.video_tiles(b) for b in range(3)]))
    assert bool((kv < limits[:, None, None]).all())
    listed = block_sparse_attention(q, k, v, cu, grids, TILE, kv, global_tokens=GLOBALS, backend="cpu")
    ref = block_sparse_attention(q, k, v, cu, grids, TILE, kv, global_tokens=GLOBALS, backend="torch")
    torch.testing.assert_close(listed, ref)


@pytest.mark.parametrize("value,exc,msg", [
    (-1, ValueError, "global_tokens must be >= 0"),
    ([5, 0], ValueError, r"one entry per sequence \(3\)"),
    (2.5, TypeError, "global_tokens must be an int or B ints"),
    (torch.tensor([5.0, 0.0, 3.0]), TypeError, "global_tokens must hold ints"),
    ([5, 0, 4], ValueError, r"grids\[2\] = \(4, 8, 8\) holds 256 tokens \+ 4 global tokens but sequence 2"),
])
def test_bad_global_tokens_are_rejected_before_any_kernel(value, exc, msg):
    q, k, v, _, grids = _batch(GRIDS, 4, 2, 8, torch.float32)
    q, k, v, cu = _with_globals(q, k, v, grids, GLOBALS)
    before = [t.clone() for t in (q, k, v)]
    with pytest.raises(exc, match=msg):
        sliding_tile_attention(q, k, v, cu, grids, TILE, (1, 1, 1), global_tokens=value)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


@pytest.mark.parametrize("backend,device", backends_of("block_sparse_attention", reference=True))
def test_explicit_tiles_cut_from_a_batch_equal_the_batch(backend, device):
    """block_sparse_attention_tiles on a contiguous run of a batch's tiles (what a sequence-parallel rank holds:
    its range and the key tiles its queries list), with the lists of some of them: those tiles' outputs and all
    gradients equal the whole batch's; a tile with no list gives 0."""
    from vdit.ops.sparse_attention import block_sparse_attention_tiles
    from vdit.ops.tiles import sliding_window_tiles, to_global

    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, cu, grids = _batch(GRIDS, 4, 2, 16, dtype)
    layout = tile_layout(grids, TILE, "cpu")
    lists = to_global(layout, sliding_window_tiles(layout, torch.tensor([[3, 3, 3]])))
    first = layout.first_tile[2]  # the third video: tiles u0..u1 hold query tiles q0..q1 and all their keys
    q0, q1 = first + 4, first + 8
    u0, u1 = first, first + layout.video_tiles(2)
    offsets = layout.offsets.tolist()
    a, b = offsets[u0], offsets[u1]
    mine = torch.full((u1 - u0, 1, lists.shape[2]), -1, dtype=torch.int32)
    mine[q0 - u0:q1 - u0] = torch.where(lists[q0:q1] >= 0, lists[q0:q1] - u0, -1)
    tile_offsets = torch.tensor([o - a for o in offsets[u0:u1 + 1]], dtype=torch.int32)
    dout = torch.randn_like(q)
    rows = slice(offsets[q0], offsets[q1])
    mask = torch.zeros(q.shape[0], 1, 1, dtype=q.dtype)
    mask[rows] = 1
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = sliding_tile_attention(qr, kr, vr, cu, grids, TILE, (3, 3, 3))
    (ref * mask * dout).sum().backward()
    qs, ks, vs = (t[a:b].clone().to(device).requires_grad_() for t in (q, k, v))
    out = block_sparse_attention_tiles(qs, ks, vs, tile_offsets.to(device), mine.to(device), backend=backend)
    (out * mask[a:b].to(device) * dout[a:b].to(device)).sum().backward()
    assert_close(out[rows.start - a:rows.stop - a].cpu(), ref[rows].detach(), dtype)
    assert torch.equal(out[:rows.start - a].cpu(), torch.zeros_like(out[:rows.start - a].cpu()))
    for mine_t, full in ((qs, qr), (ks, kr), (vs, vr)):
        assert_close(mine_t.grad.cpu(), full.grad[a:b], dtype)


def test_explicit_tiles_bad_input_names_the_argument():
    from vdit.ops.sparse_attention import block_sparse_attention_tiles

    q = torch.randn(8, 2, 4)
    offsets = torch.tensor([0, 4, 8], dtype=torch.int32)
    lists = torch.tensor([[[0, 1]], [[1, -1]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="tile_offsets"):
        block_sparse_attention_tiles(q, q, q, torch.tensor([0, 4, 7], dtype=torch.int32), lists)
    with pytest.raises(ValueError, match="kv_tiles"):
        block_sparse_attention_tiles(q, q, q, offsets, torch.tensor([[[0, 2]], [[1, -1]]], dtype=torch.int32))
    with pytest.raises(ValueError, match="same rows"):
        block_sparse_attention_tiles(q, q[:4], q[:4], offsets, lists)
    out = block_sparse_attention_tiles(q, q, q, offsets, lists)
    assert out.shape == q.shape
