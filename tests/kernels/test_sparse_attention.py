"""The C++ CPU block-sparse attention kernel (csrc/sparse_attention), called directly.

torch.ops.vdit.block_sparse_attention_fwd / _bwd on CPU tensors, below the op layer and its Python checks,
against the float64 oracle vdit.ops.reference.block_sparse_attention_tiles: out and lse, and dq, dk, dv
against the oracle's autograd gradients. Inputs are packed batches in tile order built with vdit.ops.tiles
(grids that the tile does not divide, a 1-frame video, several videos), per-head lists, GQA / MQA, -1 slots
anywhere in a row, repeated tiles, a row that lists no tile (out 0, lse -inf, zero gradients), empty tiles,
tiles larger than the kernel's tiles, every tile visible; all four dtypes; a bit-identical backward; and bad
inputs, which must raise RuntimeError and leave every input unmodified. Outputs are NaN-poisoned
(conftest's autouse fixture), so an element the kernel forgets to write fails the comparison.

The op contract (every backend through vdit.ops) is tested in tests/ops/test_sparse_attention.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_close
from vdit.ops import reference
from vdit.ops.tiles import query_lists, sliding_window_tiles, tile_layout, to_global

DTYPES = [  # dtype, forward / gradient tolerance scale (as the dense CPU kernel's tests)
    pytest.param(torch.float64, 1.0, 1.0, id="fp64"),
    pytest.param(torch.float32, 2.0, 8.0, id="fp32"),
    pytest.param(torch.float16, 1.0, 2.0, id="fp16"),
    pytest.param(torch.bfloat16, 1.0, 2.0, id="bf16"),
]
GRIDS = [[5, 6, 7], [1, 4, 4], [4, 8, 8]]  # not divisible by the tile, a 1-frame video, a divisible one
TILE = (2, 4, 4)


def _layout(grids=GRIDS, tile=TILE):
    return tile_layout(torch.tensor(grids, dtype=torch.int32), tile)


def _window_lists(layout, window, hq):
    """Global kv_tiles (num_tiles, Hq, K) of a sliding window: one (1, 3) row for every head, or (Hq, 3)."""
    lists = to_global(layout, sliding_window_tiles(layout, torch.tensor(window)))
    return lists.expand(-1, hq, -1).contiguous()


def _inputs(total, hq, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(total, hq, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(total, hk, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return q, k, v, dout


def _run(q, k, v, dout, offsets, kv, max_tile, scale):
    qt = query_lists(kv, offsets.numel() - 1, q.shape[1], k.shape[1])
    out, lse = torch.ops.vdit.block_sparse_attention_fwd(q, k, v, offsets, kv, max_tile, scale)
    grads = torch.ops.vdit.block_sparse_attention_bwd(dout, q, k, v, out, lse, offsets, kv, qt, max_tile, scale)
    return out, lse, grads


def _check(offsets, kv, max_tile, hq, hk, d, dtype=torch.float64, fwd_scale=1.0, grad_scale=1.0, scale=None):
    """Runs the kernels and compares them with the float64 oracle; returns (out, lse, (dq, dk, dv))."""
    total = int(offsets[-1])
    q, k, v, dout = _inputs(total, hq, hk, d, dtype)
    scale = d ** -0.5 if scale is None else scale
    out, lse, grads = _run(q, k, v, dout, offsets, kv, max_tile, scale)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.block_sparse_attention_tiles(q64, k64, v64, offsets, kv, softmax_scale=scale,
                                                              return_lse=True)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == compute and lse.shape == (hq, total)
    assert_close(out, ref_out.detach(), dtype, scale=fwd_scale)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), "exactly the queries that see no key have lse = -inf"
    assert torch.all(lse[~seen] == float("-inf"))
    assert_close(lse[seen], ref_lse[seen], compute, scale=4.0)
    for name, got, want, like in zip("qkv", grads, ref_grads, (q, k, v)):
        assert got.dtype == dtype and got.shape == like.shape, name
        assert_close(got, want, dtype, scale=grad_scale)
    return out, lse, grads


# ---- packed batches from vdit.ops.tiles ---------------------------------------------------------

@pytest.mark.parametrize("dtype,fwd_scale,grad_scale", DTYPES)
@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_sliding_window_packed_batch(dtype, fwd_scale, grad_scale, hq, hk):
    """Three videos (partial edge tiles, a 1-frame video), a (1, 3, 3) window, every dtype, GQA and MQA."""
    layout = _layout()
    kv = _window_lists(layout, [[1, 3, 3]], hq)
    _check(layout.offsets, kv, layout.max_tile, hq, hk, 16, dtype, fwd_scale, grad_scale)


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_per_head_windows(hq, hk):
    """Lists that differ across heads; smaller windows leave -1 at the end of their rows."""
    layout = _layout()
    kv = _window_lists(layout, [[1, 1, 1], [2, 3, 3], [3, 2, 1], [1, 2, 2]], hq)
    assert (kv == -1).any() and not torch.equal(kv[:, 0], kv[:, 1])
    _check(layout.offsets, kv, layout.max_tile, hq, hk, 32)


def test_holes_repeats_and_any_order():
    """-1 slots in the middle of rows, a tile listed twice (attended once, like the oracle) and rows in
    no particular order; key tiles that no query lists get zero dk / dv."""
    layout = _layout()
    hq, hk = 4, 2
    kv = _window_lists(layout, [[2, 3, 3]], hq).clone()
    g = torch.Generator().manual_seed(3)
    kv[torch.rand(kv.shape, generator=g) < 0.3] = -1
    kv = torch.gather(kv, 2, torch.rand(kv.shape, generator=g).argsort(2))  # shuffle every row
    kv[0, 0, 1] = kv[0, 0, 0] = 5  # a repeated tile
    kv[:, :, -1] = torch.where(kv[:, :, -1] >= 0, kv[:, :, -1], kv[:, :, -2])  # more repeats
    middle = (kv[:, :, 1:-1] == -1) & (kv[:, :, :1] >= 0) & (kv[:, :, -1:] >= 0)
    assert middle.any(), "some -1 slots sit between used slots"
    _check(layout.offsets, kv, layout.max_tile, hq, hk, 16, torch.float32, 2.0, 8.0)


@pytest.mark.parametrize("dtype,fwd_scale,grad_scale", DTYPES)
def test_row_that_lists_no_tile(dtype, fwd_scale, grad_scale):
    """An all -1 row: its queries output 0 with lse -inf and get zero dq; a key tile nobody lists gets
    zero dk / dv."""
    layout = _layout()
    hq, hk = 2, 1
    kv = _window_lists(layout, [[1, 3, 3]], hq).clone()
    kv[3, 1] = -1  # query tile 3, head 1 sees nothing
    kv[kv == 7] = -1  # nobody attends key tile 7
    out, lse, (dq, dk, dv) = _check(layout.offsets, kv, layout.max_tile, hq, hk, 16, dtype, fwd_scale, grad_scale)
    rows = slice(int(layout.offsets[3]), int(layout.offsets[4]))
    assert torch.equal(out[rows, 1], torch.zeros_like(out[rows, 1]))
    assert torch.all(lse[1, rows] == float("-inf")) and torch.isfinite(lse[0, rows]).all()
    assert torch.equal(dq[rows, 1], torch.zeros_like(dq[rows, 1]))
    keys = slice(int(layout.offsets[7]), int(layout.offsets[8]))
    assert torch.equal(dk[keys], torch.zeros_like(dk[keys])) and torch.equal(dv[keys], torch.zeros_like(dv[keys]))


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_every_tile_visible(threads):
    """The whole grid as the window: rows of equal lists share items, key runs longer than a score tile, and
    each video is a closed dense block per kv head, done in one single-pass backward item when it is no
    larger than a thread's share (the 1024-token video: with 1 or 2 threads, not with 4)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layout = _layout([[4, 16, 16], [3, 5, 6]], (2, 4, 4))
        kv = _window_lists(layout, [[2, 4, 4]], 4)
        assert int(layout.offsets[layout.first_tile[1]]) == 1024  # the first video: 1024 keys in one run
        _check(layout.offsets, kv, layout.max_tile, 4, 2, 32, torch.float32, 2.0, 8.0)
    finally:
        torch.set_num_threads(before)


def test_tiles_larger_than_the_kernel_tiles():
    """288-token tiles: more query rows than one forward item and more keys than one dk / dv item."""
    layout = _layout([[4, 8, 18], [2, 3, 5]], (4, 8, 9))
    assert layout.max_tile == 288
    kv = _window_lists(layout, [[1, 1, 2], [1, 1, 1]], 2)
    _check(layout.offsets, kv, layout.max_tile, 2, 2, 16)


def test_hand_built_offsets_with_empty_tiles():
    """tile_offsets may repeat (empty tiles); a row that lists only an empty tile sees no key."""
    offsets = torch.tensor([0, 5, 5, 12, 12, 20], dtype=torch.int32)
    kv = torch.tensor([[[0, 1, -1]], [[2, 0, 1]], [[1, -1, 2]], [[1, 3, -1]], [[-1, 4, 0]]], dtype=torch.int32)
    kv = kv.expand(-1, 2, -1).contiguous()
    _check(offsets, kv, 8, 2, 2, 8)
    kv2 = kv.clone()
    kv2[0] = torch.tensor([1, 3, -1], dtype=torch.int32)  # query tile 0 lists only empty tiles
    _, lse, _ = _check(offsets, kv2, 8, 2, 2, 8)
    assert torch.all(lse[:, :5] == float("-inf"))


def test_empty_batch():
    offsets = torch.zeros(1, dtype=torch.int32)
    q = torch.zeros(0, 2, 8)
    kv = torch.zeros(0, 2, 3, dtype=torch.int32)
    out, lse = torch.ops.vdit.block_sparse_attention_fwd(q, q, q, offsets, kv, 0, 0.5)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    qt = query_lists(kv, 0, 2, 2)  # no lists: one offset, 1
    dq, dk, dv = torch.ops.vdit.block_sparse_attention_bwd(q, q, q, q, out, lse, offsets, kv, qt, 0, 0.5)
    assert dq.shape == dk.shape == dv.shape == (0, 2, 8)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count(threads):
    """Work items are grouped by the thread count: other groupings, same answer."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layout = _layout([[4, 16, 16], [5, 6, 7]], TILE)
        kv = _window_lists(layout, [[1, 3, 3], [2, 4, 4]], 2)
        _check(layout.offsets, kv, layout.max_tile, 2, 1, 16)
    finally:
        torch.set_num_threads(before)


def test_backward_is_bit_identical_across_runs():
    layout = _layout()
    kv = _window_lists(layout, [[2, 3, 3], [1, 2, 3], [1, 1, 1], [3, 3, 3]], 4)
    q, k, v, dout = _inputs(int(layout.offsets[-1]), 4, 2, 16, torch.float32)
    first = _run(q, k, v, dout, layout.offsets, kv, layout.max_tile, 0.25)
    for _ in range(2):
        again = _run(q, k, v, dout, layout.offsets, kv, layout.max_tile, 0.25)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        assert all(torch.equal(a, b) for a, b in zip(again[2], first[2]))


# ---- bad inputs: RuntimeError before anything is written, inputs unmodified ----------------------

def _good_args():
    layout = _layout()
    hq, hk = 4, 2
    kv = _window_lists(layout, [[1, 3, 3]], hq)
    q, k, v, dout = _inputs(int(layout.offsets[-1]), hq, hk, 8, torch.float32)
    out, lse = torch.ops.vdit.block_sparse_attention_fwd(q, k, v, layout.offsets, kv, layout.max_tile, 0.5)
    qt = query_lists(kv, layout.num_tiles, hq, hk)
    return dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse, tile_offsets=layout.offsets.clone(), kv_tiles=kv,
                q_tiles=qt, max_tile=layout.max_tile)


def _with(a, index, value):
    a = a.clone()
    a.view(-1)[index] = value
    return a


BAD_INPUTS = [  # (name, args -> replaced args, expected message)
    ("kv-tile-too-large", lambda a: dict(kv_tiles=_with(a["kv_tiles"], 5, a["tile_offsets"].numel() - 1)),
     "kv_tiles entries"),
    ("kv-tile-below-minus-one", lambda a: dict(kv_tiles=_with(a["kv_tiles"], 0, -2)), "kv_tiles entries"),
    ("q-tile-entry-too-large", lambda a: dict(q_tiles=_with(a["q_tiles"], -1, 10 ** 6)), "q_tiles entries"),
    ("q-tile-entry-negative", lambda a: dict(q_tiles=_with(a["q_tiles"], -1, -1)), "q_tiles entries"),
    # The last list's entries belong to the last kv head (1): query head 0 uses kv head 0.
    ("q-tile-entry-of-another-kv-head", lambda a: dict(q_tiles=_with(a["q_tiles"], -1, 0)), "uses kv head"),
    ("q-tiles-offsets-decreasing", lambda a: dict(q_tiles=_with(a["q_tiles"], 5, int(a["q_tiles"][0]))),
     "non-decreasing"),
    ("q-tiles-offsets-wrong-end", lambda a: dict(q_tiles=a["q_tiles"][:-1].contiguous()), "end at its length"),
    ("q-tiles-too-short", lambda a: dict(q_tiles=a["q_tiles"][:3].contiguous()), "list offsets, got 3"),
    ("kv-tiles-int64", lambda a: dict(kv_tiles=a["kv_tiles"].long()), "kv_tiles must be int32"),
    ("offsets-int64", lambda a: dict(tile_offsets=a["tile_offsets"].long()), "tile_offsets must be int32"),
    ("q-tiles-int64", lambda a: dict(q_tiles=a["q_tiles"].long()), "q_tiles must be int32"),
    ("k-float64", lambda a: dict(k=a["k"].double(), v=a["v"].double()), "k and v must have q's dtype"),
    ("q-int", lambda a: dict(q=a["q"].int()), "q must be float16, bfloat16, float32 or float64"),
    ("lse-float64", lambda a: dict(lse=a["lse"].double()), "lse must be Float"),
    ("dout-float16", lambda a: dict(dout=a["dout"].half()), "dout must have q's dtype"),
    ("k-fewer-tokens", lambda a: dict(k=a["k"][:-1], v=a["v"][:-1]), "same number of tokens"),
    ("v-other-shape", lambda a: dict(v=a["v"][:, :1].contiguous()), "k must have v's shape"),
    ("heads-not-multiple", lambda a: dict(k=a["k"].repeat(1, 2, 1)[:, :3].contiguous(),
                                          v=a["v"].repeat(1, 2, 1)[:, :3].contiguous()), "multiple of k heads"),
    ("head-dim-mismatch", lambda a: dict(k=a["k"][:, :, :4].contiguous(), v=a["v"][:, :, :4].contiguous()),
     "same head dim"),
    ("kv-tiles-wrong-heads", lambda a: dict(kv_tiles=a["kv_tiles"][:, :2].contiguous()), "kv_tiles must be"),
    ("kv-tiles-wrong-tiles", lambda a: dict(kv_tiles=a["kv_tiles"][1:].contiguous()), "kv_tiles must be"),
    ("q-tiles-2d", lambda a: dict(q_tiles=a["q_tiles"][None]), "q_tiles must be 1-D"),
    ("q-non-contiguous", lambda a: dict(q=a["q"].transpose(0, 1).contiguous().transpose(0, 1)), "q must be contiguous"),
    ("kv-tiles-non-contiguous", lambda a: dict(kv_tiles=a["kv_tiles"].transpose(0, 1).contiguous().transpose(0, 1)),
     "kv_tiles must be contiguous"),
    ("lse-wrong-shape", lambda a: dict(lse=a["lse"][:, 1:].contiguous()), "lse must be"),
    ("out-wrong-shape", lambda a: dict(out=a["out"][1:].contiguous()), "out must have q's shape"),
    ("offsets-wrong-end", lambda a: dict(tile_offsets=_with(a["tile_offsets"], -1, 7)), "must start at 0 and end at"),
    ("offsets-decreasing", lambda a: dict(tile_offsets=_with(a["tile_offsets"], 3, 0)), "non-decreasing"),
    ("max-tile-too-small", lambda a: dict(max_tile=a["max_tile"] - 1), "more than max_tile"),
    ("max-tile-negative", lambda a: dict(max_tile=-1), "max_tile must be >= 0"),
]


BACKWARD_ONLY = {"q-tile-entry-too-large", "q-tile-entry-negative", "q-tile-entry-of-another-kv-head",
                 "q-tiles-offsets-decreasing", "q-tiles-offsets-wrong-end", "q-tiles-too-short", "q-tiles-int64",
                 "lse-float64", "dout-float16", "q-tiles-2d", "lse-wrong-shape", "out-wrong-shape"}
FWD_ARGS = ("q", "k", "v", "tile_offsets", "kv_tiles", "max_tile")
BWD_ARGS = ("dout", "q", "k", "v", "out", "lse", "tile_offsets", "kv_tiles", "q_tiles", "max_tile")


@pytest.mark.parametrize("op,change,message", [
    pytest.param(op, change, message, id=f"{op}-{name}")
    for name, change, message in BAD_INPUTS for op in ("fwd", "bwd") if op == "bwd" or name not in BACKWARD_ONLY])
def test_bad_inputs_raise_before_writing(op, change, message):
    args = _good_args()
    args.update(change(args))
    before = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(RuntimeError, match=message):
        if op == "fwd":
            torch.ops.vdit.block_sparse_attention_fwd(*(args[n] for n in FWD_ARGS), 0.5)
        else:
            torch.ops.vdit.block_sparse_attention_bwd(*(args[n] for n in BWD_ARGS), 0.5)
    for n, t in before.items():
        assert torch.equal(args[n], t), f"{n} was modified"
