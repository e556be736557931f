// Nearest-codebook search, C++ CPU kernel (result rule and math in csrc/common/search.h).
//   indices[n]   = argmin_k ||e_k||^2 - 2 z_n.e_k   (lowest k on ties)
//   distances[n] = ||z_n - e_indices[n]||^2         (exact, recomputed directly)
// Parallel over blocks of rows; never N x K: beyond inputs and outputs, O(K) memory and
// bounded per-thread tiles. Math in fp32 (fp64 for fp64 input) whatever the precision mode.
// Small D (<= kDirectMaxDim) scans a staged, transposed codebook with a register-blocked
// SIMD loop, one FMA per (row, code, dim), each lane keeping its own (min, argmin); larger D
// takes a single-threaded GEMM per (row tile x code tile), folded into the lanes; on a CPU
// with AVX512-BF16, fp32 ranking screens each tile with bf16 products instead and re-scores
// the candidates in fp32 (search_screen.h). The residual search runs the same block search
// once a stage on the block's residual, which stays in the thread's buffer between stages.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"  // first: the -Wpsabi pragma (common/cpu_isa.h) covers common/search.h
#include "common/checks.h"
#include "common/search.h"
#include "cpu/blas_tiles.h"
#include "cpu/parallel.h"
#include "cpu/search_lanes.h"
#include "cpu/search_screen.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

using namespace cpu;

constexpr int64_t kDirectMaxDim = 16;
constexpr int64_t kDirectRows = 1024;        // rows per block: their lane state stays in L2
constexpr int64_t kDirectTileBytes = 16384;  // transposed code tile, stays in L1
constexpr int64_t kGemmRows = 256;           // GEMM tile: 256 x 512 outputs, in L2
constexpr int64_t kGemmCodes = 512;
constexpr int64_t kDenseRescore = 4;  // a screened tile with over 1/4 candidates: fp32 GEMM

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

// sum_d (a_d - b_d)^2 in Acc (sum_in_lanes: a pair always gets the same bits).
template <typename Acc, typename T>
Acc squared_distance(const T* a, const T* b, int64_t dim) {
  return sum_in_lanes<Acc>(dim, [&](int64_t d) {
    const Acc diff = static_cast<Acc>(a[d]) - static_cast<Acc>(b[d]);
    return diff * diff;
  });
}

// Row n's result once code k won: the exact distance to it, or, where that is not finite
// (NaN / Inf / overflow: the expanded score ranks such rows differently from the exact
// distance), the code the exact distance picks (rare rows).
template <typename T, typename Acc>
void finish_row(const Problem<T, Acc>& p, int64_t n, int64_t k) {
  const T* zn = p.z + n * p.dim;
  Acc distance = squared_distance<Acc>(zn, p.e + k * p.dim, p.dim);
  if (!std::isfinite(distance)) {
    Acc best_distance = std::numeric_limits<Acc>::infinity();
    k = 0;
    for (int64_t c = 0; c < p.k; ++c)
      common::update_best(squared_distance<Acc>(zn, p.e + c * p.dim, p.dim), c, best_distance, k);
    distance = squared_distance<Acc>(zn, p.e + k * p.dim, p.dim);
  }
  p.indices[n] = k;
  p.distances[n] = distance;
}

// Lanes -> one (index) a row, then finish_row.
template <typename T, typename Acc>
void finish_rows(const Problem<T, Acc>& p, int64_t r0, int64_t rows, const Acc* best,
                 const IndexOf<Acc>* best_k) {
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
    finish_row(p, r0 + r, k);
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
  torch::stable::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
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
// into staged tiles; whether the GEMM path screens (fp32 ranking, search_screen.h).
struct Plan {
  bool direct, screen;
  int64_t block_rows, tile;
};

template <typename Acc>
Plan plan_search(int64_t n, int64_t dim, const MicroKernels<Acc>& mk) {
  const bool direct = dim <= kDirectMaxDim;
  const bool screen = !direct && std::is_same_v<Acc, float> && screen_available();
  const int64_t per_thread = round_up(ceil_div(n, torch::stable::get_num_threads()), 8);
  const int64_t block_rows = std::max<int64_t>(1, std::min(direct ? kDirectRows : kGemmRows,
                                                           per_thread));
  const int64_t code_bytes = (dim + 1) * static_cast<int64_t>(sizeof(Acc));
  const int64_t tile = std::max<int64_t>(mk.codes, kDirectTileBytes / code_bytes / mk.codes *
                                                       mk.codes);
  return {direct, screen, block_rows, tile};
}

// A thread's buffers for the blocks of one plan: z rows converted (or padded
// to the register block), a converted code tile, a GEMM tile, the lanes; or the screen's.
template <typename Acc>
struct Scratch {
  std::vector<Acc> zs, es, dots, sq, best;
  std::vector<IndexOf<Acc>> best_k;
  ScreenRows screen;
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
      if (plan.screen)
        screen.masks.resize(round_up(plan.block_rows, kScreenRows) * kGemmCodes / kScreenCodes);
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

// Rows of a T matrix as an Acc matrix for BLAS: src itself when T is Acc, else converted
// into `buffer` (by torch's vectorized copy_, single-threaded here).
template <typename T, typename Acc>
const Acc* as_acc(const T* src, int64_t rows, int64_t dim, std::vector<Acc>& buffer) {
  if constexpr (std::is_same_v<T, Acc>) {
    return src;
  } else {
    // The rows viewed as the column-major (dim x rows) matrices they also are.
    Tensor out = as_tensor(buffer.data(), dim, rows, dim, false);
    torch::stable::copy_(out, as_tensor(src, dim, rows, dim, false));
    return buffer.data();
  }
}

// Rows [r0, r0 + rows) of p against every code, a GEMM tile of codes at a time.
template <typename T, typename Acc>
void search_block_gemm(const Problem<T, Acc>& p, int64_t r0, int64_t rows, Scratch<Acc>& s) {
  const int64_t D = p.dim, W = p.mk.width;
  const Acc* zt = as_acc(p.z + r0 * D, rows, D, s.zs);
  reset_lanes(rows * W, s.best.data(), s.best_k.data());
  for (int64_t k0 = 0; k0 < p.k; k0 += kGemmCodes) {
    const int64_t kt = std::min(kGemmCodes, p.k - k0), width = round_up(kt, W);
    const Acc* et = as_acc(p.e + k0 * D, kt, D, s.es);
    // dots (rows x kt, row stride kGemmCodes) = z e^T; column-major, its transpose e z^T.
    gemm<Acc>(true, false, kt, rows, D, Acc(1), et, D, zt, D, Acc(0), s.dots.data(),
              kGemmCodes);
    std::copy(p.sqnorm + k0, p.sqnorm + k0 + kt, s.sq.begin());
    std::fill(s.sq.begin() + kt, s.sq.begin() + width, std::numeric_limits<Acc>::infinity());
    p.mk.fold(s.dots.data(), kGemmCodes, rows, s.sq.data(), width, k0, s.best.data(),
              s.best_k.data());
  }
  finish_rows(p, r0, rows, s.best.data(), s.best_k.data());
}

// Rows [r0, r0 + rows) of an fp32-ranked p against every code, screened a GEMM tile of
// codes at a time (search_screen.h): bf16 products, then fp32 scores of the candidates.
template <typename T>
void search_block_screen(const Problem<T, float>& p, const ScreenCodes& codes, int64_t r0,
                         int64_t rows, Scratch<float>& s) {
  const float* zt = as_acc(p.z + r0 * p.dim, rows, p.dim, s.zs);
  prepare_screen_rows(zt, rows, p.dim, s.screen);
  const int64_t padded = round_up(rows, kScreenRows);
  for (int64_t k0 = 0; k0 < p.k; k0 += kGemmCodes) {
    const int64_t kt = std::min(kGemmCodes, p.k - k0);
    screen_tile(codes, k0, kt, s.screen, padded);
    if (count_candidates(s.screen, rows, kt) * kDenseRescore > rows * kt) {
      // Mostly candidates (duplicate or equidistant codes): the fp32 GEMM path's tiles cost
      // less than that many dot products one by one. The whole block goes that way, so that
      // one computation scores all its pairs and exact ties still go to the lowest index.
      search_block_gemm(p, r0, rows, s);
      return;
    }
    rescore_candidates(zt, p.e, p.sqnorm, p.dim, rows, k0, kt, s.screen);
  }
  for (int64_t r = 0; r < rows; ++r)
    finish_row(p, r0 + r, common::search_key_index(s.screen.best[r]));
}

// A codebook made ready for the plan's path once a call: the direct path's staged
// tiles or the screen's bf16 codes (else nothing).
template <typename Acc>
struct PreparedCodes {
  std::vector<Acc> staged;
  ScreenCodes screen;
};

template <typename T, typename Acc>
PreparedCodes<Acc> prepare_codes(const Problem<T, Acc>& p, const Plan& plan) {
  PreparedCodes<Acc> prepared;
  if (plan.direct) prepared.staged = stage_codebook(p, plan.tile);
  if constexpr (std::is_same_v<Acc, float>)
    if (plan.screen) prepared.screen = pack_screen_codes(p.e, p.sqnorm, p.k, p.dim);
  return prepared;
}

template <typename T, typename Acc>
void search_block(const Problem<T, Acc>& p, const Plan& plan, const PreparedCodes<Acc>& codes,
                  int64_t r0, int64_t rows, Scratch<Acc>& s) {
  if (plan.direct) {
    search_block_direct(p, codes.staged.data(), plan.tile, r0, rows, s);
  } else if constexpr (std::is_same_v<Acc, float>) {
    if (plan.screen) search_block_screen(p, codes.screen, r0, rows, s);
    else search_block_gemm(p, r0, rows, s);
  } else {
    search_block_gemm(p, r0, rows, s);
  }
}

template <typename T, typename Acc>
void search(const Problem<T, Acc>& p) {
  const Plan plan = plan_search(p.n, p.dim, p.mk);
  const PreparedCodes<Acc> codes = prepare_codes(p, plan);
  torch::stable::parallel_for(0, ceil_div(p.n, plan.block_rows), 1, [&](int64_t b0, int64_t b1) {
    Scratch<Acc> scratch(plan, p.dim, p.mk, static_cast<T*>(nullptr));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * plan.block_rows;
      search_block(p, plan, codes, r0, std::min(plan.block_rows, p.n - r0), scratch);
    }
  });
}

// One codebook of a residual search as the search reads it: Acc codes (a view
// when the input is Acc), their ||e||^2 and what the plan's path prepares.
template <typename Acc>
struct Stage {
  Tensor codes, sqnorm;
  PreparedCodes<Acc> prepared;
};

// Each block of rows goes through every stage while its residual stays in the
// thread's buffer; stage q is nearest_code on the Acc residual:
//   i_q = argmin_k ||r_q - e^q_k||^2,  r_(q+1) = r_q - e^q_(i_q),  out = sum_q e^q_(i_q)
template <typename T, typename Acc>
void residual_search(const T* z, int64_t n, int64_t dim, const std::vector<Stage<Acc>>& stages,
                     const Plan& plan, const MicroKernels<Acc>& mk, int64_t* indices,
                     T* quantized) {
  const int64_t num_stages = static_cast<int64_t>(stages.size()), block = plan.block_rows;
  torch::stable::parallel_for(0, ceil_div(n, block), 1, [&](int64_t b0, int64_t b1) {
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
        const Problem<Acc, Acc> p{residual.data(), cdata<Acc>(stage.codes),
                                  cdata<Acc>(stage.sqnorm), rows,
                                  stage.codes.size(0), dim, chosen.data(), distances.data(), mk};
        search_block(p, plan, stage.prepared, 0, rows, scratch);
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

// The ||e_k||^2 the search ranks by: fp64 ranks by fp64 norms, codes.square().sum(1)
// (O(K); aten::square is called by name, the stable ABI does not wrap it); the caller's are fp32.
Tensor ranking_sqnorm(const Tensor& codes, const Tensor& given, bool fp64) {
  if (!fp64) {
    return contiguous(torch::stable::to(torch::stable::reshape(given, {-1}), ScalarType::Float));
  }
  const Tensor squares = call_aten_tensor("aten::square", "", codes);
  return torch::stable::sum(squares, torch::headeronly::IntHeaderOnlyArrayRef{1});
}

}  // namespace

bool cpu_search_screens() { return screen_available(); }

std::tuple<Tensor, Tensor> nearest_code_cpu(const Tensor& z, const Tensor& codebook,
                                            const Tensor& codebook_sqnorm,
                                            std::string_view precision) {
  VQK_CHECK_DEVICE(z, DeviceType::CPU);
  VQK_CHECK_DEVICE(codebook, DeviceType::CPU);
  check_nearest_code_args(z, codebook, codebook_sqnorm, precision);
  const int64_t n = z.size(0), k = codebook.size(0), dim = z.size(1);
  const bool fp64 = z.scalar_type() == ScalarType::Double;
  const Tensor zc = contiguous(z), ec = contiguous(codebook);
  const Tensor sqnorm = ranking_sqnorm(ec, codebook_sqnorm, fp64);
  Tensor indices = new_empty(zc, {n}, ScalarType::Long);
  Tensor distances = new_empty(zc, {n}, fp64 ? ScalarType::Double : ScalarType::Float);
  if (n == 0) return {indices, distances};
  VQK_DISPATCH_FLOATING(zc.scalar_type(), "nearest_code", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Problem<scalar_t, Acc> p{cdata<scalar_t>(zc), cdata<scalar_t>(ec), cdata<Acc>(sqnorm),
                                   n, k, dim, data<int64_t>(indices), data<Acc>(distances),
                                   select_micro_kernels<Acc>()};
    search(p);
  });
  return {indices, distances};
}

std::tuple<Tensor, Tensor> residual_nearest_code_cpu(const Tensor& z,
                                                     const std::vector<Tensor>& codebooks,
                                                     const std::vector<Tensor>& codebook_sqnorms,
                                                     std::string_view precision) {
  VQK_CHECK_DEVICE(z, DeviceType::CPU);
  check_residual_nearest_code_args(z, codebooks, codebook_sqnorms, precision);
  const int64_t n = z.size(0), dim = z.size(1), num_stages = codebooks.size();
  const bool fp64 = z.scalar_type() == ScalarType::Double;
  const ScalarType acc_type = fp64 ? ScalarType::Double : ScalarType::Float;
  Tensor indices = new_empty(z, {n, num_stages}, ScalarType::Long);
  Tensor quantized = new_empty(z, {n, dim});
  if (n == 0) return {indices, quantized};
  const Tensor zc = contiguous(z);
  VQK_DISPATCH_FLOATING(zc.scalar_type(), "residual_nearest_code", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const MicroKernels<Acc> mk = select_micro_kernels<Acc>();
    const Plan plan = plan_search(n, dim, mk);
    std::vector<Stage<Acc>> stages;
    for (int64_t q = 0; q < num_stages; ++q) {
      Tensor codes = contiguous(torch::stable::to(codebooks[q], acc_type));
      Tensor sqnorm = ranking_sqnorm(codes, codebook_sqnorms[q], fp64);
      const Problem<Acc, Acc> p{nullptr, cdata<Acc>(codes), cdata<Acc>(sqnorm), 0,
                                codes.size(0), dim, nullptr, nullptr, mk};
      PreparedCodes<Acc> prepared = prepare_codes(p, plan);
      stages.push_back({std::move(codes), std::move(sqnorm), std::move(prepared)});
    }
    residual_search(cdata<scalar_t>(zc), n, dim, stages, plan, mk, data<int64_t>(indices),
                    data<scalar_t>(quantized));
  });
  return {indices, quantized};
}

}  // namespace vqkernels
