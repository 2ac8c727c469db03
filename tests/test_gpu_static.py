"""Static GPU check (no GPU needed): every shipped Triton configuration compiles ahead of time for
sm_80 and sm_90 without spills and within shared memory; the CUDA extension's kernels use no stack
or local memory. This is the CI gate behind benchmarks/results/gpu-static.md."""
import pytest

pytest.importorskip("triton")

import vdit  # noqa: E402
from vdit.bench import gpu_static  # noqa: E402
from vdit.kernels.triton.registry import shipped_specs  # noqa: E402


def test_every_triton_module_ships_specs():
    specs = shipped_specs()
    assert "patchify" in specs and all(len(v) > 0 for v in specs.values())


def test_triton_configurations_compile_without_spills():
    rows = gpu_static.triton_rows()
    assert len(rows) == 2 * sum(len(v) for v in shipped_specs().values())
    assert all(r.get("registers", 0) > 0 for r in rows if "error" not in r)
    assert gpu_static.failures(rows, []) == []


@pytest.mark.skipif(not vdit.build_info()["cuda"], reason="extension built without CUDA kernels")
def test_cuda_kernels_use_no_local_memory():
    rows = gpu_static.cuda_rows()
    assert rows, "cuobjdump found no kernels in a CUDA build"
    assert {r["arch"] for r in rows} >= {int(a.replace(".", "")) for a in vdit.build_info()["cuda_archs"].split(";")}
    assert gpu_static.failures([], rows) == []
