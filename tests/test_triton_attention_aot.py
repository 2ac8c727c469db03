"""Static GPU check of the Triton varlen-attention kernels: every shipped tile configuration compiles
ahead of time (no GPU needed) for sm_90 and sm_80, spills nothing, fits in shared memory, and on sm_90
the fp16/bf16 kernels use wgmma without ptxas serializing it (performance warning C7515).

Coverage, kept to about a minute of compilation on 2 idle cores: sm_90 every kernel x head dim
{64, 128, 256} x {fp16, bf16} (causal: the variant with both the masked and unmasked key loops);
sm_80 the same in fp16, and head dim 128 in bf16 (bf16 and fp16 tiles compile to the same code apart
from the mma type); the sm_86/89 (99 KB shared memory) table; the fp32 configurations (FMA dot
products, slow to compile) on sm_90 and at head dim 64 on sm_80; the non-causal variant and a padded
head dim (96) on sm_90; the backward preprocess kernel.

The kernels call triton's own @jit library functions (tl.max, tl.sum), which TRITON_INTERPRET=1 (set
by conftest.py) turns into interpreter objects that cannot be compiled. So the compilation runs once,
in a subprocess without TRITON_INTERPRET (this file is its entry point), and the tests read its
results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_cases() -> list[tuple]:
    """(kernel, arch, head_dim, dtype, causal) for the shipped-config checks."""
    cases = []
    for kernel in KERNELS:
        for head_dim in (64, 128, 256):
            for dtype in ("fp16", "bf16"):
                cases.append((kernel, 90, head_dim, dtype, True))
            cases.append((kernel, 80, head_dim, "fp16", True))
            cases.append((kernel, 90, head_dim, "fp32", True))
        cases.append((kernel, 80, 64, "fp32", True))
        cases.append((kernel, 80, 128, "bf16", True))
        cases.append((kernel, 90, 128, "fp16", False))
        for head_dim in (96,):  # padded to BLOCK_D 64 / 128 with masked loads along the head dim
            cases.append((kernel, 90, head_dim, "fp16", True))
    return cases


def _small_smem_cases() -> list[tuple]:
    """sm_86/89 (99 KB) entries that differ from the sm_80 ones need their own compilation."""
    from vdit.kernels.triton.attention import CONFIGS
    return [(kernel, 86, head_dim, "fp16", True) for kernel in KERNELS for head_dim in (64, 128, 256)
            if any(c not in CONFIGS[kernel][80][head_dim] for c in CONFIGS[kernel][86][head_dim])]


def _preprocess_cases() -> list[tuple]:
    return [("bwd_preprocess", 90, 256, "bf16", False), ("bwd_preprocess", 80, 256, "fp32", False),
            ("bwd_preprocess", 90, 64, "fp16", False)]


def _compile(case: tuple) -> list[dict]:
    """Compile every configuration of one case; runs in the subprocess (no interpreter)."""
    from vdit.kernels.triton import aot, attention, attention_bwd, attention_fwd

    kernel, arch, head_dim, dtype, causal = case
    block_d = attention.block_d_of(head_dim)
    if kernel == "bwd_preprocess":
        sig = {"O": "*" + dtype, "DO": "*" + dtype, "DELTA": "*fp32", "total_q": "i32", "num_heads": "i32"}
        res = aot.resources(attention_bwd.attn_bwd_preprocess_kernel, sig,
                            {"HEAD_DIM": head_dim, "BLOCK_D": block_d,
                             "BLOCK_T": attention_bwd.preprocess_block_t(block_d)}, arch, 4, 1)
        return [dict(config=None, **vars(res))]
    fn = {"fwd": attention_fwd.attn_fwd_kernel, "bwd_dkdv": attention_bwd.attn_bwd_dkdv_kernel,
          "bwd_dq": attention_bwd.attn_bwd_dq_kernel}[kernel]
    tensors = {"fwd": "Q K V O", "bwd_dkdv": "Q K V DO DK DV", "bwd_dq": "Q K V DO DQ"}[kernel].split()
    types = {name: "*" + dtype for name in tensors}
    types.update(LSE="*fp32", DELTA="*fp32", CU_Q="*i32", CU_K="*i32", WORK="*i32", total_q="i32",
                 num_heads_q="i32", num_heads_k="i32", softmax_scale="fp32")
    sig = {name: types[name] for name in fn.arg_names if name in types}
    table = attention.FP32_CONFIGS[kernel] if dtype == "fp32" else attention.CONFIGS[kernel][arch]
    configs = table[max(64, block_d)]
    if arch == 86:  # entries shared with sm_80 reuse its compilation (see test_small_shared_memory_configs)
        configs = [c for c in configs if c not in attention.CONFIGS[kernel][80][max(64, block_d)]]
    results = []
    for cfg in configs:
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": cfg.block_m,
                      "BLOCK_N": cfg.block_n, "CAUSAL": causal,
                      "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        res = aot.resources(fn, sig, constexprs, arch, cfg.num_warps, cfg.num_stages)
        serialized = arch == 90 and dtype != "fp32" and _wgmma_serialized(
            aot.compile_kernel(fn, sig, constexprs, arch, cfg.num_warps, cfg.num_stages))  # cached
        results.append(dict(config=list(vars(cfg).values()), wgmma_serialized=serialized, **vars(res)))
    return results


def _wgmma_serialized(compiled) -> bool:
    """Whether ptxas serializes the kernel's wgmma (its performance warning C7515 on sm_90a)."""
    import tempfile

    from vdit.kernels.triton import aot
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([aot._nvidia_tool("ptxas"), "-v", "--gpu-name=sm_90a", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    return "C7515" in out.stdout + out.stderr


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cases = _config_cases() + _small_smem_cases() + _preprocess_cases()
    assert cases
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(cases)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {tuple(case): res for case, res in zip(cases, results)}


def _check(results: list[dict], expect_wgmma: bool) -> None:
    assert results, "no configuration shipped"
    for res in results:
        print(f"{res['name']} sm_{res['arch']} config={res['config']}: {res['registers']} regs, "
              f"{res['spill_stores'] + res['spill_loads']} B spilled, {res['shared']} B shared, "
              f"wgmma={res['uses_wgmma']}")
        assert res["registers"] > 0, "ptxas reported no register count"
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack"] == 0, res
        assert res["registers"] <= 255, res
        from vdit.kernels.triton.aot import SHARED_MEMORY_LIMIT
        assert res["shared"] <= SHARED_MEMORY_LIMIT[res["arch"]], res
        if expect_wgmma:
            assert res["uses_wgmma"], res
            assert not res["wgmma_serialized"], res


def _case_id(case: tuple) -> str:
    return "-".join(map(str, case[:4])) + ("-causal" if case[4] else "-full")


@pytest.mark.parametrize("case", _config_cases(), ids=_case_id)
def test_attention_configs_compile_without_spills(compiled, case):
    _check(compiled[case], expect_wgmma=case[1] == 90 and case[3] != "fp32")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_small_shared_memory_configs(compiled, kernel, head_dim):
    # sm_86/89 entries equal to sm_80's reuse its compilation: same code, checked against 99 KB.
    from vdit.kernels.triton.aot import SHARED_MEMORY_LIMIT
    from vdit.kernels.triton.attention import CONFIGS
    sm80 = dict(zip((tuple(r["config"]) for r in compiled[(kernel, 80, head_dim, "fp16", True)]),
                    compiled[(kernel, 80, head_dim, "fp16", True)]))
    own = {tuple(r["config"]): r for r in compiled.get((kernel, 86, head_dim, "fp16", True), [])}
    results = [own.get(tuple(vars(c).values())) or sm80[tuple(vars(c).values())]
               for c in CONFIGS[kernel][86][head_dim]]
    _check(results, expect_wgmma=False)
    assert all(r["shared"] <= SHARED_MEMORY_LIMIT[86] for r in results), results
    # fp32 configurations are shared by all architectures: they must fit the smallest one too.
    assert all(r["shared"] <= SHARED_MEMORY_LIMIT[86] for r in compiled[(kernel, 90, head_dim, "fp32", True)])


@pytest.mark.parametrize("case", _preprocess_cases(), ids=lambda c: "-".join(map(str, c[1:4])))
def test_bwd_preprocess_compiles_without_spills(compiled, case):
    _check(compiled[case], expect_wgmma=False)


if __name__ == "__main__":
    # Subprocess entry point: compile the cases given as JSON, print the results as one JSON line.
    from concurrent.futures import ProcessPoolExecutor

    todo = [tuple(c) for c in json.loads(sys.argv[1])]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        out = list(pool.map(_compile, todo))
    print(json.dumps(out))
