// Scaled dot-product attention forward (non-causal, no mask), C++ CPU
// kernel, FlashAttention-2 style (spec: vqkernels/reference/attention.py,
// attention_lse). Per (b, h), with s_ij = scale q_i.k_j:
//
//   lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j
//
// Never S x S: tasks (b, h, query block) go to threads as they free up; a
// thread holds one (key block x query block) score tile at a time, stored
// transposed (a row per key, a column per query), a running (max, sum) per
// query (the online softmax) and the output, accumulated transposed. Tile
// products are BLAS GEMMs (csrc/cpu/blas_tiles.h); the elementwise passes
// stream whole tile rows, vectorized along the queries. Math in the input
// dtype (fp32 or fp64); the same GEMMs in the same order on every run.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "cpu/attention_problem.h"
#include "cpu/blas_tiles.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

using namespace cpu;

// Tile rows (a 512 x 256 fp32 score tile, 544 KiB, stays in L2).
constexpr int64_t kQueryBlock = 256;
constexpr int64_t kKeyBlock = 512;

// The lane ops (for_lanes): V is a SIMD vector of T or T itself, U its unsigned twin.
struct MaxInto {  // acc = max(acc, x)
  template <typename T, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* acc, const T* x) {
    const V a = load_vec<V>(acc + i), b = load_vec<V>(x + i);
    store_vec(acc + i, b > a ? b : a);
  }
};
struct ExpSum {  // x = exp(x - mx), sum += x
  template <typename T, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* x, const T* mx, T* sum) {
    const V p = exp_lanes<T, V, U>(load_vec<V>(x + i) - load_vec<V>(mx + i));
    store_vec(x + i, p);
    store_vec(sum + i, load_vec<V>(sum + i) + p);
  }
};
struct AddInto {  // acc += x
  template <typename T, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* acc, const T* x) {
    store_vec(acc + i, load_vec<V>(acc + i) + load_vec<V>(x + i));
  }
};
struct Rescale {  // alpha = exp(m - mx), l = l alpha + sum
  template <typename T, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const T* m, const T* mx, T* l, T* sum_alpha) {
    const V alpha = exp_lanes<T, V, U>(load_vec<V>(m + i) - load_vec<V>(mx + i));
    store_vec(l + i, load_vec<V>(l + i) * alpha + load_vec<V>(sum_alpha + i));
    store_vec(sum_alpha + i, alpha);
  }
};
struct Scale {  // x *= alpha
  template <typename T, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* x, const T* alpha) {
    store_vec(x + i, load_vec<V>(x + i) * load_vec<V>(alpha + i));
  }
};
// One key block of the online softmax on a transposed score tile s (rows =
// keys, cols = queries, ld): s becomes exp(s - m_new), (m, l) are each
// query's running max and sum, and its output accumulator, column i of o
// (dim rows, ld), is rescaled by exp(m_old - m_new). `first`: the block that
// starts the rows (m = -inf, o unset). work: 3 cols scratch. Every pass
// streams whole rows, the per-query state staying in L1. The sums go by
// chunks of rows: a chain of 512 additions would cost the fp32 output several
// times the error of the reference's (cascaded) sum.
template <typename T, int VB>
VQK_ALWAYS_INLINE void online_softmax(T* s, int64_t ld, int64_t rows, int64_t cols, T* m, T* l,
                                      T* o, int64_t dim, bool first, T* work) {
  constexpr int64_t kSumChunk = 16;
  T* mx = work;
  T* sum = work + cols;
  T* part = work + 2 * cols;
  std::copy(m, m + cols, mx);
  for (int64_t j = 0; j < rows; ++j) for_lanes<T, VB, MaxInto>(cols, mx, s + j * ld);
  std::fill(sum, sum + cols, T(0));
  for (int64_t j0 = 0; j0 < rows; j0 += kSumChunk) {
    std::fill(part, part + cols, T(0));
    for (int64_t j = j0; j < std::min(rows, j0 + kSumChunk); ++j)
      for_lanes<T, VB, ExpSum>(cols, s + j * ld, mx, part);
    for_lanes<T, VB, AddInto>(cols, sum, part);
  }
  if (first) {
    std::copy(sum, sum + cols, l);
  } else {
    for_lanes<T, VB, Rescale>(cols, m, mx, l, sum);
    for (int64_t c = 0; c < dim; ++c) for_lanes<T, VB, Scale>(cols, o + c * ld, sum);
  }
  std::copy(mx, mx + cols, m);
}

template <typename T>
using OnlineSoftmax = void (*)(T*, int64_t, int64_t, int64_t, T*, T*, T*, int64_t, bool, T*);

#define VQK_DEFINE_ONLINE_SOFTMAX(NAME, TARGET, VB)                                            \
  template <typename T>                                                                        \
  TARGET void NAME##_online_softmax(T* s, int64_t ld, int64_t rows, int64_t cols, T* m, T* l,  \
                                    T* o, int64_t dim, bool first, T* work) {                  \
    online_softmax<T, VB>(s, ld, rows, cols, m, l, o, dim, first, work);                       \
  }
VQK_DEFINE_ISA_COPIES(VQK_DEFINE_ONLINE_SOFTMAX)
#undef VQK_DEFINE_ONLINE_SOFTMAX

template <typename T>
OnlineSoftmax<T> select_online_softmax() {
#define VQK_ONLINE_SOFTMAX(NAME) &NAME##_online_softmax<T>
  return VQK_PICK_ISA(common::cpu_isa(), VQK_ONLINE_SOFTMAX);
#undef VQK_ONLINE_SOFTMAX
}

// out_i = o_i / l_i from the transposed accumulator o (dim rows, ld), and
// lse_i = m_i + log l_i.
template <typename T>
void finish_rows(const T* o, int64_t ld, int64_t dim, int64_t rows, const T* m, const T* l,
                 T* out, T* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < dim; ++c) out[i * dim + c] = o[c * ld + i] / l[i];  // one rounding
    lse[i] = m[i] + std::log(l[i]);
  }
}

template <typename T>
void forward(const AttentionProblem<T>& p, int64_t units, T* out, T* lse) {
  const int64_t qb = block_rows(p.sq, units, kAttentionMinBlock, kQueryBlock);
  const int64_t kb = std::min(kKeyBlock, p.sk), nqb = ceil_div(p.sq, qb);
  const int64_t ld = tile_ld<T>(qb);
  const OnlineSoftmax<T> softmax_step = select_online_softmax<T>();
  share_tasks(units * nqb, [&](const auto& next) {
    // Transposed tiles: scores (keys x queries), output (d x queries); then
    // each query's running max and sum, and the softmax's scratch.
    const Tensor buffer = scratch<T>((kb + p.dim) * ld + 5 * qb);
    T* s = data<T>(buffer);
    T* o = s + kb * ld;
    T* m = o + p.dim * ld;
    T* l = m + qb;
    T* work = l + qb;
    for (int64_t t; (t = next()) >= 0;) {
      const int64_t bh = t / nqb, b = bh / p.heads, h = bh % p.heads;
      const int64_t i0 = t % nqb * qb, rows = std::min(qb, p.sq - i0);
      const T* q = p.q.at(b, h, i0);
      std::fill(m, m + qb, -std::numeric_limits<T>::infinity());
      for (int64_t j0 = 0; j0 < p.sk; j0 += kb) {
        const int64_t cols = std::min(kb, p.sk - j0);
        const bool first = j0 == 0;
        gemm<T>(true, false, rows, cols, p.dim, p.scale, q, p.q.row, p.k.at(b, h, j0), p.k.row,
                T(0), s, ld);  // s^T = scale q k^T
        softmax_step(s, ld, cols, rows, m, l, o, p.dim, first, work);
        gemm<T>(false, true, rows, p.dim, cols, T(1), s, ld, p.v.at(b, h, j0), p.v.row,
                first ? T(0) : T(1), o, ld);  // o^T += P v
      }
      const int64_t row0 = bh * p.sq + i0;
      finish_rows(o, ld, p.dim, rows, m, l, out + row0 * p.dim, lse + row0);
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> attention_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 double scale) {
  VQK_CHECK_DEVICE(q, DeviceType::CPU);
  check_attention_args(q, k, v);
  check_attention_cpu_dtype(q);
  const int64_t units = q.size(0) * q.size(1);
  Tensor out = new_empty(q, q.sizes());
  Tensor lse = new_empty(q, {q.size(0), q.size(1), q.size(2)});
  if (units * q.size(2) == 0) return {out, lse};
  VQK_DISPATCH_FLOAT_DOUBLE(q.scalar_type(), "attention_forward", [&] {
    forward(attention_problem<scalar_t>(q, k, v, scale), units, data<scalar_t>(out),
            data<scalar_t>(lse));
  });
  return {out, lse};
}

}  // namespace vqkernels
