// Sinusoidal timestep embedding, C++ CPU kernel.
//
//   out[n, cos_column(i)] = cos(scale * t[n] * freq_i),  i < dim / 2
//   out[n, sin_column(i)] = sin(scale * t[n] * freq_i)
//   out[n, dim - 1]       = 0 when dim is odd
// Memory: N * sizeof(t) read, N * dim * sizeof(out) written. FLOPs: ~N * dim
// transcendentals. Parallel over rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common/checks.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

template <typename T, typename Out>
void timestep_embedding_rows(const T* t, Out* out, int64_t begin, int64_t end,
                             const common::TimestepParams& p) {
  for (int64_t n = begin; n < end; ++n) {
    const float tn = static_cast<float>(t[n]);
    Out* row = out + n * p.dim;
    for (int i = 0; i < p.half; ++i) {
      const float arg = common::timestep_argument(tn, i, p);
      row[common::cos_column(i, p)] = static_cast<Out>(std::cos(arg));
      row[common::sin_column(i, p)] = static_cast<Out>(std::sin(arg));
    }
    if (p.dim % 2) row[p.dim - 1] = Out(0);
  }
}

}  // namespace

at::Tensor timestep_embedding_cpu(const at::Tensor& t, int64_t dim, double max_period,
                                  bool flip_sin_to_cos, double downscale_freq_shift,
                                  double scale, at::ScalarType dtype) {
  VQK_CHECK_DEVICE(t, at::kCPU);
  TORCH_CHECK(t.dim() == 1, "t must be 1-D, got ", t.dim(), " dims");
  const auto p = make_timestep_params(dim, max_period, flip_sin_to_cos, downscale_freq_shift, scale);
  const at::Tensor tc = t.contiguous();
  at::Tensor out = at::empty({tc.size(0), dim}, tc.options().dtype(dtype));
  const int64_t grain = std::max<int64_t>(1, 16384 / dim);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, tc.scalar_type(), "timestep_t", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "timestep_out", [&] {
      const T* tp = tc.const_data_ptr<T>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, tc.size(0), grain, [&](int64_t begin, int64_t end) {
        timestep_embedding_rows(tp, op, begin, end, p);
      });
    });
  });
  return out;
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

bool built_with_cuda() {
#ifdef VQKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace vqkernels
