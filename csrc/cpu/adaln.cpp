// adaLN-Zero glue of a DiT block, C++ CPU kernels (math in csrc/common/adaln.h,
// spec in vqkernels/reference/adaln.py). Per row (b, t) of D elements:
//
//   x_new = x + gate y (rounded to x's dtype),  h = (x_new - mean) rstd (1 + scale) + shift
//   dx = rstd (gs - mean_D gs - xhat mean_D(gs xhat)) (+ dx_new),  gs = dh (1 + scale)
//   dshift = sum_T dh, dscale = sum_T dh xhat (per sample; per token: no sum)
//
// A row stays in L1 across its passes, so every tensor crosses memory once:
// forward reads x (, y), writes h (, x_new): 2 (4) x BTD elements, 9 (11) FLOPs
// each; backward reads dh, x (, dx_new), writes dx: 3 (4) x BTD, ~19 FLOPs.
// Per-sample parameter grads: each task (b, chunk of kTokensPerChunk tokens)
// sums into its own row, and the rows are added in chunk order, so the bits
// never depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"  // first: its pragma quiets -Wpsabi in the headers after it
#include "common/adaln.h"
#include "common/checks.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "vqkernels.h"

// No fused multiply-adds: x_new rounds as the unfused x + gate * y does, and gs
// rounds alike in both backward passes (a row of D = 1 gets dx = 0 exactly).
#pragma GCC optimize("fp-contract=off")

#include "cpu/adaln_lane_ops.h"  // after the pragma: its lane ops inline into code without FMAs

namespace vqkernels {
namespace {

using namespace cpu;

constexpr int64_t kTokensPerChunk = 64;      // rows of one per-sample partial sum
constexpr int64_t kElementsPerTask = 16384;  // forward: the least work handed to a thread

// The type of statistics and sums: float, or double for double.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows (b, t) of a (B, T, D) tensor or of a per-sample (B, D) one; data null: not given.
template <typename T>
struct TokenRows {
  const T* data = nullptr;
  RowStrides stride{0, 0};
  const T* at(int64_t b, int64_t t) const { return data + b * stride.batch + t * stride.token; }
};

template <typename T>
TokenRows<T> rows_of(const Tensor* t) {
  return t ? TokenRows<T>{cdata<T>(*t), row_strides(*t)} : TokenRows<T>{};
}

// A row of T read as A: the row itself when T is A, else converted into buf,
// once while the same row repeats (a per-sample parameter).
template <typename T>
struct RowReader {
  Acc<T>* buf;
  const T* cached = nullptr;
  const Acc<T>* operator()(const T* row, int64_t n) {
    if constexpr (std::is_same_v<T, Acc<T>>) {
      return row;
    } else {
      if (row != cached) std::transform(row, row + n, buf, [](T v) { return Acc<T>(v); });
      cached = row;
      return buf;
    }
  }
};

// Where a row of A results goes: straight into the T output when T is A, else
// into buf, which store() converts into the output.
template <typename T>
struct RowWriter {
  Acc<T>* buf;
  Acc<T>* target(T* row) const {
    if constexpr (std::is_same_v<T, Acc<T>>) return row;
    return buf;
  }
  // round_trip: buf then holds the stored (rounded) values.
  void store(T* row, int64_t n, bool round_trip = false) const {
    if constexpr (!std::is_same_v<T, Acc<T>>) {
      for (int64_t d = 0; d < n; ++d) {
        row[d] = static_cast<T>(buf[d]);
        if (round_trip) buf[d] = static_cast<Acc<T>>(row[d]);
      }
    }
  }
};

// Per-thread row buffers, as A.
template <typename A>
struct RowBuffers {
  std::unique_ptr<A[]> data;
  int64_t n;
  RowBuffers(int count, int64_t n) : data(new A[count * n]), n(n) {}
  A* operator[](int i) const { return data.get() + i * n; }
};

template <typename T>
struct ForwardArgs {
  TokenRows<T> x, gate, y, shift, scale;  // no gate: x itself is normalized; no shift: none is
  T *h, *x_new;
  Acc<T>*mean, *rstd;
  int64_t tokens, dim;
  Acc<T> eps;
};

// mean and rstd of a row, the variance taken around the mean (two passes in L1).
template <typename A, int VB>
VQK_ALWAYS_INLINE void row_statistics(const A* x, int64_t n, A eps, A* mean, A* rstd) {
  LaneSums<A, VB> sum{}, squares{};
  for_lanes<A, VB, Sum>(n, x, &sum);
  *mean = sum.mean(0, n);
  for_lanes<A, VB, SquaredDeviation>(n, x, *mean, &squares);
  *rstd = 1 / std::sqrt(squares.mean(0, n) + eps);
}

// Forward of rows [r0, r1) of the B x T rows.
template <typename T, int VB>
VQK_ALWAYS_INLINE void forward_rows(const ForwardArgs<T>& a, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  const int64_t n = a.dim;
  const RowBuffers<A> buf(7, n);
  RowReader<T> x{buf[0]}, gate{buf[1]}, y{buf[2]}, shift{buf[3]}, scale{buf[4]};
  const RowWriter<T> x_new{buf[5]}, h{buf[6]};
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.tokens, t = r % a.tokens;
    const A* normed = x(a.x.at(b, t), n);
    if (a.gate.data) {
      A* out = x_new.target(a.x_new + r * n);
      for_lanes<A, VB, GatedAdd>(n, normed, gate(a.gate.at(b, t), n), y(a.y.at(b, t), n), out);
      x_new.store(a.x_new + r * n, n, /*round_trip=*/true);
      normed = out;
    }
    if (!a.shift.data) continue;
    row_statistics<A, VB>(normed, n, a.eps, a.mean + r, a.rstd + r);
    for_lanes<A, VB, Modulate>(n, normed, a.mean[r], a.rstd[r], shift(a.shift.at(b, t), n),
                               scale(a.scale.at(b, t), n), h.target(a.h + r * n));
    h.store(a.h + r * n, n);
  }
}

// Both backward ops. adaln: grad = dh, x the normalized input, param = scale,
// out = dx, param_grads = (dshift, dscale). Gated residual: grad, x = y,
// param = gate, out = dy, param_grads = (dgate).
template <typename T>
struct BackwardArgs {
  TokenRows<T> grad, x, param, grad_x_new;
  const Acc<T>*mean, *rstd;
  T* out;
  T* param_grads[2];  // (B, T, D) per token, else (B, D) from the partials
  Acc<T>* partials;   // per sample: (B, chunks, param grads, D)
  int64_t tokens, dim, chunks;
  bool per_token;
};

// Tasks [k0, k1): task k is sample k / chunks, tokens of chunk k % chunks.
template <typename T, int VB, int kGrads>
VQK_ALWAYS_INLINE void backward_tasks(const BackwardArgs<T>& a, int64_t k0, int64_t k1) {
  using A = Acc<T>;
  const int64_t n = a.dim;
  const RowBuffers<A> buf(7, n);
  RowReader<T> grad{buf[0]}, x{buf[1]}, param{buf[2]}, grad_x_new{buf[3]};
  const RowWriter<T> out{buf[4]}, param_grad[2] = {{buf[5]}, {buf[6]}};
  A* acc[2] = {};
  const auto start_sums = [&](int64_t row, int64_t task) {
    for (int k = 0; k < kGrads; ++k) {
      acc[k] = a.per_token ? param_grad[k].target(a.param_grads[k] + row * n)
                           : a.partials + (task * kGrads + k) * n;
      std::fill_n(acc[k], n, A(0));
    }
  };
  for (int64_t task = k0; task < k1; ++task) {
    const int64_t b = task / a.chunks, t0 = task % a.chunks * kTokensPerChunk;
    const int64_t t1 = std::min(a.tokens, t0 + kTokensPerChunk);
    if (!a.per_token) start_sums(0, task);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = b * a.tokens + t;
      if (a.per_token) start_sums(r, 0);
      const A* g = grad(a.grad.at(b, t), n);
      const A* xr = x(a.x.at(b, t), n);
      const A* p = param(a.param.at(b, t), n);
      A* dx = out.target(a.out + r * n);
      if constexpr (kGrads == 2) {
        LaneSums<A, VB> sums{};
        const A mean = a.mean[r], rstd = a.rstd[r];
        for_lanes<A, VB, ParamGradsAndSums>(n, g, xr, p, mean, rstd, acc[0], acc[1], &sums);
        const A* dx_new = a.grad_x_new.data ? grad_x_new(a.grad_x_new.at(b, t), n) : nullptr;
        for_lanes<A, VB, InputGrad>(n, g, xr, p, mean, rstd, sums.mean(0, n), sums.mean(1, n),
                                    dx_new, dx);
      } else {
        for_lanes<A, VB, GateGrads>(n, g, p, xr, dx, acc[0]);
      }
      out.store(a.out + r * n, n);
      if (!a.per_token) continue;
      for (int k = 0; k < kGrads; ++k) param_grad[k].store(a.param_grads[k] + r * n, n);
    }
  }
}

#define VQK_DEFINE_ADALN_KERNELS(NAME, TARGET, VB)                                          \
  template <typename T>                                                                    \
  TARGET void forward_rows_##NAME(const ForwardArgs<T>& a, int64_t r0, int64_t r1) {       \
    forward_rows<T, VB>(a, r0, r1);                                                        \
  }                                                                                        \
  template <typename T, int kGrads>                                                        \
  TARGET void backward_tasks_##NAME(const BackwardArgs<T>& a, int64_t k0, int64_t k1) {    \
    backward_tasks<T, VB, kGrads>(a, k0, k1);                                              \
  }
VQK_DEFINE_ISA_COPIES(VQK_DEFINE_ADALN_KERNELS)
#undef VQK_DEFINE_ADALN_KERNELS

template <typename T>
void run_forward(const ForwardArgs<T>& a, int64_t rows) {
#define VQK_FORWARD(NAME) &forward_rows_##NAME<T>
  const auto kernel = VQK_PICK_ISA(common::cpu_isa(), VQK_FORWARD);
#undef VQK_FORWARD
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(a.dim, 1));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { kernel(a, r0, r1); });
}

// out[b] = the sum of sample b's chunk partials, in chunk order, for each param grad.
template <typename T, int kGrads>
void reduce_partials(const BackwardArgs<T>& a, int64_t batch) {
  torch::stable::parallel_for(0, batch * kGrads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<Acc<T>> sum(a.dim);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / kGrads, k = i % kGrads;
      std::fill(sum.begin(), sum.end(), Acc<T>(0));
      for (int64_t c = 0; c < a.chunks; ++c) {
        const Acc<T>* part = a.partials + ((b * a.chunks + c) * kGrads + k) * a.dim;
        for (int64_t d = 0; d < a.dim; ++d) sum[d] += part[d];
      }
      std::transform(sum.begin(), sum.end(), a.param_grads[k] + b * a.dim,
                     [](Acc<T> v) { return static_cast<T>(v); });
    }
  });
}

template <typename T, int kGrads>
void run_backward(BackwardArgs<T> a, const AdalnSizes& s) {
  a.chunks = ceil_div(s.tokens, kTokensPerChunk);
  const int64_t tasks = s.batch * a.chunks;
  std::unique_ptr<Acc<T>[]> partials(a.per_token ? nullptr : new Acc<T>[tasks * kGrads * s.dim]);
  a.partials = partials.get();
#define VQK_BACKWARD(NAME) &backward_tasks_##NAME<T, kGrads>
  const auto kernel = VQK_PICK_ISA(common::cpu_isa(), VQK_BACKWARD);
#undef VQK_BACKWARD
  torch::stable::parallel_for(0, tasks, 1, [&](int64_t k0, int64_t k1) { kernel(a, k0, k1); });
  if (!a.per_token) reduce_partials<T, kGrads>(a, s.batch);
}

Tensor empty_rows(const AdalnSizes& s, const Tensor& like) {
  return new_empty(like, {s.batch, s.tokens, s.dim});
}

// Forward of both ops; normalize: adaln (h, mean and rstd), else x_new only.
AdalnForward forward(const AdalnSizes& s, const Tensor& x, const Tensor* gate, const Tensor* y,
                     const Tensor* shift, const Tensor* scale, double eps) {
  const bool normalize = shift != nullptr;
  const Tensor h = normalize ? empty_rows(s, x) : new_empty(x, {0});
  const Tensor x_new = gate ? empty_rows(s, x) : new_empty(x, {0});
  const ScalarType stat_dtype = adaln_stat_dtype(x);
  const Tensor mean = new_empty(x, {normalize ? s.batch : 0, s.tokens}, stat_dtype);
  const Tensor rstd = new_empty(x, {normalize ? s.batch : 0, s.tokens}, stat_dtype);
  VQK_DISPATCH_FLOATING(x.scalar_type(), "adaln_forward", [&] {
    using T = scalar_t;
    const ForwardArgs<T> a{rows_of<T>(&x), rows_of<T>(gate), rows_of<T>(y), rows_of<T>(shift),
                           rows_of<T>(scale), data<T>(h), data<T>(x_new), data<Acc<T>>(mean),
                           data<Acc<T>>(rstd), s.tokens, s.dim, static_cast<Acc<T>>(eps)};
    run_forward(a, s.batch * s.tokens);
  });
  return {h, x_new, mean, rstd};
}

}  // namespace

AdalnForward adaln_forward_cpu(VQK_ADALN_FORWARD_ARGS) {
  const AdalnSizes s = check_adaln_forward_args(x, shift, scale, gate, y, DeviceType::CPU);
  return forward(s, x, given(gate), given(y), &shift, &scale, eps);
}

Tensor gated_residual_forward_cpu(const Tensor& x, const Tensor& gate, const Tensor& y) {
  const AdalnSizes s = check_gated_residual_args({&x, "x"}, gate, y, DeviceType::CPU);
  return std::get<1>(forward(s, x, &gate, &y, nullptr, nullptr, 0.0));
}

AdalnBackward adaln_backward_cpu(VQK_ADALN_BACKWARD_ARGS) {
  const AdalnSizes s =
      check_adaln_backward_args(grad_h, grad_x_new, x, scale, mean, rstd, DeviceType::CPU);
  const Tensor grad_x = empty_rows(s, x);
  const Tensor grad_shift = new_empty(scale, scale.sizes());
  const Tensor grad_scale = new_empty(scale, scale.sizes());
  const Tensor mean_c = contiguous(mean), rstd_c = contiguous(rstd);
  VQK_DISPATCH_FLOATING(x.scalar_type(), "adaln_backward", [&] {
    using T = scalar_t;
    run_backward<T, 2>({rows_of<T>(&grad_h), rows_of<T>(&x), rows_of<T>(&scale),
                        rows_of<T>(given(grad_x_new)), cdata<Acc<T>>(mean_c),
                        cdata<Acc<T>>(rstd_c), data<T>(grad_x),
                        {data<T>(grad_shift), data<T>(grad_scale)}, nullptr, s.tokens, s.dim, 0,
                        s.per_token},
                       s);
  });
  return {grad_x, grad_shift, grad_scale};
}

std::tuple<Tensor, Tensor> gated_residual_backward_cpu(const Tensor& grad, const Tensor& gate,
                                                       const Tensor& y) {
  const AdalnSizes s = check_gated_residual_args({&grad, "grad"}, gate, y, DeviceType::CPU);
  const Tensor grad_y = empty_rows(s, grad);
  const Tensor grad_gate = new_empty(gate, gate.sizes());
  VQK_DISPATCH_FLOATING(grad.scalar_type(), "gated_residual_backward", [&] {
    using T = scalar_t;
    run_backward<T, 1>({rows_of<T>(&grad), rows_of<T>(&y), rows_of<T>(&gate), {}, nullptr, nullptr,
                        data<T>(grad_y), {data<T>(grad_gate), nullptr}, nullptr, s.tokens, s.dim,
                        0, s.per_token},
                       s);
  });
  return {grad_gate, grad_y};
}

}  // namespace vqkernels
