// GELU with the tanh approximation (DiT's MLP activation), C++ CPU kernels
// (spec in vqkernels/reference/gelu.py). Per element, with u = k0 (x + k1 x^3),
// k0 = sqrt(2 / pi), k1 = 0.044715:
//
//   y  = 0.5 x (1 + tanh u) = x s,  s = sigmoid(2u) = 1 / (1 + e^{-2u})
//   dx = dy (s + 2 x s (1 - s) du/dx),  du/dx = k0 (1 + 3 k1 x^2)
//
// s comes from e = e^{-2|u|} <= 1 (simd.h's sigmoid_lanes), so no exponent
// overflows and x s keeps its relative accuracy where 1 + tanh u cancels (x < -3).
// Forward reads and writes N elements (in place when y is x), backward reads 2N and
// writes N; ~25 FLOPs an element, so both are memory-bound wherever the exponential
// vectorizes.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu_isa.h"  // first: its pragma quiets -Wpsabi in the headers after it
#include "common/checks.h"
#include "cpu/simd.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

using namespace cpu;

constexpr int64_t kElementsPerTask = 1 << 15;  // the least work handed to a thread
constexpr int64_t kConvertChunk = 256;         // 16-bit inputs: elements converted at a time

// The type the math runs in: float, or double for double.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr double kK0 = 0.79788456080286535588, kK1 = 0.044715;

// s = sigmoid(2u) of the formula above and s (1 - s), per lane.
template <typename A, typename V, typename U>
VQK_ALWAYS_INLINE Sigmoid<V> gelu_sigmoid(V x) {
  const V u = x * (A(kK0) + A(kK0 * kK1) * (x * x));
  return sigmoid_lanes<A, V, U>(u + u);
}

struct Forward {  // y = gelu(x)
  template <typename A, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* x, A* y) {
    const V xv = load_vec<V>(x + i);
    store_vec(y + i, xv * gelu_sigmoid<A, V, U>(xv).s);
  }
};
struct Backward {  // dx = dy gelu'(x)
  template <typename A, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const A* dy, const A* x, A* dx) {
    const V xv = load_vec<V>(x + i);
    const Sigmoid<V> sig = gelu_sigmoid<A, V, U>(xv);
    const V du = A(kK0) + A(3 * kK0 * kK1) * (xv * xv);
    store_vec(dx + i, load_vec<V>(dy + i) * (sig.s + (xv + xv) * sig.s_one_minus_s * du));
  }
};

// Elements [0, n) of the Acc-typed arrays: dy null, the forward; else the backward.
template <typename A, int VB>
VQK_ALWAYS_INLINE void gelu_lanes(int64_t n, const A* dy, const A* x, A* out) {
  if (dy == nullptr)
    for_lanes<A, VB, Forward>(n, x, out);
  else
    for_lanes<A, VB, Backward>(n, dy, x, out);
}

template <typename A>
using GeluLanes = void (*)(int64_t, const A*, const A*, A*);

#define VQK_DEFINE_GELU_LANES(NAME, TARGET, VB)                               \
  template <typename A>                                                       \
  TARGET void NAME##_gelu_lanes(int64_t n, const A* dy, const A* x, A* out) { \
    gelu_lanes<A, VB>(n, dy, x, out);                                         \
  }
VQK_DEFINE_ISA_COPIES(VQK_DEFINE_GELU_LANES)
#undef VQK_DEFINE_GELU_LANES

template <typename A>
GeluLanes<A> select_gelu_lanes() {
#define VQK_GELU_LANES(NAME) &NAME##_gelu_lanes<A>
  return VQK_PICK_ISA(common::cpu_isa(), VQK_GELU_LANES);
#undef VQK_GELU_LANES
}

// out[i] = gelu(x[i]) (dy null) or dy[i] gelu'(x[i]) for i < n, over torch's threads.
// out may be x (in place): each element is read before it is written.
template <typename T>
void run(int64_t n, const T* dy, const T* x, T* out) {
  using A = Acc<T>;
  const GeluLanes<A> lanes = select_gelu_lanes<A>();
  torch::stable::parallel_for(0, n, kElementsPerTask, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, A>) {
      lanes(end - begin, dy ? dy + begin : nullptr, x + begin, out + begin);
    } else {  // float16 / bfloat16: the math in float, one chunk at a time
      A xa[kConvertChunk], dya[kConvertChunk], outa[kConvertChunk];
      for (int64_t c = begin; c < end; c += kConvertChunk) {
        const int64_t m = std::min(kConvertChunk, end - c);
        std::transform(x + c, x + c + m, xa, [](T v) { return static_cast<A>(v); });
        if (dy) std::transform(dy + c, dy + c + m, dya, [](T v) { return static_cast<A>(v); });
        lanes(m, dy ? dya : nullptr, xa, outa);
        std::transform(outa, outa + m, out + c, [](A v) { return static_cast<T>(v); });
      }
    }
  });
}

void check_gelu_tensor(const Tensor& t, const char* name) {
  VQK_CHECK(t.device().type() == DeviceType::CPU, name, " must be a CPU tensor, got ", t.device());
  VQK_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

Tensor gelu_tanh_forward_cpu(const Tensor& x) {
  check_gelu_tensor(x, "x");
  const Tensor y = empty_like(x);
  VQK_DISPATCH_FLOATING(x.scalar_type(), "gelu_tanh_forward", [&] {
    run<scalar_t>(x.numel(), nullptr, cdata<scalar_t>(x), data<scalar_t>(y));
  });
  return y;
}

void gelu_tanh_forward_inplace_cpu(const Tensor& x) {
  check_gelu_tensor(x, "x");
  VQK_DISPATCH_FLOATING(x.scalar_type(), "gelu_tanh_forward_", [&] {
    run<scalar_t>(x.numel(), nullptr, cdata<scalar_t>(x), data<scalar_t>(x));
  });
}

Tensor gelu_tanh_backward_cpu(const Tensor& grad, const Tensor& x) {
  check_gelu_tensor(grad, "grad");
  check_gelu_tensor(x, "x");
  VQK_CHECK(same_sizes(grad, x) && grad.scalar_type() == x.scalar_type(),
            "grad must have x's shape and dtype");
  const Tensor dx = empty_like(x);
  VQK_DISPATCH_FLOATING(x.scalar_type(), "gelu_tanh_backward", [&] {
    run<scalar_t>(x.numel(), cdata<scalar_t>(grad), cdata<scalar_t>(x), data<scalar_t>(dx));
  });
  return dx;
}

}  // namespace vqkernels
