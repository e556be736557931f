// ATen-facing launchers of the CUDA kernels: tensors in, raw pointers out.
// Compiled by the host compiler; the kernels themselves live in the .cu files.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/checks.h"
#include "kernels.h"
#include "vqkernels.h"

namespace vqkernels {

at::Tensor timestep_embedding_cuda(const at::Tensor& t, int64_t dim, double max_period,
                                   bool flip_sin_to_cos, double downscale_freq_shift,
                                   double scale, at::ScalarType dtype) {
  VQK_CHECK_DEVICE(t, at::kCUDA);
  TORCH_CHECK(t.dim() == 1, "t must be 1-D, got ", t.dim(), " dims");
  const auto p = make_timestep_params(dim, max_period, flip_sin_to_cos, downscale_freq_shift, scale);
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor tc = t.contiguous();
  at::Tensor out = at::empty({tc.size(0), dim}, tc.options().dtype(dtype));
  C10_CUDA_CHECK(cuda::launch_timestep_embedding(tc.const_data_ptr(), to_dtype(tc.scalar_type()),
                                                 out.mutable_data_ptr(), to_dtype(dtype),
                                                 tc.size(0), p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace vqkernels
