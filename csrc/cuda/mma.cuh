#pragma once
// PTX wrappers of the sm_80+ tensor-core path: cp.async copies, ldmatrix
// loads and mma.sync.m16n8k16 (f16 / bf16 in, f32 accumulators), the packing
// of two floats into one 32-bit mma operand, and reductions over the lanes
// that hold one row of an accumulator.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace vqkernels::cuda {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; valid == false writes 16 zero bytes (src-size 0).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// ldmatrix .m8n8 .b16: lane 8i + r supplies the address of row r (16 bytes) of
// matrix i; register i of lane l receives row l / 4, columns 2 (l % 4) + {0, 1}
// of matrix i (lower column in the low half). kTrans (.trans) delivers the
// transpose: rows 2 (l % 4) + {0, 1}, column l / 4. .x2 reads addresses from
// lanes 0..15 only.
#define VQK_LDMATRIX(COUNT, TRANS, REGS, ...)                                             \
  asm volatile("ldmatrix.sync.aligned.m8n8." COUNT TRANS ".shared.b16 " REGS ";\n"         \
               : __VA_ARGS__                                                              \
               : "r"(addr)                                                                \
               : "memory")
template <bool kTrans = false>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
#define VQK_LDSM_X4(TRANS)                                                         \
  VQK_LDMATRIX("x4", TRANS, "{%0, %1, %2, %3}, [%4]", "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), \
               "=r"(r[3]))
  if constexpr (kTrans) VQK_LDSM_X4(".trans");
  else VQK_LDSM_X4("");
#undef VQK_LDSM_X4
}
template <bool kTrans = false>
__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
#define VQK_LDSM_X2(TRANS) VQK_LDMATRIX("x2", TRANS, "{%0, %1}, [%2]", "=r"(r0), "=r"(r1))
  if constexpr (kTrans) VQK_LDSM_X2(".trans");
  else VQK_LDSM_X2("");
#undef VQK_LDSM_X2
}
#undef VQK_LDMATRIX

// D = A B + D for one 16 x 8 x 16 tile (PTX ISA, mma.m16n8k16, f16 / bf16 -> f32).
// With g = lane / 4 and t = lane % 4 (each register packs two 16-bit values, low first):
//   A (16 x 16, row):  a[0] = (g,   2t..2t+1)   a[1] = (g+8, 2t..2t+1)
//                      a[2] = (g,   2t+8..+9)   a[3] = (g+8, 2t+8..+9)
//   B (16 x 8,  col):  b0 = (k = 2t..2t+1, n = g)   b1 = (k = 2t+8..2t+9, n = g)
//   C (16 x 8, f32):   c[0], c[1] = (g, 2t), (g, 2t+1);  c[2], c[3] = (g+8, 2t), (g+8, 2t+1)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
#define VQK_MMA(AB)                                                                         \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0, %1, %2, %3}, "          \
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                                     \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if constexpr (std::is_same_v<T, __half>) VQK_MMA("f16");
  else VQK_MMA("bf16");
#undef VQK_MMA
}

// Two floats rounded to T and packed, lo in the low 16 bits (the mma element order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&r, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &h, 4);
  }
  return r;
}

// Max over the 4 lanes (lane % 4 = 0..3) that hold one row of a C fragment.
__device__ __forceinline__ float row_max4(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float row_sum4(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace vqkernels::cuda
