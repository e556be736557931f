#pragma once
// The bf16 screen of the C++ CPU search's GEMM path (search.cpp). On a CPU with AVX512-BF16,
// an fp32 search takes the dot products of a tile from bf16 copies of its rows and codes, at
// twice the fp32 FMA rate (VDPBF16PS), and scores again in fp32 every code that the error
// bound of those products cannot rule out. A code wins only by its fp32 score: the screen
// changes the speed, not the result rule (common/search.h).
//
// For a row z and a code e (fp32 values), u = 2^-8 (bf16 rounding), u32 = 2^-24 and
// gamma = D u32 / (1 - D u32) for D (even) fp32 additions, the screened product obeys
//   |dot~ - z.e| <= kappa ||z|| ||e|| + flushed denormals,  kappa = 2u + u^2 + gamma (1+u)^2
// and the screened score s~ = sq - 2 dot~ (sq: the ranking ||e||^2) lies within
//   b = P ||e|| + slack + Q,   P = 1.01 (2 kappa + 4 u32) ||z|| + 2^-120 sqrt(D),
//                              slack = 2^-22 |sq|,  Q = 2^-120 (sqrt(D) ||z|| + D)
// of the exact score s = sq - 2 z.e, the fp32 rounding of s~ and of s~ +- b included.
// T = min_k (s~_k + b_k) is at least min_k s_k, so the best code k* has
// s~_k* - b_k* <= s_k* <= T: every code with s~ - b <= T is a candidate. The threshold a
// tile is screened against only falls, so a code screened early is at worst re-scored for
// nothing.
//
// A row or code with a norm above 2^60 (bf16 and fp32 products could overflow) or not finite
// gets an infinite bound: it never lowers T and every pairing with it is re-scored. A block of
// rows whose tile is mostly candidates (duplicate or equidistant codes) runs the fp32 GEMM
// path instead (search.cpp), which scores every pair at BLAS speed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/search.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

#ifdef VQK_X86_SIMD
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace vqkernels::cpu {
namespace {  // internal to search.cpp, the one file that includes this

constexpr int64_t kScreenRows = 4;    // rows of a register block
constexpr int64_t kScreenLanes = 16;  // codes of a vector of products
constexpr int64_t kScreenCodes = 64;  // codes of a register block: one candidate mask word
constexpr double kScreenMaxNorm = 0x1p60;
constexpr double kScreenTiny = 0x1p-120;

// Whether this process's searches screen: AVX-512 as torch's capability allows it (which
// checks the OS saves its registers; ATEN_CPU_CAPABILITY=avx2 turns the screen off) and the
// BF16 dot products (CPUID leaf 7, subleaf 1, EAX bit 5: read directly, as compilers differ
// in the names __builtin_cpu_supports knows).
inline bool screen_available() {
#ifdef VQK_X86_SIMD
  static const bool available = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool bf16 = __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5));
    return bf16 && common::cpu_isa() == common::Isa::kAvx512;
  }();
  return available;
#else
  return false;
#endif
}

// fp32 -> bf16 bits, rounded to nearest even; NaN stays NaN.
inline uint32_t bf16_bits(float x) {
  const uint32_t u = common::float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Elements 2p and 2p + 1 of a row as one 32-bit lane of VDPBF16PS (the even one low).
template <typename T>
uint32_t bf16_pair(const T* x, int64_t dim, int64_t p) {
  const float lo = static_cast<float>(x[2 * p]);
  const float hi = 2 * p + 1 < dim ? static_cast<float>(x[2 * p + 1]) : 0.0f;
  return bf16_bits(lo) | (bf16_bits(hi) << 16);
}

// ||x|| of fp32 values (summed in fp64), or +inf where the screen cannot bound x.
template <typename T>
float screen_norm(const T* x, int64_t dim) {
  double sum = 0;
  for (int64_t d = 0; d < dim; ++d) sum += static_cast<double>(x[d]) * static_cast<double>(x[d]);
  const double norm = std::sqrt(sum);
  return norm <= kScreenMaxNorm ? static_cast<float>(norm) : std::numeric_limits<float>::infinity();
}

// A codebook as the screen reads it: bf16 pairs of 16 codes a vector, K padded to a register
// block, and per code the ranking ||e||^2, ||e|| and the slack of its score; padded codes
// hold +inf, 0, 0 (and are masked out).
struct ScreenCodes {
  int64_t pairs = 0;             // ceil(D / 2)
  std::vector<uint32_t> packed;  // [k / 16][pairs][16]
  std::vector<float> sq, norm, slack;

  const uint32_t* tile(int64_t k0) const { return packed.data() + k0 * pairs; }
};

template <typename T>
ScreenCodes pack_screen_codes(const T* e, const float* sqnorm, int64_t k, int64_t dim) {
  ScreenCodes c;
  c.pairs = ceil_div(dim, 2);
  const int64_t padded = round_up(k, kScreenCodes), vectors = padded / kScreenLanes;
  c.packed.assign(padded * c.pairs, 0u);
  c.sq.assign(padded, std::numeric_limits<float>::infinity());
  c.norm.assign(padded, 0.0f);
  c.slack.assign(padded, 0.0f);
  torch::stable::parallel_for(0, vectors, 1, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      for (int64_t j = v * kScreenLanes; j < std::min(k, (v + 1) * kScreenLanes); ++j) {
        const T* code = e + j * dim;
        uint32_t* lane = c.packed.data() + v * c.pairs * kScreenLanes + j % kScreenLanes;
        for (int64_t p = 0; p < c.pairs; ++p) lane[p * kScreenLanes] = bf16_pair(code, dim, p);
        c.sq[j] = sqnorm[j];
        c.norm[j] = screen_norm(code, dim);
        c.slack[j] = static_cast<float>(0x1p-22 * std::fabs(sqnorm[j]));
      }
    }
  });
  return c;
}

// A block of rows as the screen reads it: bf16 pairs (rows padded with zeros to a register
// block), per row its P and Q, its threshold T and its best fp32 key so far.
struct ScreenRows {
  std::vector<uint32_t> packed;
  std::vector<float> p, q, threshold;
  std::vector<uint64_t> best;
  std::vector<uint64_t> masks;  // [row][register block of the tile]: candidate bits
};

#ifdef VQK_X86_SIMD
// A mask of the first n of 16 lanes (n clamped to [0, 16]).
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>((uint32_t{1} << std::clamp<int64_t>(n, 0, 16)) - 1);
}

// A row x as bf16 pairs (VCVTNE2PS2BF16: round to nearest even, denormals flushed, which
// the bound's 2^-120 terms cover) and its sum of squares in fp64, 32 elements at a time.
VQK_TARGET_AVX512_BF16 double pack_screen_row(const float* x, int64_t dim, uint32_t* pairs) {
  __m512d sums[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
                     _mm512_setzero_pd()};
  for (int64_t d = 0; d < dim; d += 32) {
    const int64_t n = std::min<int64_t>(32, dim - d);
    const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(n), x + d);
    const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(n - 16), x + d + 16);
    _mm512_mask_storeu_epi32(pairs + d / 2, first_lanes(ceil_div(n, 2)),
                             (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    for (int i = 0; i < 4; ++i) {
      const int64_t left = n - 8 * i;
      const auto mask = static_cast<__mmask8>((1u << std::clamp<int64_t>(left, 0, 8)) - 1);
      const __m512d part = __builtin_convertvector(_mm256_maskz_loadu_ps(mask, x + d + 8 * i),
                                                   __m512d);
      sums[i] = _mm512_fmadd_pd(part, part, sums[i]);
    }
  }
  alignas(64) double lanes[8];
  _mm512_store_pd(lanes, _mm512_add_pd(_mm512_add_pd(sums[0], sums[1]),
                                       _mm512_add_pd(sums[2], sums[3])));
  double sum = 0;
  for (double lane : lanes) sum += lane;
  return sum;
}
#else
inline double pack_screen_row(const float*, int64_t, uint32_t*) { return 0; }
#endif

inline void prepare_screen_rows(const float* z, int64_t rows, int64_t dim, ScreenRows& s) {
  const int64_t pairs = ceil_div(dim, 2), padded = round_up(rows, kScreenRows);
  const double u = 0x1p-8, u32 = 0x1p-24, terms = 2.0 * pairs;
  const double gamma = terms * u32 / (1 - terms * u32);
  const double kappa = 2 * u + u * u + gamma * (1 + u) * (1 + u);
  const double tiny_root_d = kScreenTiny * std::sqrt(terms);
  s.packed.assign(padded * pairs, 0u);
  s.p.assign(padded, 0.0f);
  s.q.assign(padded, 0.0f);
  s.threshold.assign(padded, std::numeric_limits<float>::infinity());
  s.best.assign(padded, common::initial_search_key());
  for (int64_t r = 0; r < rows; ++r) {
    const double root = std::sqrt(pack_screen_row(z + r * dim, dim, s.packed.data() + r * pairs));
    const double norm = root <= kScreenMaxNorm ? root : std::numeric_limits<double>::infinity();
    s.p[r] = static_cast<float>(1.01 * (2 * kappa + 4 * u32) * norm + tiny_root_d);
    s.q[r] = static_cast<float>(tiny_root_d * norm + kScreenTiny * terms);
  }
}

#ifdef VQK_X86_SIMD
// The screen of the code tile [k0, k0 + count) for every row of the block (a multiple of
// 4): the products of a register block of 4 rows x 64 codes, each row's threshold lowered by
// the block's s~ + b, then the block's candidates (s~ - b <= T, real codes only) as one mask
// word a row, masks[row][block].
VQK_TARGET_AVX512_BF16 void screen_tile(const ScreenCodes& c, int64_t k0, int64_t count,
                                        ScreenRows& s, int64_t rows) {
  const int64_t pairs = c.pairs, blocks = ceil_div(count, kScreenCodes);
  const uint32_t* codes = c.tile(k0);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = k0 + blk * kScreenCodes;
    __mmask16 real[4];
    for (int v = 0; v < 4; ++v) real[v] = first_lanes(k0 + count - j0 - v * kScreenLanes);
    const uint32_t* block_codes = codes + blk * kScreenCodes * pairs;
    for (int64_t r0 = 0; r0 < rows; r0 += kScreenRows) {
      __m512 acc[kScreenRows][4];
      for (auto& row : acc)
        for (__m512& a : row) a = _mm512_setzero_ps();
      const uint32_t* z = s.packed.data() + r0 * pairs;
      for (int64_t p = 0; p < pairs; ++p) {
        __m512bh e[4];
        for (int v = 0; v < 4; ++v)
          e[v] = (__m512bh)_mm512_loadu_si512(block_codes + (v * pairs + p) * kScreenLanes);
        for (int r = 0; r < kScreenRows; ++r) {
          const __m512bh zr = (__m512bh)_mm512_set1_epi32(static_cast<int>(z[r * pairs + p]));
          for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], zr, e[v]);
        }
      }
      // Stored once: the row loop below indexes them at run time, which would otherwise keep
      // acc in memory through the loop above.
      alignas(64) float dots[kScreenRows][4][kScreenLanes];
      for (int r = 0; r < kScreenRows; ++r)
        for (int v = 0; v < 4; ++v) _mm512_store_ps(dots[r][v], acc[r][v]);
      for (int r = 0; r < kScreenRows; ++r) {
        const int64_t row = r0 + r;
        const __m512 p = _mm512_set1_ps(s.p[row]), q = _mm512_set1_ps(s.q[row]);
        __m512 score[4], bound[4], lowest = _mm512_set1_ps(s.threshold[row]);
        for (int v = 0; v < 4; ++v) {
          const int64_t j = j0 + v * kScreenLanes;
          score[v] =
              common::expanded_score(_mm512_loadu_ps(c.sq.data() + j), _mm512_load_ps(dots[r][v]));
          bound[v] = _mm512_fmadd_ps(p, _mm512_loadu_ps(c.norm.data() + j),
                                     _mm512_add_ps(_mm512_loadu_ps(c.slack.data() + j), q));
          const __m512 high = _mm512_add_ps(score[v], bound[v]);
          lowest = _mm512_mask_mov_ps(lowest, _mm512_cmp_ps_mask(high, lowest, _CMP_LT_OQ), high);
        }
        alignas(64) float lanes[kScreenLanes];  // no NaN: only `<` moved a value in
        _mm512_store_ps(lanes, lowest);
        const float threshold = *std::min_element(lanes, lanes + kScreenLanes);
        s.threshold[row] = threshold;
        uint64_t mask = 0;
        for (int v = 0; v < 4; ++v) {
          const __m512 low = _mm512_sub_ps(score[v], bound[v]);
          const __mmask16 candidates =  // not above T, NaN included
              _mm512_cmp_ps_mask(low, _mm512_set1_ps(threshold), _CMP_NGT_UQ) & real[v];
          mask |= uint64_t{candidates} << (v * kScreenLanes);
        }
        s.masks[row * blocks + blk] = mask;
      }
    }
  }
}
#else
inline void screen_tile(const ScreenCodes&, int64_t, int64_t, ScreenRows&, int64_t) {}
#endif

#ifdef VQK_X86_SIMD
#define VQK_TARGET_SCREEN VQK_TARGET_AVX512_BF16
#else
#define VQK_TARGET_SCREEN
#endif

// z.e in fp32, its 16 running sums one AVX-512 vector (sum_in_lanes: an order independent
// of the block or tile the pair was screened in).
template <typename T>
VQK_TARGET_SCREEN float fp32_dot(const float* z, const T* e, int64_t dim) {
  return sum_in_lanes<float>(dim, [&](int64_t d) { return z[d] * static_cast<float>(e[d]); });
}
#undef VQK_TARGET_SCREEN

// The candidates of the tile [k0, k0 + count) over the block's rows.
inline int64_t count_candidates(const ScreenRows& s, int64_t rows, int64_t count) {
  const int64_t words = rows * ceil_div(count, kScreenCodes);
  int64_t total = 0;
  for (int64_t i = 0; i < words; ++i) total += __builtin_popcountll(s.masks[i]);
  return total;
}

// Each candidate of the tile at k0 scored in fp32 and merged into its row's best key.
template <typename T>
void rescore_candidates(const float* z, const T* e, const float* sqnorm, int64_t dim,
                        int64_t rows, int64_t k0, int64_t count, ScreenRows& s) {
  const int64_t blocks = ceil_div(count, kScreenCodes);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      for (uint64_t m = s.masks[r * blocks + blk]; m != 0; m &= m - 1) {
        const int64_t k = k0 + blk * kScreenCodes + __builtin_ctzll(m);
        const float score =
            common::expanded_score(sqnorm[k], fp32_dot(z + r * dim, e + k * dim, dim));
        s.best[r] = std::min(s.best[r], common::search_key(score, static_cast<uint32_t>(k)));
      }
    }
  }
}

}  // namespace
}  // namespace vqkernels::cpu
