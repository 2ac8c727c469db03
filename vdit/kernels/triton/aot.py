"""Ahead-of-time compilation of Triton kernels for NVIDIA GPUs, on a machine without one.

Each kernel module declares its shipped configurations once, next to the kernel, as ``aot_specs()``
returning :class:`KernelSpec` s (see ``registry.shipped_specs``); the static GPU report
(``vdit-bench --gpu-static``), the CI gate and the tests all compile those declarations and nothing
else. Signatures are derived from the kernel's own argument names by :func:`signature`.

A spec is compiled the way the runtime compiles it: Triton specializes every pointer argument that
is 16-byte aligned (``tt.divisibility = 16``), which changes vectorization and register use, so a
spec says whether its launcher guarantees alignment (``aligned``) and a kernel that may receive
unaligned pointers declares both variants. ptxas reports registers, spills and the wgmma
serialization warning; triton reports shared memory. No GPU is needed, and it works under
``TRITON_INTERPRET=1`` too.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

# Shared memory a block may use (opt-in maximum), bytes.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One shipped configuration of a Triton kernel, as the static GPU check compiles it.

    ``signature`` maps each runtime argument to a triton type (``"*fp16"``, ``"i32"``); ``constexprs``
    maps constexpr arguments to values; ``label`` names the case (e.g. ``"fwd d128 bf16 128x64"``).
    """

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""
    matmul: bool = False  # whether the kernel's hot loop is a tl.dot (sm_90 should use wgmma)
    archs: tuple = (80, 90)  # architectures this configuration ships for
    aligned: bool = True  # every pointer argument 16-byte aligned, as the launcher guarantees

    def attrs(self) -> dict:
        """The runtime's alignment specialization: ``tt.divisibility = 16`` on every pointer argument."""
        if not self.aligned:
            return {}
        names = _jit_function(self.kernel).arg_names
        return {(names.index(arg),): [["tt.divisibility", 16]] for arg, t in self.signature.items()
                if t.startswith("*")}


def pointer_args(kernel) -> list[str]:
    """The pointer arguments of ``kernel`` by the kernels' naming convention: a kernel names its pointers
    either all with a ``_ptr`` suffix (its scalars then have none, e.g. ``C``, ``PT``) or, if none has
    the suffix, all in UPPER case with its scalars in lower case (``Q``, ``CU_Q`` / ``total_q``)."""
    fn = _jit_function(kernel)
    names = [p.name for p in fn.params if not p.is_constexpr]
    if any(n.endswith("_ptr") for n in names):
        return [n for n in names if n.endswith("_ptr")]
    return [n for n in names if n.isupper()]


def signature(kernel, dtype: str, **overrides: str) -> dict:
    """Triton signature of ``kernel``'s runtime (non-constexpr) arguments.

    Pointer arguments (:func:`pointer_args`) are ``"*" + dtype``, scalars ``"i32"`` (Python ints below
    2**31 are i32 at run time), except those named in ``overrides`` (``LSE="*fp32"``, ``eps="fp32"``).
    """
    fn = _jit_function(kernel)
    pointers = set(pointer_args(kernel))
    sig = {}
    for p in fn.params:
        if not p.is_constexpr:
            sig[p.name] = overrides.pop(p.name, "*" + dtype if p.name in pointers else "i32")
    if overrides:
        raise KeyError(f"{fn.fn.__name__} has no arguments {sorted(overrides)}")
    return sig


@dataclasses.dataclass
class KernelResources:
    """Resource use of one compiled kernel configuration."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes
    shared: int  # bytes
    uses_wgmma: bool
    wgmma_serialized: bool = False  # ptxas performance warning C7515: the wgmma pipeline is serialized

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_MEMORY_LIMIT[self.arch] and self.registers <= 255

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _jit_function(kernel) -> JITFunction:
    # Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction wrapping the Python fn.
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _nvidia_tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 2, attrs: dict | None = None):
    """Compile ``kernel`` for ``sm_<arch>`` and return triton's compiled kernel (asm + metadata).

    ``signature`` maps every non-constexpr argument to a triton type (``"*fp16"``, ``"i32"``, ...);
    ``constexprs`` maps constexpr argument names to values; ``attrs`` are argument specializations
    (see :meth:`KernelSpec.attrs`).
    """
    fn = _jit_function(kernel)
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, attrs=attrs,
                                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
              num_stages: int = 2, attrs: dict | None = None) -> KernelResources:
    """Compile for ``sm_<arch>`` and report registers, spills (from ptxas) and shared memory."""
    compiled = compile_kernel(kernel, signature, constexprs, arch, num_warps, num_stages, attrs)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([_nvidia_tool("ptxas"), "-v", f"--gpu-name={arch_name}", ptx_path,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return KernelResources(
        name=fn_name(kernel), arch=arch, num_warps=num_warps, num_stages=num_stages,
        registers=int(regs.group(1)) if regs else 0,
        spill_stores=int(spill.group(1)) if spill else 0, spill_loads=int(spill.group(2)) if spill else 0,
        stack=int(stack.group(1)) if stack else 0, shared=int(compiled.metadata.shared),
        uses_wgmma="wgmma" in ptx, wgmma_serialized="C7515" in log)


def spec_resources(spec: KernelSpec, arch: int) -> KernelResources:
    """:func:`resources` of one :class:`KernelSpec`."""
    return resources(spec.kernel, spec.signature, spec.constexprs, arch, spec.num_warps, spec.num_stages,
                     spec.attrs())


def fn_name(kernel) -> str:
    return _jit_function(kernel).fn.__name__
