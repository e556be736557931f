#pragma once
// The element-wise steps of the adaLN CPU kernels (adaln.cpp), one struct each, as for_lanes
// runs them: V is a SIMD vector of the accumulation type A or A itself, S a LaneSums.
// Included after adaln.cpp's fp-contract=off, so that these inline into code without FMAs.
#include <cstdint>

#include "common/adaln.h"
#include "cpu/simd.h"

namespace vqkernels::cpu {
namespace {  // internal to adaln.cpp, the one file that includes this

// Running sums of a row: one per lane, then the scalar tail's.
template <typename A, int VB>
struct LaneSums {
  using Vec = typename Lanes<A, VB>::Vec;
  Vec lanes[2];
  A tail[2];
  VQK_ALWAYS_INLINE void add(int k, Vec v) { lanes[k] += v; }
  VQK_ALWAYS_INLINE void add(int k, A v) { tail[k] += v; }
  VQK_ALWAYS_INLINE A mean(int k, int64_t n) const {
    A s = 0;
    for (int w = 0; w < Lanes<A, VB>::kWidth; ++w) s += lanes[k][w];
    return (s + tail[k]) / static_cast<A>(n);
  }
};

struct GatedAdd {  // out = x + gate y
  template <typename A, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* x, const A* gate, const A* y, A* out) {
    store_vec(out + i, common::gated_residual(load_vec<V>(x + i), load_vec<V>(gate + i),
                                              load_vec<V>(y + i)));
  }
};
struct Sum {  // sums[0] += x
  template <typename A, typename V, typename U, typename S>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* x, S* sums) {
    sums->add(0, load_vec<V>(x + i));
  }
};
struct SquaredDeviation {  // sums[0] += (x - mean)^2
  template <typename A, typename V, typename U, typename S>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* x, A mean, S* sums) {
    const V d = load_vec<V>(x + i) - mean;
    sums->add(0, d * d);
  }
};
struct Modulate {  // h = xhat (1 + scale) + shift
  template <typename A, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* x, A mean, A rstd, const A* shift,
                                      const A* scale, A* h) {
    const V xhat = common::normalized(load_vec<V>(x + i), mean, rstd);
    store_vec(h + i, common::modulate(xhat, load_vec<V>(shift + i), load_vec<V>(scale + i)));
  }
};
// The first backward pass: dshift += dh, dscale += dh xhat, sums of gs and gs xhat.
struct ParamGradsAndSums {
  template <typename A, typename V, typename U, typename S>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* dh, const A* x, const A* scale, A mean,
                                      A rstd, A* dshift, A* dscale, S* sums) {
    const V g = load_vec<V>(dh + i), xhat = common::normalized(load_vec<V>(x + i), mean, rstd);
    const V gs = common::modulated_grad(g, load_vec<V>(scale + i));
    sums->add(0, gs);
    sums->add(1, gs * xhat);
    store_vec(dshift + i, load_vec<V>(dshift + i) + g);
    store_vec(dscale + i, load_vec<V>(dscale + i) + g * xhat);
  }
};
struct InputGrad {  // dx = rstd (gs - mean_D gs - xhat mean_D(gs xhat)) (+ dx_new)
  template <typename A, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* dh, const A* x, const A* scale, A mean,
                                      A rstd, A mean_gs, A mean_gs_xhat, const A* dx_new, A* dx) {
    const V xhat = common::normalized(load_vec<V>(x + i), mean, rstd);
    const V gs = common::modulated_grad(load_vec<V>(dh + i), load_vec<V>(scale + i));
    V out = common::layer_norm_input_grad(gs, xhat, rstd, mean_gs, mean_gs_xhat);
    if (dx_new) out += load_vec<V>(dx_new + i);
    store_vec(dx + i, out);
  }
};
struct GateGrads {  // dy = gate g, dgate += g y
  template <typename A, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* g, const A* gate, const A* y, A* dy,
                                      A* dgate) {
    const V gv = load_vec<V>(g + i);
    store_vec(dy + i, load_vec<V>(gate + i) * gv);
    store_vec(dgate + i, load_vec<V>(dgate + i) + gv * load_vec<V>(y + i));
  }
};

}  // namespace
}  // namespace vqkernels::cpu
