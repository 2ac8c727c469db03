"""The static GPU gate (no GPU needed): every Triton configuration that the kernel modules declare
(``aot_specs()``, collected by ``vdit.kernels.triton.registry.shipped_specs``) compiles ahead of time
for its architectures with the runtime's alignment specialization, spills nothing, has no stack
frame, fits in shared memory, and on sm_90 runs its tl.dot on a pipelined wgmma; and the CUDA
extension's kernels use no stack or local memory beyond the documented allowances.

All of it comes from one run of ``python -m vdit.kernels.triton.static_check`` (the same code that writes
benchmarks/results/gpu-static.md), in a subprocess: the Triton interpreter that the other tests run
under cannot compile triton's own library functions. Nothing here retypes a kernel signature.
"""
import collections
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import vdit  # noqa: E402
from vdit.kernels.triton import static_check  # noqa: E402
from vdit.kernels.triton.registry import shipped_specs  # noqa: E402


@pytest.fixture(scope="module")
def static(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vdit.kernels.triton.static_check", "--out", str(out), "--json",
                           str(out / "rows.json")], env=env, capture_output=True, text=True, timeout=2400)
    rows = json.loads((out / "rows.json").read_text()) if (out / "rows.json").exists() else None
    return dict(returncode=proc.returncode, log=proc.stdout[-4000:] + proc.stderr[-4000:], rows=rows,
                report=(out / "gpu-static.md").read_text() if (out / "gpu-static.md").exists() else "")


def test_every_triton_module_declares_specs():
    specs = shipped_specs()
    assert {"patchify", "attention", "rope", "patch_embed"} <= set(specs)
    assert all(len(v) > 0 for v in specs.values())


def test_attention_ships_causal_and_full_variants_of_every_config():
    variants = collections.defaultdict(set)
    for spec in shipped_specs()["attention"]:
        if "CAUSAL" in spec.constexprs:
            key = (spec.kernel, spec.archs, tuple(sorted((k, v) for k, v in spec.constexprs.items() if k != "CAUSAL")))
            variants[key].add(spec.constexprs["CAUSAL"])
    assert variants and all(v == {True, False} for v in variants.values())


def test_rope_ships_aligned_and_unaligned_variants():
    assert {spec.aligned for spec in shipped_specs()["rope"]} == {True, False}


def test_static_report_passes(static):
    assert static["returncode"] == 0, static["log"]
    expected = sum(len(spec.archs) for specs in shipped_specs().values() for spec in specs)
    assert len(static["rows"]["triton"]) == expected
    assert "All configurations compile without spills" in static["report"]


def test_every_configuration_is_clean(static):
    assert static["rows"] is not None, static["log"]
    for row in static["rows"]["triton"]:
        where = f"{row['module']} {row['label']} sm_{row['arch']}"
        assert "error" not in row, f"{where}: {row.get('error')}"
        assert row["registers"] > 0, f"{where}: ptxas reported no register count"
        assert row["spill"] == 0 and row["stack"] == 0, where
        assert row["fits"], where
        if row["wgmma"] is not None:  # a tl.dot kernel on sm_90
            assert row["wgmma"] and not row["wgmma_serialized"], where


@pytest.mark.skipif(not vdit.build_info()["cuda"], reason="extension built without CUDA kernels")
def test_cuda_kernels_are_read_from_the_extension(static):
    rows = static["rows"]["cuda"]
    assert rows, "cuobjdump found no kernels in a CUDA build"
    built = {int(a.replace(".", "")) for a in vdit.build_info()["cuda_archs"].split(";")}
    assert {r["arch"] for r in rows} >= built
    assert static_check.failures([], rows) == []
    rope = [r for r in rows if "rope" in r["kernel"] and "fwd" in r["kernel"]]
    assert rope and all(r["registers"] <= 128 for r in rope), "rope forward exceeds its launch bound of 128 registers"
