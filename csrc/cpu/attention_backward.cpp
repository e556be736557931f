// Scaled dot-product attention backward (non-causal, no mask), C++ CPU
// kernel, FlashAttention-2 style (spec: vqkernels/reference/attention.py).
// Per (b, h), from the forward's out and lse, with s_ij = scale q_i.k_j:
//
//   P_ij = exp(s_ij - lse_i),  delta_i = do_i.o_i,  dS_ij = P_ij (do_i.v_j - delta_i),
//   dv_j = sum_i P_ij do_i,  dk_j = scale sum_i dS_ij q_i,  dq_i = scale sum_j dS_ij k_j
//
// Never S x S: P is recomputed tile by tile from lse with the forward's GEMM,
// so its scores are the forward's bit for bit; tiles are transposed (a row
// per key, a column per query). Every output element comes from the same
// GEMMs in the same order on every run: deterministic for a given thread
// count. Math in the input dtype (fp32 or fp64).
#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "cpu/attention_problem.h"
#include "cpu/blas_tiles.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

using namespace cpu;

// Tile rows (two 256 x 256 fp32 tiles, 512 KiB, stay in L2).
constexpr int64_t kQueryBlock = 256;
constexpr int64_t kKeyBlock = 256;

// The lane op (for_lanes): V is a SIMD vector of T or T itself, U its unsigned twin.
struct GradScores {  // p = exp(p - lse), ds = p (ds - delta)
  template <typename T, typename V, typename U>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* p, T* ds, const T* lse, const T* delta) {
    const V x = exp_lanes<T, V, U>(load_vec<V>(p + i) - load_vec<V>(lse + i));
    store_vec(p + i, x);
    store_vec(ds + i, x * (load_vec<V>(ds + i) - load_vec<V>(delta + i)));
  }
};

// Gradient tile, transposed (rows = keys, cols = queries, ld): p holds the
// scores s_ij and becomes P_ij = exp(s_ij - lse_i); ds holds dP_ij = do_i.v_j
// and becomes dS_ij = P_ij (dP_ij - delta_i).
template <typename T, int VB>
VQK_ALWAYS_INLINE void grad_scores(T* p, T* ds, int64_t ld, int64_t rows, int64_t cols,
                                   const T* lse, const T* delta) {
  for (int64_t j = 0; j < rows; ++j)
    for_lanes<T, VB, GradScores>(cols, p + j * ld, ds + j * ld, lse, delta);
}

// x . y over n elements (two lane accumulators, then the tail).
template <typename T, int VB>
VQK_ALWAYS_INLINE T dot(const T* x, const T* y, int64_t n) {
  using L = Lanes<T, VB>;
  using V = typename L::Vec;
  constexpr int64_t W = L::kWidth;
  V acc0 = {}, acc1 = {};
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    acc0 += load_vec<V>(x + c) * load_vec<V>(y + c);
    acc1 += load_vec<V>(x + c + W) * load_vec<V>(y + c + W);
  }
  if (c + W <= n) {
    acc0 += load_vec<V>(x + c) * load_vec<V>(y + c);
    c += W;
  }
  acc0 += acc1;
  T sum = 0;
  for (; c < n; ++c) sum += x[c] * y[c];
  for (int64_t w = 0; w < W; ++w) sum += acc0[w];
  return sum;
}

template <typename T>
struct GradKernels {
  void (*grad_scores)(T*, T*, int64_t, int64_t, int64_t, const T*, const T*);
  T (*dot)(const T*, const T*, int64_t);
};

#define VQK_DEFINE_GRAD_KERNELS(NAME, TARGET, VB)                                              \
  template <typename T>                                                                        \
  TARGET void NAME##_grad_scores(T* p, T* ds, int64_t ld, int64_t rows, int64_t cols,          \
                                 const T* lse, const T* delta) {                               \
    grad_scores<T, VB>(p, ds, ld, rows, cols, lse, delta);                                     \
  }                                                                                            \
  template <typename T>                                                                        \
  TARGET T NAME##_dot(const T* x, const T* y, int64_t n) {                                     \
    return dot<T, VB>(x, y, n);                                                                \
  }
VQK_DEFINE_ISA_COPIES(VQK_DEFINE_GRAD_KERNELS)
#undef VQK_DEFINE_GRAD_KERNELS

template <typename T>
GradKernels<T> select_grad_kernels() {
#define VQK_GRAD_KERNELS(NAME) GradKernels<T>{&NAME##_grad_scores<T>, &NAME##_dot<T>}
  return VQK_PICK_ISA(common::cpu_isa(), VQK_GRAD_KERNELS);
#undef VQK_GRAD_KERNELS
}

template <typename T>
struct Grads {
  Rows<T> dout;
  const T* lse;    // (B H Sq), contiguous
  const T* delta;  // (B H Sq): do_i.o_i
  T *dq, *dk, *dv;  // contiguous
  GradKernels<T> kernels;
};

// delta_i = do_i.o_i for every query row.
template <typename T>
void row_dots(const AttentionProblem<T>& p, T (*dot)(const T*, const T*, int64_t), Rows<T> dout,
              Rows<T> out, int64_t units, T* delta) {
  torch::stable::parallel_for(0, units * p.sq, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / p.sq, b = bh / p.heads, h = bh % p.heads, i = r % p.sq;
      delta[r] = dot(dout.at(b, h, i), out.at(b, h, i), p.dim);
    }
  });
}

// Tiles of one thread's backward, transposed: (key rows x query columns), ld.
template <typename T>
struct GradTiles {
  int64_t ld;
  Tensor buffer;
  T *p, *ds;
  GradTiles(int64_t keys, int64_t queries)
      : ld(tile_ld<T>(queries)), buffer(scratch<T>(2 * keys * ld)), p(data<T>(buffer)),
        ds(p + keys * ld) {}
};

// The tile of query rows [i0, i0 + qrows) x key rows [j0, j0 + krows) of head
// bh: P and dS recomputed, then (with_kv) added to dk_j, dv_j (set on the
// first query block) and (with_q) to dq_i (set on the first key block).
template <typename T>
void backward_tile(const AttentionProblem<T>& p, const Grads<T>& g, GradTiles<T>& t, int64_t bh,
                   int64_t i0, int64_t qrows, int64_t j0, int64_t krows, bool with_kv,
                   bool with_q) {
  const int64_t b = bh / p.heads, h = bh % p.heads, d = p.dim;
  const T* q = p.q.at(b, h, i0);
  const T* dout = g.dout.at(b, h, i0);
  const T* k = p.k.at(b, h, j0);
  const T* v = p.v.at(b, h, j0);
  gemm<T>(true, false, qrows, krows, d, p.scale, q, p.q.row, k, p.k.row, T(0), t.p, t.ld);
  gemm<T>(true, false, qrows, krows, d, T(1), dout, g.dout.row, v, p.v.row, T(0), t.ds,
          t.ld);
  const int64_t row0 = bh * p.sq + i0;
  g.kernels.grad_scores(t.p, t.ds, t.ld, krows, qrows, g.lse + row0, g.delta + row0);
  if (with_kv) {
    const T beta = i0 == 0 ? T(0) : T(1);
    const int64_t key0 = (bh * p.sk + j0) * d;
    gemm<T>(false, false, d, krows, qrows, T(1), dout, g.dout.row, t.p, t.ld, beta,
            g.dv + key0, d);  // dv_j += P^T do
    gemm<T>(false, false, d, krows, qrows, p.scale, q, p.q.row, t.ds, t.ld, beta,
            g.dk + key0, d);  // dk_j += scale dS^T q
  }
  if (with_q)
    gemm<T>(false, true, d, qrows, krows, p.scale, k, p.k.row, t.ds, t.ld,
            j0 == 0 ? T(0) : T(1), g.dq + row0 * d, d);  // dq_i += scale dS k
}

// One pass of the two-pass backward: tasks (b, h, block of the rows it owns),
// each walking all blocks of the other side. by_keys: it owns key rows and
// adds to dk, dv; else query rows, adding to dq.
template <typename T>
void backward_pass(const AttentionProblem<T>& p, const Grads<T>& g, int64_t units, bool by_keys) {
  const int64_t own = by_keys ? p.sk : p.sq, other = by_keys ? p.sq : p.sk;
  const int64_t ob = block_rows(own, units, kAttentionMinBlock,
                                by_keys ? kKeyBlock : kQueryBlock);
  const int64_t wb = std::min(by_keys ? kQueryBlock : kKeyBlock, other);
  const int64_t blocks = ceil_div(own, ob);
  share_tasks(units * blocks, [&](const auto& next) {
    GradTiles<T> t(by_keys ? ob : wb, by_keys ? wb : ob);
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t bh = task / blocks, o0 = task % blocks * ob, orows = std::min(ob, own - o0);
      for (int64_t w0 = 0; w0 < other; w0 += wb) {
        const int64_t wrows = std::min(wb, other - w0);
        if (by_keys) backward_tile(p, g, t, bh, w0, wrows, o0, orows, true, false);
        else backward_tile(p, g, t, bh, o0, orows, w0, wrows, false, true);
      }
    }
  });
}

template <typename T>
void backward(const AttentionProblem<T>& p, const Grads<T>& g, int64_t units) {
  const int64_t threads = torch::stable::get_num_threads(), rounds = ceil_div(units, threads);
  // Tasks (b, h): for each key block, every query block's tile adds to dk_j,
  // dv_j and dq_i (5 GEMMs a tile); unless the idle threads (few heads) cost
  // more than the two race-free passes, which recompute the tiles (7 GEMMs).
  if (7 * units >= 5 * threads * rounds) {
    const int64_t qb = std::min(kQueryBlock, p.sq), kb = std::min(kKeyBlock, p.sk);
    share_tasks(units, [&](const auto& next) {
      GradTiles<T> t(kb, qb);
      for (int64_t bh; (bh = next()) >= 0;)
        for (int64_t j0 = 0; j0 < p.sk; j0 += kb)
          for (int64_t i0 = 0; i0 < p.sq; i0 += qb)
            backward_tile(p, g, t, bh, i0, std::min(qb, p.sq - i0), j0, std::min(kb, p.sk - j0),
                          true, true);
    });
    return;
  }
  backward_pass(p, g, units, true);
  backward_pass(p, g, units, false);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(const Tensor& grad_out, const Tensor& q,
                                                          const Tensor& k, const Tensor& v,
                                                          const Tensor& out, const Tensor& lse,
                                                          double scale) {
  VQK_CHECK_DEVICE(q, DeviceType::CPU);
  check_attention_backward_args(grad_out, q, k, v, out, lse);
  check_attention_cpu_dtype(q);
  const int64_t units = q.size(0) * q.size(1), sq = q.size(2);
  Tensor grad_q = new_empty(q, q.sizes());
  Tensor grad_k = new_empty(k, k.sizes());
  Tensor grad_v = new_empty(v, v.sizes());
  if (units * k.size(2) == 0) return {grad_q, grad_k, grad_v};
  if (sq == 0) {  // no query: no gradient
    return {grad_q, torch::stable::zero_(grad_k), torch::stable::zero_(grad_v)};
  }
  const Tensor lse_c = contiguous(lse);
  Tensor delta = new_empty(q, {units * sq});
  VQK_DISPATCH_FLOAT_DOUBLE(q.scalar_type(), "attention_backward", [&] {
    using T = scalar_t;
    const AttentionProblem<T> p = attention_problem<T>(q, k, v, scale);
    const GradKernels<T> kernels = select_grad_kernels<T>();
    const Rows<T> dout = rows_of<T>(grad_out);
    row_dots(p, kernels.dot, dout, rows_of<T>(out), units, data<T>(delta));
    const Grads<T> g{dout, cdata<T>(lse_c), cdata<T>(delta), data<T>(grad_q), data<T>(grad_k),
                     data<T>(grad_v), kernels};
    backward(p, g, units);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace vqkernels
