#pragma once
// The SIMD loops of the C++ CPU search (search.cpp), compiled once per ISA: a
// register-blocked scan of a transposed code tile (small D) and the fold of a
// GEMM tile of dot products into each row's running (min, argmin) lanes.
#include <cstdint>

#include "common/search.h"
#include "cpu/simd.h"

namespace vqkernels::cpu {
namespace {  // internal to search.cpp, the one file that includes this

// Code indices in lanes of the scores' size, so that a comparison mask selects both.
template <typename Acc>
using IndexOf = typename IntOf<Acc>::Signed;

// Lane l holds l: the lanes' offsets within a vector of codes.
template <typename Acc, int VB>
VQK_ALWAYS_INLINE typename Lanes<Acc, VB>::IVec lane_offsets() {
  typename Lanes<Acc, VB>::IVec lane;
  for (int l = 0; l < Lanes<Acc, VB>::kWidth; ++l) lane[l] = l;
  return lane;
}

// Scores of `rows` (a multiple of R) staged rows of z against the first
// `width` codes of a tile stored transposed and scaled, et[d * ld + j] =
// -2 e_(k0 + j)[d], with et[dim * ld + j] = ||e_(k0 + j)||^2; padded codes
// hold 0 and +inf, so their score is +inf (or NaN) and never wins.
// best / best_k: kWidth lanes a row.
template <typename Acc, int VB, int R, int C>
VQK_ALWAYS_INLINE void scan_direct(const Acc* z, int64_t rows, const Acc* et, int64_t dim,
                                   int64_t ld, int64_t width, int64_t k0, Acc* best,
                                   IndexOf<Acc>* best_k) {
  using Vec = typename Lanes<Acc, VB>::Vec;
  using IVec = typename Lanes<Acc, VB>::IVec;
  constexpr int W = Lanes<Acc, VB>::kWidth;
  const IVec lane = lane_offsets<Acc, VB>();
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const Acc* zr = z + r0 * dim;
    Vec b[R];
    IVec bk[R];
    for (int r = 0; r < R; ++r) {
      b[r] = load_vec<Vec>(best + (r0 + r) * W);
      bk[r] = load_vec<IVec>(best_k + (r0 + r) * W);
    }
    for (int64_t j = 0; j < width; j += W * C) {
      Vec acc[R][C];
      for (int q = 0; q < C; ++q) {
        const Vec sqv = load_vec<Vec>(et + dim * ld + j + q * W);
        for (int r = 0; r < R; ++r) acc[r][q] = sqv;
      }
      for (int64_t d = 0; d < dim; ++d) {
        Vec e[C];
        for (int q = 0; q < C; ++q) e[q] = load_vec<Vec>(et + d * ld + j + q * W);
        for (int r = 0; r < R; ++r) {
          const Acc zd = zr[r * dim + d];
          for (int q = 0; q < C; ++q) acc[r][q] = common::expanded_score_step(acc[r][q], zd, e[q]);
        }
      }
      for (int q = 0; q < C; ++q) {
        const IVec k = lane + static_cast<IndexOf<Acc>>(k0 + j + q * W);
        for (int r = 0; r < R; ++r) common::update_best(acc[r][q], k, b[r], bk[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      store_vec(best + (r0 + r) * W, b[r]);
      store_vec(best_k + (r0 + r) * W, bk[r]);
    }
  }
}

// Folds a GEMM tile dots[r * ld + j] = z_r . e_(k0 + j) into the running
// argmin by the score sqnorm[j] - 2 dots; sqnorm is padded with +inf up to
// `width` (a multiple of the lane count), so stale columns never win.
template <typename Acc, int VB>
VQK_ALWAYS_INLINE void fold_scores(const Acc* dots, int64_t ld, int64_t rows, const Acc* sqnorm,
                                   int64_t width, int64_t k0, Acc* best, IndexOf<Acc>* best_k) {
  using Vec = typename Lanes<Acc, VB>::Vec;
  using IVec = typename Lanes<Acc, VB>::IVec;
  constexpr int W = Lanes<Acc, VB>::kWidth;
  const IVec lane = lane_offsets<Acc, VB>();
  for (int64_t r = 0; r < rows; ++r) {
    Vec b = load_vec<Vec>(best + r * W);
    IVec bk = load_vec<IVec>(best_k + r * W);
    for (int64_t j = 0; j < width; j += W) {
      const Vec s =
          common::expanded_score(load_vec<Vec>(sqnorm + j), load_vec<Vec>(dots + r * ld + j));
      common::update_best(s, lane + static_cast<IndexOf<Acc>>(k0 + j), b, bk);
    }
    store_vec(best + r * W, b);
    store_vec(best_k + r * W, bk);
  }
}

// One ISA's compiled loops and their blocking.
template <typename Acc>
struct MicroKernels {
  int width;  // lanes
  int rows;   // R: rows per register block of the direct path
  int codes;  // C * width: codes per register block of the direct path
  void (*scan)(const Acc*, int64_t, const Acc*, int64_t, int64_t, int64_t, int64_t, Acc*,
               IndexOf<Acc>*);
  void (*fold)(const Acc*, int64_t, int64_t, const Acc*, int64_t, int64_t, Acc*, IndexOf<Acc>*);
};

// Code vectors per register block: 4 with AVX-512's 32 vector registers, 1 with 16.
constexpr int code_vectors(int vector_bytes) { return vector_bytes == 64 ? 4 : 1; }
constexpr int kRowBlock = 4;

#define VQK_DEFINE_MICRO_KERNELS(NAME, TARGET, VB)                                              \
  template <typename Acc>                                                                       \
  TARGET void NAME##_scan(const Acc* z, int64_t rows, const Acc* et, int64_t dim, int64_t ld,    \
                          int64_t width, int64_t k0, Acc* best, IndexOf<Acc>* best_k) {         \
    scan_direct<Acc, VB, kRowBlock, code_vectors(VB)>(z, rows, et, dim, ld, width, k0, best,    \
                                                      best_k);                                  \
  }                                                                                             \
  template <typename Acc>                                                                       \
  TARGET void NAME##_fold(const Acc* dots, int64_t ld, int64_t rows, const Acc* sqnorm,         \
                          int64_t width, int64_t k0, Acc* best, IndexOf<Acc>* best_k) {         \
    fold_scores<Acc, VB>(dots, ld, rows, sqnorm, width, k0, best, best_k);                      \
  }                                                                                             \
  template <typename Acc>                                                                       \
  MicroKernels<Acc> NAME##_kernels() {                                                          \
    constexpr int W = Lanes<Acc, VB>::kWidth;                                                   \
    return {W, kRowBlock, code_vectors(VB) * W, &NAME##_scan<Acc>, &NAME##_fold<Acc>};          \
  }
VQK_DEFINE_ISA_COPIES(VQK_DEFINE_MICRO_KERNELS)
#undef VQK_DEFINE_MICRO_KERNELS

template <typename Acc>
MicroKernels<Acc> select_micro_kernels() {
#define VQK_MICRO_KERNELS(NAME) NAME##_kernels<Acc>()
  return VQK_PICK_ISA(common::cpu_isa(), VQK_MICRO_KERNELS);
#undef VQK_MICRO_KERNELS
}

}  // namespace
}  // namespace vqkernels::cpu
