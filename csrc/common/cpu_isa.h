#pragma once
// Instruction-set copies of the C++ CPU kernels' hot loops (CPU only). A loop
// is defined once as a VQK_ALWAYS_INLINE template and wrapped in one function
// per target below; a kernel picks the copy from torch's CPU capability
// (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY can lower), so one
// build runs the widest vectors the machine has and still runs anywhere.
#include <ATen/Version.h>

#include <string>

#if defined(__x86_64__)
#define VQK_X86_SIMD 1
#define VQK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define VQK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
#define VQK_TARGET_BASELINE
#define VQK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace vqkernels::common {

// "AVX512", "AVX2" or "DEFAULT" (torch's names), read once.
inline const std::string& cpu_capability() {
  static const std::string capability = at::get_cpu_capability();
  return capability;
}

// A SIMD vector of VB bytes of T (GCC / Clang vector extension); a class
// member, since the attribute is dropped on a typedef inside a function template.
template <typename T, int VB>
struct Simd {
  static constexpr int kWidth = VB / static_cast<int>(sizeof(T));
  typedef T Vec __attribute__((vector_size(VB)));
};

// Unaligned SIMD vector load and store.
template <typename V, typename T>
VQK_ALWAYS_INLINE V load_vec(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
VQK_ALWAYS_INLINE void store_vec(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

}  // namespace vqkernels::common
