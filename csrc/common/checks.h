#pragma once
// Checks shared by the launchers (host code on torch's stable ABI).
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string_view>
#include <utility>

#include "dtype.h"
#include "stable.h"
#include "timestep.h"

namespace vqkernels {

#define VQK_CHECK_DEVICE(x, dev) \
  VQK_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())

inline DType to_dtype(ScalarType s) {
  switch (s) {
    case ScalarType::Float: return DType::Float32;
    case ScalarType::Double: return DType::Float64;
    case ScalarType::Half: return DType::Float16;
    case ScalarType::BFloat16: return DType::BFloat16;
    case ScalarType::Int: return DType::Int32;
    case ScalarType::Long: return DType::Int64;
    default: throw std::runtime_error(str("vqkernels: unsupported dtype ", s));
  }
}

// The embedding's parameters, after checking them and t: 1-D, on `device`.
inline common::TimestepParams check_timestep_args(const Tensor& t, DeviceType device,
                                                  int64_t dim, double max_period,
                                                  bool flip_sin_to_cos,
                                                  double downscale_freq_shift, double scale) {
  VQK_CHECK_DEVICE(t, device);
  VQK_CHECK(t.dim() == 1, "t must be 1-D, got ", t.dim(), " dims");
  VQK_CHECK(dim >= 1 && dim <= (1 << 30), "dim must be in [1, 2^30], got ", dim);
  VQK_CHECK(max_period > 0, "max_period must be positive, got ", max_period);
  const int half = static_cast<int>(dim / 2);
  const double denominator = half - downscale_freq_shift;
  VQK_CHECK(half == 0 || denominator != 0, "downscale_freq_shift must differ from dim // 2");
  return {static_cast<int>(dim), half, static_cast<float>(-std::log(max_period)),
          static_cast<float>(denominator), static_cast<float>(scale), flip_sin_to_cos};
}

// What would crash the nearest_code kernels (the rest is validated in
// vqkernels/ops/): ranks, matching sizes and dtypes, the code indices (and
// their padding) fitting 32-bit lanes and keys, a known precision mode.
inline void check_nearest_code_args(const Tensor& z, const Tensor& codebook,
                                    const Tensor& codebook_sqnorm,
                                    std::string_view precision) {
  VQK_CHECK(z.dim() == 2, "z must be 2-D (N, D), got ", z.dim(), " dims");
  VQK_CHECK(codebook.dim() == 2, "codebook must be 2-D (K, D), got ", codebook.dim(), " dims");
  VQK_CHECK(z.size(1) == codebook.size(1), "z and codebook must have the same D, got ",
              z.size(1), " and ", codebook.size(1));
  VQK_CHECK(z.size(1) >= 1, "D must be at least 1");
  VQK_CHECK(codebook.size(0) >= 1 && codebook.size(0) <= (int64_t{1} << 30),
              "codebook must have between 1 and 2^30 codes, got ", codebook.size(0));
  VQK_CHECK(z.scalar_type() == codebook.scalar_type(),
              "z and codebook must have the same dtype, got ", z.scalar_type(), " and ",
              codebook.scalar_type());
  VQK_CHECK(codebook_sqnorm.numel() == codebook.size(0), "codebook_sqnorm must have K = ",
              codebook.size(0), " elements, got ", codebook_sqnorm.numel());
  VQK_CHECK(codebook_sqnorm.device() == codebook.device(),
              "codebook_sqnorm must be on the codebook's device");
  VQK_CHECK(precision == "ieee" || precision == "tf32" || precision == "bf16",
              "precision must be \"ieee\", \"tf32\" or \"bf16\", got \"", precision, "\"");
}

// The same for each stage of the residual search: one codebook (on z's device) and its
// norms a stage.
inline void check_residual_nearest_code_args(const Tensor& z, const std::vector<Tensor>& codebooks,
                                             const std::vector<Tensor>& codebook_sqnorms,
                                             std::string_view precision) {
  VQK_CHECK(!codebooks.empty(), "codebooks must hold at least one codebook");
  VQK_CHECK(codebook_sqnorms.size() == codebooks.size(), "codebook_sqnorms must have one ",
              "tensor a codebook (", codebooks.size(), "), got ", codebook_sqnorms.size());
  for (size_t q = 0; q < codebooks.size(); ++q) {
    VQK_CHECK(codebooks[q].device() == z.device(), "codebooks[", q, "] must be on z's device (",
                z.device(), "), got ", codebooks[q].device());
    check_nearest_code_args(z, codebooks[q], codebook_sqnorms[q], precision);
  }
}

// What would crash the attention kernels (the rest is validated in
// vqkernels/ops/flash_attention.py): q (B, H, Sq, d), k and v (B, H, Sk, d) sharing
// q's B, H, d, dtype and device, each with unit stride along d (any other
// strides), and at least one key when there are queries.
inline void check_attention_args(const Tensor& q, const Tensor& k, const Tensor& v) {
  VQK_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "q, k, v must be 4-D (B, H, S, d), got ", q.dim(), ", ", k.dim(), " and ", v.dim(),
              " dims");
  VQK_CHECK(same_sizes(k, v), "k and v must have one shape, got ", sizes(k), " and ",
              sizes(v));
  VQK_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "q ", sizes(q), " and k ", sizes(k), " must share B, H and d");
  VQK_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              " and ", v.scalar_type());
  VQK_CHECK(q.device() == k.device() && q.device() == v.device(),
              "q, k, v must be on one device, got ", q.device(), ", ", k.device(), " and ",
              v.device());
  for (const Tensor* x : {&q, &k, &v})
    VQK_CHECK(x->size(3) <= 1 || x->stride(3) == 1, "q, k, v need unit stride along d");
  VQK_CHECK(k.size(2) >= 1 || q.size(0) * q.size(1) * q.size(2) == 0,
              "k and v need at least one key when there are queries");
}

// check_attention_args, and grad_out and out like q (unit stride along d), lse
// (B, H, Sq) in fp32 (fp64 for fp64 q) on q's device.
inline void check_attention_backward_args(const Tensor& grad_out, const Tensor& q,
                                          const Tensor& k, const Tensor& v,
                                          const Tensor& out, const Tensor& lse) {
  check_attention_args(q, k, v);
  for (const auto& [x, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    VQK_CHECK(same_sizes(*x, q), name, " must have q's shape ", sizes(q), ", got ", sizes(*x));
    VQK_CHECK(x->scalar_type() == q.scalar_type() && x->device() == q.device(), name,
                " must have q's dtype and device");
    VQK_CHECK(x->size(3) <= 1 || x->stride(3) == 1, name, " needs unit stride along d");
  }
  const ScalarType lse_dtype =
      q.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  VQK_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              "lse must be (B, H, Sq) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
              sizes(lse));
  VQK_CHECK(lse.scalar_type() == lse_dtype && lse.device() == q.device(), "lse must be ",
              lse_dtype, " on q's device, got ", lse.scalar_type(), " on ", lse.device());
}

// The sizes of an adaLN-family call: x (B, T, D), the conditioning (shift,
// scale, gate) per sample (B, D) or per token (B, T, D).
struct AdalnSizes {
  int64_t batch, tokens, dim;
  bool per_token;
};

// Element strides between rows (b, t) of a (B, T, D) tensor, or of a
// per-sample (B, D) one (token stride 0: every token reads its sample's row).
struct RowStrides {
  int64_t batch, token;
};
inline RowStrides row_strides(const Tensor& t) {
  return {t.stride(0), t.dim() == 3 ? t.stride(1) : 0};
}

// An argument and its name in messages; tensor is null for an optional one not given.
struct NamedTensor {
  const Tensor* tensor;
  const char* name;
};
inline const Tensor* given(const std::optional<Tensor>& t) { return t ? &*t : nullptr; }

// The dtype of adaLN statistics (mean, rstd) and sums: float64 for float64 x, else float32.
inline ScalarType adaln_stat_dtype(const Tensor& x) {
  return x.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// What would crash the adaLN kernels (the rest is validated in
// vqkernels/ops/adaln.py): x (B, T, D) on `device`; each of like_x of x's
// shape; each of params (B, D) or (B, T, D), all in one form; all of x's dtype
// and device, with unit stride along D.
inline AdalnSizes check_adaln_args(NamedTensor x, DeviceType device,
                                   std::initializer_list<NamedTensor> like_x,
                                   std::initializer_list<NamedTensor> params) {
  const Tensor& t = *x.tensor;
  VQK_CHECK(t.device().type() == device, x.name, " must be on ", device, ", got ", t.device());
  VQK_CHECK(t.dim() == 3, x.name, " must be 3-D (B, T, D), got ", t.dim(), " dims");
  const AdalnSizes s{t.size(0), t.size(1), t.size(2), params.begin()->tensor->dim() == 3};
  const auto check_like = [&](const Tensor& a, const char* name) {
    VQK_CHECK(a.scalar_type() == t.scalar_type() && a.device() == t.device(), name,
                " must have ", x.name, "'s dtype and device (", t.scalar_type(), " on ",
                t.device(), "), got ", a.scalar_type(), " on ", a.device());
    VQK_CHECK(dim_size(a, -1) <= 1 || dim_stride(a, -1) == 1, name, " needs unit stride along D");
  };
  check_like(t, x.name);
  for (const NamedTensor& a : like_x) {
    if (!a.tensor) continue;
    VQK_CHECK(same_sizes(*a.tensor, t), a.name, " must have ", x.name, "'s shape ", sizes(t),
              ", got ", sizes(*a.tensor));
    check_like(*a.tensor, a.name);
  }
  for (const NamedTensor& p : params) {
    if (!p.tensor) continue;
    const Tensor& a = *p.tensor;
    const bool matches = s.per_token ? a.dim() == 3 && same_sizes(a, t)
                                     : a.dim() == 2 && a.size(0) == s.batch && a.size(1) == s.dim;
    VQK_CHECK(matches, p.name, " must be ", s.per_token ? "(B, T, D)" : "(B, D)",
                " like ", params.begin()->name, ", with (B, T, D) = ", sizes(t), ", got ",
                sizes(a));
    check_like(a, p.name);
  }
  return s;
}

inline AdalnSizes check_adaln_forward_args(const Tensor& x, const Tensor& shift,
                                           const Tensor& scale,
                                           const std::optional<Tensor>& gate,
                                           const std::optional<Tensor>& y,
                                           DeviceType device) {
  VQK_CHECK(gate.has_value() == y.has_value(), "gate and y must be given together");
  return check_adaln_args({&x, "x"}, device, {{given(y), "y"}},
                          {{&shift, "shift"}, {&scale, "scale"}, {given(gate), "gate"}});
}

// check_adaln_args for adaln_backward, and mean, rstd (B, T) in float32
// (float64 for float64 x) on x's device.
inline AdalnSizes check_adaln_backward_args(const Tensor& grad_h,
                                            const std::optional<Tensor>& grad_x_new,
                                            const Tensor& x, const Tensor& scale,
                                            const Tensor& mean, const Tensor& rstd,
                                            DeviceType device) {
  const AdalnSizes s = check_adaln_args({&x, "x"}, device,
                                        {{&grad_h, "grad_h"}, {given(grad_x_new), "grad_x_new"}},
                                        {{&scale, "scale"}});
  const ScalarType stat_dtype = adaln_stat_dtype(x);
  for (const auto& [stat, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    VQK_CHECK(stat->dim() == 2 && stat->size(0) == s.batch && stat->size(1) == s.tokens, name,
                " must be (B, T) = (", s.batch, ", ", s.tokens, "), got ", sizes(*stat));
    VQK_CHECK(stat->scalar_type() == stat_dtype && stat->device() == x.device(), name,
                " must be ", stat_dtype, " on x's device, got ", stat->scalar_type(), " on ",
                stat->device());
  }
  return s;
}

// gated_residual_forward (x) or its backward (x = grad): x, y (B, T, D), gate.
inline AdalnSizes check_gated_residual_args(NamedTensor x, const Tensor& gate,
                                            const Tensor& y, DeviceType device) {
  return check_adaln_args(x, device, {{&y, "y"}}, {{&gate, "gate"}});
}

}  // namespace vqkernels
