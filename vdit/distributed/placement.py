"""A checking mode for device placement and host synchronisation in sequence-parallel code.

NCCL takes CUDA tensors only, while gloo on CPU takes anything, so a collective that gets a CPU tensor
passes every CPU test and fails at the first call on a GPU cluster. Under :func:`check_placement`:

* every ``torch.distributed`` collective and point-to-point call must get tensors on the data's
  ``device``; anything else raises :class:`PlacementError` naming the call;
* a tensor created by code in ``vdit/distributed`` (itself, not torch on its behalf) must say its device
  (``torch.tensor(..., device=...)``): on CPU a factory without one silently lands on the data's device, on a
  GPU it does not, so the rule catches on CPU what would reach NCCL as a CPU tensor;
* a batched point-to-point call (``batch_isend_irecv``) on a group that has not yet run a collective all its
  ranks joined raises: NCCL creates a group's communicator lazily, collectively, at the group's first call,
  so a first call that is point-to-point and that some rank of the group sits out blocks the others forever
  (:func:`vdit.distributed.build_mesh` therefore runs one collective on every group it makes);
* host reads of tensors (``tolist``, ``item``, ``cpu``, ``bool``, ``int``) made by any vdit code (the ops'
  validation and kernels' launchers included) are counted in ``host_reads`` (file:line, relative to the
  package), so a test can assert that a model's layers add none (a GPU would synchronise on each).

``VDIT_CHECK_PLACEMENT=1`` turns it on in the demo's torchrun entry points (``vdit.demo.cli.common``), so the
sequence-parallel training and sampling tests run under it.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_DISTRIBUTED = os.path.dirname(os.path.abspath(__file__)) + os.sep
_VDIT = os.path.dirname(_DISTRIBUTED.rstrip(os.sep)) + os.sep
# Point-to-point transfers are checked where vdit makes them, in batch_isend_irecv (its P2POp entries must
# hold the original isend / irecv functions, so those are not wrapped).
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
                "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "batch_isend_irecv")
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.randn, torch.rand, torch.linspace}
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__}


class PlacementError(RuntimeError):
    """A collective got a tensor off the data's device, vdit.distributed made a tensor without a device, or a
    batched point-to-point call ran on a group before any collective on it."""


def _group_key(group):
    """A hashable name for ``group``: the default group is ``"world"`` however it was passed."""
    return "world" if group is None or group is dist.group.WORLD else group


def _call_group(original, args, kwargs):
    """The ``group`` argument a collective was called with (None: the default group)."""
    try:
        return inspect.signature(original).bind_partial(*args, **kwargs).arguments.get("group")
    except (TypeError, ValueError):
        return kwargs.get("group")


_TORCH = os.path.dirname(torch.__file__) + os.sep
# Frames of torch's function-mode dispatch, between a call and a mode's __torch_function__.
_DISPATCH = (os.path.join(_TORCH, "overrides.py"), os.path.join(_TORCH, "utils", "_device.py"))


def _caller_in(package: str, direct: bool = False) -> str | None:
    """``file:line`` (relative to vdit/) of the nearest caller frame inside ``package`` (a directory path
    ending in a separator; this module excluded), or None when the first frame outside torch is not there.
    With ``direct``, only a call made by ``package`` itself counts, not one torch makes on its behalf (torch's
    own bookkeeping tensors, such as DTensor's shard indices, live on the host by design)."""
    frame = sys._getframe(2)
    here = os.path.abspath(__file__)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name == here or name in _DISPATCH:
            frame = frame.f_back
            continue
        if name.startswith(package):
            return f"{os.path.relpath(name, _VDIT)}:{frame.f_lineno}"
        if direct or not name.startswith(_TORCH):
            return None  # the caller is torch itself (direct), or the first frame outside torch is not ours
        frame = frame.f_back
    return None


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dist.P2POp):
        yield value.tensor


class _Mode(TorchFunctionMode):
    def __init__(self, checker: PlacementChecker):
        super().__init__()
        self.checker = checker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and "device" not in kwargs:
            where = _caller_in(_DISTRIBUTED, direct=True)
            if where is not None:
                raise PlacementError(f"{where}: {func.__name__}(...) without device=: on a GPU it would be a CPU "
                                     f"tensor (say the data's device, or device='cpu' for host bookkeeping)")
        elif func in _HOST_READS:
            where = _caller_in(_VDIT)
            if where is not None:
                self.checker.host_reads[where] += 1
        return func(*args, **kwargs)


class PlacementChecker:
    """State of one :func:`check_placement` block: ``device``, ``collectives`` (name -> calls checked),
    ``host_reads`` (file:line -> count) and ``joined`` (the groups that have run a collective in the block)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.collectives: collections.Counter = collections.Counter()
        self.host_reads: collections.Counter = collections.Counter()
        self.joined: set = set()

    def check_group(self, name: str, original, args, kwargs) -> None:
        """Record the group of a collective; refuse a batched point-to-point call on a group not yet joined."""
        if name != "batch_isend_irecv":
            self.joined.add(_group_key(_call_group(original, args, kwargs)))
            return
        for op in (args[0] if args else kwargs.get("p2p_op_list", [])):
            if _group_key(op.group) not in self.joined:
                raise PlacementError("torch.distributed.batch_isend_irecv on a group that has run no collective yet: "
                                     "NCCL would create its communicator here, collectively, and a rank of the group "
                                     "that sends nothing now would block the others (warm the group up first, as "
                                     "vdit.distributed.build_mesh does)")

    def wrap(self, name: str, original):
        def checked(*args, **kwargs):
            for tensor in _tensors(list(args) + list(kwargs.values())):
                if tensor.device.type != self.device.type:
                    raise PlacementError(f"torch.distributed.{name} got a tensor on {tensor.device}, not on the "
                                         f"data's device {self.device} (NCCL takes CUDA tensors only)")
            self.check_group(name, original, args, kwargs)
            self.collectives[name] += 1
            return original(*args, **kwargs)

        checked.__wrapped__ = original
        return checked


@contextlib.contextmanager
def check_placement(device: str | torch.device) -> Iterator[PlacementChecker]:
    """Check every collective made inside the block against the data's ``device`` (module docstring);
    yields the :class:`PlacementChecker`."""
    checker = PlacementChecker(device)
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
    for name, original in originals.items():
        setattr(dist, name, checker.wrap(name, original))
    try:
        with _Mode(checker):
            yield checker
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def placement_checking_requested() -> bool:
    """True when ``VDIT_CHECK_PLACEMENT`` asks for :func:`check_placement` in the entry points."""
    return os.environ.get("VDIT_CHECK_PLACEMENT", "0") not in ("", "0")
