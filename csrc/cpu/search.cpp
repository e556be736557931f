// Nearest-codebook search, C++ CPU kernel (result rule and math in csrc/common/search.h).
//   indices[n]   = argmin_k ||e_k||^2 - 2 z_n.e_k   (lowest k on ties)
//   distances[n] = ||z_n - e_indices[n]||^2         (exact, recomputed directly)
// Parallel over blocks of rows; never N x K: beyond inputs and outputs, O(K) memory and
// bounded per-thread tiles. Math in fp32 (fp64 for fp64 input) whatever the precision mode.
// Small D (<= kDirectMaxDim) scans a staged, transposed codebook with a register-blocked
// SIMD loop, one FMA per (row, code, dim), each lane keeping its own (min, argmin); larger D
// takes a single-threaded GEMM per (row tile x code tile), folded into the lanes. The
// residual search runs the same block search once a stage on the block's residual, which
// stays in the thread's buffer between stages.
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
#include "cpu/search_lanes.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

using namespace cpu;

constexpr int64_t kDirectMaxDim = 16;
constexpr int64_t kDirectRows = 1024;        // rows per block: their lane state stays in L2
constexpr int64_t kDirectTileBytes = 16384;  // transposed code tile, stays in L1
constexpr int64_t kGemmRows = 256;           // GEMM tile: 256 x 512 outputs, in L2
constexpr int64_t kGemmCodes = 512;

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

// How a search over D cuts its rows into blocks (enough for every thread, no
// more rows than the path's tiles want) and, on the direct path, its codes
// into staged tiles.
struct Plan {
  bool direct;
  int64_t block_rows, tile;
};

template <typename Acc>
Plan plan_search(int64_t n, int64_t dim, const MicroKernels<Acc>& mk) {
  const bool direct = dim <= kDirectMaxDim;
  const int64_t per_thread = round_up(ceil_div(n, at::get_num_threads()), 8);
  const int64_t block_rows = std::max<int64_t>(1, std::min(direct ? kDirectRows : kGemmRows,
                                                           per_thread));
  const int64_t code_bytes = (dim + 1) * static_cast<int64_t>(sizeof(Acc));
  const int64_t tile = std::max<int64_t>(mk.codes, kDirectTileBytes / code_bytes / mk.codes *
                                                       mk.codes);
  return {direct, block_rows, tile};
}

// A thread's buffers for the blocks of one plan: z rows converted (or padded
// to the register block), a converted code tile, a GEMM tile, the lanes.
template <typename Acc>
struct Scratch {
  std::vector<Acc> zs, es, dots, sq, best;
  std::vector<IndexOf<Acc>> best_k;
  template <typename T>
  Scratch(const Plan& plan, int64_t dim, const MicroKernels<Acc>& mk, T*) {
    constexpr bool convert = !std::is_same_v<T, Acc>;
    const int64_t rows = round_up(plan.block_rows, mk.rows), lanes = rows * mk.width;
    best.resize(lanes);
    best_k.resize(lanes);
    if (plan.direct) {
      zs.resize(rows * dim);
    } else {
      zs.resize(convert ? plan.block_rows * dim : 0);
      es.resize(convert ? kGemmCodes * dim : 0);
      dots.resize(plan.block_rows * kGemmCodes);  // zeros: the fold reads padding columns
      sq.resize(kGemmCodes);
    }
  }
};

// Rows [r0, r0 + rows) of p against every code, scanning the staged tiles.
template <typename T, typename Acc>
void search_block_direct(const Problem<T, Acc>& p, const Acc* staged, int64_t tile, int64_t r0,
                         int64_t rows, Scratch<Acc>& s) {
  const int64_t D = p.dim, W = p.mk.width, step = p.mk.codes;
  const int64_t rows_pad = round_up(rows, p.mk.rows);
  for (int64_t i = 0; i < rows * D; ++i) s.zs[i] = static_cast<Acc>(p.z[r0 * D + i]);
  std::fill(s.zs.begin() + rows * D, s.zs.begin() + rows_pad * D, Acc(0));  // results dropped
  reset_lanes(rows_pad * W, s.best.data(), s.best_k.data());
  for (int64_t k0 = 0, t = 0; k0 < p.k; k0 += tile, ++t) {
    // The last tile's padding is scanned only up to the next register block.
    const int64_t width = round_up(std::min(tile, p.k - k0), step);
    p.mk.scan(s.zs.data(), rows_pad, staged + t * (D + 1) * tile, D, tile, width, k0,
              s.best.data(), s.best_k.data());
  }
  finish_rows(p, r0, rows, s.best.data(), s.best_k.data());
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

// Rows [r0, r0 + rows) of p against every code, a GEMM tile of codes at a time.
template <typename T, typename Acc>
void search_block_gemm(const Problem<T, Acc>& p, int64_t r0, int64_t rows, Scratch<Acc>& s) {
  const int64_t D = p.dim, W = p.mk.width;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value);
  const at::Tensor zt = as_matrix(p.z + r0 * D, rows, D, s.zs);
  reset_lanes(rows * W, s.best.data(), s.best_k.data());
  for (int64_t k0 = 0; k0 < p.k; k0 += kGemmCodes) {
    const int64_t kt = std::min(kGemmCodes, p.k - k0), width = round_up(kt, W);
    const at::Tensor et = as_matrix(p.e + k0 * D, kt, D, s.es);
    at::Tensor out = at::from_blob(s.dots.data(), {rows, kt}, {kGemmCodes, 1}, options);
    at::mm_out(out, zt, et.t());
    std::copy(p.sqnorm + k0, p.sqnorm + k0 + kt, s.sq.begin());
    std::fill(s.sq.begin() + kt, s.sq.begin() + width, std::numeric_limits<Acc>::infinity());
    p.mk.fold(s.dots.data(), kGemmCodes, rows, s.sq.data(), width, k0, s.best.data(),
              s.best_k.data());
  }
  finish_rows(p, r0, rows, s.best.data(), s.best_k.data());
}

template <typename T, typename Acc>
void search_block(const Problem<T, Acc>& p, const Plan& plan, const std::vector<Acc>& staged,
                  int64_t r0, int64_t rows, Scratch<Acc>& s) {
  if (plan.direct) search_block_direct(p, staged.data(), plan.tile, r0, rows, s);
  else search_block_gemm(p, r0, rows, s);
}

template <typename T, typename Acc>
void search(const Problem<T, Acc>& p) {
  const Plan plan = plan_search(p.n, p.dim, p.mk);
  const std::vector<Acc> staged = plan.direct ? stage_codebook(p, plan.tile) : std::vector<Acc>{};
  at::parallel_for(0, ceil_div(p.n, plan.block_rows), 1, [&](int64_t b0, int64_t b1) {
    Scratch<Acc> scratch(plan, p.dim, p.mk, static_cast<T*>(nullptr));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * plan.block_rows;
      search_block(p, plan, staged, r0, std::min(plan.block_rows, p.n - r0), scratch);
    }
  });
}

// One codebook of a residual search as the search reads it: Acc codes (a view
// when the input is Acc), their ||e||^2 and, on the direct path, the staged tiles.
template <typename Acc>
struct Stage {
  at::Tensor codes, sqnorm;
  std::vector<Acc> staged;
};

// Each block of rows goes through every stage while its residual stays in the
// thread's buffer; stage q is nearest_code on the Acc residual:
//   i_q = argmin_k ||r_q - e^q_k||^2,  r_(q+1) = r_q - e^q_(i_q),  out = sum_q e^q_(i_q)
template <typename T, typename Acc>
void residual_search(const T* z, int64_t n, int64_t dim, const std::vector<Stage<Acc>>& stages,
                     const Plan& plan, const MicroKernels<Acc>& mk, int64_t* indices,
                     T* quantized) {
  const int64_t num_stages = static_cast<int64_t>(stages.size()), block = plan.block_rows;
  at::parallel_for(0, ceil_div(n, block), 1, [&](int64_t b0, int64_t b1) {
    Scratch<Acc> scratch(plan, dim, mk, static_cast<Acc*>(nullptr));
    std::vector<Acc> residual(block * dim), sum(block * dim), distances(block);
    std::vector<int64_t> chosen(block);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * block, rows = std::min(block, n - r0);
      std::transform(z + r0 * dim, z + (r0 + rows) * dim, residual.begin(),
                     [](T v) { return static_cast<Acc>(v); });
      std::fill(sum.begin(), sum.begin() + rows * dim, Acc(0));
      for (int64_t q = 0; q < num_stages; ++q) {
        const Stage<Acc>& stage = stages[q];
        const Problem<Acc, Acc> p{residual.data(), stage.codes.template const_data_ptr<Acc>(),
                                  stage.sqnorm.template const_data_ptr<Acc>(), rows,
                                  stage.codes.size(0), dim, chosen.data(), distances.data(), mk};
        search_block(p, plan, stage.staged, 0, rows, scratch);
        for (int64_t r = 0; r < rows; ++r) {
          const Acc* code = p.e + chosen[r] * dim;
          Acc* res = residual.data() + r * dim;
          Acc* out = sum.data() + r * dim;
          for (int64_t d = 0; d < dim; ++d) {
            res[d] -= code[d];
            out[d] += code[d];
          }
          indices[(r0 + r) * num_stages + q] = chosen[r];
        }
      }
      std::transform(sum.begin(), sum.begin() + rows * dim, quantized + r0 * dim,
                     [](Acc v) { return static_cast<T>(v); });
    }
  });
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

std::tuple<at::Tensor, at::Tensor> residual_nearest_code_cpu(const at::Tensor& z,
                                                             at::TensorList codebooks,
                                                             at::TensorList codebook_sqnorms,
                                                             std::string_view precision) {
  VQK_CHECK_DEVICE(z, at::kCPU);
  check_residual_nearest_code_args(z, codebooks, codebook_sqnorms, precision);
  const int64_t n = z.size(0), dim = z.size(1), num_stages = codebooks.size();
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor indices = at::empty({n, num_stages}, z.options().dtype(at::kLong));
  at::Tensor quantized = at::empty({n, dim}, z.options());
  if (n == 0) return {indices, quantized};
  const at::Tensor zc = z.contiguous();
  const auto type = zc.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "residual_nearest_code", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const MicroKernels<Acc> mk = select_micro_kernels<Acc>();
    const Plan plan = plan_search(n, dim, mk);
    std::vector<Stage<Acc>> stages;
    for (int64_t q = 0; q < num_stages; ++q) {
      at::Tensor codes = codebooks[q].to(acc_type).contiguous();
      // fp64 ranks by fp64 norms (O(K)); the caller's are fp32.
      at::Tensor sqnorm = acc_type == at::kDouble
                              ? codes.square().sum(1)
                              : codebook_sqnorms[q].reshape({-1}).to(at::kFloat).contiguous();
      std::vector<Acc> staged;
      if (plan.direct) {
        const Problem<Acc, Acc> p{nullptr, codes.const_data_ptr<Acc>(),
                                  sqnorm.const_data_ptr<Acc>(), 0, codes.size(0), dim, nullptr,
                                  nullptr, mk};
        staged = stage_codebook(p, plan.tile);
      }
      stages.push_back({std::move(codes), std::move(sqnorm), std::move(staged)});
    }
    residual_search(zc.const_data_ptr<scalar_t>(), n, dim, stages, plan, mk,
                    indices.mutable_data_ptr<int64_t>(), quantized.mutable_data_ptr<scalar_t>());
  });
  return {indices, quantized};
}

}  // namespace vqkernels
