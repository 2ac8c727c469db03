"""The shipped Triton kernels: every module here that defines ``aot_specs()`` lists its configurations,
which the static GPU check (``vdit-bench --gpu-static``, tests/static/test_gpu_static.py) compiles for
the architectures each spec names (sm_80 and sm_90; the attention tables also sm_86), and states in
``GPU_ONLY`` what only a GPU can verify."""
from __future__ import annotations

import importlib
import pkgutil

import vdit.kernels.triton as package


def _modules():
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name not in ("aot", "registry"):
            yield info.name, importlib.import_module(f"{package.__name__}.{info.name}")


def gpu_only_notes() -> dict[str, str]:
    """{module name: what only a GPU can verify about its kernels} (each module's ``GPU_ONLY``)."""
    return {name: module.GPU_ONLY for name, module in _modules() if hasattr(module, "GPU_ONLY")}


def shipped_specs() -> dict[str, list]:
    """{module name: [KernelSpec, ...]} for every Triton kernel module with ``aot_specs``."""
    return {name: module.aot_specs() for name, module in _modules() if hasattr(module, "aot_specs")}
