"""The PatchEmbed3d / PatchUnembed3d modules (vdit/nn/patch_embed.py): built from a Conv3d, loading
Conv3d / Linear state dicts, and training end to end. The ops are tested in tests/ops/test_patch_embed.py."""
import pytest
import torch

from tests.ops.test_patch_embed import close  # the op tests' magnitude-scaled tolerance
from vdit.nn import PatchEmbed3d, PatchUnembed3d
from vdit.ops import reference


def test_from_conv3d_reproduces_conv3d():
    conv = torch.nn.Conv3d(16, 48, kernel_size=(1, 2, 2), stride=(1, 2, 2), dtype=torch.float64)
    module = PatchEmbed3d.from_conv3d(conv)
    assert module.weight is conv.weight and module.bias is conv.bias
    x = torch.randn(2, 16, 3, 8, 6, dtype=torch.float64)
    close(module(x), conv(x).flatten(2).transpose(1, 2), torch.float64)
    videos = [x[0], x[1, :, :1, :4]]
    tokens, cu, grids = module(videos)
    c = cu.tolist()
    for i, v in enumerate(videos):
        close(tokens[c[i]:c[i + 1]], conv(v[None]).flatten(2).transpose(1, 2)[0], torch.float64)
    with pytest.raises(ValueError, match="kernel_size == stride"):
        PatchEmbed3d.from_conv3d(torch.nn.Conv3d(4, 8, 3, stride=1))


def test_modules_load_conv3d_and_linear_state_dicts():
    conv = torch.nn.Conv3d(5, 12, kernel_size=(2, 2, 2), stride=(2, 2, 2))
    embed = PatchEmbed3d(5, 12, (2, 2, 2))
    embed.load_state_dict(conv.state_dict())
    x = torch.randn(1, 5, 2, 4, 4)
    close(embed(x), conv(x).flatten(2).transpose(1, 2), torch.float32)
    linear = torch.nn.Linear(12, 5 * 8)
    unembed = PatchUnembed3d(12, 5, (2, 2, 2))
    unembed.load_state_dict(linear.state_dict())
    tokens = torch.randn(1, 4, 12)
    close(unembed(tokens, (1, 2, 2)), reference.unpatchify_3d(linear(tokens), (1, 2, 2), (2, 2, 2)), torch.float32)


def test_modules_train_end_to_end():
    embed, unembed = PatchEmbed3d(3, 16, (1, 2, 2)), PatchUnembed3d(16, 3, (1, 2, 2))
    x = torch.randn(2, 3, 2, 4, 6)
    loss = (unembed(embed(x), (2, 2, 3)) - x).pow(2).mean()
    loss.backward()
    for p in [embed.weight, embed.bias, unembed.weight, unembed.bias]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
