"""The RotaryEmbedding3d module (vdit/nn/rope.py): its presets against independent eager implementations
of each model's published RoPE formula (written here from the models' math, not taken from their code),
on every kernel backend, plus the position helpers (vdit.packing). The rope ops are tested in
tests/ops/test_rope.py."""
import pytest
import torch

from tests.conftest import assert_close, backends_of
from vdit.nn import RotaryEmbedding3d
from vdit.nn.rope import PRESETS
from vdit.packing import dense_positions, grid_positions


def _axis_freqs(d, theta):
    """theta^(-2j/d), j < d/2, float64."""
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def _real_tables(positions, dims, theta):
    """cos / sin tables (L, sum(dims)): each frequency repeated twice (pairs (2j, 2j+1)), axes t, h, w
    concatenated - the layout HunyuanVideo and CogVideoX describe."""
    cos, sin = [], []
    for axis, d in enumerate(dims):
        angle = positions[:, axis].double()[:, None] * _axis_freqs(d, theta)[None, :]
        cos.append(angle.cos().repeat_interleave(2, dim=-1))
        sin.append(angle.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, -1), torch.cat(sin, -1)


def _apply_real(x, cos, sin):
    """x * cos + rotate_pairs(x) * sin with rotate_pairs(a, b) = (-b, a); x (..., L, H, D)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-b, a), dim=-1).flatten(-2)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def hunyuan_video_rope(q, k, positions, q_weight, k_weight, eps=1e-6):
    """HunyuanVideo: per-head RMSNorm (with weights) of q and k, then 3D RoPE with axis dims
    [16, 56, 56], theta 256, interleaved real rotation."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    cos, sin = _real_tables(positions, (16, 56, 56), 256.0)
    return (_apply_real(rms(q.double(), q_weight.double()), cos, sin),
            _apply_real(rms(k.double(), k_weight.double()), cos, sin))


def wan_rope(x, positions, head_dim=128):
    """Wan: complex rotation. t gets head_dim - 4 * (head_dim // 6) channels, h and w 2 * (head_dim // 6);
    each axis' frequencies are 1 / 10000^(2j / d_axis); the head is viewed as head_dim / 2 complex
    numbers (x[2j] + i x[2j+1]) and multiplied by exp(i * pos * freq)."""
    hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * hw, hw, hw)
    angles = [positions[:, a].double()[:, None] * _axis_freqs(d, 10000.0)[None, :] for a, d in enumerate(dims)]
    freqs = torch.polar(torch.ones(positions.shape[0], head_dim // 2, dtype=torch.float64), torch.cat(angles, -1))
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * freqs[:, None, :]).flatten(-2)


def cogvideox_positions(grid_h, grid_w, frames, base_h, base_w):
    """CogVideoX's resize-crop grid: the latent grid is fitted into the base grid (keeping its aspect
    ratio, centred) and sampled at grid_h x grid_w points without the end point."""
    ratio = grid_h / grid_w
    if ratio > base_h / base_w:
        resize_h, resize_w = base_h, round(base_h / grid_h * grid_w)
    else:
        resize_w, resize_h = base_w, round(base_w / grid_w * grid_h)
    top, left = round((base_h - resize_h) / 2.0), round((base_w - resize_w) / 2.0)
    hs = top + torch.arange(grid_h, dtype=torch.float64) * (resize_h / grid_h)
    ws = left + torch.arange(grid_w, dtype=torch.float64) * (resize_w / grid_w)
    t, h, w = torch.meshgrid(torch.arange(frames, dtype=torch.float64), hs, ws, indexing="ij")
    return torch.stack((t, h, w), -1).reshape(-1, 3), (top, left), (resize_h / grid_h, resize_w / grid_w)


def cogvideox_rope(x, positions, head_dim=64):
    """CogVideoX: t gets head_dim // 4 channels, h and w head_dim // 8 * 3; theta 10000; interleaved real rotation."""
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    cos, sin = _real_tables(positions, dims, 10000.0)
    return _apply_real(x.double(), cos, sin)


def test_preset_splits():
    assert RotaryEmbedding3d.hunyuan_video().dims == (16, 56, 56)
    assert RotaryEmbedding3d.hunyuan_video().theta == 256.0
    assert RotaryEmbedding3d.wan().dims == (44, 42, 42)
    assert RotaryEmbedding3d.wan(64).dims == (24, 20, 20)
    assert RotaryEmbedding3d.cogvideox().dims == (16, 24, 24)
    assert set(PRESETS) == {"hunyuan_video", "wan", "cogvideox"}
    with pytest.raises(ValueError, match="dims must be 3 even ints"):
        RotaryEmbedding3d.hunyuan_video(64)


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
def test_hunyuan_video_with_fused_qk_norm(backend, device):
    grids = torch.tensor([[2, 3, 5], [1, 1, 1], [3, 2, 2]], dtype=torch.int32)
    pos = grid_positions(grids)
    q = torch.randn(pos.shape[0], 3, 128)
    k = torch.randn(pos.shape[0], 3, 128)
    qw, kw = 1 + 0.1 * torch.randn(128), 1 + 0.1 * torch.randn(128)
    rope = RotaryEmbedding3d.hunyuan_video()
    from vdit.backends import use_backend

    with use_backend(backend):
        oq, ok = rope(q.to(device), k.to(device), pos.to(device), qw.to(device), kw.to(device))
    eq, ek = hunyuan_video_rope(q, k, pos, qw, kw)
    assert_close(oq, eq, scale=2.0)
    assert_close(ok, ek, scale=2.0)


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
def test_wan_dense_batch(backend, device):
    pos = dense_positions((3, 4, 5))
    q = torch.randn(2, pos.shape[0], 2, 128)
    k = torch.randn(2, pos.shape[0], 2, 128)
    from vdit.backends import use_backend

    with use_backend(backend):
        oq, ok = RotaryEmbedding3d.wan()(q.to(device), k.to(device), pos.to(device))
    for out, x in ((oq, q), (ok, k)):
        expected = torch.stack([wan_rope(x[b], pos) for b in range(2)])
        assert_close(out, expected)


@pytest.mark.parametrize("backend,device", backends_of("rope_3d"))
def test_cogvideox_resize_crop_positions(backend, device):
    frames, gh, gw = 2, 3, 5
    expected_pos, (top, left), (sh, sw) = cogvideox_positions(gh, gw, frames, base_h=4, base_w=6)
    assert (sh, sw) != (1.0, 1.0)  # a fractional grid
    pos = dense_positions((frames, gh, gw), scale=(1.0, sh, sw), offset=(0.0, top, left))
    torch.testing.assert_close(pos.double(), expected_pos)
    q = torch.randn(pos.shape[0], 4, 64)
    k = torch.randn(pos.shape[0], 4, 64)
    from vdit.backends import use_backend

    with use_backend(backend):
        oq, ok = RotaryEmbedding3d.cogvideox()(q.to(device), k.to(device), pos.to(device))
    assert_close(oq, cogvideox_rope(q, expected_pos))
    assert_close(ok, cogvideox_rope(k, expected_pos))


def test_position_helpers():
    pos = dense_positions((2, 3, 4))
    assert pos.dtype == torch.int32 and pos.shape == (24, 3)
    assert pos[5].tolist() == [0, 1, 1] and pos[-1].tolist() == [1, 2, 3]
    assert torch.equal(dense_positions((2, 3, 4), batch=3)[2], pos)
    assert torch.equal(grid_positions(torch.tensor([[2, 3, 4], [1, 2, 2]], dtype=torch.int32))[:24], pos)
    scaled = dense_positions((2, 3, 4), scale=(1.0, 0.5, 0.5), offset=(4.0, 0.0, 0.0))
    assert scaled.dtype == torch.float32 and scaled[-1].tolist() == [5.0, 1.0, 1.5]
