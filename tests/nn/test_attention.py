"""The attention modules VarlenSelfAttention / VarlenCrossAttention (vdit/nn/attention.py): packed vs
per-sequence, dense + padding mask, RoPE between QK-norm and attention, GQA / MQA, gradients. The
varlen_attention op is tested in tests/ops/test_attention.py."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close, cu_seqlens_of
from vdit.nn import RotaryEmbedding3d, VarlenCrossAttention, VarlenSelfAttention
from vdit.ops import reference
from vdit.packing import grid_positions

LENGTHS = [5, 1, 23, 12]


def _per_sequence_self(m, x, lengths, positions=None, rope=None):
    """The module applied to each sequence alone, written with plain torch ops (SDPA per sequence)."""
    outs, start = [], 0
    for n in lengths:
        xi = x[start:start + n]
        q, k, v = m.qkv(xi).split([m.heads * m.head_dim, m.kv_heads * m.head_dim, m.kv_heads * m.head_dim], -1)
        q, k, v = (t.reshape(n, -1, m.head_dim) for t in (q, k, v))
        if m.q_norm is not None:
            q, k = m.q_norm(q), m.k_norm(k)
        if rope is not None:
            q = reference.rope_3d(q, positions[start:start + n], dims=rope.dims, theta=rope.theta)
            k = reference.rope_3d(k, positions[start:start + n], dims=rope.dims, theta=rope.theta)
        rep = m.heads // m.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
        outs.append(m.proj(o.reshape(n, -1)))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("kv_heads,qk_norm", [(None, "rms"), (2, "layer"), (1, None)],
                         ids=["mha-rms", "gqa-layer", "mqa"])
def test_self_attention_packed_matches_per_sequence(kv_heads, qk_norm):
    m = VarlenSelfAttention(64, 4, kv_heads=kv_heads, qk_norm=qk_norm).double()
    x = torch.randn(sum(LENGTHS), 64, dtype=torch.float64)
    cu = cu_seqlens_of(LENGTHS)
    out = m(x, cu, max(LENGTHS))
    assert out.shape == x.shape
    assert_close(out, _per_sequence_self(m, x, LENGTHS))


def test_self_attention_rope_between_qk_norm_and_attention():
    m = VarlenSelfAttention(96, 2, qk_norm="rms").double()
    with torch.no_grad():  # non-trivial norm weights, so the order of norm and rotation matters
        m.q_norm.weight.uniform_(0.5, 1.5)
        m.k_norm.weight.uniform_(0.5, 1.5)
    grids = torch.tensor([[2, 2, 3], [1, 1, 1], [3, 2, 2]], dtype=torch.int32)
    lengths = [12, 1, 12]
    positions = grid_positions(grids)
    rope = RotaryEmbedding3d(48, RotaryEmbedding3d.even_split(48))
    x = torch.randn(sum(lengths), 96, dtype=torch.float64, requires_grad=True)
    out = m(x, cu_seqlens_of(lengths), 12, positions, rope)
    expected = _per_sequence_self(m, x, lengths, positions, rope)
    assert_close(out, expected)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (ex,) = torch.autograd.grad(expected, x, g)
    assert_close(gx, ex)


def test_self_attention_dense_with_padding_mask_equals_packed():
    m = VarlenSelfAttention(32, 2, kv_heads=1)
    lengths = [7, 3, 10]
    x = torch.randn(3, 10, 32)
    mask = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]
    dense = m(x, key_padding_mask=mask)
    packed = m(torch.cat([x[i, :n] for i, n in enumerate(lengths)]), cu_seqlens_of(lengths), 10)
    assert dense.shape == x.shape
    assert torch.equal(dense[~mask], torch.zeros(int((~mask).sum()), 32))
    assert_close(dense[mask], packed)
    # no mask: every row is a full sequence
    full = m(x)
    assert_close(full, m(x.reshape(30, 32), cu_seqlens_of([10, 10, 10]), 10).reshape(3, 10, 32))


def test_self_attention_gradients_reach_parameters():
    m = VarlenSelfAttention(32, 4, kv_heads=2)
    x = torch.randn(sum(LENGTHS), 32, requires_grad=True)
    m(x, cu_seqlens_of(LENGTHS)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_self_attention_rejects_rope_on_dense_input():
    m = VarlenSelfAttention(32, 2)
    with pytest.raises(ValueError, match="dense input takes no positions"):
        m(torch.randn(2, 4, 32), positions=torch.zeros(8, 3, dtype=torch.int32), rope=RotaryEmbedding3d(16, (4, 6, 6)))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        m(torch.randn(2, 4, 32), key_padding_mask=torch.ones(2, 4))


def test_cross_attention_packed_matches_per_sequence():
    m = VarlenCrossAttention(64, 48, 4).double()
    ctx_lengths = [3, 7, 0, 2]  # a sample without text tokens attends to nothing and outputs proj(0)
    x = torch.randn(sum(LENGTHS), 64, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(sum(ctx_lengths), 48, dtype=torch.float64, requires_grad=True)
    out = m(x, cu_seqlens_of(LENGTHS), ctx, cu_seqlens_of(ctx_lengths), max(LENGTHS), max(ctx_lengths))
    expected, s, c = [], 0, 0
    for n, nc in zip(LENGTHS, ctx_lengths):
        q = m.q_norm(m.q(x[s:s + n]).reshape(n, 4, 16))
        k, v = m.kv(ctx[c:c + nc]).reshape(nc, 2, 4, 16).unbind(1)
        k = m.k_norm(k)
        if nc:
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
        else:
            o = torch.zeros_like(q)
        expected.append(m.proj(o.reshape(n, -1)))
        s, c = s + n, c + nc
    expected = torch.cat(expected)
    assert_close(out, expected)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, ctx), g), torch.autograd.grad(expected, (x, ctx), g)):
        assert_close(a, b)


def test_cross_attention_dense_with_masks_equals_packed():
    m = VarlenCrossAttention(32, 24, 2)
    lengths, ctx_lengths = [6, 2, 9], [4, 1, 3]
    x, ctx = torch.randn(3, 9, 32), torch.randn(3, 4, 24)
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    ctx_mask = torch.arange(4)[None, :] < torch.tensor(ctx_lengths)[:, None]
    dense = m(x, context=ctx, key_padding_mask=mask, context_mask=ctx_mask)
    packed = m(x[mask], cu_seqlens_of(lengths), ctx[ctx_mask], cu_seqlens_of(ctx_lengths), 9, 4)
    assert dense.shape == x.shape
    assert torch.equal(dense[~mask], torch.zeros(int((~mask).sum()), 32))
    assert_close(dense[mask], packed)
    with pytest.raises(ValueError, match="context_mask must be a bool"):
        m(x, context=ctx, context_mask=ctx_mask.float())
    with pytest.raises(ValueError, match="needs a dense context"):
        m(x, context=ctx[0])
