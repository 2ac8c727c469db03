"""TileSparseAttention (vdit/nn/sparse_attention.py): shares VarlenSelfAttention's parameters and state_dict,
equals it with a window covering the grid, and in topk_tile mode starts as pure block-sparse attention
(zero gate) and trains its coarse gate."""
import json

import pytest
import torch

from tests.conftest import reordered_sum_tolerance
from vdit.nn import RotaryEmbedding3d, TileSparseAttention, VarlenSelfAttention
from vdit.ops import SparsePattern
from vdit.packing import cu_seqlens_from_lengths, grid_positions, tile_permutation

GRIDS = torch.tensor([[3, 4, 6], [1, 4, 4]], dtype=torch.int32)
TILE = (1, 2, 2)


def _inputs(dim=32):
    torch.manual_seed(0)
    total = int(GRIDS.prod(1).sum())
    perm = tile_permutation(GRIDS, TILE)
    return (torch.randn(total, dim), cu_seqlens_from_lengths(GRIDS.prod(1).tolist()), grid_positions(GRIDS)[perm])


def test_same_state_dict_as_the_dense_module_and_equal_with_a_whole_grid_window():
    dense = VarlenSelfAttention(32, 4, kv_heads=2)
    sparse = TileSparseAttention(32, 4, kv_heads=2, pattern=SparsePattern("sliding_tile", TILE, window=(8, 8, 8)))
    assert dense.state_dict().keys() == sparse.state_dict().keys()
    sparse.load_state_dict(dense.state_dict())
    x, cu, pos = _inputs()
    rope = RotaryEmbedding3d(8, (2, 2, 4))
    longest = int(GRIDS.prod(1).max())  # keys per query, in tile order against raster order
    torch.testing.assert_close(sparse(x, cu, None, pos, rope, grids=GRIDS), dense(x, cu, None, pos, rope),
                               **reordered_sum_tolerance(torch.float32, longest))


def test_topk_mode_starts_as_block_sparse_attention_and_its_gate_trains():
    module = TileSparseAttention(32, 4, pattern=SparsePattern("topk_tile", TILE, topk=2))
    x, cu, pos = _inputs()
    out = module(x, cu, None, grids=GRIDS)
    assert torch.equal(module.coarse_gate.weight, torch.zeros_like(module.coarse_gate.weight))
    out.square().sum().backward()
    assert module.coarse_gate.weight.grad.abs().sum() > 0  # the coarse output reaches the loss through the gate


def test_refuses_dense_input_unknown_modes_and_windows_of_other_heads():
    with pytest.raises(ValueError, match="mode must be one of"):
        TileSparseAttention(32, 4, pattern=SparsePattern("local", TILE))
    with pytest.raises(TypeError, match="pattern must be a vdit.ops.SparsePattern"):
        TileSparseAttention(32, 4, pattern="sliding_tile")
    with pytest.raises(ValueError, match="3 per-head windows for 4 heads"):
        TileSparseAttention(32, 4, pattern=SparsePattern("sliding_tile", TILE, window=[[1, 1, 1]] * 3))
    module = TileSparseAttention(32, 4, pattern=SparsePattern("sliding_tile", TILE))
    with pytest.raises(ValueError, match="packed x"):
        module(torch.randn(2, 5, 32))


def test_per_head_and_per_module_windows_reach_the_op(tmp_path):
    """The module attends through its pattern: per-head windows, and a window file's entry for its own path."""
    x, cu, _ = _inputs()
    heads = [[1, 1, 1], [1, 2, 2], [3, 2, 3], [1, 1, 3]]
    per_head = TileSparseAttention(32, 4, pattern=SparsePattern("sliding_tile", TILE, window=heads))
    file = tmp_path / "windows.json"
    file.write_text(json.dumps({"blocks.0.attn": heads, "default": [8, 8, 8]}))
    from_file = TileSparseAttention(32, 4, pattern=SparsePattern("sliding_tile", TILE, window=file),
                                    path="blocks.0.attn")
    other = TileSparseAttention(32, 4, pattern=SparsePattern("sliding_tile", TILE, window=file), path="blocks.1.attn")
    whole = TileSparseAttention(32, 4, pattern=SparsePattern("sliding_tile", TILE, window=(8, 8, 8)))
    for module in (from_file, other, whole):
        module.load_state_dict(per_head.state_dict())
    torch.testing.assert_close(from_file(x, cu, grids=GRIDS), per_head(x, cu, grids=GRIDS), rtol=0, atol=0)
    torch.testing.assert_close(other(x, cu, grids=GRIDS), whole(x, cu, grids=GRIDS), rtol=0, atol=0)
    assert not torch.allclose(per_head(x, cu, grids=GRIDS), whole(x, cu, grids=GRIDS))
    assert "per-head windows" in repr(from_file) and "blocks.0.attn" in repr(from_file)
