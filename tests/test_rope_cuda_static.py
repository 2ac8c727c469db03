"""Static GPU check of the CUDA rope kernels in the built extension (no GPU needed): every fp16 /
bf16 / fp32 instantiation has no stack frame (so no spills) and the forward kernel fits its
launch bound of 128 registers. The float64 kernels keep the precise sin / cos, whose huge-argument
path has a 40-byte stack frame (not a spill)."""
import os
import re
import subprocess

import pytest

import vdit
from vdit._extension import _C

triton = pytest.importorskip("triton")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

pytestmark = pytest.mark.skipif(not vdit.build_info()["cuda"] or not os.path.exists(CUOBJDUMP),
                                reason="vdit built without CUDA kernels, or no cuobjdump")


@pytest.fixture(scope="module")
def kernels():
    out = subprocess.run([CUOBJDUMP, "-res-usage", _C.__file__], capture_output=True, text=True, check=True).stdout
    found = {}
    for name, regs, stack in re.findall(r"Function (\S*rope_\w+_kernel\S*):\s*\n\s*REG:(\d+) STACK:(\d+)", out):
        found.setdefault(name, []).append((int(regs), int(stack)))
    assert found, "no rope kernels in the extension"
    return found


def test_no_stack_or_spills_below_float64(kernels):
    for name, uses in kernels.items():
        is_double = "IdLi" in name  # template argument double
        for regs, stack in uses:
            assert (stack <= 64) if is_double else (stack == 0), (name, regs, stack)
            if "fwd" in name:
                assert regs <= 128, (name, regs)
            assert regs <= 255, (name, regs)


def test_every_dtype_and_vector_width_is_built(kernels):
    # 4 dtypes x {scalar, 16-byte vector} x {forward, backward}
    assert len(kernels) == 16, sorted(kernels)
