"""The run-time ISA choice of the C++ CPU attention kernels (csrc/common/cpu_isa.h): each copy the build
compiled (vdit::avx2, vdit::avx512) that this CPU runs, forced with VDIT_CPU_ISA in a subprocess (the
choice is read once per process), against the float64 reference: dense varlen attention (ragged, cross,
GQA / MQA, causal, head dims that no vector width divides) and block-sparse attention (sliding windows,
GQA), forward and backward, outputs NaN-poisoned. Each ISA also runs with small tiles (VDIT_CPU_TILES), so
that every sequence spans several score tiles and the vector loops' tails are hit. Plus build_info's
report and the errors for a bad VDIT_CPU_ISA.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vdit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFO = vdit.build_info()
SUPPORTED = INFO.get("cpu_isas", [])

# Runs in a fresh process with VDIT_CPU_ISA set; prints the ISA and tiles it ran with.
CHECK_SCRIPT = textwrap.dedent("""
    import os
    import torch
    import vdit
    from vdit._memory import poison_outputs
    from tests.ops.test_attention import _check as dense_check
    from tests.kernels import test_sparse_attention as sparse

    info = vdit.build_info()
    assert info["cpu_isa"] == os.environ["VDIT_CPU_ISA"], info
    cases = [([0, 1, 17, 255, 530], None, 2, 2, 64), ([300, 1, 0, 17], [77, 5, 0, 400], 4, 2, 40),
             ([33, 0, 130], None, 4, 1, 24)]
    with poison_outputs():
        for causal in (False, True):
            for lens_q, lens_k, hq, hk, d in cases:
                for dtype, fwd, grad in ((torch.float32, 2.0, 8.0), (torch.float64, 1.0, 1.0)):
                    dense_check("cpu", "cpu", lens_q, lens_k or lens_q, hq, hk, d, dtype, causal, fwd_scale=fwd,
                                grad_scale=grad)
        layout = sparse._layout()
        for hq, hk, window in ((4, 2, [[1, 3, 3]]), (4, 4, [[1, 1, 1], [2, 3, 3], [3, 2, 1], [1, 2, 2]])):
            kv = sparse._window_lists(layout, window, hq)
            sparse._check(layout.offsets, kv, layout.max_tile, hq, hk, 24, torch.float32, 2.0, 8.0)
            sparse._check(layout.offsets, kv, layout.max_tile, hq, hk, 24, torch.float64)
    print("ran", info["cpu_isa"], info["cpu_tiles"])
""")


def _run(script, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("VDIT_CPU_ISA", "VDIT_CPU_TILES")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def test_cpu_build_info_reports_the_isa():
    assert INFO["cpu_isa"] in ("avx2", "avx512"), INFO["cpu_isa"]
    assert INFO["cpu_isa"] == SUPPORTED[-1] or os.environ.get("VDIT_CPU_ISA")  # the widest, unless forced
    assert set(SUPPORTED) <= {"avx2", "avx512"} and "avx2" in SUPPORTED
    assert torch.backends.cpu.get_cpu_capability() != "AVX512" or "avx512" in SUPPORTED
    assert INFO["cpu_arch"] is not None
    fwd, bwd = INFO["cpu_tiles"].split(", ")
    assert fwd.startswith("fwd ") and bwd.startswith("bwd "), INFO["cpu_tiles"]


@pytest.mark.parametrize("tiles", [None, "32,64,16,32"], ids=["plan-tiles", "small-tiles"])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_cpu_kernels_match_reference_under_each_isa(isa, tiles):
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU does not run the {isa} kernels")
    env = {"VDIT_CPU_ISA": isa}
    if tiles:
        env["VDIT_CPU_TILES"] = tiles
    res = _run(CHECK_SCRIPT, **env)
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith(f"ran {isa} "), last
    if tiles:
        assert last.endswith("fwd 32x64, bwd 16x32"), last


@pytest.mark.parametrize("value", ["sse", "AVX2 "])
def test_cpu_bad_isa_variable_raises_naming_it(value):
    script = textwrap.dedent("""
        import torch
        import vdit
        print(vdit.build_info()["cpu_isa"])
        q = torch.randn(4, 1, 8)
        cu = torch.tensor([0, 4], dtype=torch.int32)
        try:
            torch.ops.vdit.varlen_attention_fwd(q, q, q, cu, cu, 4, 4, 0.5, False)
        except RuntimeError as e:
            print("raised", str(e).splitlines()[0])
    """)
    res = _run(script, VDIT_CPU_ISA=value)
    assert res.returncode == 0, res.stderr
    status, raised = res.stdout.strip().splitlines()[-2:]
    assert status.startswith("error: ") and "VDIT_CPU_ISA" in status, status
    assert raised.startswith("raised ") and "VDIT_CPU_ISA must be avx2 or avx512" in raised, raised


def test_cpu_kernels_use_torch_threads_not_raw_openmp_regions():
    """Work goes through at::parallel_for on torch's threads (at::get_num_threads()), so that torch's thread
    setting holds and no second pool of OpenMP threads competes for shared cores; `omp simd` is fine."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in files:
            if name.endswith((".cpp", ".h")):
                path = os.path.join(folder, name)
                with open(path) as f:
                    for number, line in enumerate(f, 1):
                        if "#pragma omp" in line and "omp simd" not in line:
                            offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
