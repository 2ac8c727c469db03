"""vdit.swap with spacetime block-sparse attention (vdit/swap/sparse.py) on diffusers' Wan and HunyuanVideo
(tiny random configs, CPU): a window covering the whole grid (or top-k of every tile) equals the original
model, narrower ones change it, gradients flow, unswap restores it bit for bit; the per-call conversion
against dense attention with a mask built from the window rule (video tokens in raster order, text tokens
global, padded text dropped); per-head windows from JSON; what the report says."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from tests.integrations.test_diffusers import hunyuan, wan  # noqa: E402  (the models and inputs of the dense swap tests)

from vdit.swap import swap, unswap  # noqa: E402
from vdit.swap.sparse import SparseAttention, load_windows, sparse_sdpa  # noqa: E402

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
        for options in (dict(attention="sliding_tile", tile=(1, 2, 2), window=(3, 2, 2)),
                        dict(attention="topk_tile", tile=(1, 2, 2), topk=18)):  # 3 x 2 x 2 = every tile
            report = swap(model, **options)
            assert sorted(p for p in report.paths("attention") if p) == SELF_ATTENTION[name]
            torch.testing.assert_close(_run(model, inputs), ref, rtol=2e-5, atol=2e-5)
            assert report.calls["attention.sparse"] == 2 and not any("sparse_fallback" in k for k in report.calls)
            unswap(model)
        report = swap(model, attention="sliding_tile", tile=(1, 2, 2), window=(1, 1, 2))
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
            swap(model, attention="sliding_tile", tile=(1, 2, 2), window=(3, 2, 2))
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
    sparse = SparseAttention.from_options("sliding_tile", tile, window, 8)
    sparse.grid = grid
    out, why = sparse_sdpa(q, k, v, keep[:, None, None, :] if masked else None, False, None, sparse,
                           sparse.window_for("any"))
    assert why == "sparse"
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=_rule_mask(grid, tile, window, L, keep))
    valid = keep[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[valid], expected[valid])
    assert bool((out[~valid] == 0).all())  # padded text queries are skipped


def test_calls_that_do_not_fit_are_declined_with_a_reason():
    sparse = SparseAttention.from_options("sliding_tile", (1, 2, 2), (1, 1, 1), 8)
    q = torch.randn(1, 2, 12, 8)
    assert sparse_sdpa(q, q, q, None, False, None, sparse, sparse.window_for("x"))[1] == "video grid unknown"
    sparse.grid = (2, 2, 4)  # 16 tokens
    assert "fewer than the video's 16" in sparse_sdpa(q, q, q, None, False, None, sparse, sparse.window_for("x"))[1]
    sparse.grid = (1, 2, 6)
    k = torch.randn(1, 2, 7, 8)
    assert "Lq != Lk" in sparse_sdpa(q, k, k, None, False, None, sparse, sparse.window_for("x"))[1]
    hide_video = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    hide_video[..., 0] = False
    assert sparse_sdpa(q, q, q, hide_video, False, None, sparse, sparse.window_for("x"))[1] == "mask hides video tokens"


def test_per_head_windows_from_a_json_file(tmp_path):
    model, inputs, _, _ = wan(SIZE, False)
    model.eval()
    heads = [[1, 1, 1], [3, 2, 1]]
    path = tmp_path / "windows.json"
    path.write_text(json.dumps({"default": heads, "blocks.1.attn1": [3, 2, 2]}))
    with torch.no_grad():
        swap(model, attention="sliding_tile", tile=(1, 2, 2), window=torch.tensor(heads))
        per_head = _run(model, inputs)
        unswap(model)
        report = swap(model, attention="sliding_tile", tile=(1, 2, 2), window=str(path))
        from_file = _run(model, inputs)
        unswap(model)
        path.write_text(json.dumps(heads))
        swap(model, attention="sliding_tile", tile=(1, 2, 2), window=str(path))
        every_layer = _run(model, inputs)
        unswap(model)
    torch.testing.assert_close(every_layer, per_head, rtol=1e-6, atol=1e-6)
    assert (from_file - per_head).abs().max() > 1e-4  # layer 1 took its own (whole-grid) window
    assert "2 per-head windows" in str(report)
    windows = load_windows(str(path), heads=2)
    assert windows["default"].tolist() == heads
    path.write_text(json.dumps({"default": [[1, 0, 1]]}))
    with pytest.raises(ValueError, match="windows.json: 'default' must be"):
        load_windows(str(path))
    with pytest.raises(ValueError, match="has 2 windows for 3 heads"):
        path.write_text(json.dumps(heads))
        load_windows(str(path), heads=3)


def test_report_and_options():
    model, inputs, _, _ = hunyuan(SIZE, True)
    report = swap(model, attention="sliding_tile", tile=(1, 2, 2), window=(1, 2, 2))
    text = str(report)
    assert "[attention] transformer_blocks.0.attn: self-attention (F.scaled_dot_product_attention) -> " \
           "vdit.ops.sliding_tile_attention (tile 1x2x2, window [1, 2, 2])" in text
    with torch.no_grad():
        _run(model, inputs)
    assert "attention.sparse=2" in str(report)
    unswap(model)
    with pytest.raises(ValueError, match="tile must be 3 positive ints"):
        swap(model, attention="sliding_tile", window=(1, 1, 1))
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        swap(model, attention="topk_tile", tile=(1, 2, 2), topk=0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    report = swap(plain, attention="sliding_tile", tile=(1, 2, 2))
    assert any(s.kind == "attention" and "Wan and HunyuanVideo" in s.reason for s in report.skipped)
    unswap(plain)
