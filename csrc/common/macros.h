// Portability macros for code shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define VDIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VDIT_HOST_DEVICE inline
#endif
