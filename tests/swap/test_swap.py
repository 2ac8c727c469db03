"""vdit.swap (vdit/swap) on plain PyTorch models: patch-embedding convolutions, SDPA with key-padding masks ->
varlen attention, the report, scoping of the routing, unswap, and RoPE position recovery."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vdit.ops import reference
from vdit.swap import SwapReport, swap, unswap
from vdit.swap.attention import sdpa_as_varlen
from vdit.swap.patch_embed import ConvPatchEmbed
from vdit.swap.rope import TableRope


class TinyVideoDiT(nn.Module):
    """Conv3d patch embedding + one attention block over padded text+video tokens (SDPA with a mask)."""

    def __init__(self, c=3, d=32, heads=4, patch=(1, 2, 2)):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv3d(c, d, patch, stride=patch)
        self.pointwise = nn.Conv3d(c, c, 1)  # kernel == stride == 1: not a patch embedding
        self.smooth = nn.Conv3d(c, c, 3, padding=1)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, text, text_mask=None):
        x = self.smooth(self.pointwise(x))
        v = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([v, text], 1)
        B, L, D = tokens.shape
        q, k, vv = self.qkv(tokens).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if text_mask is not None:
            mask = torch.cat([torch.ones(B, v.shape[1], dtype=torch.bool), text_mask], 1)[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, vv, attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(B, L, D))[:, : v.shape[1]]


def _inputs(B=3, T=2, H=6, W=4, S=5, pad=True):
    x = torch.randn(B, 3, T, H, W)
    text = torch.randn(B, S, 32)
    mask = None
    if pad:
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[1, 2:] = False
        mask[2, 4:] = False
    return x, text, mask


@pytest.mark.parametrize("size", [(2, 6, 4), (3, 4, 8), (1, 2, 2)])
@pytest.mark.parametrize("pad", [True, False])
def test_tiny_dit_equivalence_and_unswap(size, pad):
    model = TinyVideoDiT().eval()
    x, text, mask = _inputs(T=size[0], H=size[1], W=size[2], pad=pad)
    keys = list(model.state_dict())
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x, text, mask)
        report = swap(model, attention="all")
        out = model(x, text, mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert list(model.state_dict()) == keys
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs  # shared, not copied
        assert report.calls["attention.varlen" if pad else "attention.dense"] == 1
        assert report.calls["attention.kernel:cpu"] == 1  # which kernel ran is part of the report
        assert "attention.kernel:cpu=1" in str(report)
        unswap(model)
        assert torch.equal(model(x, text, mask), ref)
    assert type(model.embed) is nn.Conv3d


def test_report_lists_replacements_and_skips():
    model = TinyVideoDiT()
    conv = model.embed
    report = swap(model)
    assert isinstance(report, SwapReport)
    assert report.paths("patch_embed") == ["embed"]
    assert isinstance(model.embed, ConvPatchEmbed)
    assert model.embed.weight is conv.weight and model.embed.bias is conv.bias
    skipped = {s.path: s.reason for s in report.skipped if s.kind == "patch_embed"}
    assert "pointwise" in skipped["pointwise"] and "kernel_size" in skipped["smooth"]
    assert report.paths("attention") == [""]
    assert {s.kind for s in report.skipped} >= {"norm", "rope"}
    text = str(report)
    assert "embed" in text and "ConvPatchEmbed" in text and "skipped" in text
    with pytest.raises(ValueError, match="already swapped"):
        swap(model)
    assert unswap(model) is report
    assert unswap(model) is None
    assert model.embed is conv


def test_package_is_callable():
    import vdit.swap as swap_module
    model = TinyVideoDiT()
    report = swap_module(model, attention=False)
    assert report.paths("patch_embed") == ["embed"] and swap_module.unswap(model) is report


def test_options_turn_replacements_off():
    model = TinyVideoDiT()
    report = swap(model, attention=False, patch_embed=False, rope=False, norm=False)
    assert len(report) == 0 and type(model.embed) is nn.Conv3d
    x, text, mask = _inputs()
    model(x, text, mask)
    assert not report.calls
    unswap(model)


def test_routing_is_scoped_to_the_forward_and_survives_errors():
    model = TinyVideoDiT()
    report = swap(model, attention="all")
    q = torch.randn(2, 2, 5, 8)
    F.scaled_dot_product_attention(q, q, q)  # outside the model: not routed
    assert not report.calls
    x, text, mask = _inputs()
    with pytest.raises(RuntimeError):
        model(x, text[:, :, :7], mask)  # wrong width: raises inside forward
    F.scaled_dot_product_attention(q, q, q)
    assert not [k for k in report.calls if k.startswith("attention")]  # the patch embedding ran, SDPA was not routed
    unswap(model)


def test_backward_matches():
    model = TinyVideoDiT()
    x, text, mask = _inputs()
    model(x, text, mask).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    swap(model, attention="all")
    model(x, text, mask).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5, msg=n)
    unswap(model)


def test_conv_patch_embed_layout_is_a_view_and_fallbacks():
    conv3 = nn.Conv3d(4, 16, (2, 2, 2), stride=(2, 2, 2))
    emb = ConvPatchEmbed.from_conv(conv3)
    x = torch.randn(2, 4, 4, 6, 8)
    out = emb(x)
    torch.testing.assert_close(out, conv3(x), rtol=1e-5, atol=1e-5)
    tokens = out.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous()  # the host's flatten + transpose gives back vdit's (B, N, D) tokens
    torch.testing.assert_close(emb(x[0]), conv3(x[0]), rtol=1e-5, atol=1e-5)  # unbatched input
    odd = torch.randn(1, 4, 5, 7, 8)  # not divisible: the convolution drops the remainder; so do we
    torch.testing.assert_close(emb(odd), conv3(odd), rtol=1e-5, atol=1e-5)
    conv2 = nn.Conv2d(4, 16, 2, stride=2)
    img = torch.randn(3, 4, 6, 10)
    torch.testing.assert_close(ConvPatchEmbed.from_conv(conv2)(img), conv2(img), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvPatchEmbed.from_conv(nn.Conv3d(4, 4, 3, stride=1))
    assert "original" not in dict(emb.named_modules())


def _sdpa64(q, k, v, mask=None, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double(),
                                          **kw)


@pytest.mark.parametrize("B,H,Hk,Lq,Lk,D", [(3, 4, 4, 9, 9, 16), (2, 4, 2, 5, 11, 8), (1, 2, 2, 1, 1, 32),
                                            (4, 3, 1, 7, 6, 8)])
def test_sdpa_as_varlen_key_padding(B, H, Hk, Lq, Lk, D):
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, D)
    lengths = [max(1, Lk - 3 * i) for i in range(B)]
    keep = torch.arange(Lk)[None, :] < torch.tensor(lengths)[:, None]
    gqa = dict(enable_gqa=True) if H != Hk else {}
    for mask in (keep[:, None, None, :], keep[:, None, None, :].expand(B, H, Lq, Lk),
                 torch.where(keep, 0.0, -10000.0)[:, None, None, :],
                 torch.where(keep, 0.0, float("-inf"))[:, None, None, :].expand(B, H, 1, Lk)):
        out, why = sdpa_as_varlen(q, k, v, mask, dense=True, **gqa)  # dense: all-valid masks too
        assert why == ("varlen" if B > 1 else "dense")
        torch.testing.assert_close(out.double(), _sdpa64(q, k, v, mask, **gqa), rtol=1e-5, atol=1e-5)
    out, why = sdpa_as_varlen(q, k, v, None, scale=0.3, dense=True, **gqa)
    torch.testing.assert_close(out.double(), _sdpa64(q, k, v, scale=0.3, **gqa), rtol=1e-5, atol=1e-5)


def test_sdpa_as_varlen_causal_and_skipped_queries():
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    out, why = sdpa_as_varlen(q, k, v, None, is_causal=True, dense=True)
    torch.testing.assert_close(out.double(), _sdpa64(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out, _ = sdpa_as_varlen(q, k, v, keep[:, None, None, :], skip_padded_queries=True)
    ref = _sdpa64(q, k, v, keep[:, None, None, :])
    torch.testing.assert_close(out[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :, :4].double(), ref[1, :, :4], rtol=1e-5, atol=1e-5)
    assert out[1, :, 4:].abs().max() == 0  # skipped padded queries


@pytest.mark.parametrize("case,why", [
    ("dropout", "dropout"), ("rows", "differs"), ("empty", "no valid key"), ("soft", "values other"),
    ("dense", "dense"), ("causal", "causal")])
def test_sdpa_as_varlen_declines(case, why):
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    keep = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    keep[1, ..., 2:] = False
    kw = dict(attn_mask=keep)
    if case == "dropout":
        kw["dropout_p"] = 0.1
    elif case == "rows":
        kw["attn_mask"] = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    elif case == "empty":
        kw["attn_mask"] = torch.zeros(2, 1, 1, 4, dtype=torch.bool)
    elif case == "soft":
        kw["attn_mask"] = torch.randn(2, 1, 1, 4)
    elif case == "dense":
        kw["attn_mask"] = None
    elif case == "causal":
        k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
        kw = dict(is_causal=True)
    out, reason = sdpa_as_varlen(q, k, v, **kw)
    assert out is None and why in reason


def _tables(positions, dims, theta, Dh):
    angles = torch.cat(reference.rope_3d_angles(positions, dims, theta, torch.float64), 1).repeat_interleave(2, 1)
    tail = Dh - angles.shape[1]
    cos = torch.cat([angles.cos(), torch.ones(angles.shape[0], tail, dtype=torch.float64)], 1)
    sin = torch.cat([angles.sin(), torch.zeros(angles.shape[0], tail, dtype=torch.float64)], 1)
    return cos.float(), sin.float()


@pytest.mark.parametrize("dims,theta,grid", [((4, 6, 6), 10000.0, (3, 30, 45)), ((16, 56, 56), 256.0, (5, 12, 7)),
                                              ((2, 4, 4), 256.0, (2, 3, 3)), ((0, 8, 8), 10000.0, (1, 90, 160))])
def test_table_rope_recovers_positions(dims, theta, grid):
    T, H, W = grid
    axes = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    pos = torch.stack(axes, -1).reshape(-1, 3)
    Dh = sum(dims) + 4
    cos, sin = _tables(pos, dims, theta, Dh)
    tables = TableRope(dims, theta)
    got = tables.positions(cos, sin)
    assert got is not None and torch.equal(got, pos.float())
    assert tables.positions(cos, sin) is got  # cached per table object
    assert TableRope(dims, theta * 2).positions(cos, sin) is None  # another schedule: declined
    x = torch.randn(2, pos.shape[0], 3, Dh)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # the table-based rotation host models do
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    want = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    torch.testing.assert_close(tables.apply(x, got, 1), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tables.apply(x.transpose(1, 2), got, 2), want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_table_rope_fractional_positions():
    pos = torch.stack([torch.zeros(20), torch.linspace(0, 7.5, 20), torch.linspace(0, 3.3, 20)], 1)
    cos, sin = _tables(pos, (4, 6, 6), 10000.0, 16)
    got = TableRope((4, 6, 6), 10000.0).positions(cos, sin)
    assert got is not None and (got - pos).abs().max() < 1e-4 and not math.isnan(float(got.sum()))
