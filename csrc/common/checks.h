#pragma once
// Checks shared by the ATen-facing launchers (host code that includes torch).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string_view>

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

}  // namespace vqkernels
