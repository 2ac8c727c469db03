"""Kernel layer: Triton kernels (``vdit.kernels.triton``); C++/CUDA kernels live in ``csrc/``."""
