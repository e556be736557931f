// Sinusoidal timestep embedding, C++ CPU kernel.
//
//   out[n, cos_column(i)] = cos(scale * t[n] * freq_i),  i < dim / 2
//   out[n, sin_column(i)] = sin(scale * t[n] * freq_i)
//   out[n, dim - 1]       = 0 when dim is odd
// Memory: N * sizeof(t) read, N * dim * sizeof(out) written. FLOPs: ~N * dim
// transcendentals. Parallel over rows.
#include <vector>

#include "common/checks.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

// sin and cos of x, branch-free so the row loop vectorizes (libm's sincosf is
// a scalar call). The argument is reduced in double, x - j * pi/2 with
// j = round(x * 2/pi), exact enough for any float x below 2^30; on the
// remainder |r| <= pi/4 the Cephes single-precision polynomials are within
// ~1 ulp. Then the quadrant j mod 4 rotates (sin r, cos r).
inline void sincos_simd(float x, float* sin_out, float* cos_out) {
  constexpr double kTwoOverPi = 0.63661977236758134308;
  constexpr double kPiOver2Hi = 1.5707963267341256;       // pi/2 = hi + lo
  constexpr double kPiOver2Lo = 6.077100506506192e-11;
  constexpr double kRoundMagic = 6755399441055744.0;      // 1.5 * 2^52: round to integer
  const double xd = x;
  const double j = (xd * kTwoOverPi + kRoundMagic) - kRoundMagic;
  const float r = static_cast<float>((xd - j * kPiOver2Hi) - j * kPiOver2Lo);
  const int quadrant = static_cast<int>(j) & 3;
  const float r2 = r * r;
  const float sin_r = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float cos_r = 1.0f - 0.5f * r2 +
                      r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const bool swap = quadrant & 1;
  const float s = swap ? cos_r : sin_r;
  const float c = swap ? sin_r : cos_r;
  *sin_out = (quadrant & 2) ? -s : s;
  *cos_out = ((quadrant + 1) & 2) ? -c : c;
}

template <typename T, typename Out>
void timestep_embedding_rows(const T* t, Out* out, int64_t begin, int64_t end,
                             const common::TimestepParams& p) {
  std::vector<float> freq(p.half), cos_buf(p.half), sin_buf(p.half);
  for (int i = 0; i < p.half; ++i) freq[i] = common::timestep_frequency(i, p);
  for (int64_t n = begin; n < end; ++n) {
    const float tn = static_cast<float>(t[n]);
#pragma omp simd
    for (int i = 0; i < p.half; ++i) {
      sincos_simd(p.scale * (tn * freq[i]), &sin_buf[i], &cos_buf[i]);
    }
    Out* row = out + n * p.dim;
    for (int i = 0; i < p.half; ++i) {
      row[common::cos_column(i, p)] = static_cast<Out>(cos_buf[i]);
      row[common::sin_column(i, p)] = static_cast<Out>(sin_buf[i]);
    }
    if (p.dim % 2) row[p.dim - 1] = Out(0);
  }
}

}  // namespace

Tensor timestep_embedding_cpu(const Tensor& t, int64_t dim, double max_period,
                              bool flip_sin_to_cos, double downscale_freq_shift, double scale,
                              ScalarType dtype) {
  const auto p = check_timestep_args(t, DeviceType::CPU, dim, max_period, flip_sin_to_cos,
                                     downscale_freq_shift, scale);
  const Tensor tc = contiguous(t);
  Tensor out = new_empty(tc, {tc.size(0), dim}, dtype);
  const int64_t grain = std::max<int64_t>(1, 16384 / dim);
  VQK_DISPATCH_FLOATING_AND_INTEGRAL(tc.scalar_type(), "timestep_t", [&] {
    using T = scalar_t;
    VQK_DISPATCH_FLOATING(dtype, "timestep_out", [&] {
      const T* tp = cdata<T>(tc);
      scalar_t* op = data<scalar_t>(out);
      torch::stable::parallel_for(0, tc.size(0), grain, [&](int64_t begin, int64_t end) {
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
