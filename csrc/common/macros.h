#pragma once
// Shared by the C++ CPU kernels and the CUDA kernels: math marked for host and
// device lives once in csrc/common/ so the CPU tests exercise it too.
//
// On the host the functions are forced inline: the CPU kernels call them from
// ISA-specific functions (target attributes) with SIMD vector arguments, where
// an out-of-line call would drop to the baseline ISA and its vector ABI.

#if defined(__CUDACC__)
#define VQK_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define VQK_HOST_DEVICE inline __attribute__((always_inline))
#else
#define VQK_HOST_DEVICE inline
#endif
