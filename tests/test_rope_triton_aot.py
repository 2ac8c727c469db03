"""Static GPU check of the Triton rope kernels: shipped configurations compile ahead of time for
sm_80 and sm_90 with no GPU, spill nothing and fit in shared memory.

The compiles run in one subprocess without TRITON_INTERPRET: under the interpreter (the tests'
default without a GPU) triton's own @jit library functions such as tl.sum are interpreter wrappers
that the compiler cannot inline.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import dataclasses, json, sys
from vdit.kernels.triton import aot, rope

DIMS = {n: "i32" for n in ("L", "total", "D", "Hq", "Hk", "pos_sb", "pos_sl", "pos_sa")}

def strides(*prefixes):
    return {f"{p}_{s}": "i64" for p in prefixes for s in ("sb", "sl", "sh")}

def fwd_signature(t):
    sig = dict(pos_ptr="*i32", table_ptr="*fp32", q_ptr=t, q_out_ptr=t, qw_ptr="*fp32", k_ptr=t, k_out_ptr=t,
               kw_ptr="*fp32", **DIMS)
    sig.update(strides("q", "qo", "k", "ko"))
    sig.update(sin_sign="fp32", eps="fp32")
    return sig

def bwd_signature(t):
    sig = dict(pos_ptr="*i32", table_ptr="*fp32", gq_ptr=t, q_ptr=t, gq_out_ptr=t, qw_ptr="*fp32", gqw_ptr="*fp32",
               gk_ptr=t, k_ptr=t, gk_out_ptr=t, kw_ptr="*fp32", gkw_ptr="*fp32", **DIMS)
    sig.update(strides("gq", "q", "gqo", "gk", "k", "gko"))
    sig.update(eps="fp32")
    return sig

out = {}
for key in json.loads(sys.argv[1]):
    kind, arch, block_d, dtype, norm = key.split(":")
    arch, block_d, norm = int(arch), int(block_d), norm == "norm"
    kernel, sig = (rope.rope_fwd_kernel, fwd_signature) if kind == "fwd" else (rope.rope_bwd_kernel, bwd_signature)
    block_t = (rope.BLOCK_T if kind == "fwd" else rope.BLOCK_T_BWD)[block_d]
    constexprs = dict(HAS_K=True, Q_NORM=norm, K_NORM=norm, BLOCK_T=block_t, BLOCK_D=block_d)
    warps = rope.BWD_WARPS.get(block_d, rope.NUM_WARPS) if kind == "bwd" else rope.NUM_WARPS
    res = aot.resources(kernel, sig("*" + dtype), constexprs, arch, warps)
    out[key] = dict(dataclasses.asdict(res), fits=res.fits, spills=res.spills)
print("RESULT" + json.dumps(out))
'''

# The most register-hungry variant of every shipped BLOCK_D (fused norm on q and k, bf16) for the
# forward and the backward, on both archs; plus fp32 and the plain forward at head dim 128.
KEYS = [f"{kind}:{arch}:{bd}:bf16:norm" for arch in (80, 90) for bd in (16, 32, 64, 128, 256) for kind in ("fwd", "bwd")]
KEYS += ["fwd:90:128:fp32:norm", "bwd:90:128:fp32:norm", "fwd:90:128:fp16:plain"]


@pytest.fixture(scope="module")
def resources():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(KEYS)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_shipped_configs_are_all_covered():
    from vdit.kernels.triton import rope

    assert {int(k.split(":")[2]) for k in KEYS} == set(rope.BLOCK_T)


@pytest.mark.parametrize("key", KEYS)
def test_compiles_without_spills(resources, key):
    res = resources[key]
    assert res["registers"] > 0, f"ptxas reported no register count: {res}"
    assert res["spills"] == 0 and res["stack"] == 0, res
    assert res["fits"], res
