#pragma once
// Checks shared by the ATen-facing launchers (host code that includes torch).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace vqkernels
