"""SparsePattern (vdit/ops/sparse_pattern.py), the one validated value of the block-sparse modes: errors name
the field (mode, tile, window, topk, a window file's entry, per-head windows against the heads), ``attend``
is exactly the op it names (sliding_tile_attention, or block_sparse_attention over topk_tiles) for one
window, per-head windows and per-module windows from a JSON file, and patterns compare by value."""
import json

import pytest
import torch

import vdit
from vdit.ops import SparsePattern, block_sparse_attention, sliding_tile_attention, topk_tiles
from vdit.ops.sparse_pattern import MODES, load_windows
from vdit.ops.tiles import sliding_window_tiles, tile_layout
from vdit.packing import cu_seqlens_from_lengths

GRIDS = [[3, 6, 7], [1, 4, 4]]  # not divisible by the tile; a 1-frame image
TILE = (2, 4, 4)
HEADS = [[1, 1, 1], [2, 1, 2], [1, 2, 1], [3, 3, 3]]  # one window per query head


def _batch(hq=4, hk=2, d=8, global_tokens=0):
    g = torch.Generator().manual_seed(0)
    grids = torch.tensor(GRIDS, dtype=torch.int32)
    lengths = [n + global_tokens for n in grids.prod(1).tolist()]
    q, k, v = (torch.randn(sum(lengths), h, d, generator=g) for h in (hq, hk, hk))
    return q, k, v, cu_seqlens_from_lengths(lengths), grids


def _windows_file(tmp_path, content) -> str:
    path = tmp_path / "windows.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(mode="local", tile=TILE), ValueError, r"SparsePattern.mode must be one of \('sliding_tile', 'topk_tile'\)"),
    (dict(mode="dense", tile=TILE), ValueError, "SparsePattern.mode must be one of"),
    (dict(mode="sliding_tile", tile=(0, 4, 4)), ValueError, "SparsePattern.tile must be 3 positive ints"),
    (dict(mode="sliding_tile", tile=(2, 4)), ValueError, "SparsePattern.tile must be 3 positive ints"),
    (dict(mode="topk_tile", tile=None), TypeError, "SparsePattern.tile must be 3 ints"),
    (dict(mode="sliding_tile", tile=TILE, window=(0, 1, 1)), ValueError, "SparsePattern.window sizes must be >= 1"),
    (dict(mode="sliding_tile", tile=TILE, window=(1, 2)), ValueError, r"SparsePattern.window must be \[t, h, w\]"),
    (dict(mode="sliding_tile", tile=TILE, window=[[1, 1, 1], [1, 1]]), TypeError, "SparsePattern.window must be"),
    (dict(mode="sliding_tile", tile=TILE, window=torch.ones(2, 3)), TypeError, "SparsePattern.window must be an int"),
    (dict(mode="sliding_tile", tile=TILE, topk=2), ValueError, "SparsePattern.topk is for mode 'topk_tile'"),
    (dict(mode="topk_tile", tile=TILE, window=(1, 1, 1)), ValueError, "SparsePattern.window is for mode 'sliding"),
    (dict(mode="topk_tile", tile=TILE, topk=0), ValueError, "SparsePattern.topk must be an int >= 1, got 0"),
    (dict(mode="topk_tile", tile=TILE, topk=True), ValueError, "SparsePattern.topk must be an int >= 1"),
    (dict(mode="topk_tile", tile=TILE, topk=2.0), ValueError, "SparsePattern.topk must be an int >= 1"),
])
def test_validation_errors_name_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparsePattern(**kwargs)


@pytest.mark.parametrize("content,message", [
    ({"default": [1, 0, 1]}, r"window file .*windows.json: 'default' sizes must be >= 1"),
    ({"blocks.0.attn": "wide", "default": [1, 1, 1]}, r"window file .*: 'blocks.0.attn' must be \[t, h, w\]"),
    ([[1, 1, 1], [1, 1]], r"window file .*: 'default' must be \[t, h, w\] or a list of them"),
    ("{not json", r"window file .*windows.json: Expecting"),
])
def test_window_file_errors_name_the_file_and_the_entry(tmp_path, content, message):
    path = _windows_file(tmp_path, content)
    with pytest.raises(ValueError, match=message):
        SparsePattern("sliding_tile", TILE, window=path)
    with pytest.raises(ValueError, match="window file .*missing.json"):
        load_windows(tmp_path / "missing.json")


def test_per_head_windows_must_match_the_heads(tmp_path):
    pattern = SparsePattern("sliding_tile", TILE, window=HEADS[:3])
    assert pattern.window_for(heads=3).shape == (3, 3)
    with pytest.raises(ValueError, match="SparsePattern.window: 3 per-head windows for 4 heads"):
        pattern.window_for(heads=4)
    q, k, v, cu, grids = _batch(hq=4)
    with pytest.raises(ValueError, match="3 per-head windows for 4 heads"):
        pattern.attend(q, k, v, cu, grids)
    per_module = SparsePattern("sliding_tile", TILE, window=_windows_file(tmp_path, {"blocks.1.attn": HEADS[:3]}))
    with pytest.raises(ValueError, match="3 per-head windows for 4 heads at 'blocks.1.attn'"):
        per_module.window_for("blocks.1.attn", heads=4)
    with pytest.raises(ValueError, match="names no window for 'blocks.0.attn' and has no 'default'"):
        per_module.window_for("blocks.0.attn")


@pytest.mark.parametrize("window", [(1, 2, 1), (9, 9, 9), HEADS], ids=["one", "whole-grid", "per-head"])
def test_sliding_tile_attend_is_sliding_tile_attention(window):
    q, k, v, cu, grids = _batch()
    pattern = SparsePattern("sliding_tile", TILE, window=window)
    expected_window = torch.tensor(window) if window is HEADS else window
    torch.testing.assert_close(pattern.attend(q, k, v, cu, grids),
                               sliding_tile_attention(q, k, v, cu, grids, TILE, expected_window), rtol=0, atol=0)
    lists = sliding_window_tiles(tile_layout(grids, TILE), torch.tensor(window).reshape(-1, 3))
    assert torch.equal(pattern.window_tiles(grids), lists)  # the lists the op attends, for baselines' masks


def test_attend_passes_global_tokens_scale_and_backend():
    q, k, v, cu, grids = _batch(global_tokens=3)
    options = dict(global_tokens=3, softmax_scale=0.5, backend="cpu")
    pattern = SparsePattern("sliding_tile", TILE, window=(1, 1, 2))
    torch.testing.assert_close(pattern.attend(q, k, v, cu, grids, **options),
                               sliding_tile_attention(q, k, v, cu, grids, TILE, (1, 1, 2), **options), rtol=0, atol=0)
    pattern = SparsePattern("topk_tile", TILE, topk=2)
    kv_tiles = topk_tiles(q, k, cu, grids, TILE, 2, global_tokens=3)
    torch.testing.assert_close(pattern.attend(q, k, v, cu, grids, **options),
                               block_sparse_attention(q, k, v, cu, grids, TILE, kv_tiles, **options), rtol=0, atol=0)


@pytest.mark.parametrize("topk", [1, 3, 50])
def test_topk_tile_attend_is_block_sparse_attention_of_topk_tiles(topk):
    q, k, v, cu, grids = _batch()
    pattern = SparsePattern("topk_tile", TILE, topk=topk)
    kv_tiles = topk_tiles(q, k, cu, grids, TILE, topk)
    assert torch.equal(pattern.key_tiles(q, k, cu, grids), kv_tiles)
    torch.testing.assert_close(pattern.attend(q, k, v, cu, grids),
                               block_sparse_attention(q, k, v, cu, grids, TILE, kv_tiles), rtol=0, atol=0)
    with pytest.raises(ValueError, match="a topk_tile pattern has no window"):
        pattern.window_for()
    with pytest.raises(ValueError, match="a sliding_tile pattern lists no top-k tiles"):
        SparsePattern("sliding_tile", TILE).key_tiles(q, k, cu, grids)


def test_window_file_per_module_path_with_default(tmp_path):
    """A module the file names attends with its own windows, any other with "default"."""
    path = _windows_file(tmp_path, {"blocks.0.attn": HEADS, "blocks.1.attn": [2, 2, 2], "default": [1, 1, 1]})
    pattern = SparsePattern("sliding_tile", TILE, window=path)
    assert pattern.window == path and sorted(pattern.windows) == ["blocks.0.attn", "blocks.1.attn", "default"]
    assert pattern.window_for("blocks.1.attn").tolist() == [[2, 2, 2]]
    assert pattern.window_for("blocks.7.attn").tolist() == pattern.window_for().tolist() == [[1, 1, 1]]
    q, k, v, cu, grids = _batch()
    for where, window in [("blocks.0.attn", torch.tensor(HEADS)), ("blocks.1.attn", (2, 2, 2)), (None, (1, 1, 1)),
                          ("blocks.9.attn", (1, 1, 1))]:
        torch.testing.assert_close(pattern.attend(q, k, v, cu, grids, path=where),
                                   sliding_tile_attention(q, k, v, cu, grids, TILE, window), rtol=0, atol=0)
    assert pattern.describe() == "sliding_tile, tile 2x4x4, per-head windows (blocks.0.attn, blocks.1.attn, default)"


def test_equality_normalization_and_of():
    assert MODES == ("sliding_tile", "topk_tile") and vdit.SparsePattern is SparsePattern
    sliding = SparsePattern("sliding_tile", [2, 4, 4])
    assert sliding == SparsePattern("sliding_tile", TILE, window=[3, 3, 3])  # the default window, normalized
    assert (sliding.tile, sliding.window, sliding.topk) == (TILE, (3, 3, 3), None)
    assert sliding != SparsePattern("sliding_tile", TILE, window=(3, 3, 1))
    assert sliding != SparsePattern("sliding_tile", (1, 4, 4)) and sliding != "sliding_tile"
    topk = SparsePattern("topk_tile", TILE)
    assert topk.topk == 8 and topk.window is None and topk != sliding
    assert topk != SparsePattern("topk_tile", TILE, topk=4)
    per_head = SparsePattern("sliding_tile", TILE, window=torch.tensor(HEADS))
    assert per_head == SparsePattern("sliding_tile", TILE, window=HEADS)  # a list of windows is per-head too
    assert isinstance(SparsePattern("sliding_tile", TILE, window=HEADS).window, torch.Tensor)
    assert SparsePattern.of("sliding_tile", TILE, window=(1, 2, 1), topk=5) == SparsePattern(
        "sliding_tile", TILE, window=(1, 2, 1))  # each mode keeps its own option, ignores the other's
    assert SparsePattern.of("topk_tile", TILE, window=(1, 2, 1), topk=5) == SparsePattern("topk_tile", TILE, topk=5)
    with pytest.raises(ValueError, match="SparsePattern.mode must be one of"):
        SparsePattern.of("dense", TILE, window=(1, 1, 1), topk=5)
    with pytest.raises(TypeError, match="unhashable"):
        hash(sliding)
    assert sliding.describe() == "sliding_tile, tile 2x4x4, window 3x3x3"
    assert topk.describe() == "topk_tile, tile 2x4x4, top 8"


def test_a_window_file_of_one_list_equals_those_windows(tmp_path):
    from_file = SparsePattern("sliding_tile", TILE, window=_windows_file(tmp_path, HEADS))
    assert from_file == SparsePattern("sliding_tile", TILE, window=HEADS)
    assert load_windows(_windows_file(tmp_path, [1, 2, 3]))["default"].tolist() == [[1, 2, 3]]
