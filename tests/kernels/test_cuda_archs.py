"""Which GPUs the compiled CUDA kernels run on: a cubin runs on its own major at the same or a higher minor,
embedded PTX on any newer GPU, and nothing else (sm_100 / sm_120 would fail with "no kernel image")."""
import pytest
import torch

import vdit
from vdit._extension import HAS_CUDA_KERNELS, _parse_archs, cuda_code_missing


@pytest.mark.parametrize("capability, archs, runs", [
    ((8, 0), "8.0;9.0", True), ((8, 6), "8.0;9.0", True), ((9, 0), "8.0;9.0", True),
    ((10, 0), "8.0;9.0", False), ((12, 0), "8.0;9.0", False), ((7, 5), "8.0;9.0", False),
    ((10, 0), "8.0;9.0+PTX", True), ((12, 0), "8.0;9.0+PTX", True), ((7, 5), "8.0;9.0+PTX", False),
    ((8, 9), "9.0+PTX", False), ((9, 0), "9.0a", True), ((9, 0), "", False),
])
def test_cuda_code_missing_follows_cubin_and_ptx_compatibility(capability, archs, runs):
    reason = cuda_code_missing(capability, archs)
    if runs:
        assert reason is None
    else:
        assert f"sm_{capability[0]}{capability[1]}" in reason and "TORCH_CUDA_ARCH_LIST" in reason


def test_the_default_build_embeds_ptx_for_its_newest_arch():
    import re
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    default = re.search(r'setdefault\("TORCH_CUDA_ARCH_LIST", "([^"]+)"\)', setup).group(1)
    assert default.endswith("+PTX"), default
    assert cuda_code_missing((12, 0), default) is None


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="vdit was built without CUDA kernels")
def test_dispatch_skips_the_cuda_kernels_on_a_gpu_the_build_does_not_cover():
    major, minor, _ = _parse_archs(vdit.build_info()["cuda_archs"])[0]
    call = dict(device="cuda", dtype=torch.float16, head_dim=64)
    assert vdit.plan("rope_3d", capability=(major, minor), **call)[0] == "cuda"
    kernel, why = vdit.plan("rope_3d", capability=(7, 0), **call)  # older than every arch vdit builds
    assert kernel != "cuda" and "no code for sm_70" in why, why
