"""The op registry (vdit.ops._registry) and backend selection: declared kernels, the one fallback
policy (explicit backends raise, auto falls back), vdit.plan, use_backend / VDIT_BACKEND,
and the capability table that the docs embed."""
import os
import subprocess
import sys

import pytest
import torch

import vdit
from vdit.backends import BackendUnavailableError
from vdit.ops import _registry, plan
from vdit.ops._registry import ALL_FLOATS, GPU_FLOATS, TRITON, Kernel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = _registry.OpSpec("toy", (Kernel("cuda", devices=("cuda",), max_head_dim=128),
                               Kernel("triton", devices=("cuda",), family=TRITON, interpreted=True, dtypes=GPU_FLOATS,
                                      max_head_dim=256),
                               Kernel("cpu", devices=("cpu",), dtypes=ALL_FLOATS)))


def test_build_info_lists_compiled_backends():
    info = vdit.build_info()
    assert info["cpu"] is True and info["error"] is None
    assert info["torch"] == torch.__version__
    for key in ("cuda", "cuda_archs", "cuda_version", "openmp", "triton", "built_with_torch"):
        assert key in info
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_version"]


def test_every_public_op_is_declared():
    assert set(_registry.OPS) >= {"patchify_3d", "unpatchify_3d", "patch_embed_3d", "patch_embed_3d_varlen",
                                  "patch_unembed_3d", "patch_unembed_3d_varlen", "varlen_attention", "rope_3d",
                                  "rope_3d_qk", "adaln_modulate", "gated_residual"}


def test_auto_takes_the_first_kernel_that_covers_the_call():
    assert _registry.plan(TOY, device="cpu", dtype=torch.float32)[0] == "cpu"
    narrow = _registry.OpSpec("narrow", (Kernel("cpu", devices=("cpu",), dtypes=GPU_FLOATS, max_head_dim=128),))
    assert _registry.plan(narrow, device="cpu", dtype=torch.float32, head_dim=64)[0] == "cpu"
    # dtypes and head dims outside the kernel's table move auto to the reference, and say why
    kernel, why = _registry.plan(narrow, device="cpu", dtype=torch.float64, head_dim=64)
    assert kernel == "torch" and "cpu: takes float16, bfloat16, float32, got torch.float64" in why
    kernel, why = _registry.plan(narrow, device="cpu", dtype=torch.float32, head_dim=200)
    assert kernel == "torch" and "cpu: takes head dims up to 128, got 200" in why
    with pytest.raises(ValueError, match="backend 'cpu' takes head dims up to 128"):
        _registry.select(narrow, torch.device("cpu"), torch.float32, "cpu", head_dim=200)


def test_plan_is_the_public_rule(monkeypatch):
    assert vdit.plan is vdit.ops.plan is _registry.plan and not hasattr(vdit.backends, "plan")
    assert plan("varlen_attention", device="cpu", dtype=torch.float32, head_dim=64)[0] == "cpu"
    assert plan("varlen_attention", device="cuda", dtype=torch.float64, head_dim=64)[0] == "torch"
    assert plan("rope_3d", device="cuda", dtype=torch.bfloat16, head_dim=512)[0] == "torch"
    kernel, reason = plan("patch_embed_3d", device="cuda", dtype=torch.float16)
    assert kernel in ("triton", "torch") and reason


def test_explicit_backend_errors_name_the_problem():
    with pytest.raises(ValueError, match="backend must be one of"):
        _registry.select(TOY, torch.device("cpu"), torch.float32, "fast")
    with pytest.raises(BackendUnavailableError, match="has no 'triton' kernel"):
        _registry.select(_registry.OPS["adaln_modulate"], torch.device("cpu"), torch.float32, "triton")
    with pytest.raises(ValueError, match="backend 'cuda' runs on cuda tensors, got tensors on cpu"):
        _registry.select(TOY, torch.device("cpu"), torch.float32, "cuda")
    with pytest.raises(ValueError, match="backend 'cpu' runs on cpu tensors"):
        _registry.select(TOY, torch.device("meta"), torch.float32, "cpu")
    if vdit.backends.TRITON_INTERPRET:  # triton runs CPU tensors here, so the capability check is reached
        with pytest.raises(TypeError, match="backend 'triton' takes float16, bfloat16, float32, got torch.float64"):
            _registry.select(TOY, torch.device("cpu"), torch.float64, "triton")
        with pytest.raises(ValueError, match="backend 'triton' takes head dims up to 256, got 320"):
            _registry.select(TOY, torch.device("cpu"), torch.float32, "triton", head_dim=320)


def test_forward_and_backward_follow_the_same_policy():
    """varlen_attention_backward refuses what its forward refuses (no silent fallback either way)."""
    from vdit.ops.attention import varlen_attention, varlen_attention_backward
    q = torch.randn(4, 2, 16, dtype=torch.float64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    if not vdit.backends.TRITON_INTERPRET:
        pytest.skip("needs triton on CPU tensors (TRITON_INTERPRET=1)")
    with pytest.raises(TypeError, match="triton"):
        varlen_attention(q, q, q, cu, cu, backend="triton")
    with pytest.raises(TypeError, match="triton"):
        varlen_attention_backward(q, q, q, q, q, torch.zeros(2, 4), cu, cu, backend="triton")


def test_use_backend_nests_and_yields_to_explicit_calls():
    dev = torch.device("cpu")
    with vdit.use_backend("torch"):
        assert _registry.select(TOY, dev, torch.float32) == "torch"
        with vdit.use_backend("cpu"):
            assert _registry.select(TOY, dev, torch.float32) == "cpu"
        assert _registry.select(TOY, dev, torch.float32, "cpu") == "cpu"
    assert _registry.select(TOY, dev, torch.float32) == "cpu"
    with pytest.raises(ValueError):
        with vdit.use_backend("nope"):
            pass


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_env_var_sets_the_default_backend():
    code = "import vdit; print(vdit.plan('rope_3d', device='cpu')[0])"
    assert _run(code, VDIT_BACKEND="torch").stdout.strip() == "torch"
    bad = _run("import vdit", VDIT_BACKEND="gpu")
    assert bad.returncode != 0 and "VDIT_BACKEND must be one of" in bad.stderr


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import torch, vdit\n"
            "try:\n    vdit.ops.patchify_3d(torch.ones(1, 1, 1, 2, 2), (1, 2, 2), backend='triton')\n"
            "except vdit.BackendUnavailableError as e:\n    print('refused:', e)\n")
    out = _run(code, TRITON_INTERPRET="0")
    assert "refused:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_docs_embed_the_current_capability_table():
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        doc = f.read()
    regenerate = "regenerate: python scripts/capability_table.py --update docs/architecture.md"
    assert _registry.capability_table() in doc, regenerate


def test_capability_table_script_writes_the_table(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- capability-table -->\nstale\n<!-- /capability-table -->\nafter\n")
    script = os.path.join(ROOT, "scripts", "capability_table.py")
    printed = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert printed.stdout.strip() == _registry.capability_table()
    updated = subprocess.run([sys.executable, script, "--update", str(doc)], capture_output=True, text=True,
                             timeout=120)
    assert updated.returncode == 0, updated.stderr[-2000:]
    assert doc.read_text() == ("before\n<!-- capability-table -->\n" + _registry.capability_table()
                               + "\n<!-- /capability-table -->\nafter\n")


# ---- the dense-attention rule (varlen_attention on CUDA), one test per branch, no GPU needed ----------

@pytest.fixture
def installed(monkeypatch):
    """Pretend which external kernels are installed: installed(flash_attn=3 | 2 | None, torch_varlen=bool,
    flash_attn_backward=bool) (the last: flash-attn's private backward from a given output and lse)."""
    from vdit.kernels import external

    def set_(flash_attn=None, torch_varlen=True, flash_attn_backward=False):
        monkeypatch.setattr(external, "flash_attn_version", lambda: flash_attn)
        monkeypatch.setattr(external, "torch_varlen_missing", lambda: None if torch_varlen else "not installed")
        monkeypatch.setattr(external, "flash_attn_backward_missing",
                            lambda: None if flash_attn and flash_attn_backward else "no private backward")
    return set_


def attention(**features):
    call = dict(device="cuda", dtype=torch.bfloat16, head_dim=128, causal=False)
    call.update(features)
    return plan("varlen_attention", **call)[0]


def test_rule_fa3_on_hopper(installed):
    installed(flash_attn=3)
    assert attention(capability=(9, 0)) == "flash-attn"
    assert attention(capability=(9, 0), causal=True, gqa=True) == "flash-attn"
    assert attention(capability=(8, 0)) == "torch-varlen"  # FlashAttention-3 runs on sm_90 only


def test_rule_fa2_is_not_preferred_over_what_torch_ships(installed):
    installed(flash_attn=2)
    assert attention(capability=(9, 0)) == "torch-varlen"
    assert attention(capability=(9, 0), backend="flash-attn") == "flash-attn"  # named, it runs
    installed(flash_attn=2, torch_varlen=False)
    assert attention(capability=(8, 0)) == "flash-attn"


def test_rule_torch_varlen_is_the_default_dense_kernel(installed):
    installed()
    assert attention(capability=(8, 0)) == "torch-varlen"
    assert attention(capability=(9, 0), dtype=torch.float16, head_dim=72, gqa=True) == "torch-varlen"


def test_rule_vdit_triton_where_the_others_cannot_run(installed):
    installed(flash_attn=3)
    assert attention(capability=(7, 5)) == "triton"  # pre-Ampere
    assert attention(capability=(8, 0), dtype=torch.float32) == "triton"  # fp32
    assert attention(capability=(8, 0), head_dim=59) == "triton"  # head dim not a multiple of 8 (no FA3 on sm_80)
    assert attention(capability=(8, 0), deterministic=True) == "triton"  # torch-varlen's backward uses atomics
    assert attention(capability=(9, 0), backward=True) == "triton"  # this flash-attn has no backward from lse
    assert attention(capability=(9, 0), empty=True) == "triton"
    assert attention(capability=(9, 0), head_dim=320) == "torch"  # beyond every GPU kernel: the reference
    assert attention(capability=(9, 0), dtype=torch.float64) == "torch"


def test_rule_backward_from_out_and_lse_runs_flash_attn_where_it_has_one(installed):
    installed(flash_attn=3, flash_attn_backward=True)
    assert attention(capability=(9, 0), backward=True, causal=True, gqa=True) == "flash-attn"
    assert attention(capability=(8, 0), backward=True) == "triton"  # FlashAttention-3 runs on sm_90 only
    assert attention(capability=(9, 0), backward=True, head_dim=60) == "triton"  # the private backward: % 8
    assert attention(capability=(9, 0), backward=True, empty=True) == "triton"
    assert attention(capability=(9, 0), backward=True, deterministic=True, head_dim=256) == "triton"
    assert attention(capability=(9, 0), backward=True, deterministic=True, head_dim=128) == "flash-attn"
    installed(flash_attn=2, flash_attn_backward=True)  # torch-varlen has no such backward: FA2's runs in auto
    assert attention(capability=(8, 0), backward=True) == "flash-attn"
    assert attention(capability=(8, 0)) == "torch-varlen"  # the forward still prefers what torch ships
    installed(flash_attn=3)
    with pytest.raises(ValueError, match="flash-attn' has no backward from a given output and lse here: no private"):
        attention(capability=(9, 0), backward=True, backend="flash-attn")
    with pytest.raises(ValueError, match="torch-varlen' has no backward from a given output and lse"):
        attention(capability=(9, 0), backward=True, backend="torch-varlen")


def test_rule_explicit_choices_raise_with_the_reason(installed):
    installed()
    with pytest.raises(ValueError, match="torch-varlen' needs an sm_80 or newer GPU"):
        attention(capability=(7, 5), backend="torch-varlen")
    with pytest.raises(TypeError, match="torch-varlen' takes float16, bfloat16, got torch.float32"):
        attention(capability=(9, 0), dtype=torch.float32, backend="torch-varlen")
    with pytest.raises(BackendUnavailableError, match="flash-attn' is unavailable: not installed"):
        attention(capability=(9, 0), backend="flash-attn")


def test_rule_env_var_forces_one_kernel_for_one_op(installed, monkeypatch):
    installed()
    monkeypatch.setenv("VDIT_BACKEND_VARLEN_ATTENTION", "triton")
    assert attention(capability=(9, 0)) == "triton"
    assert plan("rope_3d", device="cpu", dtype=torch.float32, head_dim=64)[0] == "cpu"  # other ops unaffected
    monkeypatch.setenv("VDIT_BACKEND_VARLEN_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="VDIT_BACKEND_VARLEN_ATTENTION must be one of"):
        attention(capability=(9, 0))


# ---- kernel families and the implementation tables --------------------------------------------

def test_a_kernel_family_decides_installation_and_interpretation():
    # Backend names are those of vdit.backends.BACKENDS; the families here are made up.
    absent = _registry.Family("absent", "_absent", lambda device: "absent is not installed")
    spec = _registry.OpSpec("toy2", (Kernel("triton", devices=("cuda",), family=absent, interpreted=True),
                                     Kernel("cpu", devices=("cpu",))))
    assert spec.family("triton") is absent and spec.family("cpu") is _registry.COMPILED
    with pytest.raises(BackendUnavailableError, match="absent is not installed"):  # named: reaches the family
        _registry.plan(spec, device="cpu", backend="triton")
    assert _registry.plan(spec, device="cpu")[0] == "cpu"  # auto never runs an interpreter
    not_interpreted = _registry.OpSpec("toy3", (Kernel("triton", devices=("cuda",), family=TRITON),))
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        _registry.plan(not_interpreted, device="cpu", backend="triton")
    external = _registry.OpSpec("toy4", (Kernel("flash-attn", devices=("cuda",), family=None, missing=lambda: None),))
    with pytest.raises(ValueError, match="not a vdit operator"):
        external.family("flash-attn")


def test_every_triton_operator_is_implemented_from_a_table():
    from vdit.kernels import schemas

    for name in schemas.TRITON_SCHEMAS:
        qualname = _registry.TRITON.qualname(name)
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (qualname, key)


def test_implement_rejects_a_malformed_table():
    with pytest.raises(ValueError, match="table entry 'x' must be 'module:function'"):
        _registry.implement(_registry.TRITON, {"x": "no_function"})
    with pytest.raises(ValueError, match="family 'compiled' has no Python package"):
        _registry.implement(_registry.COMPILED, {"x": "module:function"})


def test_table_functions_import_their_module_at_the_first_call(tmp_path, monkeypatch):
    source = "CALLS = []\ndef run(a, b=0):\n    CALLS.append(a)\n    return a + b\n"
    (tmp_path / "vdit_lazy_probe.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    forward = _registry._lazy_function("vdit_lazy_probe", "run")
    assert "vdit_lazy_probe" not in sys.modules and forward.__name__ == "run"
    assert forward(2, b=3) == 5 and sys.modules["vdit_lazy_probe"].CALLS == [2]
    monkeypatch.delitem(sys.modules, "vdit_lazy_probe")


def test_backends_of_tests_every_declared_vdit_kernel(monkeypatch):
    from tests.conftest import backends_of

    for name, spec in _registry.OPS.items():
        assert {p.values[0] for p in backends_of(name)} == {k.name for k in spec.kernels if k.family}, name
    # A kernel declared for an op is tested without editing a list.
    extra = Kernel("cuda", devices=("cuda",), family=_registry.COMPILED)
    monkeypatch.setitem(_registry.OPS, "toy_new", _registry.OpSpec("toy_new", (extra, Kernel("cpu", devices=("cpu",)))))
    params = backends_of("toy_new", reference=True)
    assert [p.values for p in params] == [("torch", "cpu"), ("cuda", "cuda"), ("cpu", "cpu")]
    assert any(m.name == "cuda" for m in params[1].marks)
    assert [p.values for p in backends_of("toy_new", device="cpu", with_device=False)] == [("cpu",)]
