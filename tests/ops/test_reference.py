"""The reference ops (vdit/ops/reference.py, the float64 oracles every kernel is tested against)
against independent formulations: element-wise patchify, F.conv3d, per-sequence SDPA, complex
rotation, RoPE invariants, per-sample LayerNorm."""
import random

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import cu_seqlens_of, ragged_lengths
from vdit.ops import reference as R


def test_patchify_matches_elementwise_definition():
    x = torch.randn(2, 3, 4, 6, 4, dtype=torch.float64)
    pt, ph, pw = 2, 3, 2
    tokens = R.patchify_3d(x, (pt, ph, pw))
    Hp, Wp = 6 // ph, 4 // pw
    for b, c, t, h, w in [(0, 0, 0, 0, 0), (1, 2, 3, 5, 3), (0, 1, 2, 4, 1), (1, 0, 1, 2, 2)]:
        n = ((t // pt) * Hp + h // ph) * Wp + w // pw
        f = ((c * pt + t % pt) * ph + h % ph) * pw + w % pw
        assert tokens[b, n, f] == x[b, c, t, h, w]
    assert torch.equal(R.unpatchify_3d(tokens, (2, 2, 2), (pt, ph, pw)), x)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1), (2, 3, 1)])
def test_patch_embed_matches_conv3d(patch):
    x = torch.randn(2, 5, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(7, 5, *patch, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    expected = F.conv3d(x, w, b, stride=patch).flatten(2).transpose(1, 2)
    torch.testing.assert_close(R.patch_embed_3d(x, w, b), expected)
    torch.testing.assert_close(R.patch_embed_3d(x, w), F.conv3d(x, w, stride=patch).flatten(2).transpose(1, 2))


def test_patch_embed_varlen_packs_each_video():
    w = torch.randn(8, 3, 1, 2, 2, dtype=torch.float64)
    videos = [torch.randn(3, t, h, ww, dtype=torch.float64) for t, h, ww in [(1, 2, 2), (3, 4, 6), (2, 6, 2)]]
    tokens, cu, grids = R.patch_embed_3d_varlen(videos, w)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 1, 19, 25]
    assert grids.dtype == torch.int32 and grids.tolist() == [[1, 1, 1], [3, 2, 3], [2, 3, 1]]
    for i, v in enumerate(videos):
        expected = F.conv3d(v[None], w, stride=(1, 2, 2)).flatten(2).transpose(1, 2)[0]
        torch.testing.assert_close(tokens[cu[i]:cu[i + 1]], expected)


def _sdpa_per_sequence(q, k, v, cu_q, cu_k, scale, causal):
    """Independent oracle: SDPA per sequence with an explicit bottom-right causal mask."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        Lq, Lk = qe - qs, ke - ks
        if Lq == 0 or Lk == 0:
            continue
        mask = None
        if causal:
            mask = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        qi = q[qs:qe].transpose(0, 1)
        ki = k[ks:ke].transpose(0, 1).repeat_interleave(groups, 0)
        vi = v[ks:ke].transpose(0, 1).repeat_interleave(groups, 0)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(0, 1)
        if mask is not None:  # SDPA yields NaN for rows that see no key; the contract says 0
            o = torch.where(mask.any(-1)[:, None, None], o, torch.zeros_like(o))
        out[qs:qe] = o
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("cross", [False, True])
def test_varlen_attention_matches_sdpa(causal, heads, cross):
    rng = random.Random(7)
    lq = ragged_lengths(rng, 6, 40)
    lk = [rng.randint(0, 12) if cross else n for n in lq]
    cu_q, cu_k = cu_seqlens_of(lq), cu_seqlens_of(lk)
    Hq, Hk = heads
    q = torch.randn(sum(lq), Hq, 16, dtype=torch.float64)
    k = torch.randn(sum(lk), Hk, 16, dtype=torch.float64)
    v = torch.randn(sum(lk), Hk, 16, dtype=torch.float64)
    out, lse = R.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), softmax_scale=0.3, causal=causal,
                                  return_lse=True)
    torch.testing.assert_close(out, _sdpa_per_sequence(q, k, v, cu_q, cu_k, 0.3, causal))
    assert lse.shape == (Hq, sum(lq))
    # lse is the log of the softmax denominator: check the last query of the longest sequence,
    # which sees every key of its sequence even when causal (bottom-right alignment).
    i = lq.index(max(lq))
    row, keys = int(cu_q[i + 1]) - 1, k[int(cu_k[i]):int(cu_k[i + 1])].repeat_interleave(Hq // Hk, 1)
    if lk[i]:
        scores = torch.einsum("hd,jhd->hj", q[row], keys) * 0.3
        torch.testing.assert_close(lse[:, row], torch.logsumexp(scores, -1))


def test_varlen_attention_empty_keys_give_zero_and_minus_inf_lse():
    q = torch.randn(3, 2, 8, dtype=torch.float64)
    k = torch.zeros(0, 2, 8, dtype=torch.float64)
    out, lse = R.varlen_attention(q, k, k, cu_seqlens_of([3]), cu_seqlens_of([0]), 3, 0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


def _rope_complex(x, positions, dims, theta):
    """Independent oracle for the interleaved layout: pairs as complex numbers times e^{i angle}."""
    out, start = x.clone(), 0
    for axis, d in enumerate(dims):
        j = torch.arange(d // 2, dtype=torch.float64)
        angle = positions[:, axis].double()[:, None] * theta ** (-2 * j / d)
        pairs = torch.view_as_complex(x[..., start:start + d].reshape(*x.shape[:-1], d // 2, 2).contiguous())
        rotated = pairs * torch.polar(torch.ones_like(angle), angle)[:, None, :]
        out[..., start:start + d] = torch.view_as_real(rotated).flatten(-2)
        start += d
    return out


@pytest.mark.parametrize("dims", [(4, 6, 6), (2, 2, 2), (8, 12, 10), (0, 4, 4)])
def test_rope_interleaved_matches_complex_rotation(dims):
    x = torch.randn(20, 3, 32, dtype=torch.float64)
    pos = torch.randint(0, 50, (20, 3))
    torch.testing.assert_close(R.rope_3d(x, pos, dims=dims, theta=100.0), _rope_complex(x, pos, dims, 100.0))


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_invariants(interleaved):
    dims, D = (4, 6, 6), 24
    x = torch.randn(30, 2, D, dtype=torch.float64)
    pos = torch.randint(0, 40, (30, 3)).double()
    y = R.rope_3d(x, pos, dims=dims, interleaved=interleaved)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # rotation keeps the norm
    assert torch.equal(y[..., sum(dims):], x[..., sum(dims):])  # pass-through channels untouched
    # <R(m) q, R(n) k> depends only on m - n, per axis.
    q, k = torch.randn(1, 1, D, dtype=torch.float64), torch.randn(1, 1, D, dtype=torch.float64)
    m, n, shift = torch.tensor([[3.0, 7.0, 2.0]]), torch.tensor([[1.0, 4.0, 9.0]]), torch.tensor([[5.0, -2.0, 11.0]])
    rot = lambda t, p: R.rope_3d(t, p, dims=dims, interleaved=interleaved)  # noqa: E731
    torch.testing.assert_close((rot(q, m) * rot(k, n)).sum(), (rot(q, m + shift) * rot(k, n + shift)).sum())


def test_rope_layouts_are_channel_permutations_of_each_other():
    dims = (4, 6, 6)
    x = torch.randn(10, 2, 16, dtype=torch.float64)
    pos = torch.randint(0, 9, (10, 3))
    perm, start = [], 0
    for d in dims:  # interleaved position 2j <- half position j, 2j+1 <- j + d/2
        for j in range(d // 2):
            perm += [start + j, start + j + d // 2]
        start += d
    y_half = R.rope_3d(x, pos, dims=dims, interleaved=False)
    y_inter = R.rope_3d(x[..., perm], pos, dims=dims, interleaved=True)
    torch.testing.assert_close(y_inter, y_half[..., perm])


def test_rope_dense_equals_packed_and_qk_norm():
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    pos = torch.randint(0, 9, (5, 3))
    dense = R.rope_3d(x, pos, dims=(4, 4, 4))
    packed = R.rope_3d(x.reshape(10, 3, 16), pos.repeat(2, 1), dims=(4, 4, 4))
    torch.testing.assert_close(dense.reshape(10, 3, 16), packed)
    w = torch.rand(16, dtype=torch.float64)
    q, k = R.rope_3d_qk(x, x, pos, dims=(4, 4, 4), q_norm_weight=w)
    normed = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    torch.testing.assert_close(q, R.rope_3d(normed, pos, dims=(4, 4, 4)))
    torch.testing.assert_close(k, dense)


def test_adaln_and_gated_residual_per_sample():
    lengths = [3, 0, 1, 5]
    cu = cu_seqlens_of(lengths)
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randn(9, 6, dtype=torch.float64)
    shift, scale, gate = (torch.randn(4, 6, dtype=torch.float64) for _ in range(3))
    out = R.adaln_modulate(x, shift, scale, cu)
    res = R.gated_residual(x, y, gate, cu)
    for i in range(4):
        s, e = int(cu[i]), int(cu[i + 1])
        ln = F.layer_norm(x[s:e], (6,), eps=1e-6)
        torch.testing.assert_close(out[s:e], ln * (1 + scale[i]) + shift[i])
        torch.testing.assert_close(res[s:e], x[s:e] + gate[i] * y[s:e])
    dense = R.adaln_modulate(x[:8].reshape(2, 4, 6), shift[:2], scale[:2])
    torch.testing.assert_close(dense[1], F.layer_norm(x[4:8], (6,), eps=1e-6) * (1 + scale[1]) + shift[1])
