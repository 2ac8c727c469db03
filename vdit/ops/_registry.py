"""The op registry: what kernels each op has, what each covers, how one is chosen, how they register.

Every public op declares its kernels once with :func:`declare`, in its order of preference::

    SPEC = declare("rope_3d",
                   Kernel("cuda", devices=("cuda",), dtypes=ALL_FLOATS, max_head_dim=256),
                   Kernel("triton", devices=("cuda",), family=TRITON, interpreted=True, max_head_dim=256),
                   Kernel("cpu", devices=("cpu",), dtypes=ALL_FLOATS))

The same declaration drives dispatch (:func:`select`), the public rule :func:`plan` (exported as
``vdit.plan`` and ``vdit.ops.plan``) and the capability table in the docs (:func:`capability_rows`).

Fallback policy, identical for every op and for its forward and backward:

* A kernel named explicitly (``backend=`` or :func:`vdit.use_backend` or ``VDIT_BACKEND``) runs or
  raises: :class:`~vdit.backends.BackendUnavailableError` when the op has no such kernel or it is not
  installed, ``ValueError`` when it does not run on the tensors' device or head dim, ``TypeError`` for
  a dtype it does not take.
* ``auto`` takes the first declared kernel that runs on the tensors' device, is installed and covers
  the call (dtype, head dim); otherwise the pure-PyTorch reference (``torch``), which covers
  everything. A device kernel that exists but is not installed makes auto warn once.
* The backward of an op uses the kernel family its forward used (the autograd formula is registered
  per family), so gradients never mix kernels.

Kernel families (``Kernel.family``, how operators are named and when they are installed): the
compiled kernels of ``vdit._C`` are ``vdit::<name>`` (one operator, CPU and CUDA implementations
picked by the dispatcher) and the Triton kernels are ``vdit::<name>_triton``, implemented by the
functions each op lists for :func:`implement`; both schemas come from :mod:`vdit.kernels.schemas`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from collections.abc import Callable

import torch

from vdit import backends
from vdit._extension import HAS_CPU_KERNELS, HAS_CUDA_KERNELS, HAS_TRITON, LOAD_ERROR, cuda_code_missing
from vdit.backends import BackendUnavailableError
from vdit.kernels import MAX_GPU_HEAD_DIM, schemas  # noqa: F401  (MAX_GPU_HEAD_DIM: re-exported for the ops)

ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # Triton has no float64 tl.dot
REFERENCE = "torch"


@dataclasses.dataclass(frozen=True)
class Call:
    """What a kernel rule may look at: the call's device, dtype and head dim, and the features an op
    describes (for attention: ``causal``, ``gqa``, ``lse``, ``deterministic``, ``backward``), plus
    ``capability`` ((major, minor) of a CUDA device; taken from the device when not given) and ``auto``
    (whether the kernel is being chosen rather than named)."""

    device: torch.device
    dtype: torch.dtype | None
    head_dim: int | None
    features: dict
    auto: bool

    def __getattr__(self, name):
        return self.features.get(name)

    @property
    def capability(self) -> tuple[int, int] | None:
        if "capability" in self.features:
            return tuple(self.features["capability"])
        return _device_capability(self.device)


@functools.cache
def _device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


# ---- kernel families: operator names, availability -------------------------------------------

def _compiled_missing(device: torch.device) -> str | None:
    if not HAS_CPU_KERNELS:
        return LOAD_ERROR
    if device.type == "cuda" and not HAS_CUDA_KERNELS:
        return "vdit was built without CUDA kernels (see vdit.build_info(); rebuild with VDIT_BUILD_CUDA=1)"
    return None


def _triton_missing(device: torch.device) -> str | None:
    if not HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and not backends.TRITON_INTERPRET:
        return "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing vdit)"
    return None


@dataclasses.dataclass(frozen=True)
class Family:
    """Operators implemented together, with one schema each in :mod:`vdit.kernels.schemas`.

    Args:
        name: the family's name (``"compiled"``, ``"triton"``).
        suffix: appended to an op's operator names (``vdit::<name><suffix>``).
        missing: why the family cannot run tensors on a device in this install, or None.
        package: where its Python implementations live (:func:`implement`), None for the extension's.
    """

    name: str
    suffix: str
    missing: Callable[[torch.device], str | None]
    package: str | None = None

    def qualname(self, name: str) -> str:
        return f"vdit::{name}{self.suffix}"

    def op(self, name: str):
        """The ``torch.ops.vdit`` packet of operator ``name`` in this family."""
        return getattr(torch.ops.vdit, name + self.suffix)

    def lse_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of an attention lse this family returns for inputs of ``dtype``: the compiled kernels
        keep float64 statistics for float64 inputs, Triton (no float64 dot) always float32."""
        return torch.float64 if dtype == torch.float64 and self is COMPILED else torch.float32

    def has(self, name: str) -> bool:
        return name in schemas.SCHEMAS and (not self.suffix or name in schemas.TRITON_SCHEMAS)


COMPILED = Family("compiled", "", _compiled_missing)  # vdit._C: CPU and CUDA implementations of vdit::<name>
TRITON = Family("triton", schemas.TRITON_SUFFIX, _triton_missing, package="vdit.kernels.triton")
FAMILIES = (COMPILED, TRITON)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of an op and what it covers.

    Args:
        name: the backend name users pass as ``backend=`` (``"cpu"``, ``"cuda"``, ``"triton"``, or a
            kernel vdit calls but does not own, e.g. ``"torch-varlen"``).
        devices: device types ``auto`` uses it for.
        family: the :class:`Family` whose operators run it; None for a kernel vdit calls but does not own
            (the op calls it directly and ``missing`` says when it is not installed).
        interpreted: it also runs CPU tensors, when named explicitly, under an interpreter (Triton's,
            ``TRITON_INTERPRET=1``: how the tests run GPU kernels without a GPU).
        dtypes: floating dtypes it takes.
        max_head_dim: largest head dim (ops with heads), None for no limit.
        requires: a rule over the :class:`Call` returning why the kernel cannot (or, when ``call.auto``,
            should not) run it, or None.
        missing: for kernels vdit does not build, why they are not installed, or None.
        note: one line for the docs' capability table.
    """

    name: str
    devices: tuple[str, ...]
    family: Family | None = COMPILED
    interpreted: bool = False
    dtypes: tuple[torch.dtype, ...] = ALL_FLOATS
    max_head_dim: int | None = None
    requires: Callable[[Call], str | None] | None = None
    missing: Callable[[], str | None] | None = None
    note: str = ""

    def misfit(self, call: Call) -> tuple[type[Exception], str] | None:
        """(exception type, reason) when this kernel cannot run ``call``."""
        if call.dtype is not None and call.dtype not in self.dtypes:
            return TypeError, f"takes {_dtype_list(self.dtypes)}, got {call.dtype}"
        if call.head_dim is not None and self.max_head_dim is not None and call.head_dim > self.max_head_dim:
            return ValueError, f"takes head dims up to {self.max_head_dim}, got {call.head_dim}"
        reason = self.requires(call) if self.requires is not None else None
        if reason is None and self.family is COMPILED and call.device.type == "cuda" and HAS_CUDA_KERNELS \
                and call.capability is not None:
            reason = cuda_code_missing(call.capability)  # the build's archs must cover the GPU's
        return (ValueError, reason) if reason else None

    def not_installed(self, device: torch.device) -> str | None:
        if self.missing is not None:
            return self.missing()
        return self.family.missing(device) if self.family is not None else None

    def runs_on(self, device: torch.device) -> bool:
        return device.type in self.devices or (self.interpreted and device.type == "cpu")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An op's kernels, in ``auto``'s order of preference (the reference is implicitly last)."""

    name: str
    kernels: tuple[Kernel, ...]

    def kernel(self, name: str) -> Kernel | None:
        return next((k for k in self.kernels if k.name == name), None)

    def family(self, kernel: str) -> Family:
        """The family whose operators run this op's ``kernel`` (a name :func:`select` returned)."""
        family = self.kernel(kernel).family
        if family is None:
            raise ValueError(f"{self.name}: kernel {kernel!r} is not a vdit operator; the op calls it directly")
        return family

    @property
    def env_var(self) -> str:
        """The environment variable that forces one kernel for this op (e.g. ``VDIT_BACKEND_VARLEN_ATTENTION``)."""
        return "VDIT_BACKEND_" + self.name.upper()


OPS: dict[str, OpSpec] = {}


def declare(name: str, *kernels: Kernel) -> OpSpec:
    """Register the kernels of op ``name`` (called once per op, at import of its ``vdit.ops`` module)."""
    spec = OpSpec(name, tuple(kernels))
    OPS[name] = spec
    return spec


def _dtype_list(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _resolve(spec: OpSpec, backend: str) -> str:
    """The requested kernel: the call's ``backend``, then :func:`vdit.use_backend`, then the op's own
    environment variable (read at each call), then ``VDIT_BACKEND``, then auto."""
    requested = backends.check_name(backend, "backend")
    if requested != "auto":
        return requested
    if backends.in_use_backend():
        return backends.default_backend()
    forced = os.environ.get(spec.env_var)
    if forced:
        return backends.check_name(forced, spec.env_var)
    return backends.default_backend()


def plan(op: str | OpSpec, *, device, dtype: torch.dtype | None = None, head_dim: int | None = None,
         backend: str = "auto", **features) -> tuple[str, str]:
    """The kernel a call of ``op`` runs on, and why, without running anything.

    Args:
        op: a declared op name (see :data:`OPS`) or its :class:`OpSpec`.
        device: ``torch.device`` or a string (``"cuda"``, ``"cpu"``).
        dtype: the call's floating dtype (None: not considered).
        head_dim: the call's head dim, for ops with heads.
        backend: ``"auto"`` or a kernel name to force.
        features: further properties of the call that an op's rules read, e.g. for varlen_attention
            ``capability=(9, 0)``, ``causal``, ``gqa``, ``lse``, ``deterministic``, ``backward``.
    Returns:
        (kernel name, reason): one of the op's kernel names or ``"torch"`` (the reference).
    Raises:
        BackendUnavailableError, ValueError, TypeError: a kernel named explicitly cannot run the call.
    """
    kernel, reason, _ = _plan(op, device, dtype, head_dim, backend, features)
    return kernel, reason


def _plan(op, device, dtype, head_dim, backend, features) -> tuple[str, str, list[str]]:
    """:func:`plan`, plus the device kernels auto skipped because they are not installed."""
    spec = OPS[op] if isinstance(op, str) else op
    device = torch.device(device)
    requested = _resolve(spec, backend)
    if requested == REFERENCE:
        return REFERENCE, "requested", []
    if requested != "auto":
        call = Call(device, dtype, head_dim, features, auto=False)
        return requested, _check_explicit(spec, spec.kernel(requested), requested, call), []
    call = Call(device, dtype, head_dim, features, auto=True)
    skipped, not_installed = [], []
    for kernel in spec.kernels:
        if device.type not in kernel.devices:
            continue
        missing = kernel.not_installed(device)
        misfit = kernel.misfit(call) if missing is None else None
        if missing is None and misfit is None:
            reason = f"the first {device.type} kernel of {spec.name} that covers the call"
            return kernel.name, reason + (f" (skipped: {'; '.join(skipped)})" if skipped else ""), []
        skipped.append(f"{kernel.name}: {missing or misfit[1]}")
        if missing is not None and kernel.missing is None:  # a vdit kernel that should have been built
            not_installed.append(f"{kernel.name}: {missing}")
    return REFERENCE, "reference: " + ("; ".join(skipped) or f"no {device.type} kernel"), not_installed


def _check_explicit(spec: OpSpec, kernel: Kernel | None, name: str, call: Call) -> str:
    if kernel is None:
        names = (REFERENCE, *(k.name for k in spec.kernels))
        raise BackendUnavailableError(f"{spec.name} has no {name!r} kernel; it has {names}")
    if not kernel.runs_on(call.device):
        raise ValueError(f"{spec.name}: backend {name!r} runs on {' or '.join(kernel.devices)} tensors, "
                         f"got tensors on {call.device}")
    missing = kernel.not_installed(call.device)
    if missing:
        raise BackendUnavailableError(f"{spec.name}: backend {name!r} is unavailable: {missing}")
    misfit = kernel.misfit(call)
    if misfit:
        error, reason = misfit
        raise error(f"{spec.name}: backend {name!r} {reason}")
    return "requested"


def select(op: str | OpSpec, device: torch.device, dtype: torch.dtype | None = None, backend: str = "auto", *,
           head_dim: int | None = None, **features) -> str:
    """The kernel name (or ``"torch"``) one call runs on; see the module docstring for the policy."""
    kernel, _, not_installed = _plan(op, device, dtype, head_dim, backend, features)
    if not_installed:
        _warn_fallback(op if isinstance(op, str) else op.name, torch.device(device), not_installed)
    return kernel


_warned: set[tuple[str, str]] = set()


def _warn_fallback(op: str, device: torch.device, not_installed: list[str]) -> None:
    if (op, device.type) not in _warned:
        _warned.add((op, device.type))
        warnings.warn(f"vdit: {op} on {device.type} falls back to the torch reference ({'; '.join(not_installed)})",
                      stacklevel=4)


def capability_rows() -> list[dict]:
    """One row per (op, kernel) for the docs: devices, dtypes, head-dim limit, note."""
    rows = []
    for spec in OPS.values():
        for k in spec.kernels:
            limit = "-" if k.max_head_dim is None else f"<= {k.max_head_dim}"
            rows.append(dict(op=spec.name, kernel=k.name, devices="/".join(k.devices), dtypes=_dtype_list(k.dtypes),
                             head_dim=limit, note=k.note))
    return rows


def capability_table() -> str:
    """:func:`capability_rows` as a markdown table (docs/architecture.md embeds it, written by
    ``scripts/capability_table.py``; a test compares)."""
    lines = ["| op | kernel (auto order) | devices | dtypes | head dim | note |", "|---|---|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['kernel']} | {r['devices']} | {r['dtypes']} | {r['head_dim']} | {r['note']} |"
              for r in capability_rows()]
    return "\n".join(lines)


# ---- registration: fakes, autograd, implementations -------------------------------------------

def register(*, fakes: dict[str, Callable] | Callable[[Family], dict[str, Callable]],
             autograd: Callable[[Family], dict[str, tuple[Callable, Callable]]]) -> None:
    """Register an op's fake implementations and autograd formulas for every family that has them.

    Args:
        fakes: {operator name: fake implementation} (shapes only, used by torch.compile), or a
            function of the family returning it (when the output dtypes differ between families).
        autograd: called once per family; returns {operator name: (backward, setup_context)}. It
            receives the family so its backward calls that family's backward operators.
    """
    for family in FAMILIES:
        for name, fake in (fakes(family) if callable(fakes) else fakes).items():
            if family.has(name):
                torch.library.register_fake(family.qualname(name))(fake)
        for name, (backward, setup) in autograd(family).items():
            if family.has(name):
                torch.library.register_autograd(family.qualname(name), backward, setup_context=setup)


def implement(family: Family, table: dict[str, str]) -> None:
    """Register ``family``'s implementation of each operator in ``table``.

    Args:
        family: a family whose implementations are Python functions (``family.package`` set).
        table: {operator name: ``"module:function"``}, the module relative to ``family.package``, the
            function taking the operator's schema arguments in order (e.g. ``{"rope_3d": "rope:rope_3d"}``).
    The module is imported at the first call, so the family's package (and triton) stay optional; CPU
    tensors reach the function only when the kernel runs under an interpreter (``Kernel.interpreted``).
    """
    if family.package is None:
        raise ValueError(f"family {family.name!r} has no Python package to implement operators from")
    for name, target in table.items():
        module, sep, function = target.partition(":")
        if not (module and sep and function):
            raise ValueError(f"table entry {name!r} must be 'module:function', got {target!r}")
        torch.library.register_kernel(family.qualname(name), ("cuda", "cpu"),
                                      _lazy_function(f"{family.package}.{module}", function))


def _lazy_function(module: str, function: str) -> Callable:
    """A function that imports ``module`` on its first call and forwards every call to ``module.function``."""
    @functools.cache
    def target() -> Callable:
        return getattr(importlib.import_module(module), function)

    def forward(*args, **kwargs):
        return target()(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = function
    forward.__module__ = module
    return forward
