// Nearest-codebook search, C++ CPU kernel (result rule and math in
// csrc/common/search.h).
//
//   indices[n]   = argmin_k ||e_k||^2 - 2 z_n.e_k   (lowest k on ties)
//   distances[n] = ||z_n - e_indices[n]||^2         (exact, recomputed directly)
//
// Parallel over blocks of rows; never N x K: beyond inputs and outputs, O(K)
// memory and bounded per-thread tiles. Math in fp32 (fp64 for fp64 input)
// whatever the precision mode. Small D (<= kDirectMaxDim) scans a staged,
// transposed codebook with a register-blocked SIMD loop, one FMA per (row,
// code, dim), each lane keeping its own (min, argmin); larger D takes a
// single-threaded GEMM per (row tile x code tile), folded into the lanes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"  // first: the -Wpsabi pragma (common/cpu_isa.h) covers common/search.h
#include "common/checks.h"
#include "common/search.h"
#include "cpu/parallel.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

using namespace cpu;

constexpr int64_t kDirectMaxDim = 16;
constexpr int64_t kDirectRows = 1024;        // rows per block: their lane state stays in L2
constexpr int64_t kDirectTileBytes = 16384;  // transposed code tile, stays in L1
constexpr int64_t kGemmRows = 256;           // GEMM tile: 256 x 512 outputs, in L2
constexpr int64_t kGemmCodes = 512;

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

template <typename T, typename Acc>
struct Problem {
  const T* z;
  const T* e;
  const Acc* sqnorm;  // ||e_k||^2
  int64_t n, k, dim;
  int64_t* indices;
  Acc* distances;
  MicroKernels<Acc> mk;
};

// Lanes -> one (index), then the exact distance of the winner.
template <typename T, typename Acc>
void finish_rows(const Problem<T, Acc>& p, int64_t r0, int64_t rows, const Acc* best,
                 const IndexOf<Acc>* best_k) {
  const auto load = [](T x) { return static_cast<Acc>(x); };
  for (int64_t r = 0; r < rows; ++r) {
    const Acc* b = best + r * p.mk.width;
    const IndexOf<Acc>* bk = best_k + r * p.mk.width;
    int64_t k = 0;
    if constexpr (std::is_same_v<Acc, float>) {
      uint64_t key = common::initial_search_key();
      for (int l = 0; l < p.mk.width; ++l)
        key = std::min(key, common::search_key(b[l], static_cast<uint32_t>(bk[l])));
      k = common::search_key_index(key);
    } else {
      Acc best_score = std::numeric_limits<Acc>::infinity();
      for (int l = 0; l < p.mk.width; ++l) common::merge_best(b[l], int64_t{bk[l]}, best_score, k);
    }
    const int64_t n = r0 + r;
    const T* zn = p.z + n * p.dim;
    Acc distance = common::squared_distance<Acc>(zn, p.e + k * p.dim, p.dim, load);
    if (!std::isfinite(distance)) {
      // NaN / Inf / overflow: the expanded score ranks such rows differently
      // from the exact distance, so decide them by the distance (rare rows).
      Acc best_distance = std::numeric_limits<Acc>::infinity();
      k = 0;
      for (int64_t c = 0; c < p.k; ++c)
        common::update_best(common::squared_distance<Acc>(zn, p.e + c * p.dim, p.dim, load), c,
                            best_distance, k);
      distance = common::squared_distance<Acc>(zn, p.e + k * p.dim, p.dim, load);
    }
    p.indices[n] = k;
    p.distances[n] = distance;
  }
}

template <typename Acc>
void reset_lanes(int64_t count, Acc* best, IndexOf<Acc>* best_k) {
  std::fill(best, best + count, std::numeric_limits<Acc>::infinity());
  std::fill(best_k, best_k + count, IndexOf<Acc>{0});
}

// The codebook as the direct path scans it (see scan_direct): tiles of `tile`
// codes, each transposed, scaled by -2 and followed by its ||e||^2 row. Built
// once per call; with D <= kDirectMaxDim it is O(K) memory, (D + 1) * 4 bytes
// a code, and it spares every row block a conversion of the codebook.
template <typename T, typename Acc>
std::vector<Acc> stage_codebook(const Problem<T, Acc>& p, int64_t tile) {
  const int64_t D = p.dim, tiles = ceil_div(p.k, tile);
  std::vector<Acc> staged(tiles * (D + 1) * tile);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * tile, kt = std::min(tile, p.k - k0);
      Acc* et = staged.data() + t * (D + 1) * tile;
      for (int64_t j = 0; j < kt; ++j)
        for (int64_t d = 0; d < D; ++d)
          et[d * tile + j] = Acc(-2) * static_cast<Acc>(p.e[(k0 + j) * D + d]);
      for (int64_t d = 0; d < D; ++d) std::fill(et + d * tile + kt, et + (d + 1) * tile, Acc(0));
      std::copy(p.sqnorm + k0, p.sqnorm + k0 + kt, et + D * tile);
      std::fill(et + D * tile + kt, et + (D + 1) * tile, std::numeric_limits<Acc>::infinity());
    }
  });
  return staged;
}

template <typename T, typename Acc>
void search_direct(const Problem<T, Acc>& p, const Acc* staged, int64_t tile, int64_t block_rows,
                   int64_t b0, int64_t b1) {
  const int64_t D = p.dim, W = p.mk.width, R = p.mk.rows, step = p.mk.codes;
  const int64_t rows_cap = round_up(block_rows, R);
  std::vector<Acc> zs(rows_cap * D), best(rows_cap * W);
  std::vector<IndexOf<Acc>> best_k(rows_cap * W);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t r0 = blk * block_rows, rows = std::min(block_rows, p.n - r0);
    const int64_t rows_pad = round_up(rows, R);
    for (int64_t i = 0; i < rows * D; ++i) zs[i] = static_cast<Acc>(p.z[r0 * D + i]);
    std::fill(zs.begin() + rows * D, zs.begin() + rows_pad * D, Acc(0));  // results dropped
    reset_lanes(rows_pad * W, best.data(), best_k.data());
    for (int64_t k0 = 0, t = 0; k0 < p.k; k0 += tile, ++t) {
      // The last tile's padding is scanned only up to the next register block.
      const int64_t width = round_up(std::min(tile, p.k - k0), step);
      p.mk.scan(zs.data(), rows_pad, staged + t * (D + 1) * tile, D, tile, width, k0, best.data(),
                best_k.data());
    }
    finish_rows(p, r0, rows, best.data(), best_k.data());
  }
}

// Rows of a T matrix as an Acc matrix for BLAS: a view when T is Acc, else
// converted into `buffer` (by ATen's vectorized copy, single-threaded here).
template <typename T, typename Acc>
at::Tensor as_matrix(const T* src, int64_t rows, int64_t dim, std::vector<Acc>& buffer) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value);
  if constexpr (std::is_same_v<T, Acc>) {
    return at::from_blob(const_cast<Acc*>(src), {rows, dim}, options);
  } else {
    at::Tensor out = at::from_blob(buffer.data(), {rows, dim}, options);
    out.copy_(at::from_blob(const_cast<T*>(src), {rows, dim},
                            at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)));
    return out;
  }
}

template <typename T, typename Acc>
void search_gemm(const Problem<T, Acc>& p, int64_t block_rows, int64_t b0, int64_t b1) {
  const int64_t D = p.dim, W = p.mk.width;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value);
  std::vector<Acc> zs(std::is_same_v<T, Acc> ? 0 : block_rows * D);
  std::vector<Acc> es(std::is_same_v<T, Acc> ? 0 : kGemmCodes * D);
  std::vector<Acc> dots(block_rows * kGemmCodes, Acc(0)), sq(kGemmCodes), best(block_rows * W);
  std::vector<IndexOf<Acc>> best_k(block_rows * W);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t r0 = blk * block_rows, rows = std::min(block_rows, p.n - r0);
    const at::Tensor zt = as_matrix(p.z + r0 * D, rows, D, zs);
    reset_lanes(rows * W, best.data(), best_k.data());
    for (int64_t k0 = 0; k0 < p.k; k0 += kGemmCodes) {
      const int64_t kt = std::min(kGemmCodes, p.k - k0), width = round_up(kt, W);
      const at::Tensor et = as_matrix(p.e + k0 * D, kt, D, es);
      at::Tensor out = at::from_blob(dots.data(), {rows, kt}, {kGemmCodes, 1}, options);
      at::mm_out(out, zt, et.t());
      std::copy(p.sqnorm + k0, p.sqnorm + k0 + kt, sq.begin());
      std::fill(sq.begin() + kt, sq.begin() + width, std::numeric_limits<Acc>::infinity());
      p.mk.fold(dots.data(), kGemmCodes, rows, sq.data(), width, k0, best.data(), best_k.data());
    }
    finish_rows(p, r0, rows, best.data(), best_k.data());
  }
}

template <typename T, typename Acc>
void search(const Problem<T, Acc>& p) {
  const bool direct = p.dim <= kDirectMaxDim;
  // Enough blocks for every thread, but no more rows per block than the path's tiles want.
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = round_up(ceil_div(p.n, threads), 8);
  const int64_t block_rows = std::min(direct ? kDirectRows : kGemmRows, per_thread);
  const int64_t blocks = ceil_div(p.n, block_rows);
  if (direct) {
    const int64_t step = p.mk.codes;
    const int64_t code_bytes = (p.dim + 1) * static_cast<int64_t>(sizeof(Acc));
    const int64_t tile = std::max(step, kDirectTileBytes / code_bytes / step * step);
    const std::vector<Acc> staged = stage_codebook(p, tile);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      search_direct(p, staged.data(), tile, block_rows, b0, b1);
    });
  } else {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      search_gemm(p, block_rows, b0, b1);
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                    const at::Tensor& codebook_sqnorm,
                                                    std::string_view precision) {
  VQK_CHECK_DEVICE(z, at::kCPU);
  VQK_CHECK_DEVICE(codebook, at::kCPU);
  check_nearest_code_args(z, codebook, codebook_sqnorm, precision);
  const int64_t n = z.size(0), k = codebook.size(0), dim = z.size(1);
  const bool fp64 = z.scalar_type() == at::kDouble;
  const at::Tensor zc = z.contiguous(), ec = codebook.contiguous();
  // fp64 ranks by fp64 norms (O(K)); the caller's are fp32.
  const at::Tensor sqnorm = fp64 ? ec.square().sum(1)
                                 : codebook_sqnorm.reshape({-1}).to(at::kFloat).contiguous();
  at::Tensor indices = at::empty({n}, zc.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, zc.options().dtype(fp64 ? at::kDouble : at::kFloat));
  if (n == 0) return {indices, distances};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "nearest_code", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Problem<scalar_t, Acc> p{zc.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(),
                                   sqnorm.const_data_ptr<Acc>(), n, k, dim,
                                   indices.mutable_data_ptr<int64_t>(),
                                   distances.mutable_data_ptr<Acc>(), select_micro_kernels<Acc>()};
    search(p);
  });
  return {indices, distances};
}

}  // namespace vqkernels
