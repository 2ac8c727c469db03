"""Functional API of vdit: validated, differentiable, backend-dispatched ops.

See ARCHITECTURE.md for the contract. Every op takes ``backend="auto"`` (see :mod:`vdit.backends`).
"""
from vdit.ops import reference
from vdit.ops.patchify import patchify_3d, unpatchify_3d

__all__ = ["reference", "patchify_3d", "unpatchify_3d"]
