"""The block-sparse attention path reads nothing on the host once a batch's layout is known: the second call
of ``sliding_tile_attention``, ``block_sparse_attention`` with given kv_tiles, the top-k path, the nn module
and the swapped SDPA call make no host read (``item``, ``tolist``, ``bool``, ``nonzero``, boolean indexing,
...) and build no tensor from host data (a host-to-device copy on a GPU). Lists and layouts are cached by
value, so a new grids tensor with the same values costs only reading it. On a GPU the same second calls run
under ``torch.cuda.set_sync_debug_mode("error")`` and are captured in a CUDA graph."""
from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vdit.nn import TileSparseAttention
from vdit.ops import SparsePattern, block_sparse_attention, sliding_tile_attention, topk_tiles
from vdit.ops import sparse_attention as sparse_ops
from vdit.ops.tiles import sliding_window_tiles, tile_layout
from vdit.packing import cu_seqlens_from_lengths
from vdit.swap.sparse import SparseRouting, sparse_sdpa

GRIDS = [[3, 4, 6], [1, 4, 4]]
TILE, WINDOW = (1, 2, 2), (1, 2, 2)

# Reads of device values on the host (each a synchronisation on a GPU); nonzero / unique / bincount size
# their output from the data.
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
          torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.nonzero, torch.Tensor.nonzero,
          torch.argwhere, torch.unique, torch.Tensor.unique, torch.masked_select, torch.Tensor.masked_select,
          torch.bincount, torch.Tensor.bincount}
# Tensors built from host data: a host-to-device copy when they go to a GPU.
_FROM_HOST = {torch.tensor, torch.as_tensor}
_TORCH = os.path.dirname(torch.__file__)


def _caller() -> str:
    """file:line of the nearest frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return "?" if frame is None else f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"


def _syncs(func, args, kwargs) -> bool:
    """Whether a call reads device values on the host or copies host data to the device."""
    if func in _READS or func in _FROM_HOST:
        return True
    if func is torch.Tensor.__getitem__:  # a boolean mask index is a nonzero
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):  # tensor repeats: sized from the data
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


class HostReads(TorchFunctionMode):
    """Counts, per ``file:line`` of the caller, the calls that would synchronise with a GPU or copy host data
    to it. ``within``: count only callers whose path contains one of these strings (None: all)."""

    def __init__(self, within: tuple[str, ...] | None = None):
        super().__init__()
        self.within = within
        self.reads: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            where = _caller()
            if self.within is None or any(w in where for w in self.within):
                self.reads[f"{getattr(func, '__name__', func)} at {where}"] += 1
        return func(*args, **kwargs)


def reads_of_second_call(fn, within: tuple[str, ...] | None = None) -> dict:
    """Run ``fn`` twice; the host reads of the second run (file:line -> count)."""
    fn()
    with HostReads(within) as counter:
        fn()
    return dict(counter.reads)


def _batch(heads=4, kv_heads=2, dim=8, device="cpu"):
    torch.manual_seed(0)
    grids = torch.tensor(GRIDS, dtype=torch.int32, device=device)
    lengths = [t * h * w for t, h, w in GRIDS]
    cu = cu_seqlens_from_lengths(lengths, device)
    q = torch.randn(sum(lengths), heads, dim, device=device)
    k, v = (torch.randn(sum(lengths), kv_heads, dim, device=device) for _ in range(2))
    return q, k, v, cu, grids


def test_the_counter_sees_reads_and_host_data():
    x = torch.arange(6)
    with HostReads() as counter:
        int(x[0]), x.tolist(), bool(x.any()), x[x > 2], torch.tensor([1, 2]), x.repeat_interleave(x)
        x.repeat_interleave(x, output_size=15), x + 1  # sized by the caller / no read: not counted
    assert sum(counter.reads.values()) == 6, counter.reads


@pytest.mark.parametrize("window", [WINDOW, torch.tensor([[1, 1, 1], [1, 2, 2], [3, 2, 1], [1, 1, 2]])],
                         ids=["one-window", "per-head"])
@pytest.mark.parametrize("global_tokens", [None, [0, 3]], ids=["video", "global"])
def test_sliding_tile_attention_second_call_reads_nothing(window, global_tokens):
    q, k, v, cu, grids = _batch()
    if global_tokens:
        q, k, v = (torch.cat([t, t[:3]]) for t in (q, k, v))
        cu = cu_seqlens_from_lengths([72, 19])
    reads = reads_of_second_call(lambda: sliding_tile_attention(q, k, v, cu, grids, TILE, window,
                                                                global_tokens=global_tokens))
    assert reads == {}


def test_block_sparse_attention_with_given_lists_second_call_reads_nothing():
    q, k, v, cu, grids = _batch()
    kv_tiles = sliding_window_tiles(tile_layout(grids, TILE), torch.tensor([WINDOW]))
    assert reads_of_second_call(lambda: block_sparse_attention(q, k, v, cu, grids, TILE, kv_tiles)) == {}
    # The values were checked for this tensor and version: a write makes the next call check them again.
    kv_tiles[0, 0, 0] = 99
    with pytest.raises(ValueError, match=r"kv_tiles\[0, 0, 0\] = 99 is not a tile of its video"):
        block_sparse_attention(q, k, v, cu, grids, TILE, kv_tiles)


def test_top_k_lists_are_valid_by_construction_and_read_nothing():
    q, k, v, cu, grids = _batch()

    def call():
        kv_tiles = topk_tiles(q, k, cu, grids, TILE, 3)  # new lists every call, as a model makes them
        return block_sparse_attention(q, k, v, cu, grids, TILE, kv_tiles)

    assert reads_of_second_call(call) == {}


def test_a_new_grids_tensor_with_the_same_values_costs_one_read_and_no_rebuild():
    q, k, v, cu, grids = _batch()
    sliding_tile_attention(q, k, v, cu, grids, TILE, WINDOW)
    built = sparse_ops._window_lists.cache_info().misses
    reads = reads_of_second_call(lambda: sliding_tile_attention(q, k, v, cu, grids.clone(), TILE, WINDOW))
    assert sum(reads.values()) == 1 and all(r.startswith("tolist at vdit/ops/tiles.py") for r in reads), reads
    assert sparse_ops._window_lists.cache_info().misses == built  # same layout object, same lists
    assert tile_layout(grids.clone(), TILE) is tile_layout(grids, TILE)


def test_cached_checks_still_refuse_what_changed():
    q, k, v, cu, grids = _batch()
    sliding_tile_attention(q, k, v, cu, grids, TILE, WINDOW)
    grids[1, 0] = 2  # in place: 32 tokens for a sequence of 16
    with pytest.raises(ValueError, match=r"grids\[1\] = \(2, 4, 4\) holds 32 tokens"):
        sliding_tile_attention(q, k, v, cu, grids, TILE, WINDOW)
    with pytest.raises(ValueError, match=r"grids\[1\] = \(2, 4, 4\) holds 32 tokens"):  # errors are not cached
        sliding_tile_attention(q, k, v, cu, grids, TILE, WINDOW)
    window = torch.tensor([[1, 1, 1]] * 4)
    sliding_tile_attention(q, k, v, cu, torch.tensor(GRIDS, dtype=torch.int32), TILE, window)
    window[2, 1] = 0
    with pytest.raises(ValueError, match="window sizes must be >= 1"):
        sliding_tile_attention(q, k, v, cu, torch.tensor(GRIDS, dtype=torch.int32), TILE, window)


def test_triton_launchers_read_nothing_on_the_second_call():
    """The Triton kernels' Python side (work lists, compacted lists) on the interpreter: vdit's own code makes
    no host read (the interpreter's own copies are not vdit's, and a GPU has none)."""
    q, k, v, cu, grids = _batch()

    def top_k():
        kv_tiles = topk_tiles(q, k, cu, grids, TILE, 3)
        return block_sparse_attention(q, k, v, cu, grids, TILE, kv_tiles, backend="triton")

    sliding = reads_of_second_call(lambda: sliding_tile_attention(q, k, v, cu, grids, TILE, WINDOW, backend="triton"),
                                   within=("vdit/",))
    assert sliding == {} and reads_of_second_call(top_k, within=("vdit/",)) == {}
    with HostReads(within=("vdit/",)) as counter:  # the filter still sees vdit's reads: a new grids tensor
        sliding_tile_attention(q, k, v, cu, grids.clone(), TILE, WINDOW, backend="triton")
    assert sum(counter.reads.values()) == 1 and all("vdit/ops/tiles.py" in r for r in counter.reads), counter.reads


@pytest.mark.parametrize("mode", ["sliding_tile", "topk_tile"])
def test_nn_module_second_call_reads_nothing(mode):
    q, _, _, cu, grids = _batch()
    module = TileSparseAttention(32, 4, kv_heads=2, pattern=SparsePattern.of(mode, TILE, WINDOW, 3))
    x = torch.randn(q.shape[0], 32)
    assert reads_of_second_call(lambda: module(x, cu, grids=grids)) == {}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", ["sliding_tile", "topk_tile"])
def test_swapped_sdpa_second_call_reads_nothing(mode, masked):
    grid, B, H, D, text = (3, 4, 4), 2, 2, 8, 5
    length = 48 + text
    q, k, v = (torch.randn(B, H, length, D) for _ in range(3))
    keep = torch.ones(B, length, dtype=torch.bool)
    keep[1, -2:] = False
    mask = keep[:, None, None, :] if masked else None  # one mask object for every call site of a forward
    routing = SparseRouting(SparsePattern.of(mode, TILE, WINDOW, 3))
    routing.grid = grid
    assert reads_of_second_call(lambda: sparse_sdpa(q, k, v, mask, False, None, routing, "x")) == {}
    assert sparse_sdpa(q, k, v, mask, False, None, routing, "x")[1] == "sparse"


def _second_calls(device):
    """The second-call closures of every path, on ``device``."""
    q, k, v, cu, grids = _batch(device=device)
    kv_tiles = sliding_window_tiles(tile_layout(grids, TILE), torch.tensor([WINDOW])).to(device)
    module = TileSparseAttention(32, 4, kv_heads=2, pattern=SparsePattern("topk_tile", TILE, topk=3)).to(device)
    x = torch.randn(q.shape[0], 32, device=device)
    return {
        "sliding": lambda: sliding_tile_attention(q, k, v, cu, grids, TILE, WINDOW),
        "listed": lambda: block_sparse_attention(q, k, v, cu, grids, TILE, kv_tiles),
        "module": lambda: module(x, cu, grids=grids),
    }


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["sliding", "listed", "module"])
def test_gpu_second_call_never_synchronises_and_captures_in_a_cuda_graph(path):
    call = _second_calls("cuda")[path]
    with torch.no_grad():
        expected = call()  # the first call reads the layout and builds the lists
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()  # warm-up on the side stream, as CUDA-graph capture asks
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)
