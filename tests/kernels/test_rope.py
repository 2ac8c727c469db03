"""RoPE kernel specifics: head dims whose rows a GPU program (Triton or CUDA) splits across warps,
rotated in place (GPU only). The op contract is tested in tests/ops/test_rope.py."""
import pytest
import torch

from tests.conftest import assert_close, backends_of
from vdit.ops import reference, rope_3d_qk


@pytest.mark.cuda
@pytest.mark.parametrize("backend", backends_of("rope_3d", device="cuda", with_device=False))
@pytest.mark.parametrize("head_dim,dtype", [(72, torch.bfloat16), (120, torch.float16), (192, torch.float32)],
                         ids=["d72-bf16", "d120-fp16", "d192-fp32"])
def test_inplace_rows_split_across_warps_match_the_reference(backend, head_dim, dtype):
    """Head dims whose rows a GPU program splits across warps (D % 16 != 0, fp32 above 128): in place,
    the non-interleaved partner of a channel lives in another warp, which must not see it rotated."""
    torch.manual_seed(0)
    total, heads = 1031, 6
    dims = (head_dim // 3 // 2 * 2, head_dim // 3 // 2 * 2, head_dim // 3 // 2 * 2)
    qkv = torch.randn(total, 3, heads, head_dim, device="cuda", dtype=dtype)
    pos = torch.randint(0, 40, (total, 3), device="cuda")
    expected = reference.rope_3d_qk(qkv[:, 0].double(), qkv[:, 1].double(), pos, dims=dims, interleaved=False)
    q, k = qkv[:, 0], qkv[:, 1]
    rope_3d_qk(q, k, pos, dims=dims, interleaved=False, inplace=True, backend=backend)
    assert_close(qkv[:, 0], expected[0], dtype)
    assert_close(qkv[:, 1], expected[1], dtype)
