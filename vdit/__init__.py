"""vdit: fast kernels for video diffusion transformers.

Import ``vdit.ops`` for the functional API and ``vdit.nn`` for drop-in modules. ``vdit.demo`` is a small
text-to-video application built on the library; the library never imports it.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from vdit import (
           ops,
           swap,  # noqa: E402  (callable package: vdit.swap(model) == vdit.swap.swap(model))
)
from vdit._extension import build_info
from vdit.backends import BACKENDS, BackendUnavailableError, use_backend
from vdit.ops import SparsePattern, plan
from vdit.swap import SwapReport, unswap  # noqa: E402

__version__ = "0.1.0"
__all__ = ["build_info", "plan", "SparsePattern", "use_backend", "BACKENDS", "BackendUnavailableError", "ops", "swap",
           "unswap", "SwapReport", "__version__"]
