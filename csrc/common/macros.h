#pragma once
// Shared by the C++ CPU kernels and the CUDA kernels: math marked for host and
// device lives once in csrc/common/ so the CPU tests exercise it too.

#if defined(__CUDACC__)
#define VQK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VQK_HOST_DEVICE inline
#endif
