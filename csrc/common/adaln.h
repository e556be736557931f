#pragma once
// adaLN-Zero of DiT, per element (vqkernels/reference/adaln.py is the spec):
//   x_new = x + gate * y                 (rounded to x's dtype before it is normalized)
//   xhat  = (x_new - mean) * rstd,  rstd = 1 / sqrt(var + eps),  var biased over D
//   h     = xhat * (1 + scale) + shift
// Backward of one row, g = dL/dh, gs = g * (1 + scale):
//   dx     = rstd * (gs - mean_D(gs) - xhat * mean_D(gs * xhat))  (+ dL/dx_new)
//   dshift = g,  dscale = g * xhat      (summed over T for per-sample parameters)
// Gated residual: dy = gate * g,  dgate = g * y (summed likewise), dx = g.
// T is float or double, or a SIMD vector of them on the CPU.
#include "macros.h"

namespace vqkernels::common {

template <typename T>
VQK_HOST_DEVICE T gated_residual(T x, T gate, T y) {
  return x + gate * y;
}

// xhat of one element from its row's statistics.
template <typename T, typename S>
VQK_HOST_DEVICE T normalized(T x, S mean, S rstd) {
  return (x - mean) * rstd;
}

// gs = g * (1 + scale): the gradient reaching xhat.
template <typename T>
VQK_HOST_DEVICE T modulated_grad(T g, T scale) {
  return g * (scale + 1);
}

template <typename T>
VQK_HOST_DEVICE T modulate(T xhat, T shift, T scale) {
  return xhat * (scale + 1) + shift;
}

// dL/dx of one element of a row, from that row's mean_D(gs) and mean_D(gs * xhat).
template <typename T, typename S>
VQK_HOST_DEVICE T layer_norm_input_grad(T gs, T xhat, S rstd, S mean_gs, S mean_gs_xhat) {
  return (gs - mean_gs - xhat * mean_gs_xhat) * rstd;
}

}  // namespace vqkernels::common
