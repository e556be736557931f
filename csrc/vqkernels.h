#pragma once
// The C++ API of vqkernels: what the Python bindings register as torch ops and
// what LibTorch users of the CMake library call. Inputs are validated in
// Python (vqkernels/ops/); these entry points only check what would otherwise
// crash (device, dtype, contiguity).
#include <ATen/core/Tensor.h>

#include <string_view>
#include <tuple>

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

// Nearest-codebook search (see vqkernels/reference/search.py, metric "l2"):
// (indices int64 (N,), exact squared distances (N,) fp32, fp64 for fp64 input)
// of z (N, D) against codebook (K, D) with codebook_sqnorm = ||e_k||^2 (K,)
// fp32. Ties go to the lowest index; csrc/common/search.h defines NaN / Inf
// rows. precision ("ieee", "tf32", "bf16") is a floor: these kernels compute
// in fp32 (fp64 on CPU for fp64 input) for every mode.
std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                    const at::Tensor& codebook_sqnorm,
                                                    std::string_view precision);
#ifdef VQKERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                     const at::Tensor& codebook_sqnorm,
                                                     std::string_view precision);
#endif

// Build facts, for vqkernels.info().
bool built_with_cuda();
bool built_with_openmp();

}  // namespace vqkernels
