"""Kernel layer: Triton kernels (``vdit.kernels.triton``); C++/CUDA kernels live in ``csrc/``; every
operator schema in :mod:`vdit.kernels.schemas`."""

# The GPU kernels (CUDA C++ and Triton) hold a head row, or a head-dim tile, in registers; head dims
# above this run on the CPU kernels or the reference. csrc/rope/cuda.cu has the same limit (kMaxHeadDim).
MAX_GPU_HEAD_DIM = 256
