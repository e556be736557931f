#pragma once
// One DDIM step, per sample and per element (math of
// vqkernels/reference/ddim.py::ddim_step, in float32, in the same order).
// Shared by the C++ CPU and the CUDA kernel; the Triton kernel mirrors it.
#include <math.h>
#include <stdint.h>

#include "dtype.h"
#include "macros.h"

namespace vqkernels::common {

enum class Prediction : int { Epsilon = 0, Sample = 1, VPrediction = 2 };

struct DdimParams {
  int64_t num_train_timesteps;  // length of the alphas_cumprod table
  int64_t step_ratio;           // prev_t = t - step_ratio
  float final_alpha_cumprod;    // a_prev where prev_t < 0
  float eta;
  Prediction prediction;
  bool clip_sample;
  float clip_sample_range;
  bool use_clipped_model_output;
  float guidance_scale;   // guided = uncond + s * (cond - uncond), when there is an uncond
  int64_t guided_elems;   // per sample, the first guided_elems elements are guided (channels * L)
};

// What one sample's step needs from the noise tables (timestep t, alphas a).
struct DdimCoefficients {
  float sqrt_alpha;       // sqrt(a_t)
  float sqrt_beta;        // sqrt(1 - a_t)
  float sqrt_alpha_prev;  // sqrt(a_prev)
  float direction;        // sqrt(max(1 - a_prev - std^2, 0))
  float noise_std;        // eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
};

// a_t = table[t], a_prev = table[t - step_ratio] or final_alpha_cumprod past
// the start. A timestep outside [0, T) gives NaN coefficients, so a bad
// device-side timestep shows up as NaN output rather than a wild read.
VQK_HOST_DEVICE DdimCoefficients ddim_coefficients(const float* alphas_cumprod, int64_t t,
                                                   const DdimParams& p) {
  if (t < 0 || t >= p.num_train_timesteps) {
    const float nan = NAN;
    return {nan, nan, nan, nan, nan};
  }
  const int64_t prev_t = t - p.step_ratio;
  const float a_t = alphas_cumprod[t];
  const float a_prev = prev_t >= 0 ? alphas_cumprod[prev_t] : p.final_alpha_cumprod;
  const float b_t = 1.0f - a_t;
  const float variance = (1.0f - a_prev) / b_t * (1.0f - a_t / a_prev);
  const float std = p.eta * sqrtf(variance);
  return {sqrtf(a_t), sqrtf(b_t), sqrtf(a_prev), sqrtf(fmaxf(1.0f - a_prev - std * std, 0.0f)),
          std};
}

// The element-wise math below is written once for T = float (CUDA, scalar
// tails) and T = a SIMD vector of floats (the CPU kernel's lanes): only
// arithmetic and selects, so every lane takes the same path.

template <typename T>
VQK_HOST_DEVICE T cfg_guide(T cond, T uncond, float guidance_scale) {
  return uncond + guidance_scale * (cond - uncond);
}

// The predicted clean sample x0, before clipping, from x_t and the model output.
template <typename T>
VQK_HOST_DEVICE T ddim_x0(T x, T out, const DdimCoefficients& c, Prediction kind) {
  switch (kind) {
    case Prediction::Epsilon: return (x - c.sqrt_beta * out) / c.sqrt_alpha;
    case Prediction::Sample: return out;
    default: return c.sqrt_alpha * x - c.sqrt_beta * out;
  }
}

// The predicted noise eps, from the model output and the unclipped x0.
template <typename T>
VQK_HOST_DEVICE T ddim_eps(T x, T out, T x0, const DdimCoefficients& c, Prediction kind) {
  switch (kind) {
    case Prediction::Epsilon: return out;
    case Prediction::Sample: return (x - c.sqrt_alpha * x0) / c.sqrt_beta;
    default: return c.sqrt_alpha * out + c.sqrt_beta * x;
  }
}

// x clamped to [-r, r] with NaN kept, as torch.clamp (fminf / fmaxf would
// drop it). T{} + v is v, broadcast to every lane when T is a vector.
template <typename T>
VQK_HOST_DEVICE T clamp_propagating_nan(T x, float r) {
  const T lo = T{} + (-r), hi = T{} + r;
  return x < lo ? lo : (x > hi ? hi : x);
}

// x0 clipped to [-r, r], or dynamically thresholded by the sample's s >= 1
// (clamp to [-s, s], divide by s) when threshold > 0 or NaN (a NaN sample's
// threshold: its output is NaN, as the reference's).
template <typename T>
VQK_HOST_DEVICE T ddim_limit_x0(T x0, float threshold, const DdimParams& p) {
  if (!(threshold <= 0.0f)) return clamp_propagating_nan(x0, threshold) / threshold;
  if (p.clip_sample) return clamp_propagating_nan(x0, p.clip_sample_range);
  return x0;
}

template <typename T>
struct DdimElement {
  T x0;    // the predicted clean sample, clipped / thresholded
  T prev;  // x_prev = sqrt(a_prev) * x0 + direction * eps + std * noise
};

// One element's step from x_t, the (guided) model output and its noise (0
// when there is none); threshold as in ddim_limit_x0.
template <typename T>
VQK_HOST_DEVICE DdimElement<T> ddim_element(T x, T out, T noise, float threshold,
                                            const DdimCoefficients& c, const DdimParams& p) {
  const T x0_raw = ddim_x0(x, out, c, p.prediction);
  const T x0 = ddim_limit_x0(x0_raw, threshold, p);
  const T eps = p.use_clipped_model_output ? (x - c.sqrt_alpha * x0) / c.sqrt_beta
                                           : ddim_eps(x, out, x0_raw, c, p.prediction);
  return {x0, c.sqrt_alpha_prev * x0 + c.direction * eps + c.noise_std * noise};
}

// The tensors of one step, as raw pointers: sample (B, M) contiguous, the
// model output's cond and uncond rows, each with its own row stride, timesteps
// (B,) with a stride, the float32 table; nullptr for what is absent (uncond,
// noise, seed, threshold) or not written (prev, x0).
struct DdimPointers {
  const void* sample;
  const void* cond;
  const void* uncond;
  int64_t cond_stride;
  int64_t uncond_stride;
  const float* alphas_cumprod;
  const int64_t* timesteps;
  int64_t timestep_stride;
  const void* noise;       // given noise, like sample or float32
  bool noise_float32;      // the given noise is float32
  const int64_t* seed;     // Philox key of in-kernel noise
  const float* threshold;  // (B,) dynamic-thresholding scale
  void* prev;
  void* x0;
};

// One checked step, all that a launcher needs: built once from the op's
// arguments by vqkernels::ddim_step (csrc/cpu/ddim.cpp), run by the C++ CPU
// kernel or the CUDA one.
struct DdimStep {
  DdimParams params;
  DdimPointers ptr;
  int64_t batch;       // B samples
  int64_t elems;       // M elements per sample
  DType sample_dtype;  // of sample, prev, x0 and noise that is not float32
  DType output_dtype;  // of cond and uncond
};

}  // namespace vqkernels::common
