// The torch op schemas of vqkernels and their CPU / CUDA implementations.
// Registered with the dispatcher, so the ops work from Python (torch.ops.vqkernels.*),
// under torch.compile (fake kernels are registered in vqkernels/ops/), and from
// LibTorch programs that link the CMake library.
#include <torch/library.h>

#include "vqkernels.h"

TORCH_LIBRARY(vqkernels, m) {
  m.def(
      "timestep_embedding(Tensor t, int dim, float max_period, bool flip_sin_to_cos, "
      "float downscale_freq_shift, float scale, ScalarType dtype) -> Tensor");
  m.def(
      "nearest_code(Tensor z, Tensor codebook, Tensor codebook_sqnorm, str precision) -> "
      "(Tensor indices, Tensor distances)");
}

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("timestep_embedding", &vqkernels::timestep_embedding_cpu);
  m.impl("nearest_code", &vqkernels::nearest_code_cpu);
}

#ifdef VQKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(vqkernels, CUDA, m) {
  m.impl("timestep_embedding", &vqkernels::timestep_embedding_cuda);
  m.impl("nearest_code", &vqkernels::nearest_code_cuda);
}
#endif
