#pragma once
// What the C++ CPU attention forward (attention_forward.cpp) and backward
// (attention_backward.cpp) share: the problem, q, k, v read in place through
// their strides and the smallest tile.
#include <cstdint>

#include "common/stable.h"

namespace vqkernels::cpu {

constexpr int64_t kAttentionMinBlock = 16;  // rows of the smallest tile

// A (B, H, S, d) tensor read through its strides; `row` is the row stride
// (d when S <= 1, where the tensor's own may be anything).
template <typename T>
struct Rows {
  T* data;
  int64_t batch, head, row;
  T* at(int64_t b, int64_t h, int64_t i) const { return data + b * batch + h * head + i * row; }
};

template <typename T>
Rows<T> rows_of(const Tensor& x) {
  return {const_cast<T*>(cdata<T>(x)), x.stride(0), x.stride(1),
          x.size(2) <= 1 ? x.size(3) : x.stride(2)};
}

template <typename T>
struct AttentionProblem {
  Rows<T> q, k, v;
  int64_t heads, sq, sk, dim;  // heads: H (rows of q are (b, h) = (bh / H, bh % H))
  T scale;
};

template <typename T>
AttentionProblem<T> attention_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                                      double scale) {
  return {rows_of<T>(q), rows_of<T>(k), rows_of<T>(v), q.size(1), q.size(2), k.size(2), q.size(3),
          static_cast<T>(scale)};
}

inline void check_attention_cpu_dtype(const Tensor& q) {
  VQK_CHECK(q.scalar_type() == ScalarType::Float || q.scalar_type() == ScalarType::Double,
            "the CPU attention kernels take float32 or float64, got ", q.scalar_type());
}

}  // namespace vqkernels::cpu
