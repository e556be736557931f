#pragma once
// SIMD building blocks of the C++ CPU kernels' hot loops: lanes of VB bytes
// (GCC / Clang vector extensions), a loop over lanes with a scalar tail, and
// e^x per lane. Compiled into each ISA copy of a loop (common/cpu_isa.h), so
// every helper here is forced inline.
#include <array>
#include <cstdint>
#include <type_traits>

#include "common/cpu_isa.h"

namespace vqkernels::cpu {

using common::load_vec;
using common::store_vec;

// The integers of a float type's size: Signed for index lanes that a
// comparison mask selects with the scores, Unsigned for bit patterns.
template <typename T>
struct IntOf;
template <>
struct IntOf<float> {
  using Signed = int32_t;
  using Unsigned = uint32_t;
};
template <>
struct IntOf<double> {
  using Signed = int64_t;
  using Unsigned = uint64_t;
};

// SIMD lanes of VB bytes of T, with their integer twins.
template <typename T, int VB>
struct Lanes {
  static constexpr int kWidth = common::Simd<T, VB>::kWidth;
  using Vec = typename common::Simd<T, VB>::Vec;
  using IVec = typename common::Simd<typename IntOf<T>::Signed, VB>::Vec;
  using UVec = typename common::Simd<typename IntOf<T>::Unsigned, VB>::Vec;
};

// Op::apply<T, V, U>(i, args...) at lanes [i, i + width) of n columns, V the
// lanes' vector and U its unsigned twin; then one by one on the tail (V = T).
template <typename T, int VB, typename Op, typename... Args>
VQK_ALWAYS_INLINE void for_lanes(int64_t n, Args... args) {
  using L = Lanes<T, VB>;
  int64_t i = 0;
  for (; i + L::kWidth <= n; i += L::kWidth)
    Op::template apply<T, typename L::Vec, typename L::UVec>(i, args...);
  for (; i < n; ++i) Op::template apply<T, T, typename IntOf<T>::Unsigned>(i, args...);
}

template <typename To, typename From>
VQK_ALWAYS_INLINE To bits_as(const From& x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  __builtin_memcpy(&y, &x, sizeof(To));
  return y;
}

// A scalar or a SIMD vector of T with every lane x.
template <typename V, typename T>
VQK_ALWAYS_INLINE V splat(T x) {
  if constexpr (std::is_arithmetic_v<V>) {
    return x;
  } else {
    V v = {};
    return v + x;
  }
}

// sum_{i < n} term(i) in 16 running sums, then their pairwise total: independent sums, so
// the loop vectorizes, in a fixed order, so the same terms always give the same bits.
template <typename Acc, typename Term>
VQK_ALWAYS_INLINE Acc sum_in_lanes(int64_t n, const Term& term) {
  constexpr int kLanes = 16;
  Acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += term(i + l);
  for (int l = 0; i < n; ++i, ++l) lanes[l] += term(i);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

template <typename T, int N>
constexpr std::array<T, N + 1> inverse_factorials() {
  std::array<T, N + 1> c{};
  c[0] = 1;
  for (int i = 1; i <= N; ++i) c[i] = c[i - 1] / i;
  return c;
}

// exp_lanes: Cody-Waite reduction by ln 2, a polynomial on the remainder, and
// 2^n built in the exponent bits.
template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  static constexpr float kLo = -87.0f;  // below: 0 (2^n stays a normal float above)
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr int kMantissa = 23, kBias = 127;
  // Minimax e^r on |r| <= ln2 / 2, relative error 1.9e-9 (Remez).
  static constexpr std::array<float, 7> kPoly = {
      1.0f, 1.0f, 4.999999106e-01f, 1.666641831e-01f, 4.166820645e-02f, 8.374955505e-03f,
      1.383820549e-03f};
};
template <>
struct ExpConstants<double> {
  static constexpr double kLo = -708.0;
  static constexpr double kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kMantissa = 52, kBias = 1023;
  static constexpr std::array<double, 14> kPoly = inverse_factorials<double, 13>();  // < 1e-17
};

// e^x per lane for x <= 1 (all a softmax takes: logits minus their max or
// their lse), to ~1 ulp; 0 below kLo, where the terms are < 1e-37 of the
// row's largest. V is T or a SIMD vector of T, U its unsigned integer twin.
template <typename T, typename V, typename U>
VQK_ALWAYS_INLINE V exp_lanes(V x) {
  using C = ExpConstants<T>;
  using Bits = typename IntOf<T>::Unsigned;
  const V shifter = splat<V>(C::kShifter);
  const V t = x * C::kLog2e + shifter;  // n + shifter, n = round(x / ln2)
  const V n = t - shifter;
  const V r = (x - n * C::kLn2Hi) - n * C::kLn2Lo;
  constexpr int kDegree = static_cast<int>(C::kPoly.size()) - 1;
  V p = splat<V>(C::kPoly[kDegree]);
  for (int i = kDegree - 1; i >= 0; --i) p = p * r + C::kPoly[i];
  const U bits = (bits_as<U>(t) - bits_as<U>(shifter) + splat<U>(Bits(C::kBias)))
                 << C::kMantissa;  // 2^n
  return x < splat<V>(C::kLo) ? splat<V>(T(0)) : p * bits_as<V>(bits);
}

// sigmoid(v) = 1 / (1 + e^-v) per lane and s (1 - s), its derivative, from e = e^{-|v|}
// <= 1: with q = 1 / (1 + e), s = q for v >= 0 and e q below, s (1 - s) = e q^2. No
// exponent overflows, and both keep their relative accuracy in the tails. NaN stays NaN.
template <typename V>
struct Sigmoid {
  V s, s_one_minus_s;
};

template <typename T, typename V, typename U>
VQK_ALWAYS_INLINE Sigmoid<V> sigmoid_lanes(V v) {
  const V zero = splat<V>(T(0)), one = splat<V>(T(1));
  const V minus_abs = v < zero ? v : -v;
  const V e = exp_lanes<T, V, U>(minus_abs);
  const V q = one / (one + e);
  return {v < zero ? e * q : q, e * q * q};
}

}  // namespace vqkernels::cpu
