"""Static GPU check of the Triton patch_embed kernels: every shipped tile configuration, for fp16, bf16
and fp32, compiles ahead of time for sm_80 and sm_90 with no GPU, spills nothing and fits in shared
memory.

Under TRITON_INTERPRET=1 (which tests/conftest.py sets on machines without a GPU) triton's compiler
cannot lower loops over ``range`` (triton 3.8), so the compilation runs once in a subprocess without
the interpreter, with this file as its entry point; the tests read its JSON report.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases():
    """(kernel name, dtype, config) for every shipped configuration."""
    from vdit.kernels.triton import patch_embed as pe

    tables = {"embed_kernel": pe.EMBED_CONFIGS, "project_kernel": pe.PROJECT_CONFIGS,
              "reduce_kernel": pe.REDUCE_CONFIGS}
    return [(name, dtype, tuple(config)) for name, table in tables.items() for dtype in DTYPES
            for config in table[ELEMENT_SIZE[dtype]]]


def _compile_all() -> dict:
    """Runs in the subprocess: resources of every case on every arch, keyed by ``case_id``."""
    from vdit.kernels.triton import aot, patch_embed as pe

    common = {"meta_ptr": "*i64", "tiles_ptr": "*i32", "C": "i32", "D": "i32", "PT": "i32", "PH": "i32",
              "PW": "i32"}
    report = {}
    for name, dtype, config in _cases():
        data = "*" + dtype
        block_a, block_b, block_c, warps, stages = config
        if name == "embed_kernel":
            sig = {"video_ptr": data, "w_ptr": data, "bias_ptr": data, "out_ptr": data, **common,
                   "stride_wf": "i32", "stride_wd": "i32"}
            constexprs = {"HAS_BIAS": True, "BLOCK_N": block_a, "BLOCK_D": block_b, "BLOCK_F": block_c}
        elif name == "project_kernel":
            sig = {"tokens_ptr": data, "w_ptr": data, "bias_ptr": data, "video_ptr": data, **common,
                   "stride_wd": "i32", "stride_wf": "i32"}
            constexprs = {"HAS_BIAS": True, "BLOCK_N": block_a, "BLOCK_F": block_b, "BLOCK_D": block_c}
        else:
            sig = {"video_ptr": data, "tokens_ptr": data, "out_ptr": "*fp32", "sum_f_ptr": "*fp32",
                   "sum_d_ptr": "*fp32", "meta_ptr": "*i64", "tiles_ptr": "*i32", "num_tiles": "i32",
                   "tiles_per_split": "i32", "C": "i32", "D": "i32", "PT": "i32", "PH": "i32", "PW": "i32"}
            constexprs = {"SUM_F": True, "SUM_D": True, "BLOCK_F": block_a, "BLOCK_D": block_b, "BLOCK_N": block_c}
        constexprs["DOT_PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
        for arch in ARCHS:
            res = aot.resources(getattr(pe, name), sig, constexprs, arch, warps, stages)
            report[case_id(name, dtype, config, arch)] = dict(
                registers=res.registers, spills=res.spills, stack=res.stack, shared=res.shared, fits=res.fits)
    return report


def case_id(name, dtype, config, arch) -> str:
    return f"{name}-{dtype}-{'x'.join(map(str, config))}-sm{arch}"


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,dtype,config", _cases(),
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_patch_embed_kernels_compile_without_spills(report, name, dtype, config, arch):
    res = report[case_id(name, dtype, config, arch)]
    assert res["registers"] > 0, "ptxas reported no register count"
    assert res["spills"] == 0 and res["stack"] == 0, res
    assert res["fits"], res


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
