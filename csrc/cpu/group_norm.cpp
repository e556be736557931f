// GroupNorm with an optional SiLU after it, forward, C++ CPU kernel (spec in
// vqkernels/reference/group_norm.py). x is (B, C, HW), NCHW (a plane of HW per
// channel) or NHWC (a row of C per pixel); G groups of C / G channels:
//
//   per (b, c): S1 = sum (x - k), S2 = sum (x - k)^2 in double, k = x[b, c, 0]
//   per (b, g): mean and M2 from its channels' (S1, S2) (Chan's combination),
//               rstd = 1 / sqrt(M2 / n + eps), n = C / G * HW
//   y = act((x - mean) a + bias[c]),  a = rstd w[c],  act = SiLU or identity
//
// The shift k keeps S2 - S1^2 / HW accurate where |mean| >> std. Memory: x read
// twice, y written once; ~10 FLOPs an element, plus an exponential with SiLU.
// Every sum runs in a fixed order, whatever the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/cpu_isa.h"  // first: its pragma quiets -Wpsabi in the headers after it
#include "common/checks.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

using namespace cpu;

constexpr int64_t kElementsPerTask = 1 << 15;  // the least work handed to a thread

struct Layout {
  int64_t batch, channels, pixels;
  bool channels_last;
  int64_t run_length() const { return channels_last ? channels : pixels; }  // rows of C / planes
  int64_t runs() const { return batch * (channels_last ? pixels : channels); }
};

// NCHW, one plane: S1 and S2 of p[0, n) shifted by k, each in 16 double lanes.
template <typename T>
VQK_ALWAYS_INLINE void plane_sums(const T* p, int64_t n, double k, double* s1, double* s2) {
  *s1 = sum_in_lanes<double>(n, [&](int64_t i) { return static_cast<double>(p[i]) - k; });
  *s2 = sum_in_lanes<double>(n, [&](int64_t i) {
    const double d = static_cast<double>(p[i]) - k;
    return d * d;
  });
}

// NHWC, `rows` pixel rows of C: s1[c] += x - k[c], s2[c] += (x - k[c])^2, vectorized over c.
template <typename T>
VQK_ALWAYS_INLINE void row_sums(const T* x, int64_t rows, int64_t c, const double* k, double* s1,
                                double* s2) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < c; ++j) {
      const double d = static_cast<double>(x[r * c + j]) - k[j];
      s1[j] += d;
      s2[j] += d * d;
    }
}

template <bool kSilu, typename T, typename V, typename U>
VQK_ALWAYS_INLINE V activate(V v) {
  if constexpr (kSilu)
    return v * sigmoid_lanes<T, V, U>(v).s;
  else
    return v;
}
template <bool kSilu>
struct RowApply {  // NHWC: y = act((x - m[c]) a[c] + bias[c])
  template <typename T, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const T* x, const T* m, const T* a, const T* bias,
                                      T* y) {
    const V v = (load_vec<V>(x + i) - load_vec<V>(m + i)) * load_vec<V>(a + i);
    store_vec(y + i, activate<kSilu, T, V, U>(v + load_vec<V>(bias + i)));
  }
};
template <bool kSilu>
struct PlaneApply {  // NCHW: y = act((x - m) a + bias), one (m, a, bias) a plane
  template <typename T, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const T* x, T m, T a, T bias, T* y) {
    store_vec(y + i, activate<kSilu, T, V, U>((load_vec<V>(x + i) - m) * a + bias));
  }
};

// What y = act((x - mean) a + bias) reads: mean and a = rstd w per (b, c), bias (C,).
template <typename T>
struct Coefficients {
  const T* mean;
  const T* scale;
  const T* bias;
};

// y over runs [r0, r1): pixel rows of C (NHWC) or channel planes of HW (NCHW).
template <typename T, int VB, bool kSilu>
VQK_ALWAYS_INLINE void apply_runs(const T* x, T* y, const Layout& l, int64_t r0, int64_t r1,
                                  const Coefficients<T>& k) {
  const int64_t n = l.run_length();
  for (int64_t r = r0; r < r1; ++r) {
    if (l.channels_last) {
      const int64_t bc = r / l.pixels * n;
      for_lanes<T, VB, RowApply<kSilu>>(n, x + r * n, k.mean + bc, k.scale + bc, k.bias, y + r * n);
    } else {
      for_lanes<T, VB, PlaneApply<kSilu>>(n, x + r * n, k.mean[r], k.scale[r],
                                          k.bias[r % l.channels], y + r * n);
    }
  }
}

template <typename T>
struct Kernels {
  void (*plane_sums)(const T*, int64_t, double, double*, double*);
  void (*row_sums)(const T*, int64_t, int64_t, const double*, double*, double*);
  void (*apply_runs)(const T*, T*, const Layout&, int64_t, int64_t, const Coefficients<T>&);
};

#define VQK_DEFINE_GROUP_NORM_KERNELS(NAME, TARGET, VB)                                         \
  template <typename T>                                                                         \
  TARGET void NAME##_plane_sums(const T* p, int64_t n, double k, double* s1, double* s2) {      \
    plane_sums(p, n, k, s1, s2);                                                                \
  }                                                                                             \
  template <typename T>                                                                         \
  TARGET void NAME##_row_sums(const T* x, int64_t rows, int64_t c, const double* k, double* s1, \
                              double* s2) {                                                     \
    row_sums(x, rows, c, k, s1, s2);                                                            \
  }                                                                                             \
  template <typename T, bool kSilu>                                                             \
  TARGET void NAME##_apply_runs(const T* x, T* y, const Layout& l, int64_t r0, int64_t r1,      \
                                const Coefficients<T>& k) {                                     \
    apply_runs<T, VB, kSilu>(x, y, l, r0, r1, k);                                               \
  }
VQK_DEFINE_ISA_COPIES(VQK_DEFINE_GROUP_NORM_KERNELS)
#undef VQK_DEFINE_GROUP_NORM_KERNELS

template <typename T>
Kernels<T> select_kernels(bool silu) {
#define VQK_GROUP_NORM_KERNELS(NAME)                                      \
  Kernels<T> {                                                            \
    &NAME##_plane_sums<T>, &NAME##_row_sums<T>,                           \
        silu ? &NAME##_apply_runs<T, true> : &NAME##_apply_runs<T, false> \
  }
  return VQK_PICK_ISA(common::cpu_isa(), VQK_GROUP_NORM_KERNELS);
#undef VQK_GROUP_NORM_KERNELS
}

// S1 and S2 of every (b, c) (each (B, C)), shifted by the channel's first value k.
template <typename T>
void channel_sums(const Kernels<T>& kernels, const T* x, const Layout& l, double* s1, double* s2,
                  double* k) {
  const int64_t bc = l.batch * l.channels;
  for (int64_t i = 0; i < bc; ++i)
    k[i] = static_cast<double>(x[(i / l.channels) * l.channels * l.pixels +
                                 (i % l.channels) * (l.channels_last ? 1 : l.pixels)]);
  if (!l.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / l.pixels);
    torch::stable::parallel_for(0, bc, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        kernels.plane_sums(x + i * l.pixels, l.pixels, k[i], s1 + i, s2 + i);
    });
    return;
  }
  // NHWC: chunks of pixel rows sum into partials of their own, added in chunk order.
  const int64_t rows = std::max<int64_t>(1, kElementsPerTask / l.channels);
  const int64_t chunks = ceil_div(l.pixels, rows);
  std::vector<double> partials(l.batch * chunks * 2 * l.channels, 0.0);
  torch::stable::parallel_for(0, l.batch * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, p0 = (t % chunks) * rows;
      double* part = partials.data() + t * 2 * l.channels;
      kernels.row_sums(x + (b * l.pixels + p0) * l.channels, std::min(rows, l.pixels - p0),
                       l.channels, k + b * l.channels, part, part + l.channels);
    }
  });
  std::fill(s1, s1 + bc, 0.0);
  std::fill(s2, s2 + bc, 0.0);
  for (int64_t t = 0; t < l.batch * chunks; ++t) {
    const int64_t b = t / chunks;
    const double* part = partials.data() + t * 2 * l.channels;
    for (int64_t c = 0; c < l.channels; ++c) {
      s1[b * l.channels + c] += part[c];
      s2[b * l.channels + c] += part[l.channels + c];
    }
  }
}

// mean and rstd (B, G) from the channel sums: a channel's mean is k + S1 / HW and its M2
// S2 - S1^2 / HW; the group's M2 adds each channel's HW (mean_c - mean)^2.
template <typename T>
void group_statistics(const Layout& l, int64_t groups, double eps, const double* s1,
                      const double* s2, const double* k, T* mean, T* rstd) {
  const int64_t per_group = l.channels / groups;
  const double hw = static_cast<double>(l.pixels), n = hw * static_cast<double>(per_group);
  for (int64_t bg = 0; bg < l.batch * groups; ++bg) {
    const int64_t c0 = (bg / groups) * l.channels + (bg % groups) * per_group;
    double total = 0;
    for (int64_t c = c0; c < c0 + per_group; ++c) total += k[c] * hw + s1[c];
    const double m = total / n;
    double m2 = 0;
    for (int64_t c = c0; c < c0 + per_group; ++c) {
      const double channel_mean = k[c] + s1[c] / hw;
      m2 += (s2[c] - s1[c] * s1[c] / hw) + hw * (channel_mean - m) * (channel_mean - m);
    }
    mean[bg] = static_cast<T>(m);
    rstd[bg] = static_cast<T>(1.0 / std::sqrt(std::max(m2, 0.0) / n + eps));
  }
}

// The statistics, then y = act((x - mean) a + bias) with mean and a = rstd w per (b, c).
template <typename T>
void forward(const Layout& l, int64_t groups, double eps, bool silu, const T* x, const T* w,
             const T* bias, T* y, T* mean, T* rstd) {
  const Kernels<T> kernels = select_kernels<T>(silu);
  const int64_t bc = l.batch * l.channels, per_group = l.channels / groups;
  std::vector<double> s1(bc), s2(bc), shifts(bc);
  channel_sums(kernels, x, l, s1.data(), s2.data(), shifts.data());
  group_statistics(l, groups, eps, s1.data(), s2.data(), shifts.data(), mean, rstd);
  std::vector<T> channel_mean(bc), scale(bc);
  for (int64_t i = 0; i < bc; ++i) {
    const int64_t c = i % l.channels, bg = i / l.channels * groups + c / per_group;
    channel_mean[i] = mean[bg];
    scale[i] = rstd[bg] * w[c];
  }
  const Coefficients<T> k{channel_mean.data(), scale.data(), bias};
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / l.run_length());
  torch::stable::parallel_for(
      0, l.runs(), grain, [&](int64_t r0, int64_t r1) { kernels.apply_runs(x, y, l, r0, r1, k); });
}

Layout check_group_norm_args(const Tensor& x, const Tensor& weight, const Tensor& bias,
                             int64_t groups) {
  VQK_CHECK(x.device().type() == DeviceType::CPU, "x must be a CPU tensor, got ", x.device());
  VQK_CHECK(x.dim() >= 2, "x must be (B, C, *spatial), got ", x.dim(), " dims");
  const int64_t b = x.size(0), c = x.size(1);
  VQK_CHECK(groups >= 1 && c % groups == 0, "num_groups must divide C = ", c, ", got ", groups);
  VQK_CHECK(weight.dim() == 1 && weight.size(0) == c && bias.dim() == 1 && bias.size(0) == c,
            "weight and bias must be (C,) = (", c, ",)");
  VQK_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
            "weight and bias must have x's dtype");
  VQK_CHECK(weight.is_contiguous() && bias.is_contiguous(), "weight and bias must be contiguous");
  const int64_t pixels = b * c == 0 ? 0 : x.numel() / (b * c);
  const bool channels_last = !x.is_contiguous();
  VQK_CHECK(!channels_last || (x.dim() == 4 && x.stride(1) == 1 && x.stride(3) == c &&
                               x.stride(2) == x.size(3) * c && x.stride(0) == pixels * c),
            "x must be contiguous or channels-last");
  return {b, c, pixels, channels_last};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> group_norm_forward_cpu(const Tensor& x, const Tensor& weight,
                                                          const Tensor& bias, int64_t num_groups,
                                                          double eps, bool silu) {
  const Layout l = check_group_norm_args(x, weight, bias, num_groups);
  const Tensor y = empty_like(x);
  const Tensor mean = new_empty(x, {l.batch, num_groups});
  const Tensor rstd = new_empty(x, {l.batch, num_groups});
  if (x.numel() == 0) return {y, mean, rstd};
  VQK_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), "group_norm_forward", [&] {
    forward(l, num_groups, eps, silu, cdata<scalar_t>(x), cdata<scalar_t>(weight),
            cdata<scalar_t>(bias), data<scalar_t>(y), data<scalar_t>(mean), data<scalar_t>(rstd));
  });
  return {y, mean, rstd};
}

}  // namespace vqkernels
