// Scaled dot-product attention (non-causal, no mask), C++ CPU kernels, forward
// and backward, FlashAttention-2 style (spec: vqkernels/reference/attention.py,
// attention_lse). Per (b, h), with s_ij = scale q_i.k_j:
//
//   forward   lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j
//   backward  P_ij = exp(s_ij - lse_i),  delta_i = do_i.o_i,
//             dS_ij = P_ij (do_i.v_j - delta_i),
//             dv_j = sum_i P_ij do_i,  dk_j = scale sum_i dS_ij q_i,
//             dq_i = scale sum_j dS_ij k_j
//
// Never S x S: a thread holds one (key block x query block) score tile at a
// time, stored transposed (a row per key, a column per query), and a running
// (max, sum) per query (the online softmax); the backward recomputes P from
// the saved lse with the same GEMM, so its scores are the forward's bit for
// bit. Tile products are single-threaded BLAS GEMMs reading q, k, v through
// their strides (permuted views of a packed qkv are not copied: only the
// last dimension needs stride 1). The elementwise passes (max, exp and sum,
// rescale; P and dS) stream whole tile rows, vectorized along the queries
// with no horizontal reductions, compiled for AVX-512, AVX2 and the baseline
// ISA and picked from torch's CPU capability; exp is a polynomial (~1 ulp).
// Math in the input dtype (fp32 or fp64). Tasks go to threads as they free up
// (share_tasks); every output element comes from the same GEMMs in the same
// order on every run, so results are deterministic for a given thread count
// (the block sizes shrink when there are fewer blocks than threads).
//  - forward: tasks (b, h, query block); the output accumulates transposed
//    in the thread's tile and is written once. FLOPs 4 B H Sq Sk d and
//    B H Sq Sk exponentials. Bytes: q and out once, k and v once per query
//    block (from L2/L3 for one head).
//  - backward: for each key block, every query block's tile adds to dk_j, dv_j
//    and dq_i (5 GEMMs a tile), tasks (b, h). When that would idle threads
//    (few heads), two race-free passes instead: (b, h, key block) for dk, dv,
//    then (b, h, query block) for dq, recomputing the tiles (7 GEMMs a tile).
//    FLOPs 10 (or 14) B H Sq Sk d; delta first (B H Sq d).
// Extra memory: per thread one score tile and a d x 256 accumulator (forward,
// ~620 KiB fp32) or two 256 x 256 tiles (backward, ~540 KiB); B H Sq delta.
// BLAS is the Fortran sgemm_ / dgemm_ of torch's own build (MKL here):
// torch does not export at::native::cpublas::gemm for extensions. Where the
// symbol is missing or a stride does not suit BLAS (e.g. an expanded input
// with row stride 0), a tile goes through at::addmm_ instead.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#if !defined(__GNUC__) && !defined(__clang__)
#error "csrc/cpu/attention.cpp needs GCC or Clang vector extensions"
#endif
#pragma GCC diagnostic ignored "-Wpsabi"

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "vqkernels.h"

// Weak: resolved from the BLAS that libtorch_cpu carries, null where it has none.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace vqkernels {
namespace {

// Tile rows. Measured on a 2-core AVX-512 Xeon at (1, 16, 1024, 72) fp32
// against 64..1024: forward 256 queries x 512 keys (128 x 512 and 128 x 1024
// tie, 512 x 512 is 10% slower), backward 256 x 256 (128 or 512 either way:
// 5-15% slower). A 512 x 256 fp32 score tile (544 KiB) stays in L2.
constexpr int64_t kForwardQueryBlock = 256;
constexpr int64_t kForwardKeyBlock = 512;
constexpr int64_t kBackwardQueryBlock = 256;
constexpr int64_t kBackwardKeyBlock = 256;
constexpr int64_t kMinBlock = 16;

// ---- GEMM: column-major C (m x n) = alpha op(A) op(B) + beta C, as BLAS ----

template <typename T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                          const T*, const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
BlasGemm<T> blas_gemm() {
  if constexpr (std::is_same_v<T, float>) return &sgemm_;
  else return &dgemm_;
}

// A column-major (rows x cols) operand as a tensor (no copy): `t` reads it transposed.
template <typename T>
at::Tensor as_tensor(const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return t ? at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, options)
           : at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld}, options);
}

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;
  const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
  // The leading dimension of a one-column matrix is never used, but BLAS checks it.
  if (a_cols <= 1) lda = std::max<int64_t>(a_rows, 1);
  if (b_cols <= 1) ldb = std::max<int64_t>(b_rows, 1);
  if (n <= 1) ldc = std::max<int64_t>(m, 1);
  const auto fits = [](int64_t ld, int64_t rows) {
    return ld >= std::max<int64_t>(rows, 1) && ld <= INT_MAX;
  };
  const BlasGemm<T> blas = blas_gemm<T>();
  if (blas && fits(lda, a_rows) && fits(ldb, b_rows) && fits(ldc, m) && k <= INT_MAX) {
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    const int mi = m, ni = n, ki = k, lda_i = lda, ldb_i = ldb, ldc_i = ldc;
    blas(&tra, &trb, &mi, &ni, &ki, &alpha, a, &lda_i, b, &ldb_i, &beta, c, &ldc_i);
    return;
  }
  at::Tensor out = as_tensor(c, m, n, ldc, false);
  out.addmm_(as_tensor(a, a_rows, a_cols, lda, ta), as_tensor(b, b_rows, b_cols, ldb, tb), beta,
             alpha);
}

// ---- SIMD exp (Cody-Waite reduction, polynomial, 2^n by exponent bits) ----

template <typename T, int N>
constexpr std::array<T, N + 1> inverse_factorials() {
  std::array<T, N + 1> c{};
  c[0] = 1;
  for (int i = 1; i <= N; ++i) c[i] = c[i - 1] / i;
  return c;
}

template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  using Bits = uint32_t;
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
  using Bits = uint64_t;
  static constexpr double kLo = -708.0;
  static constexpr double kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kMantissa = 52, kBias = 1023;
  static constexpr std::array<double, 14> kPoly = inverse_factorials<double, 13>();  // < 1e-17
};

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

// e^x per lane for x <= 1 (all the softmax takes: logits minus their max or
// their lse), to ~1 ulp; 0 below kLo, where the terms are < 1e-37 of the
// row's largest. V is T or a SIMD vector of T, I its unsigned integer twin.
template <typename T, typename V, typename I>
VQK_ALWAYS_INLINE V exp_lanes(V x) {
  using C = ExpConstants<T>;
  const V shifter = splat<V>(C::kShifter);
  const V t = x * C::kLog2e + shifter;  // n + shifter, n = round(x / ln2)
  const V n = t - shifter;
  const V r = (x - n * C::kLn2Hi) - n * C::kLn2Lo;
  constexpr int kDegree = static_cast<int>(C::kPoly.size()) - 1;
  V p = splat<V>(C::kPoly[kDegree]);
  for (int i = kDegree - 1; i >= 0; --i) p = p * r + C::kPoly[i];
  const I bits = (bits_as<I>(t) - bits_as<I>(shifter) + splat<I>(typename C::Bits(C::kBias)))
                 << C::kMantissa;  // 2^n
  return x < splat<V>(C::kLo) ? splat<V>(T(0)) : p * bits_as<V>(bits);
}

// ---- elementwise tile loops (SIMD lanes of VB bytes, then a scalar tail) ----

template <typename T, int VB>
struct Lanes {
  using Vec = typename common::Simd<T, VB>::Vec;
  using IVec = typename common::Simd<typename ExpConstants<T>::Bits, VB>::Vec;
  static constexpr int64_t kWidth = common::Simd<T, VB>::kWidth;
};

// Applies Op at lanes [i, i + width) of n columns, then one by one on the tail.
template <typename T, int VB, typename Op, typename... Args>
VQK_ALWAYS_INLINE void for_lanes(int64_t n, Args... args) {
  using L = Lanes<T, VB>;
  int64_t i = 0;
  for (; i + L::kWidth <= n; i += L::kWidth)
    Op::template apply<T, typename L::Vec, typename L::IVec>(i, args...);
  for (; i < n; ++i) Op::template apply<T, T, typename ExpConstants<T>::Bits>(i, args...);
}

// The lane ops: V is a SIMD vector of T or T itself, I its integer twin.
using common::load_vec;
using common::store_vec;
struct MaxInto {  // acc = max(acc, x)
  template <typename T, typename V, typename I>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* acc, const T* x) {
    const V a = load_vec<V>(acc + i), b = load_vec<V>(x + i);
    store_vec(acc + i, b > a ? b : a);
  }
};
struct ExpSum {  // x = exp(x - mx), sum += x
  template <typename T, typename V, typename I>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* x, const T* mx, T* sum) {
    const V p = exp_lanes<T, V, I>(load_vec<V>(x + i) - load_vec<V>(mx + i));
    store_vec(x + i, p);
    store_vec(sum + i, load_vec<V>(sum + i) + p);
  }
};
struct AddInto {  // acc += x
  template <typename T, typename V, typename I>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* acc, const T* x) {
    store_vec(acc + i, load_vec<V>(acc + i) + load_vec<V>(x + i));
  }
};
struct Rescale {  // alpha = exp(m - mx), l = l alpha + sum
  template <typename T, typename V, typename I>
  static VQK_ALWAYS_INLINE void apply(int64_t i, const T* m, const T* mx, T* l, T* sum_alpha) {
    const V alpha = exp_lanes<T, V, I>(load_vec<V>(m + i) - load_vec<V>(mx + i));
    store_vec(l + i, load_vec<V>(l + i) * alpha + load_vec<V>(sum_alpha + i));
    store_vec(sum_alpha + i, alpha);
  }
};
struct Scale {  // x *= alpha
  template <typename T, typename V, typename I>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* x, const T* alpha) {
    store_vec(x + i, load_vec<V>(x + i) * load_vec<V>(alpha + i));
  }
};
struct GradScores {  // p = exp(p - lse), ds = p (ds - delta)
  template <typename T, typename V, typename I>
  static VQK_ALWAYS_INLINE void apply(int64_t i, T* p, T* ds, const T* lse, const T* delta) {
    const V x = exp_lanes<T, V, I>(load_vec<V>(p + i) - load_vec<V>(lse + i));
    store_vec(p + i, x);
    store_vec(ds + i, x * (load_vec<V>(ds + i) - load_vec<V>(delta + i)));
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
struct TileKernels {
  void (*online_softmax)(T*, int64_t, int64_t, int64_t, T*, T*, T*, int64_t, bool, T*);
  void (*grad_scores)(T*, T*, int64_t, int64_t, int64_t, const T*, const T*);
  T (*dot)(const T*, const T*, int64_t);
};

#define VQK_DEFINE_TILE_KERNELS(NAME, TARGET, VB)                                               \
  template <typename T>                                                                         \
  TARGET void NAME##_online_softmax(T* s, int64_t ld, int64_t rows, int64_t cols, T* m, T* l,   \
                                    T* o, int64_t dim, bool first, T* work) {                   \
    online_softmax<T, VB>(s, ld, rows, cols, m, l, o, dim, first, work);                        \
  }                                                                                             \
  template <typename T>                                                                         \
  TARGET void NAME##_grad_scores(T* p, T* ds, int64_t ld, int64_t rows, int64_t cols,           \
                                 const T* lse, const T* delta) {                                \
    grad_scores<T, VB>(p, ds, ld, rows, cols, lse, delta);                                      \
  }                                                                                             \
  template <typename T>                                                                         \
  TARGET T NAME##_dot(const T* x, const T* y, int64_t n) {                                      \
    return dot<T, VB>(x, y, n);                                                                 \
  }                                                                                             \
  template <typename T>                                                                         \
  TileKernels<T> NAME##_tile_kernels() {                                                        \
    return {&NAME##_online_softmax<T>, &NAME##_grad_scores<T>, &NAME##_dot<T>};                 \
  }

#ifdef VQK_X86_SIMD
VQK_DEFINE_TILE_KERNELS(avx512, VQK_TARGET_AVX512, 64)
VQK_DEFINE_TILE_KERNELS(avx2, VQK_TARGET_AVX2, 32)
#endif
VQK_DEFINE_TILE_KERNELS(baseline, VQK_TARGET_BASELINE, 16)

template <typename T>
TileKernels<T> select_tile_kernels() {
#ifdef VQK_X86_SIMD
  const std::string& capability = common::cpu_capability();
  if (capability == "AVX512") return avx512_tile_kernels<T>();
  if (capability == "AVX2") return avx2_tile_kernels<T>();
#endif
  return baseline_tile_kernels<T>();
}

// ---- problem ----

// A (B, H, S, d) tensor read through its strides; `row` is the row stride
// (d when S <= 1, where the tensor's own may be anything).
template <typename T>
struct Rows {
  T* data;
  int64_t batch, head, row;
  T* at(int64_t b, int64_t h, int64_t i) const { return data + b * batch + h * head + i * row; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  return {static_cast<T*>(const_cast<void*>(x.const_data_ptr())), x.stride(0), x.stride(1),
          x.size(2) <= 1 ? x.size(3) : x.stride(2)};
}

template <typename T>
struct Problem {
  Rows<T> q, k, v;
  int64_t heads, sq, sk, dim;  // heads: H (rows of q are (b, h) = (bh / H, bh % H))
  T scale;
  TileKernels<T> kernels;
};

// Rows per block: at most max_block, fewer when `units` (b, h) pairs would
// otherwise leave threads without a block.
int64_t block_rows(int64_t rows, int64_t units, int64_t max_block) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_unit = (threads + units - 1) / std::max<int64_t>(units, 1);
  const int64_t want = (rows + per_unit - 1) / per_unit;
  return std::clamp((want + kMinBlock - 1) / kMinBlock * kMinBlock, kMinBlock, max_block);
}

int64_t count_blocks(int64_t rows, int64_t block) { return (rows + block - 1) / block; }

// The leading dimension of a tile of n columns: whole cache lines, and not a
// multiple of 512 bytes, so that walking down a column spreads over L1 sets.
template <typename T>
int64_t tile_ld(int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t ld = (n + kLine - 1) / kLine * kLine;
  return ld * static_cast<int64_t>(sizeof(T)) % 512 == 0 ? ld + kLine : ld;
}

// Per-thread scratch, 64-byte aligned by torch's allocator: MKL picks its
// code path, and with it the rounding, by alignment too, so aligned scratch
// keeps results the same from run to run.
template <typename T>
at::Tensor scratch(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Runs worker(next) once on each of at::parallel_for's threads; next() hands
// out the tasks [0, n), each once, in order as threads free up (-1: none
// left), so a thread slowed down (two threads on one core) takes fewer.
template <typename Worker>
void share_tasks(int64_t n, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  const auto next = [&] {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < n ? t : int64_t{-1};
  };
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(next); });
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
void forward(const Problem<T>& p, int64_t units, T* out, T* lse) {
  const int64_t qb = block_rows(p.sq, units, kForwardQueryBlock);
  const int64_t kb = std::min(kForwardKeyBlock, p.sk), nqb = count_blocks(p.sq, qb);
  const int64_t ld = tile_ld<T>(qb);
  share_tasks(units * nqb, [&](const auto& next) {
    // Transposed tiles: scores (keys x queries), output (d x queries); then
    // each query's running max and sum, and the softmax's scratch.
    const at::Tensor buffer = scratch<T>((kb + p.dim) * ld + 5 * qb);
    T* s = buffer.mutable_data_ptr<T>();
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
        p.kernels.online_softmax(s, ld, cols, rows, m, l, o, p.dim, first, work);
        gemm<T>(false, true, rows, p.dim, cols, T(1), s, ld, p.v.at(b, h, j0), p.v.row,
                first ? T(0) : T(1), o, ld);  // o^T += P v
      }
      const int64_t row0 = bh * p.sq + i0;
      finish_rows(o, ld, p.dim, rows, m, l, out + row0 * p.dim, lse + row0);
    }
  });
}

template <typename T>
struct Grads {
  Rows<T> dout;
  const T* lse;    // (B H Sq), contiguous
  const T* delta;  // (B H Sq): do_i.o_i
  T *dq, *dk, *dv;  // contiguous
};

// delta_i = do_i.o_i for every query row.
template <typename T>
void row_dots(const Problem<T>& p, Rows<T> dout, Rows<T> out, int64_t units, T* delta) {
  at::parallel_for(0, units * p.sq, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / p.sq, b = bh / p.heads, h = bh % p.heads, i = r % p.sq;
      delta[r] = p.kernels.dot(dout.at(b, h, i), out.at(b, h, i), p.dim);
    }
  });
}

// Tiles of one thread's backward, transposed: (key rows x query columns), ld.
template <typename T>
struct GradTiles {
  int64_t ld;
  at::Tensor buffer;
  T *p, *ds;
  GradTiles(int64_t keys, int64_t queries)
      : ld(tile_ld<T>(queries)), buffer(scratch<T>(2 * keys * ld)),
        p(buffer.mutable_data_ptr<T>()), ds(p + keys * ld) {}
};

// The tile of query rows [i0, i0 + qrows) x key rows [j0, j0 + krows) of head
// bh: P and dS recomputed, then (with_kv) added to dk_j, dv_j (set on the
// first query block) and (with_q) to dq_i (set on the first key block).
template <typename T>
void backward_tile(const Problem<T>& p, const Grads<T>& g, GradTiles<T>& t, int64_t bh,
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
  p.kernels.grad_scores(t.p, t.ds, t.ld, krows, qrows, g.lse + row0, g.delta + row0);
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

template <typename T>
void backward(const Problem<T>& p, const Grads<T>& g, int64_t units) {
  const int64_t threads = at::get_num_threads(), rounds = (units + threads - 1) / threads;
  // Whole heads per thread (5 GEMMs a tile) unless the idle threads cost more
  // than the two-pass scheme's 7 GEMMs a tile.
  if (7 * units >= 5 * threads * rounds) {
    const int64_t qb = std::min(kBackwardQueryBlock, p.sq), kb = std::min(kBackwardKeyBlock, p.sk);
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
  const int64_t kb = block_rows(p.sk, units, kBackwardKeyBlock), nkb = count_blocks(p.sk, kb);
  const int64_t qb_kv = std::min(kBackwardQueryBlock, p.sq);
  share_tasks(units * nkb, [&](const auto& next) {
    GradTiles<T> t(kb, qb_kv);
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t bh = task / nkb, j0 = task % nkb * kb;
      for (int64_t i0 = 0; i0 < p.sq; i0 += qb_kv)
        backward_tile(p, g, t, bh, i0, std::min(qb_kv, p.sq - i0), j0, std::min(kb, p.sk - j0),
                      true, false);
    }
  });
  const int64_t qb = block_rows(p.sq, units, kBackwardQueryBlock), nqb = count_blocks(p.sq, qb);
  const int64_t kb_q = std::min(kBackwardKeyBlock, p.sk);
  share_tasks(units * nqb, [&](const auto& next) {
    GradTiles<T> t(kb_q, qb);
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t bh = task / nqb, i0 = task % nqb * qb;
      for (int64_t j0 = 0; j0 < p.sk; j0 += kb_q)
        backward_tile(p, g, t, bh, i0, std::min(qb, p.sq - i0), j0, std::min(kb_q, p.sk - j0),
                      false, true);
    }
  });
}

void check_cpu_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the CPU attention kernels take float32 or float64, got ", q.scalar_type());
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        double scale) {
  return {rows_of<T>(q), rows_of<T>(k), rows_of<T>(v), q.size(1), q.size(2), k.size(2), q.size(3),
          static_cast<T>(scale), select_tile_kernels<T>()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale) {
  VQK_CHECK_DEVICE(q, at::kCPU);
  check_attention_args(q, k, v);
  check_cpu_dtype(q);
  const int64_t units = q.size(0) * q.size(1);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (units * q.size(2) == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_forward", [&] {
    forward(make_problem<scalar_t>(q, k, v, scale), units, out.mutable_data_ptr<scalar_t>(),
            lse.mutable_data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  VQK_CHECK_DEVICE(q, at::kCPU);
  check_attention_backward_args(grad_out, q, k, v, out, lse);
  check_cpu_dtype(q);
  const int64_t units = q.size(0) * q.size(1), sq = q.size(2);
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  if (units * k.size(2) == 0) return {grad_q, grad_k, grad_v};
  if (sq == 0) return {grad_q, grad_k.zero_(), grad_v.zero_()};  // no query: no gradient
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty({units * sq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward", [&] {
    using T = scalar_t;
    const Problem<T> p = make_problem<T>(q, k, v, scale);
    const Rows<T> dout = rows_of<T>(grad_out);
    row_dots(p, dout, rows_of<T>(out), units, delta.mutable_data_ptr<T>());
    const Grads<T> g{dout, lse_c.const_data_ptr<T>(), delta.const_data_ptr<T>(),
                     grad_q.mutable_data_ptr<T>(), grad_k.mutable_data_ptr<T>(),
                     grad_v.mutable_data_ptr<T>()};
    backward(p, g, units);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace vqkernels
