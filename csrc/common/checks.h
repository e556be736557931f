#pragma once
// Checks shared by the ATen-facing launchers (host code that includes torch).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>

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

// The embedding's parameters, after checking them and t: 1-D, on `device`.
inline common::TimestepParams check_timestep_args(const at::Tensor& t, at::DeviceType device,
                                                  int64_t dim, double max_period,
                                                  bool flip_sin_to_cos,
                                                  double downscale_freq_shift, double scale) {
  VQK_CHECK_DEVICE(t, device);
  TORCH_CHECK(t.dim() == 1, "t must be 1-D, got ", t.dim(), " dims");
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

// What would crash the attention kernels (the rest is validated in
// vqkernels/ops/attention.py): q (B, H, Sq, d), k and v (B, H, Sk, d) sharing
// q's B, H, d, dtype and device, each with unit stride along d (any other
// strides), and at least one key when there are queries.
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "q, k, v must be 4-D (B, H, S, d), got ", q.dim(), ", ", k.dim(), " and ", v.dim(),
              " dims");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have one shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "q ", q.sizes(), " and k ", k.sizes(), " must share B, H and d");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              " and ", v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "q, k, v must be on one device, got ", q.device(), ", ", k.device(), " and ",
              v.device());
  for (const at::Tensor* x : {&q, &k, &v})
    TORCH_CHECK(x->size(3) <= 1 || x->stride(3) == 1, "q, k, v need unit stride along d");
  TORCH_CHECK(k.size(2) >= 1 || q.size(0) * q.size(1) * q.size(2) == 0,
              "k and v need at least one key when there are queries");
}

// check_attention_args, and grad_out and out like q (unit stride along d), lse
// (B, H, Sq) in fp32 (fp64 for fp64 q) on q's device.
inline void check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& out, const at::Tensor& lse) {
  check_attention_args(q, k, v);
  for (const auto& [x, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    TORCH_CHECK(x->sizes() == q.sizes(), name, " must have q's shape ", q.sizes(), ", got ",
                x->sizes());
    TORCH_CHECK(x->scalar_type() == q.scalar_type() && x->device() == q.device(), name,
                " must have q's dtype and device");
    TORCH_CHECK(x->size(3) <= 1 || x->stride(3) == 1, name, " needs unit stride along d");
  }
  const at::ScalarType lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              "lse must be (B, H, Sq) = ", q.sizes().slice(0, 3), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype && lse.device() == q.device(), "lse must be ",
              lse_dtype, " on q's device, got ", lse.scalar_type(), " on ", lse.device());
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
    TORCH_CHECK(uncond->scalar_type() == cond.scalar_type(), "uncond must have cond's dtype");
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
          uncond ? uncond->stride(0) : 0,
          alphas_cumprod.const_data_ptr<float>(), timesteps.const_data_ptr<int64_t>(),
          timesteps.stride(0), maybe(variance_noise),
          variance_noise && variance_noise->scalar_type() == at::kFloat,
          static_cast<const int64_t*>(maybe(noise_seed)),
          static_cast<const float*>(maybe(threshold)),
          prev.numel() ? prev.mutable_data_ptr() : nullptr,
          x0.numel() ? x0.mutable_data_ptr() : nullptr};
}

}  // namespace vqkernels
