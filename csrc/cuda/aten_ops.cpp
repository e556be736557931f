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

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                     const at::Tensor& codebook_sqnorm,
                                                     std::string_view precision) {
  VQK_CHECK_DEVICE(z, at::kCUDA);
  VQK_CHECK_DEVICE(codebook, at::kCUDA);
  TORCH_CHECK(z.device() == codebook.device(), "z and codebook must be on the same device, got ",
              z.device(), " and ", codebook.device());
  check_nearest_code_args(z, codebook, codebook_sqnorm, precision);
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf ||
                  z.scalar_type() == at::kBFloat16,
              "nearest_code on CUDA takes float32, float16 or bfloat16, got ", z.scalar_type());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), ec = codebook.contiguous();
  const int64_t n = zc.size(0);
  at::Tensor indices = at::empty({n}, zc.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, zc.options().dtype(at::kFloat));
  if (n == 0) return {indices, distances};
  // One packed (score, index) key per row: the search merges its code splits there.
  at::Tensor keys = at::empty({n}, zc.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::launch_nearest_code(
      zc.const_data_ptr(), ec.const_data_ptr(), to_dtype(zc.scalar_type()), n, ec.size(0),
      zc.size(1), reinterpret_cast<unsigned long long*>(keys.mutable_data_ptr<int64_t>()),
      indices.mutable_data_ptr<int64_t>(), distances.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream()));
  return {indices, distances};
}

}  // namespace vqkernels
