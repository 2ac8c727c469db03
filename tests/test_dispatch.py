"""Backend selection: per call, context manager, env var, and errors for unavailable backends."""
import subprocess
import sys

import pytest
import torch

import vdit
from vdit.backends import BackendUnavailableError, select_backend


def test_build_info_lists_compiled_backends():
    info = vdit.build_info()
    assert info["cpu"] is True and info["error"] is None
    assert info["torch"] == torch.__version__
    for key in ("cuda", "cuda_archs", "cuda_version", "openmp", "triton", "built_with_torch"):
        assert key in info
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_version"]


def test_auto_prefers_device_kernels():
    assert select_backend("op", ("cuda", "triton", "cpu"), torch.device("cpu")) == "cpu"
    assert select_backend("op", ("triton",), torch.device("cpu")) == "torch"  # no CPU kernel: reference


def test_explicit_backend_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("op", ("cpu",), torch.device("cpu"), "fast")
    with pytest.raises(BackendUnavailableError, match="op has no 'triton' kernel"):
        select_backend("op", ("cpu",), torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="backend 'cuda' runs on cuda tensors, got tensors on cpu"):
        select_backend("op", ("cuda", "cpu"), torch.device("cpu"), "cuda")
    with pytest.raises(ValueError, match="backend 'cpu' runs on cpu tensors"):
        select_backend("op", ("cpu",), torch.device("meta"), "cpu")


def test_use_backend_nests_and_yields_to_explicit_calls():
    dev = torch.device("cpu")
    with vdit.use_backend("torch"):
        assert select_backend("op", ("cpu",), dev) == "torch"
        with vdit.use_backend("cpu"):
            assert select_backend("op", ("cpu",), dev) == "cpu"
        assert select_backend("op", ("cpu",), dev, "cpu") == "cpu"
    assert select_backend("op", ("cpu",), dev) == "cpu"
    with pytest.raises(ValueError):
        with vdit.use_backend("nope"):
            pass


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_env_var_sets_the_default_backend():
    code = "import vdit.backends as b, torch; print(b.select_backend('op', ('cpu',), torch.device('cpu')))"
    assert _run(code, VDIT_BACKEND="torch").stdout.strip() == "torch"
    bad = _run("import vdit", VDIT_BACKEND="gpu")
    assert bad.returncode != 0 and "VDIT_BACKEND must be one of" in bad.stderr


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import torch, vdit\n"
            "try:\n    vdit.ops.patchify_3d(torch.ones(1, 1, 1, 2, 2), (1, 2, 2), backend='triton')\n"
            "except vdit.BackendUnavailableError as e:\n    print('refused:', e)\n")
    out = _run(code, TRITON_INTERPRET="0")
    assert "refused:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout
