"""Ahead-of-time compilation of Triton kernels for NVIDIA GPUs, on a machine without one.

Used by the static GPU check: every shipped kernel configuration is compiled for sm_80 and sm_90,
and its cubin's registers, spills and shared memory are read back (``cuobjdump`` and ``ptxas`` ship
inside triton). This needs no GPU and works under ``TRITON_INTERPRET=1`` too.
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
                   num_stages: int = 2):
    """Compile ``kernel`` for ``sm_<arch>`` and return triton's compiled kernel (asm + metadata).

    ``signature`` maps every non-constexpr argument to a triton type (``"*fp16"``, ``"i32"``, ...);
    ``constexprs`` maps constexpr argument names to values.
    """
    fn = _jit_function(kernel)
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
              num_stages: int = 2) -> KernelResources:
    """Compile for ``sm_<arch>`` and report registers, spills (from ptxas) and shared memory."""
    compiled = compile_kernel(kernel, signature, constexprs, arch, num_warps, num_stages)
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
        uses_wgmma="wgmma" in ptx)


def spec_resources(spec: KernelSpec, arch: int) -> KernelResources:
    """:func:`resources` of one :class:`KernelSpec`."""
    return resources(spec.kernel, spec.signature, spec.constexprs, arch, spec.num_warps, spec.num_stages)


def fn_name(kernel) -> str:
    return _jit_function(kernel).fn.__name__
