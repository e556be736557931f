#pragma once
// Tile products of the C++ CPU kernels: single-threaded BLAS GEMMs on
// column-major tiles read in place through their strides, and the per-thread
// scratch that holds the tiles.
//
// BLAS is the Fortran sgemm_ / dgemm_ of the BLAS torch links, since torch does
// not export at::native::cpublas::gemm to extensions. Where the symbol is
// missing or a stride does not suit BLAS (e.g. an expanded input with row
// stride 0), a tile goes through aten::mm instead, alpha and beta applied here:
// the stable ABI cannot pass addmm_'s Scalar arguments.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/stable.h"
#include "cpu/parallel.h"

// Weak: resolved from the BLAS that libtorch_cpu carries, null where it has none.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace vqkernels::cpu {

template <typename T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                          const T*, const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
BlasGemm<T> blas_gemm() {
  if constexpr (std::is_same_v<T, float>) return &sgemm_;
  else return &dgemm_;
}

// A column-major (rows x cols) operand as a CPU tensor (no copy): `t` reads it transposed.
template <typename T>
Tensor as_tensor(const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
  constexpr ScalarType dtype = torch::headeronly::CppTypeToScalarType<T>::value;
  void* ptr = const_cast<T*>(p);
  return t ? torch::stable::from_blob(ptr, {cols, rows}, {ld, 1}, DeviceType::CPU, dtype)
           : torch::stable::from_blob(ptr, {rows, cols}, {1, ld}, DeviceType::CPU, dtype);
}

// Per-thread scratch of n elements, 64-byte aligned by torch's allocator: a
// BLAS may pick its code path, and with it the rounding, by alignment, so
// aligned scratch keeps results the same from run to run.
template <typename T>
Tensor scratch(int64_t n) {
  return torch::stable::empty({n}, torch::headeronly::CppTypeToScalarType<T>::value,
                              std::nullopt, DeviceType::CPU);
}

// Column-major C (m x n) = alpha op(A) op(B) + beta C, as BLAS: op transposes
// A when ta, B when tb.
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
  // AB = op(A) op(B) into column-major scratch (C's layout, so torch's GEMM
  // takes the operands as addmm_ on C did), then C = alpha AB + beta C, C
  // unread when beta is 0 (as BLAS).
  const Tensor buffer = scratch<T>(m * n);
  T* ab = data<T>(buffer);
  mm_out(as_tensor(ab, m, n, m, false), as_tensor(a, a_rows, a_cols, lda, ta),
         as_tensor(b, b_rows, b_cols, ldb, tb));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      T& cij = c[j * ldc + i];
      cij = beta == T(0) ? alpha * ab[j * m + i] : alpha * ab[j * m + i] + beta * cij;
    }
}

// The leading dimension of a tile of n columns: whole cache lines, and not a
// multiple of 512 bytes, so that walking down a column spreads over L1 sets.
template <typename T>
int64_t tile_ld(int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t ld = round_up(n, kLine);
  return ld * static_cast<int64_t>(sizeof(T)) % 512 == 0 ? ld + kLine : ld;
}

}  // namespace vqkernels::cpu
