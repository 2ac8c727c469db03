"""The shipped Triton kernels: every module here that defines ``aot_specs()`` lists its configurations,
which the static GPU check (``vdit-bench --gpu-static``, tests/test_gpu_static.py) compiles for sm_80
and sm_90."""
from __future__ import annotations

import importlib
import pkgutil

import vdit.kernels.triton as package


def shipped_specs() -> dict[str, list]:
    """{module name: [KernelSpec, ...]} for every Triton kernel module with ``aot_specs``."""
    out = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in ("aot", "registry"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, "aot_specs"):
            out[info.name] = module.aot_specs()
    return out
