"""Static GPU check (no GPU needed): every shipped Triton configuration compiles ahead of time for its
architectures (sm_80, sm_90) without spills and within shared memory, and the CUDA extension's kernels
use no stack or local memory beyond the documented allowances. This is the CI gate behind
benchmarks/results/gpu-static.md; it runs `python -m vdit.bench.gpu_static` in a subprocess because
the Triton interpreter (set for the other tests) cannot compile triton's own library functions."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import vdit  # noqa: E402
from vdit.bench import gpu_static  # noqa: E402
from vdit.kernels.triton.registry import shipped_specs  # noqa: E402


def test_every_triton_module_ships_specs():
    specs = shipped_specs()
    assert {"patchify", "attention", "rope", "patch_embed"} <= set(specs) and all(len(v) > 0 for v in specs.values())


def test_static_report_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vdit.bench.gpu_static", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu-static.md").read_text()
    expected = sum(len(spec.archs) for specs in shipped_specs().values() for spec in specs)
    assert f"{expected} Triton configurations" in proc.stdout
    assert "All configurations compile without spills" in report


@pytest.mark.skipif(not vdit.build_info()["cuda"], reason="extension built without CUDA kernels")
def test_cuda_kernels_are_read_from_the_extension():
    rows = gpu_static.cuda_rows()
    assert rows, "cuobjdump found no kernels in a CUDA build"
    assert {r["arch"] for r in rows} >= {int(a.replace(".", "")) for a in vdit.build_info()["cuda_archs"].split(";")}
    assert gpu_static.failures([], rows) == []
