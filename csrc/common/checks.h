#pragma once
// Checks shared by the ATen-facing launchers (host code that includes torch).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

#include "ddim.h"
#include "dtype.h"
#include "timestep.h"

namespace vqkernels {

#define VQK_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kInt: return DType::Int32;
    case at::kLong: return DType::Int64;
    default: TORCH_CHECK(false, "vqkernels: unsupported dtype ", s);
  }
}

inline common::TimestepParams make_timestep_params(int64_t dim, double max_period,
                                                    bool flip_sin_to_cos,
                                                    double downscale_freq_shift, double scale) {
  TORCH_CHECK(dim >= 1 && dim <= (1 << 30), "dim must be in [1, 2^30], got ", dim);
  TORCH_CHECK(max_period > 0, "max_period must be positive, got ", max_period);
  const int half = static_cast<int>(dim / 2);
  const double denominator = half - downscale_freq_shift;
  TORCH_CHECK(half == 0 || denominator != 0, "downscale_freq_shift must differ from dim // 2");
  return {static_cast<int>(dim), half, static_cast<float>(-std::log(max_period)),
          static_cast<float>(denominator), static_cast<float>(scale), flip_sin_to_cos};
}

// What would crash the nearest_code kernels (the rest is validated in
// vqkernels/ops/): ranks, matching sizes and dtypes, the code indices (and
// their padding) fitting 32-bit lanes and keys, a known precision mode.
inline void check_nearest_code_args(const at::Tensor& z, const at::Tensor& codebook,
                                    const at::Tensor& codebook_sqnorm,
                                    std::string_view precision) {
  TORCH_CHECK(z.dim() == 2, "z must be 2-D (N, D), got ", z.dim(), " dims");
  TORCH_CHECK(codebook.dim() == 2, "codebook must be 2-D (K, D), got ", codebook.dim(), " dims");
  TORCH_CHECK(z.size(1) == codebook.size(1), "z and codebook must have the same D, got ",
              z.size(1), " and ", codebook.size(1));
  TORCH_CHECK(z.size(1) >= 1, "D must be at least 1");
  TORCH_CHECK(codebook.size(0) >= 1 && codebook.size(0) <= (int64_t{1} << 30),
              "codebook must have between 1 and 2^30 codes, got ", codebook.size(0));
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(),
              "z and codebook must have the same dtype, got ", z.scalar_type(), " and ",
              codebook.scalar_type());
  TORCH_CHECK(codebook_sqnorm.numel() == codebook.size(0), "codebook_sqnorm must have K = ",
              codebook.size(0), " elements, got ", codebook_sqnorm.numel());
  TORCH_CHECK(codebook_sqnorm.device() == codebook.device(),
              "codebook_sqnorm must be on the codebook's device");
  TORCH_CHECK(precision == "ieee" || precision == "tf32" || precision == "bf16",
              "precision must be \"ieee\", \"tf32\" or \"bf16\", got \"", precision, "\"");
}

// What would crash the DDIM step kernels (the rest is validated in
// vqkernels/ops/ddim.py); returns the step's parameters. Shapes: sample (B, M)
// contiguous, cond and uncond (B, >= M) with unit column stride, timesteps
// (B,) int64, alphas_cumprod (T,) fp32 contiguous, variance_noise like sample
// (its dtype or float32),
// noise_seed one int64, threshold (B,) fp32 contiguous; all on one device.
inline common::DdimParams check_ddim_args(
    const at::Tensor& sample, const at::Tensor& cond, const std::optional<at::Tensor>& uncond,
    const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
    const std::optional<at::Tensor>& variance_noise, const std::optional<at::Tensor>& noise_seed,
    const std::optional<at::Tensor>& threshold, int64_t step_ratio, double final_alpha_cumprod,
    double eta, std::string_view prediction_type, bool clip_sample, double clip_sample_range,
    bool use_clipped_model_output, double guidance_scale, int64_t guided_elems) {
  TORCH_CHECK(sample.dim() == 2 && sample.is_contiguous(), "sample must be a contiguous (B, M) tensor");
  const int64_t b = sample.size(0), m = sample.size(1);
  const auto same_device = [&](const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.device() == sample.device(), name, " must be on the sample's device ",
                sample.device(), ", got ", x.device());
  };
  const auto check_output = [&](const at::Tensor& x, const char* name) {
    same_device(x, name);
    TORCH_CHECK(x.dim() == 2 && x.size(0) == b && x.size(1) >= m && (x.size(1) <= 1 || x.stride(1) == 1),
                name, " must be (B, >= M) with unit column stride");
  };
  check_output(cond, "cond");
  if (uncond) {
    check_output(*uncond, "uncond");
    TORCH_CHECK(uncond->scalar_type() == cond.scalar_type() && uncond->stride(0) == cond.stride(0),
                "uncond must have cond's dtype and row stride");
  }
  same_device(timesteps, "timesteps");
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == b && timesteps.scalar_type() == at::kLong,
              "timesteps must be int64 (B,)");
  same_device(alphas_cumprod, "alphas_cumprod");
  TORCH_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.is_contiguous() &&
                  alphas_cumprod.scalar_type() == at::kFloat && alphas_cumprod.numel() >= 1,
              "alphas_cumprod must be a contiguous float32 (T,) table");
  if (variance_noise) {
    same_device(*variance_noise, "variance_noise");
    TORCH_CHECK(variance_noise->sizes() == sample.sizes() && variance_noise->is_contiguous() &&
                    (variance_noise->scalar_type() == sample.scalar_type() ||
                     variance_noise->scalar_type() == at::kFloat),
                "variance_noise must be contiguous, with the sample's shape and its dtype or float32");
  }
  if (noise_seed) {
    same_device(*noise_seed, "noise_seed");
    TORCH_CHECK(noise_seed->numel() == 1 && noise_seed->scalar_type() == at::kLong,
                "noise_seed must be one int64");
  }
  TORCH_CHECK(!(variance_noise && noise_seed), "give variance_noise or noise_seed, not both");
  if (threshold) {
    same_device(*threshold, "threshold");
    TORCH_CHECK(threshold->dim() == 1 && threshold->size(0) == b && threshold->is_contiguous() &&
                    threshold->scalar_type() == at::kFloat,
                "threshold must be a contiguous float32 (B,)");
  }
  TORCH_CHECK(b * std::max<int64_t>(m, 1) < (int64_t{1} << 31),
              "sample must have fewer than 2^31 elements (the noise counter is 32-bit)");
  TORCH_CHECK(step_ratio >= 1, "step_ratio must be >= 1, got ", step_ratio);
  TORCH_CHECK(guided_elems >= 0 && guided_elems <= m, "guided_elems must be in [0, M]");
  common::Prediction prediction;
  if (prediction_type == "epsilon") prediction = common::Prediction::Epsilon;
  else if (prediction_type == "sample") prediction = common::Prediction::Sample;
  else if (prediction_type == "v_prediction") prediction = common::Prediction::VPrediction;
  else TORCH_CHECK(false, "prediction_type must be epsilon, sample or v_prediction, got ", prediction_type);
  return {alphas_cumprod.numel(), step_ratio, static_cast<float>(final_alpha_cumprod),
          static_cast<float>(eta), prediction, clip_sample, static_cast<float>(clip_sample_range),
          use_clipped_model_output, static_cast<float>(guidance_scale),
          uncond ? guided_elems : 0};
}

// The step's outputs (prev, x0), each like sample, or empty (0,) when not written.
inline std::tuple<at::Tensor, at::Tensor> ddim_outputs(const at::Tensor& sample, bool write_prev,
                                                       bool write_x0) {
  const auto like_sample = [&](bool write) {
    return at::empty(write ? sample.sizes() : at::IntArrayRef{0}, sample.options());
  };
  return {like_sample(write_prev), like_sample(write_x0)};
}

// The raw pointers of a checked step; prev / x0 empty when not written.
inline common::DdimPointers ddim_pointers(
    const at::Tensor& sample, const at::Tensor& cond, const std::optional<at::Tensor>& uncond,
    const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
    const std::optional<at::Tensor>& variance_noise, const std::optional<at::Tensor>& noise_seed,
    const std::optional<at::Tensor>& threshold, at::Tensor& prev, at::Tensor& x0) {
  const auto maybe = [](const std::optional<at::Tensor>& x) { return x ? x->const_data_ptr() : nullptr; };
  return {sample.const_data_ptr(), cond.const_data_ptr(), maybe(uncond), cond.stride(0),
          alphas_cumprod.const_data_ptr<float>(), timesteps.const_data_ptr<int64_t>(),
          timesteps.stride(0), maybe(variance_noise),
          variance_noise && variance_noise->scalar_type() == at::kFloat,
          static_cast<const int64_t*>(maybe(noise_seed)),
          static_cast<const float*>(maybe(threshold)),
          prev.numel() ? prev.mutable_data_ptr() : nullptr,
          x0.numel() ? x0.mutable_data_ptr() : nullptr};
}

}  // namespace vqkernels
