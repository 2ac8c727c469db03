"""Loads the compiled extension ``vdit._C`` and reports what was built.

vdit still imports when the extension is missing (a source checkout that was never built); the
compiled backends are then unavailable and say why.
"""
from __future__ import annotations

import importlib.util
import re

import torch

try:
    from vdit import _C  # noqa: F401  (registers the CPU / CUDA implementations of the vdit:: operators)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    LOAD_ERROR = f"vdit._C failed to import ({exc}); reinstall with `pip install --no-build-isolation .`"

HAS_CPU_KERNELS = _C is not None
HAS_CUDA_KERNELS = _C is not None and bool(_C.build_info()["cuda"])
HAS_TRITON = importlib.util.find_spec("triton") is not None


def build_info() -> dict:
    """What this vdit install was built with and runs on.

    Returns a dict with ``cpu`` and ``cuda`` (bool: kernels compiled), ``cuda_archs`` (str, e.g.
    ``"8.0;9.0"``), ``cuda_version`` (toolkit used to build, or None), ``openmp`` (bool),
    ``built_with_torch`` / ``torch`` (versions at build and run time), ``triton`` (version or None),
    ``torch_cuda`` (CUDA version of the running torch), ``gpu_available`` (bool), and ``error``
    (why the extension failed to load, or None). With the extension also ``cpu_arch`` (the build's
    ``-march``), ``cpu_isa`` (the ISA copy of the CPU attention kernels in use, ``"avx2"`` or
    ``"avx512"``; ``VDIT_CPU_ISA`` forces one; ``"error: ..."`` when none can run), ``cpu_isas`` (the
    compiled copies this CPU runs) and ``cpu_tiles`` (their tile sizes, from the L2 cache size).
    """
    info = dict(_C.build_info()) if _C is not None else {
        "cpu": False, "cuda": False, "cuda_archs": "", "cuda_version": None, "openmp": False,
        "built_with_torch": None}
    triton_version = None
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, triton=triton_version,
                gpu_available=torch.cuda.is_available(), error=LOAD_ERROR)
    return info


def _parse_archs(archs: str) -> list[tuple[int, int, bool]]:
    """"8.0;9.0+PTX" -> [(8, 0, False), (9, 0, True)] (major, minor, PTX embedded)."""
    out = []
    for entry in archs.replace(",", ";").replace(" ", ";").split(";"):
        m = re.fullmatch(r"(\d+)\.(\d+)a?(\+PTX)?", entry.strip())
        if m:
            out.append((int(m.group(1)), int(m.group(2)), bool(m.group(3))))
    return out


def cuda_code_missing(capability, archs: str | None = None) -> str | None:
    """Why the compiled CUDA kernels cannot run on a GPU of ``capability`` (major, minor), or None.

    A cubin for sm_XY runs on sm_XZ with Z >= Y (same major); embedded PTX for sm_XY is compiled by the driver
    for any newer GPU. ``archs`` defaults to this build's ``TORCH_CUDA_ARCH_LIST`` (``build_info()``).
    """
    if archs is None:
        if not HAS_CUDA_KERNELS:
            return "the extension has no CUDA kernels"
        archs = _C.build_info()["cuda_archs"]
    major, minor = (int(c) for c in tuple(capability)[:2])
    for a_major, a_minor, ptx in _parse_archs(archs):
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor)):
            return None
    return (f"the extension holds no code for sm_{major}{minor} (built for {archs or 'no arch'}; "
            f"rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor} or a lower arch +PTX)")
