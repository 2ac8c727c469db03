"""Global tokens in the block-sparse attention ops (vdit/ops/sparse_attention.py): a dense segment beside
the sparse kernel, never a tile of any key list.

Every backend (reference, C++, Triton under the interpreter) against the float64 oracle
``reference.block_sparse_attention(global_tokens=)``, which states the rule as one more tile per video
that every list names (out, merged lse and the q, k, v gradients), on a batch that mixes grids not
divisible by the tile, a 1-frame image, sequences with and without global tokens in different counts
(one more than a tile holds), GQA, per-head windows and top-k lists with unused slots. The lists the op
hands the sparse kernel hold video-to-video entries only, pinned at the op's boundary on a small batch
and sized on a 33x45x80 video with 256 global tokens."""
import pytest
import torch

from tests.conftest import assert_close, backends_of
from tests.ops.test_sparse_attention import GRIDS, TILE, _batch, _with_globals
from vdit.ops import block_sparse_attention, reference, sliding_tile_attention, topk_tiles
from vdit.ops.tiles import (
    lists_with_global_rows,
    lists_with_global_tiles,
    query_lists,
    sliding_window_tiles,
    tile_layout,
    to_global,
    with_global_segments,
    with_global_tiles,
)

GLOBALS = [40, 0, 3]  # 40 > the largest tile (32 tokens): two global tiles; none for the 1-frame image
WINDOWS = torch.tensor([(1, 2, 1), (2, 1, 3), (3, 3, 1), (1, 1, 2)])


def _case(dtype, globals_=GLOBALS):
    q, k, v, _, grids = _batch(GRIDS, 4, 2, 16, dtype)
    q, k, v, cu = _with_globals(q, k, v, grids, globals_)
    return q, k, v, cu, grids


def _compare(run, kv_tiles, q, k, v, cu, grids, globals_, dtype):
    """run(q, k, v) -> (out, lse) against the float64 oracle: out, lse, gradients; inputs left unmodified."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = run(*leaves)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype).to(out.device))
    for leaf, original in zip(leaves, (q, k, v)):
        assert torch.equal(leaf.detach(), original)
    oracle = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = reference.block_sparse_attention(*oracle, cu.cpu(), grids.cpu(), TILE, kv_tiles.cpu(),
                                                    global_tokens=globals_, return_lse=True)
    r_grads = torch.autograd.grad(r_out, oracle, dout)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    assert_close(out, r_out, dtype, scale=2.0)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(r_lse))
    assert_close(lse[~torch.isneginf(lse)], r_lse[~torch.isneginf(r_lse)], torch.float32, scale=4.0)
    for got, want in zip(grads, r_grads):
        assert_close(got, want, dtype, scale=8.0)


@pytest.mark.parametrize("backend,device", backends_of("block_sparse_attention", reference=True))
def test_sliding_windows_per_head_with_global_tokens_match_the_oracle(backend, device):
    dtype = torch.float64 if backend in ("torch", "cpu") else torch.float32
    q, k, v, cu, grids = (t.to(device) for t in _case(dtype))
    kv = sliding_window_tiles(tile_layout(grids, TILE), WINDOWS)

    def run(q, k, v):
        return sliding_tile_attention(q, k, v, cu, grids, TILE, WINDOWS.to(device), global_tokens=GLOBALS,
                                      backend=backend, return_lse=True)

    _compare(run, kv, q, k, v, cu, grids, GLOBALS, dtype)


@pytest.mark.parametrize("backend,device", backends_of("block_sparse_attention", reference=True))
def test_topk_lists_with_unused_slots_and_global_tokens_match_the_oracle(backend, device):
    dtype = torch.float32
    q, k, v, cu, grids = _case(dtype, [2, 7, 0])  # the image (one tile) has global tokens here
    kv = topk_tiles(q, k, cu, grids, TILE, 3, global_tokens=[2, 7, 0])
    kv[5, 2] = -1  # a video query tile and head that lists nothing still sees its global tokens
    assert bool((kv == -1).any(-1).any())  # the 1-frame image keeps 1 tile of 3: unused slots
    q, k, v, cu, grids, kv_d = (t.to(device) for t in (q, k, v, cu, grids, kv))

    def run(q, k, v):
        return block_sparse_attention(q, k, v, cu, grids, TILE, kv_d, global_tokens=torch.tensor([2, 7, 0]),
                                      backend=backend, return_lse=True)

    _compare(run, kv, q, k, v, cu, grids, [2, 7, 0], dtype)


def test_a_row_that_sees_nothing_and_no_global_token_stays_zero():
    q, k, v, cu, grids = _case(torch.float64)
    layout = tile_layout(grids, TILE)
    kv = sliding_window_tiles(layout, torch.tensor([(1, 1, 1)] * 4))
    kv[layout.first_tile[1], 3] = -1  # the image: no global tokens, and this head lists nothing
    for backend in ("torch", "cpu"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = block_sparse_attention(*leaves, cu, grids, TILE, kv, global_tokens=GLOBALS, backend=backend,
                                          return_lse=True)
        start, end = int(cu[1]), int(cu[2])
        assert torch.equal(out[start:end, 3], torch.zeros_like(out[start:end, 3]))
        assert torch.isneginf(lse[3, start:end]).all() and torch.isfinite(lse[:3]).all()
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(grads[0][start:end, 3], torch.zeros_like(grads[0][start:end, 3]))


def test_the_sparse_kernel_gets_video_to_video_lists_only(monkeypatch):
    """At the op's boundary: the lists the sparse kernel runs are the window's (K = its visible tiles, as
    without global tokens), name no global tile, and the global tiles' rows are empty."""
    q, k, v, cu, grids = _case(torch.float64)
    seen = []
    original = reference.block_sparse_attention_tiles

    def spy(q, k, v, tile_offsets, kv_tiles, **kwargs):
        seen.append((tile_offsets, kv_tiles))
        return original(q, k, v, tile_offsets, kv_tiles, **kwargs)

    monkeypatch.setattr(reference, "block_sparse_attention_tiles", spy)
    sliding_tile_attention(q, k, v, cu, grids, TILE, (3, 3, 3), global_tokens=GLOBALS, backend="torch")
    (offsets, lists), = seen
    video = tile_layout(grids, TILE)
    layout = with_global_segments(video, GLOBALS)
    assert torch.equal(offsets, layout.offsets) and int(offsets[-1]) == q.shape[0]
    assert lists.shape[2] == sliding_window_tiles(video, torch.tensor([[3, 3, 3]])).shape[2]
    for b, first in enumerate(layout.first_tile[:-1]):
        n, extra = layout.video_tiles(b), layout.global_tiles(b)
        assert extra == -(-GLOBALS[b] // video.max_tile)
        rows = lists[first:first + n]
        assert bool(((rows == -1) | ((rows >= first) & (rows < first + n))).all())  # its own video tiles
        assert bool((lists[first + n:first + n + extra] == -1).all())  # global rows: empty


def test_list_memory_with_256_global_tokens_is_proportional_to_the_visible_entries():
    """33x45x80 tokens, tile 4x4x4 (9 x 12 x 20 = 2160 tiles), window 3x3x3, 256 global tokens, one head:
    the one-tile formulation needs (2161, 2161) lists; the op's lists stay (2164, 27)."""
    video = tile_layout(torch.tensor([[33, 45, 80]], dtype=torch.int32), (4, 4, 4))
    kv = sliding_window_tiles(video, torch.tensor([[3, 3, 3]]))
    layout = with_global_segments(video, [256])
    lists = lists_with_global_rows(layout, kv)
    visible = int((lists >= 0).sum())
    assert visible == 2160 * 27 and lists.shape == (2160 + 4, 1, 27)  # 256 tokens in 4 tiles of 64
    assert lists.numel() <= 2 * visible
    # The transposed lists of the backward (CSR): one offset per (key tile, head) list, then exactly the
    # visible entries, where lists padded to the most-listed key tile (64 of a 3x3x3 window's edge key tiles)
    # would hold 2.37x them; global tokens add empty lists only.
    transposed = query_lists(to_global(layout, lists), layout.num_tiles, 1, 1)
    alone = query_lists(to_global(video, kv), video.num_tiles, 1, 1)
    assert transposed.shape == (layout.num_tiles + 1 + visible,) and alone.shape == (video.num_tiles + 1 + visible,)
    counts = (transposed[1:layout.num_tiles + 1] - transposed[:layout.num_tiles]).tolist()
    assert max(counts) == 64 and max(counts) * layout.num_tiles > 2.3 * visible
    assert lists.numel() <= 1.01 * visible and transposed.numel() <= 1.04 * visible
    one_tile = lists_with_global_tiles(with_global_tiles(video, [256]), kv)
    assert one_tile.shape == (2161, 1, 2161) and one_tile.numel() > 75 * lists.numel()
