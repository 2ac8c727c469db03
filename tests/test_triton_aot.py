"""Static GPU check: every shipped Triton patchify configuration compiles ahead of time for sm_80
and sm_90 with no GPU, spills nothing and fits in shared memory."""
import pytest

triton = pytest.importorskip("triton")

from vdit.kernels.triton import aot, patchify  # noqa: E402

SIGNATURE = {"video_ptr": "*fp16", "tokens_ptr": "*fp16", "C": "i32", "T": "i32", "H": "i32", "W": "i32",
             "PT": "i32", "PH": "i32", "PW": "i32"}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("config", patchify.CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("to_tokens", [True, False], ids=["patchify", "unpatchify"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_patchify_compiles_without_spills(arch, config, to_tokens, dtype):
    block_n, block_f, num_warps = config
    sig = {k: ("*" + dtype if v.startswith("*") else v) for k, v in SIGNATURE.items()}
    res = aot.resources(patchify.patch_transpose_kernel, sig,
                        {"TO_TOKENS": to_tokens, "BLOCK_N": block_n, "BLOCK_F": block_f}, arch, num_warps)
    assert res.registers > 0, "ptxas reported no register count"
    assert res.spills == 0 and res.stack == 0, res
    assert res.fits, res
