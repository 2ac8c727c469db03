"""Property-based fuzzing of every public op on every CPU-runnable backend.

Valid random inputs (ragged lengths incl. 0 and 1, odd sizes, dtypes, non-contiguous views) must match
the float64 reference within the per-dtype tolerance; invalid inputs must raise the documented
ValueError / TypeError and leave every input tensor unmodified.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import vdit.ops as V
from tests.conftest import assert_close, backends_of, cu_seqlens_of
from vdit.ops import reference as R
from vdit.ops.tiles import lists_with_global_tiles, sliding_window_tiles, tile_layout, to_global, with_global_tiles

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def cpu_backends(op: str) -> list:
    """The backends of an op that take CPU tensors as built: the reference and the op's CPU kernels."""
    return backends_of(op, reference=True, device="cpu", interpreted=False, with_device=False)


def tensor(shape, dtype, seed, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    # same values, non-contiguous: a transposed copy transposed back
    t = torch.randn(tuple(reversed(shape)), generator=g, dtype=torch.float64).to(dtype)
    return t.permute(*reversed(range(len(shape))))


lengths = st.lists(st.integers(0, 40), min_size=1, max_size=5)


@given(b=st.integers(1, 2), c=st.integers(1, 5), grid=st.tuples(*[st.integers(1, 3)] * 3),
       patch=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)), dtype=st.sampled_from(DTYPES),
       contiguous=st.booleans(), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", cpu_backends("patchify_3d"))
def test_patchify_round_trip(backend, b, c, grid, patch, dtype, contiguous, seed):
    x = tensor((b, c, *(g * p for g, p in zip(grid, patch))), dtype, seed, contiguous)
    tokens = V.patchify_3d(x, patch, backend=backend)
    assert torch.equal(tokens, R.patchify_3d(x, patch))
    assert torch.equal(V.unpatchify_3d(tokens, grid, patch, backend=backend), x)


@given(b=st.integers(1, 2), c=st.integers(1, 5), d=st.integers(1, 40), grid=st.tuples(*[st.integers(1, 3)] * 3),
       patch=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)), dtype=st.sampled_from(DTYPES[:2]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", cpu_backends("patch_embed_3d"))
def test_patch_embed_matches_conv3d(backend, b, c, d, grid, patch, dtype, bias, seed):
    x = tensor((b, c, *(g * p for g, p in zip(grid, patch))), dtype, seed).requires_grad_()
    w = tensor((d, c, *patch), dtype, seed + 1).requires_grad_()
    bvec = tensor((d,), dtype, seed + 2).requires_grad_() if bias else None
    out = V.patch_embed_3d(x, w, bvec, backend=backend)
    expected = torch.nn.functional.conv3d(x.double(), w.double(), None if bvec is None else bvec.double(),
                                          stride=patch).flatten(2).transpose(1, 2)
    assert_close(out, expected, dtype, scale=4)
    grad = tensor(out.shape, dtype, seed + 3)
    got = torch.autograd.grad(out, [x, w], grad)
    want = torch.autograd.grad(expected, [x, w], grad.double())
    for g, e in zip(got, want):
        assert_close(g, e, dtype, scale=8)


@given(lq=lengths, cross=st.booleans(), heads=st.sampled_from([(1, 1), (4, 2), (3, 3), (6, 2)]),
       dim=st.sampled_from([8, 16, 32, 40]), causal=st.booleans(), dtype=st.sampled_from(DTYPES[:3]),
       seed=st.integers(0, 2**16), data=st.data())
@pytest.mark.parametrize("backend", cpu_backends("varlen_attention"))
def test_varlen_attention_matches_reference(backend, lq, cross, heads, dim, causal, dtype, seed, data):
    lk = data.draw(st.lists(st.integers(0, 12), min_size=len(lq), max_size=len(lq))) if cross else lq
    Hq, Hk = heads
    q = tensor((sum(lq), Hq, dim), dtype, seed)
    k, v = tensor((sum(lk), Hk, dim), dtype, seed + 1), tensor((sum(lk), Hk, dim), dtype, seed + 2)
    cu_q, cu_k = cu_seqlens_of(lq), cu_seqlens_of(lk)
    out = V.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, backend=backend)
    expected = R.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, expected, dtype, scale=4 if dtype == torch.bfloat16 else 2)


@given(total=st.integers(1, 30), heads=st.integers(1, 4), dims=st.tuples(*[st.integers(0, 4)] * 3),
       extra=st.integers(0, 6), interleaved=st.booleans(), dtype=st.sampled_from(DTYPES),
       pos_dtype=st.sampled_from([torch.int32, torch.int64, torch.float32]), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", cpu_backends("rope_3d"))
def test_rope_matches_reference(backend, total, heads, dims, extra, interleaved, dtype, pos_dtype, seed):
    dims = tuple(2 * d for d in dims)
    D = sum(dims) + 2 * extra or 2
    x = tensor((total, heads, D), dtype, seed)
    pos = torch.randint(0, 1000, (total, 3), generator=torch.Generator().manual_seed(seed)).to(pos_dtype)
    out = V.rope_3d(x, pos, dims=dims, interleaved=interleaved, backend=backend)
    expected = R.rope_3d(x.double(), pos, dims=dims, interleaved=interleaved)
    assert_close(out, expected, dtype, scale=2)


@given(lens=lengths.filter(lambda l: sum(l) > 0), c=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
       packed=st.booleans(), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", cpu_backends("adaln_modulate"))
def test_adaln_and_gated_residual_match_reference(backend, lens, c, dtype, packed, seed):
    B = len(lens)
    if packed:
        x, y, cu = tensor((sum(lens), c), dtype, seed), tensor((sum(lens), c), dtype, seed + 1), cu_seqlens_of(lens)
    else:
        x, y, cu = tensor((B, 5, c), dtype, seed), tensor((B, 5, c), dtype, seed + 1), None
    shift, scale, gate = (tensor((B, c), dtype, seed + i) for i in (2, 3, 4))
    out = V.adaln_modulate(x, shift, scale, cu, backend=backend)
    assert_close(out, R.adaln_modulate(x.double(), shift.double(), scale.double(), cu), dtype, scale=4)
    res = V.gated_residual(x, y, gate, cu, backend=backend)
    assert_close(res, R.gated_residual(x.double(), y.double(), gate.double(), cu), dtype, scale=4)


# ---- invalid inputs -------------------------------------------------------------------------------

BAD_CU = {
    "decreasing": lambda cu: torch.flip(cu, [0]),
    "not starting at 0": lambda cu: cu + 1,
    "last != total": lambda cu: torch.cat([cu[:-1], cu[-1:] + 3]),
    "int64": lambda cu: cu.long(),
    "2-D": lambda cu: cu[None],
}


@given(lens=st.lists(st.integers(1, 9), min_size=2, max_size=4), bad=st.sampled_from(sorted(BAD_CU)),
       which=st.sampled_from(["q", "k"]), seed=st.integers(0, 2**16))
def test_attention_rejects_bad_cu_seqlens(lens, bad, which, seed):
    q = tensor((sum(lens), 2, 8), torch.float32, seed)
    k, v = q.clone(), q.clone()
    cu = cu_seqlens_of(lens)
    cu_q, cu_k = (BAD_CU[bad](cu), cu) if which == "q" else (cu, BAD_CU[bad](cu))
    saved = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    with pytest.raises((ValueError, TypeError), match="cu_seqlens"):
        V.varlen_attention(q, k, v, cu_q, cu_k)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v, cu_q, cu_k)))


@given(case=st.sampled_from(["rank", "dtype", "heads", "headdim", "max_seqlen", "nan_scale"]),
       seed=st.integers(0, 2**16))
def test_attention_rejects_inconsistent_tensors(case, seed):
    q = tensor((6, 4, 8), torch.float32, seed)
    k, v = tensor((6, 2, 8), torch.float32, seed + 1), tensor((6, 2, 8), torch.float32, seed + 2)
    cu, max_q, scale = cu_seqlens_of([2, 4]), None, None
    if case == "rank":
        q = q[0]
    elif case == "dtype":
        k = k.double()
    elif case == "heads":
        k, v = tensor((6, 3, 8), torch.float32, seed), tensor((6, 3, 8), torch.float32, seed)
    elif case == "headdim":
        k, v = k[..., :4], v[..., :4]
    elif case == "max_seqlen":
        max_q = 3
    elif case == "nan_scale":
        scale = float("nan")
    saved = [t.clone() for t in (q, k, v)]
    with pytest.raises((ValueError, TypeError)):
        V.varlen_attention(q, k, v, cu, cu, max_q, softmax_scale=scale)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v)))


@given(dims=st.sampled_from([(3, 4, 4), (4, 4, 30), (2, -2, 4), (2, 2)]), seed=st.integers(0, 2**16))
def test_rope_rejects_bad_dims(dims, seed):
    x = tensor((5, 2, 16), torch.float32, seed)
    pos = torch.zeros(5, 3, dtype=torch.int32)
    saved = x.clone()
    with pytest.raises((ValueError, TypeError), match="dims"):
        V.rope_3d(x, pos, dims=dims)
    assert torch.equal(x, saved)


@given(sizes=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
       patch=st.tuples(st.integers(2, 3), st.integers(2, 3), st.integers(2, 3)))
def test_patchify_rejects_non_dividing_patches(sizes, patch):
    if all(s % p == 0 for s, p in zip(sizes, patch)):
        return
    x = torch.randn(1, 2, *sizes)
    saved = x.clone()
    with pytest.raises(ValueError, match="must divide"):
        V.patchify_3d(x, patch)
    assert torch.equal(x, saved)


grid_lists = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3)


@given(grids=grid_lists, tile=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
       window=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
       heads=st.sampled_from([(1, 1), (4, 2), (2, 2)]), dtype=st.sampled_from(DTYPES[:3]),
       seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", cpu_backends("sliding_tile_attention"))
def test_sliding_tile_attention_matches_reference(backend, grids, tile, window, heads, dtype, seed):
    """Random packings, tiles (larger than the grid on some axes) and windows (larger than the grid)."""
    assume(all(any(t <= n for t, n in zip(tile, g)) for g in grids))  # no video smaller than one tile
    Hq, Hk = heads
    total = sum(t * h * w for t, h, w in grids)
    q = tensor((total, Hq, 8), dtype, seed)
    k, v = tensor((total, Hk, 8), dtype, seed + 1), tensor((total, Hk, 8), dtype, seed + 2)
    cu, g = cu_seqlens_of([t * h * w for t, h, w in grids]), torch.tensor(grids, dtype=torch.int32)
    out = V.sliding_tile_attention(q, k, v, cu, g, tile, window, backend=backend)
    expected = V.sliding_tile_attention(q.double(), k.double(), v.double(), cu, g, tile, window, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, expected, dtype, scale=4 if dtype == torch.bfloat16 else 2)


def _sparse_oracle(q, k, v, grids, tile, kv_tiles, global_tokens):
    """float64 ``reference.block_sparse_attention_tiles`` over the batch's tile layout, with one more (dense)
    tile per video for its global tokens: (out, lse), differentiable in q, k, v."""
    layout = tile_layout(grids, tile)
    if global_tokens is not None:
        layout = with_global_tiles(layout, global_tokens)
        kv_tiles = lists_with_global_tiles(layout, kv_tiles)
    return R.block_sparse_attention_tiles(q, k, v, layout.offsets, to_global(layout, kv_tiles), return_lse=True)


def _sparse_case(grids, globals_, heads, dim, seed):
    """float64 leaf q, k, v for the videos ``grids`` each followed by its ``globals_`` tokens (None: no
    global tokens), with cu_seqlens, int32 grids and the op's global_tokens argument."""
    extra = globals_ or [0] * len(grids)
    lens = [t * h * w + g for (t, h, w), g in zip(grids, extra)]
    Hq, Hk = heads
    q = tensor((sum(lens), Hq, dim), torch.float64, seed).requires_grad_()
    k, v = (tensor((sum(lens), Hk, dim), torch.float64, seed + i).requires_grad_() for i in (1, 2))
    return q, k, v, cu_seqlens_of(lens), torch.tensor(grids, dtype=torch.int32), globals_


def _assert_sparse_matches(got, want, q, k, v, seed):
    """out, lse and the q, k, v gradients of a sparse op's (out, lse) against the oracle's, in float64."""
    for a, b in zip(got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape
        assert torch.equal(torch.isinf(a), torch.isinf(b))  # lse -inf exactly where a query sees no key
        assert_close(torch.where(torch.isinf(b), 0, a), torch.where(torch.isinf(b), 0, b), torch.float64)
    grad = tensor(got[0].shape, torch.float64, seed + 3)
    for a, b in zip(torch.autograd.grad(got[0], (q, k, v), grad), torch.autograd.grad(want[0], (q, k, v), grad)):
        assert_close(a, b, torch.float64)


sparse_grids = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3)
sparse_tiles = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
sparse_heads = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)])


@given(grids=sparse_grids, tile=sparse_tiles, window=st.tuples(*[st.integers(1, 3)] * 3), heads=sparse_heads,
       per_head=st.booleans(), dim=st.sampled_from([4, 8, 12]), seed=st.integers(0, 2**16), data=st.data())
def test_sparse_sliding_tile_kernel_matches_reference_in_float64(grids, tile, window, heads, per_head, dim, seed,
                                                                 data):
    """The C++ kernel of sliding_tile_attention against the float64 oracle: random packings, tiles, windows
    (one, or one per head; larger than the grid on some axes) and global tokens (none, or 0-3 per video)."""
    assume(all(any(t <= n for t, n in zip(tile, g)) for g in grids))  # the op refuses a video below one tile
    globals_ = data.draw(st.none() | st.lists(st.integers(0, 3), min_size=len(grids), max_size=len(grids)))
    q, k, v, cu, g, globals_ = _sparse_case(grids, globals_, heads, dim, seed)
    windows = torch.tensor([window], dtype=torch.int64)
    if per_head:
        windows = torch.tensor(data.draw(st.lists(st.tuples(*[st.integers(1, 3)] * 3), min_size=heads[0],
                                                  max_size=heads[0])), dtype=torch.int64)
    got = V.sliding_tile_attention(q, k, v, cu, g, tile, windows if per_head else window, global_tokens=globals_,
                                   return_lse=True, backend="cpu")
    kv_tiles = sliding_window_tiles(tile_layout(g, tile), windows)
    _assert_sparse_matches(got, _sparse_oracle(q, k, v, g, tile, kv_tiles, globals_), q, k, v, seed)


@given(grids=sparse_grids, tile=sparse_tiles, topk=st.integers(1, 6), heads=sparse_heads,
       dim=st.sampled_from([4, 8, 12]), seed=st.integers(0, 2**16), data=st.data())
def test_sparse_topk_kernel_matches_reference_in_float64(grids, tile, topk, heads, dim, seed, data):
    """The C++ kernel of block_sparse_attention on topk_tiles' lists (rows padded with -1 where a video has
    fewer than topk tiles) against the float64 oracle, with and without global tokens."""
    assume(all(any(t <= n for t, n in zip(tile, g)) for g in grids))
    globals_ = data.draw(st.none() | st.lists(st.integers(0, 3), min_size=len(grids), max_size=len(grids)))
    q, k, v, cu, g, globals_ = _sparse_case(grids, globals_, heads, dim, seed)
    kv_tiles = V.topk_tiles(q.detach(), k.detach(), cu, g, tile, topk, global_tokens=globals_)
    assert kv_tiles.shape == (tile_layout(g, tile).num_tiles, heads[0], topk)
    got = V.block_sparse_attention(q, k, v, cu, g, tile, kv_tiles, global_tokens=globals_, return_lse=True,
                                   backend="cpu")
    _assert_sparse_matches(got, _sparse_oracle(q, k, v, g, tile, kv_tiles, globals_), q, k, v, seed)
