"""SwapState: the undo log, the scoped patches and the report bookkeeping of one swapped model.

Bookkeeping and torch.compile: the report's counters are Python dicts. Code that dynamo traces and that
reads or grows such a dict gets guards on its keys and length, which change after the first call, so a
second call would recompile (and fail under ``error_on_recompile`` / a ``recompile_limit`` of 1). Every
counting hook therefore returns at once while dynamo traces (:func:`torch.compiler.is_compiling`): runs
under torch.compile are not counted, and the report says so.
"""
from __future__ import annotations

import torch
from torch import nn

from vdit.swap.attention import VditAttentionMode
from vdit.swap.report import SwapReport
from vdit.swap.sparse import SparseRouting

ATTR = "_vdit_swap"  # where a swapped model keeps its state


def _count_hook(calls, key: str):
    """A forward hook counting ``key`` in ``calls``, except inside a compiled graph (see the module doc)."""

    def hook(module, args, out):
        if not torch.compiler.is_compiling():
            calls[key] += 1

    return hook


class SwapState:
    """Undo log and scoped patches of one swapped model (stored as ``model._vdit_swap``)."""

    def __init__(self, report: SwapReport):
        self.report = report
        self.undo: list = []  # callables, run in reverse by unswap
        self.scoped: list[tuple[object, str, object]] = []  # (owner, attr, replacement) set during forward
        self.mode: VditAttentionMode | None = None
        self.sparse: SparseRouting | None = None  # block-sparse self-attention, if asked for
        self._saved: list = []
        self._depth = 0

    def replace_module(self, model: nn.Module, path: str, new: nn.Module) -> None:
        """Put ``new`` at ``path`` (its runs counted in the report as ``module:<path>``); unswap restores the old."""
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name)
        setattr(parent, name, new)
        self.undo.append(lambda: setattr(parent, name, old))
        self.count_runs(new, path)

    def set_class(self, module: nn.Module, cls: type, path: str) -> None:
        """Give ``module`` the class ``cls`` (a subclass of its own) now, its runs counted as ``module:<path>``;
        unswap restores the old class. The module object, its parameters and hooks stay."""
        old = module.__class__
        module.__class__ = cls
        self.undo.append(lambda: setattr(module, "__class__", old))
        self.count_runs(module, path)

    def count_runs(self, module: nn.Module, path: str) -> None:
        """Count each eager run of ``module`` in the report (``module:<path>``) until unswap."""
        handle = module.register_forward_hook(_count_hook(self.report.calls, f"module:{path}"))
        self.undo.append(handle.remove)

    def set_attr(self, owner, name: str, value) -> None:
        """Set ``owner.name`` now and restore it on unswap."""
        had = name in vars(owner) if hasattr(owner, "__dict__") else False
        old = vars(owner).get(name) if had else None
        setattr(owner, name, value)
        self.undo.append(lambda: setattr(owner, name, old) if had else delattr(owner, name))

    def forward_started(self) -> None:
        """The model's forward begins: the report's last-forward counts start here (eager runs only)."""
        if not torch.compiler.is_compiling():
            self.report.forward_started()

    # Entered and left around the model's forward and its blocks by hooks (see vdit.swap._install_hooks).
    def enter(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        saved = []
        for owner, attr, new in self.scoped:
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, new)
        self._saved = saved
        if self.mode is not None:
            self.mode.__enter__()

    def exit(self) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
        for owner, attr, old in reversed(self._saved):
            setattr(owner, attr, old)
        self._saved = []
