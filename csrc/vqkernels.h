#pragma once
// The C++ API of vqkernels: what the Python bindings register as torch ops and
// what LibTorch users of the CMake library call. Inputs are validated in
// Python (vqkernels/ops/); these entry points only check what would otherwise
// crash (device, dtype, contiguity).
#include <ATen/core/Tensor.h>

namespace vqkernels {

// Sinusoidal timestep embedding (see vqkernels/reference/timestep.py).
at::Tensor timestep_embedding_cpu(const at::Tensor& t, int64_t dim, double max_period,
                                  bool flip_sin_to_cos, double downscale_freq_shift,
                                  double scale, at::ScalarType dtype);
#ifdef VQKERNELS_WITH_CUDA
at::Tensor timestep_embedding_cuda(const at::Tensor& t, int64_t dim, double max_period,
                                   bool flip_sin_to_cos, double downscale_freq_shift,
                                   double scale, at::ScalarType dtype);
#endif

// Build facts, for vqkernels.info().
bool built_with_cuda();
bool built_with_openmp();

}  // namespace vqkernels
