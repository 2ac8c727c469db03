"""vdit.swap(model, sparse=SparsePattern(...)) (vdit/swap/sparse.py) on diffusers' Wan and HunyuanVideo
(tiny random configs, CPU): a window covering the whole grid (or top-k of every tile) equals the original
model, narrower ones change it, gradients flow, unswap restores it bit for bit; the per-call conversion
against dense attention with a mask built from the window rule (video tokens in raster order, text tokens
global, padded text dropped); per-head windows from JSON; what the report says; the old attention= form is
refused with the new one in the message; the packing of a forward's unmasked calls is built once."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from tests.swap.test_diffusers import hunyuan, wan  # noqa: E402  (the models and inputs of the dense swap tests)
from vdit.ops.sparse_pattern import SparsePattern, load_windows  # noqa: E402
from vdit.swap import swap, unswap  # noqa: E402
from vdit.swap.sparse import SparseRouting, sparse_sdpa  # noqa: E402

MODELS = {"wan": wan, "hunyuan": hunyuan}
SELF_ATTENTION = {"wan": ["blocks.0.attn1", "blocks.1.attn1"],
                  "hunyuan": ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]}
SIZE = (3, 8, 6)  # latent frames x height x width: token grid 3 x 4 x 3 with patch (1, 2, 2)


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_whole_grid_sparse_equals_dense_and_narrow_windows_differ(name, pad):
    model, inputs, _, _ = MODELS[name](SIZE, pad)
    model.eval()
    with torch.no_grad():
        ref = _run(model, inputs)
        for pattern in (SparsePattern("sliding_tile", (1, 2, 2), window=(3, 2, 2)),
                        SparsePattern("topk_tile", (1, 2, 2), topk=18)):  # 3 x 2 x 2 = every tile
            report = swap(model, sparse=pattern)
            assert sorted(p for p in report.paths("attention") if p) == SELF_ATTENTION[name]
            torch.testing.assert_close(_run(model, inputs), ref, rtol=2e-5, atol=2e-5)
            assert report.calls["attention.sparse"] == 2 and not any("sparse_fallback" in k for k in report.calls)
            unswap(model)
        report = swap(model, sparse=SparsePattern("sliding_tile", (1, 2, 2), window=(1, 1, 2)))
        narrow = _run(model, inputs)
        unswap(model)
        assert torch.equal(_run(model, inputs), ref)  # unswap: bit-identical
    error = ((narrow - ref).norm() / ref.norm()).item()
    assert 1e-3 < error < 1.0, error


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_flow_through_sparse_attention(name):
    model, inputs, _, _ = MODELS[name](SIZE, True)
    grads = {}
    for sparse in (False, True):
        model.zero_grad()
        if sparse:
            swap(model, sparse=SparsePattern("sliding_tile", (1, 2, 2), window=(3, 2, 2)))
        _run(model, inputs).square().mean().backward()
        grads[sparse] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if sparse:
            unswap(model)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-5)


def _rule_mask(grid, tile, window, L, keep):
    """(B, 1, L, L) bool from the window rule in raster order: video queries see their window's tokens and the
    valid global tokens; global queries see every valid token."""
    T, H, W = grid
    N = T * H * W
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    tiles = torch.stack([t.reshape(-1) // tile[0], h.reshape(-1) // tile[1], w.reshape(-1) // tile[2]], 1)
    visible = torch.ones(N, N, dtype=torch.bool)
    for axis, n in enumerate(-(-g // s) for g, s in zip(grid, tile)):
        start = torch.clamp(torch.clamp(tiles[:, axis] - (window[axis] - 1) // 2, min=0), max=max(n - window[axis], 0))
        visible &= (tiles[None, :, axis] >= start[:, None]) & (tiles[None, :, axis] < start[:, None] + window[axis])
    mask = torch.ones(L, L, dtype=torch.bool)
    mask[:N, :N] = visible
    return mask[None, None] & keep[:, None, None, :]


@pytest.mark.parametrize("masked", [False, True])
def test_one_call_against_dense_attention_with_the_rule_mask(masked):
    grid, tile, window, B, H, D, G = (3, 5, 4), (2, 2, 2), (1, 2, 1), 2, 2, 8, 6
    L = 3 * 5 * 4 + G
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(B, L, dtype=torch.bool)
    if masked:
        keep[1, -4:] = False  # sample 1 has 2 valid text tokens
    sparse = SparseRouting(SparsePattern("sliding_tile", tile, window=window))
    sparse.grid = grid
    out, why = sparse_sdpa(q, k, v, keep[:, None, None, :] if masked else None, False, None, sparse, "any")
    assert why == "sparse"
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=_rule_mask(grid, tile, window, L, keep))
    valid = keep[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[valid], expected[valid])
    assert bool((out[~valid] == 0).all())  # padded text queries are skipped


def test_calls_that_do_not_fit_are_declined_with_a_reason():
    sparse = SparseRouting(SparsePattern("sliding_tile", (1, 2, 2), window=(1, 1, 1)))
    q = torch.randn(1, 2, 12, 8)
    assert sparse_sdpa(q, q, q, None, False, None, sparse, "x")[1] == "video grid unknown"
    sparse.grid = (2, 2, 4)  # 16 tokens
    assert "fewer than the video's 16" in sparse_sdpa(q, q, q, None, False, None, sparse, "x")[1]
    sparse.grid = (1, 2, 6)
    k = torch.randn(1, 2, 7, 8)
    assert "Lq != Lk" in sparse_sdpa(q, k, k, None, False, None, sparse, "x")[1]
    hide_video = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    hide_video[..., 0] = False
    assert sparse_sdpa(q, q, q, hide_video, False, None, sparse, "x")[1] == "mask hides video tokens"
    three_heads = SparseRouting(SparsePattern("sliding_tile", (1, 2, 2), window=torch.ones(3, 3, dtype=torch.int64)))
    three_heads.grid = (1, 2, 6)
    assert "3 per-head windows for 2 heads" in sparse_sdpa(q, q, q, None, False, None, three_heads, "x")[1]


def test_unmasked_packing_is_built_once_per_grid():
    sparse = SparseRouting(SparsePattern("topk_tile", (1, 2, 2), topk=2))
    sparse.grid = (1, 2, 6)
    q = torch.randn(2, 2, 15, 8)  # 12 video tokens + 3 global
    first = sparse.packing(None, 2, 15, q.device)
    assert sparse.packing(None, 2, 15, q.device) is first  # every call site of a forward reuses it
    assert first[3].tolist() == [[1, 2, 6]] * 2 and first[2] == [3, 3]  # grids (B, 3), global tokens per video
    sparse.grid = (1, 2, 4)
    assert sparse.packing(None, 2, 15, q.device)[3].tolist() == [[1, 2, 4]] * 2  # a new grid: built anew
    keep = torch.ones(2, 7, dtype=torch.bool)  # 8 video tokens + 7 global
    keep[1, 1:] = False
    assert sparse.packing(keep, 2, 15, q.device)[2] == [7, 1]  # masked calls are packed per call


def test_per_head_windows_from_a_json_file(tmp_path):
    model, inputs, _, _ = wan(SIZE, False)
    model.eval()
    heads = [[1, 1, 1], [3, 2, 1]]
    path = tmp_path / "windows.json"
    path.write_text(json.dumps({"default": heads, "blocks.1.attn1": [3, 2, 2]}))
    with torch.no_grad():
        swap(model, sparse=SparsePattern("sliding_tile", (1, 2, 2), window=torch.tensor(heads)))
        per_head = _run(model, inputs)
        unswap(model)
        report = swap(model, sparse=SparsePattern("sliding_tile", (1, 2, 2), window=str(path)))
        from_file = _run(model, inputs)
        unswap(model)
        path.write_text(json.dumps(heads))
        swap(model, sparse=SparsePattern("sliding_tile", (1, 2, 2), window=str(path)))
        every_layer = _run(model, inputs)
        unswap(model)
    torch.testing.assert_close(every_layer, per_head, rtol=1e-6, atol=1e-6)
    assert (from_file - per_head).abs().max() > 1e-4  # layer 1 took its own (whole-grid) window
    assert "per-head windows (blocks.1.attn1, default)" in str(report)
    windows = load_windows(str(path))
    assert windows["default"].tolist() == heads
    assert SparsePattern("sliding_tile", (1, 2, 2), window=str(path)).window_for("blocks.0.attn1", heads=2).tolist() \
        == heads
    path.write_text(json.dumps({"default": [[1, 0, 1]]}))
    with pytest.raises(ValueError, match="windows.json: 'default' sizes must be >= 1"):
        load_windows(str(path))
    with pytest.raises(ValueError, match="2 per-head windows for 3 heads"):
        path.write_text(json.dumps(heads))
        SparsePattern("sliding_tile", (1, 2, 2), window=str(path)).window_for("blocks.0.attn1", heads=3)


def test_report_and_options():
    model, inputs, _, _ = hunyuan(SIZE, True)
    report = swap(model, sparse=SparsePattern("sliding_tile", (1, 2, 2), window=(1, 2, 2)))
    text = str(report)
    assert "[attention] transformer_blocks.0.attn: self-attention (F.scaled_dot_product_attention) -> " \
           "vdit.SparsePattern.attend (sliding_tile, tile 1x2x2, window 1x2x2)" in text
    with torch.no_grad():
        _run(model, inputs)
    assert "attention.sparse=2" in str(report)
    unswap(model)
    with pytest.raises(ValueError, match="tile must be 3 positive ints"):
        swap(model, sparse=SparsePattern("sliding_tile", (0, 2, 2), window=(1, 1, 1)))
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        swap(model, sparse=SparsePattern("topk_tile", (1, 2, 2), topk=0))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    report = swap(plain, sparse=SparsePattern("sliding_tile", (1, 2, 2)))
    assert any(s.kind == "attention" and "Wan and HunyuanVideo" in s.reason for s in report.skipped)
    unswap(plain)


@pytest.mark.parametrize("mode", ["sliding_tile", "topk_tile"])
def test_old_attention_modes_name_the_sparse_argument(mode):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=rf"attention='{mode}' .*sparse=vdit\.SparsePattern\('{mode}'") as info:
        swap(model, attention=mode)
    assert "\n" not in str(info.value)  # one line
    with pytest.raises(TypeError, match="sparse must be a vdit.SparsePattern"):
        swap(model, sparse=mode)
    with pytest.raises(ValueError, match="sparse= runs through the attention routing"):
        swap(model, attention=False, sparse=SparsePattern(mode, (1, 2, 2)))
    assert not hasattr(model, "_vdit_swap")  # nothing was swapped


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_the_second_forward_reads_nothing_in_the_sparse_path(name, pad, monkeypatch):
    """Wan's sparse calls read nothing on the host once the grid is known. HunyuanVideo's forward brings a new
    text mask: it is read once for all the forward's sparse call sites (one read when it drops nothing; the
    packing of the valid text tokens when it does), not per call."""
    from tests.ops.test_sparse_host_sync import reads_of_second_call

    model, inputs, _, _ = MODELS[name](SIZE, pad)
    model.eval()
    swap(model, sparse=SparsePattern("sliding_tile", (1, 2, 2), window=(1, 1, 2)))
    masks_read = []
    original = SparseRouting._masked_packing
    monkeypatch.setattr(SparseRouting, "_masked_packing", lambda self, *a: masks_read.append(1) or original(self, *a))
    with torch.no_grad():
        reads = reads_of_second_call(lambda: _run(model, inputs), within=("vdit/ops/", "vdit/swap/sparse.py"))
    unswap(model)
    if name == "wan":
        assert reads == {} and masks_read == []
        return
    assert len(masks_read) == 2  # one per forward, for its 2 sparse call sites
    if not pad:
        assert sum(reads.values()) == 1 and all("vdit/swap/sparse.py" in r for r in reads), reads
