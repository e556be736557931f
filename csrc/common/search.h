#pragma once
// Nearest-codebook search: the per-element and per-row math shared by the C++
// CPU kernel (csrc/cpu/search.cpp) and the CUDA kernel (csrc/cuda/search.cu).
//
// The result rule, over a ranking score s(n, k): the exact distance
// ||z_n - e_k||^2 (CUDA SIMT kernel) or the expanded score ||e_k||^2 -
// 2 z_n.e_k (CPU kernels; it differs from the distance by ||z_n||^2 and by
// rounding, so near-ties may flip):
//   indices[n]   = the lowest k among the minima of s(n, .), where NaN never
//                  compares less and the search starts from (+inf, k = 0);
//   distances[n] = sum_d (z[n, d] - e[indices[n], d])^2, computed directly.
// When that distance is not finite (a NaN or Inf in z, an overflow) the row
// is decided by the exact distance (the CPU kernel re-scans it). So a row
// whose distances are all NaN or +inf gets index 0 and the distance to code 0
// (NaN / inf), and NaN or Inf codes are never chosen while any code has a
// finite distance.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "macros.h"

namespace vqkernels::common {

// Running argmin over codes visited in increasing k: a strict "less" keeps the
// lowest index among equal scores and never takes a NaN. Written with selects
// rather than a branch so the CPU kernel runs it unchanged on whole SIMD lanes
// (GCC vector types: the comparison yields a lane mask, `?:` blends per lane).
template <typename S, typename I>
VQK_HOST_DEVICE void update_best(const S& score, const I& k, S& best, I& best_k) {
  const auto less = score < best;
  best_k = less ? k : best_k;
  best = less ? score : best;
}

// Merge of two partial results over disjoint code sets visited in any order
// (SIMD lanes, threads): the lower score wins, equal scores go to the lower k.
template <typename S, typename I>
VQK_HOST_DEVICE void merge_best(S score, I k, S& best, I& best_k) {
  if (score < best || (score == best && k < best_k)) {
    best = score;
    best_k = k;
  }
}

// The ranking score of code k for row z, as a GEMM gives it:
//   score_k = ||e_k||^2 - 2 z.e_k = ||z - e_k||^2 - ||z||^2
// (||z||^2 is the same for every code of a row). It cancels when z is close to
// e_k relative to their norms, so kernels that rank by it recompute the
// winner's distance exactly; near-ties may then flip (the numerics contract).
template <typename S>
VQK_HOST_DEVICE S expanded_score(const S& sqnorm, const S& dot) {
  return sqnorm - (dot + dot);
}

// The same score accumulated one dimension at a time: start from ||e_k||^2 and
// add z_d * (-2 e_d), the code pre-scaled by -2 (exact in binary floating
// point), so each step is one FMA and no epilogue is needed.
template <typename S, typename Z>
VQK_HOST_DEVICE S expanded_score_step(const S& score, Z z_d, const S& neg2_e_d) {
  return score + neg2_e_d * z_d;
}

// Exact squared distance of one row pair, sum_d (a_d - b_d)^2, accumulated in
// Acc in increasing d; `load` converts an element to Acc (fp16 / bf16 -> fp32).
template <typename Acc, typename T, typename Load>
VQK_HOST_DEVICE Acc squared_distance(const T* a, const T* b, int64_t dim, Load load) {
  Acc sum = Acc(0);
  for (int64_t i = 0; i < dim; ++i) {
    const Acc diff = load(a[i]) - load(b[i]);
    sum += diff * diff;
  }
  return sum;
}

VQK_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// (score, k) packed into one integer whose unsigned order is merge_best's
// order, so a min over keys (a reduction, an atomicMin) merges partial
// results: the float bits are made monotone (negative floats flipped), NaN of
// either sign maps above +inf so it never wins, and -0 becomes +0 so it ties
// with +0 as `<` says.
VQK_HOST_DEVICE uint64_t search_key(float score, uint32_t k) {
  if (score == 0.0f) score = 0.0f;
  uint32_t bits = float_bits(score);
  bits = (score != score) ? 0xFFFFFFFFu : ((bits & 0x80000000u) ? ~bits : (bits | 0x80000000u));
  return (static_cast<uint64_t>(bits) << 32) | k;
}

// The key every search starts from: (+inf, k = 0).
VQK_HOST_DEVICE uint64_t initial_search_key() { return search_key(INFINITY, 0u); }

VQK_HOST_DEVICE uint32_t search_key_index(uint64_t key) {
  return static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

}  // namespace vqkernels::common
