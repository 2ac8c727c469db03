"""Old import paths of the demo application, kept working.

The demo (shapes dataset, text encoder, TextToVideo pipeline, checkpoints, video I/O, CLIs) used to live
beside the kernel library and now lives in ``vdit.demo``. :data:`ALIASES` maps each old module name to its
new one; :class:`AliasFinder`, installed by ``vdit/__init__.py``, makes ``import <old name>`` return the new
module itself (so ``vdit.checkpoint.CheckpointError is vdit.demo.checkpoint.CheckpointError``) and runs the
new module's code for ``python -m <old name>``. The demo is imported only when an old name is, so the
library never imports it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

ALIASES = {
    "vdit.checkpoint": "vdit.demo.checkpoint",
    "vdit.data": "vdit.demo.data",
    "vdit.data.shapes": "vdit.demo.data",
    "vdit.eval_demo": "vdit.demo.cli.eval",
    "vdit.generate": "vdit.demo.cli.generate",
    "vdit.io": "vdit.demo.video_io",
    "vdit.io.video": "vdit.demo.video_io",
    "vdit.models.text": "vdit.demo.text",
    "vdit.pipelines": "vdit.demo.pipeline",
    "vdit.pipelines.text_to_video": "vdit.demo.pipeline",
    "vdit.train": "vdit.demo.cli.train",
}


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path finder and loader of the names in :data:`ALIASES`."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in ALIASES:
            return None
        # The origin is the new module's file: runpy sets __file__ from it for ``python -m <old name>``.
        # (Finding it imports the new module's parent packages, not the module itself.)
        new = importlib.util.find_spec(ALIASES[fullname])
        return importlib.machinery.ModuleSpec(fullname, self, origin=new.origin if new else None)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(ALIASES[spec.name])
        # An old package and its old submodule share one new module (vdit.io, vdit.io.video), which is not a
        # package: the import system cannot find the submodule through it, so it is registered here, and
        # bound as the attribute that ``import vdit.io.video`` then reads (vdit.io.video.save_video).
        for old, new in ALIASES.items():
            parent, _, child = old.rpartition(".")
            if parent == spec.name and new == ALIASES[spec.name]:
                sys.modules.setdefault(old, module)
                setattr(module, child, module)
        spec.loader_state = module.__spec__  # the import system overwrites module.__spec__ with ``spec``
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """The module ran when it was imported under its new name: only give it back its own spec."""
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname: str) -> types.CodeType | None:
        """The new module's code (what ``python -m <old name>`` runs as ``__main__``)."""
        new = importlib.util.find_spec(ALIASES[fullname])
        return new.loader.get_code(new.name)


def install() -> None:
    """Put an :class:`AliasFinder` first on ``sys.meta_path`` (once): before the path finders, which would
    take a leftover directory of an old package for a namespace package."""
    if not any(isinstance(finder, AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())
