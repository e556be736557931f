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
// vqkernels/ops/flash_attention.py): q (B, H, Sq, d), k and v (B, H, Sk, d) sharing
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

}  // namespace vqkernels
