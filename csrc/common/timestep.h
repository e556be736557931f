#pragma once
#include <math.h>

#include "macros.h"

namespace vqkernels::common {

// Sinusoidal timestep embedding, one (row, frequency) pair:
//   freq_i = exp(-log(max_period) * i / (half - downscale_freq_shift))
//   arg    = scale * (t * freq_i)
// The operation order follows DiT and diffusers in float32, so the kernels
// agree with the float32 PyTorch formula to the last ulp of `arg`.
struct TimestepParams {
  int dim;                 // output width; a zero column is appended when odd
  int half;                // dim / 2 frequencies
  float neg_log_max_period;  // -log(max_period), rounded once to float
  float freq_denominator;  // half - downscale_freq_shift, never zero
  float scale;
  bool flip_sin_to_cos;    // [cos, sin] when true, else [sin, cos]
};

VQK_HOST_DEVICE float timestep_frequency(int i, const TimestepParams& p) {
  return expf(p.neg_log_max_period * static_cast<float>(i) / p.freq_denominator);
}

VQK_HOST_DEVICE float timestep_argument(float t, int i, const TimestepParams& p) {
  return p.scale * (t * timestep_frequency(i, p));
}

// Output columns of the cosine and the sine of frequency i.
VQK_HOST_DEVICE int cos_column(int i, const TimestepParams& p) {
  return p.flip_sin_to_cos ? i : p.half + i;
}
VQK_HOST_DEVICE int sin_column(int i, const TimestepParams& p) {
  return p.flip_sin_to_cos ? p.half + i : i;
}

}  // namespace vqkernels::common
