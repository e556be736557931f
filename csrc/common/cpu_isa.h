#pragma once
// Instruction-set copies of the C++ CPU kernels' hot loops (CPU only). A loop
// is defined once as a VQK_ALWAYS_INLINE template and wrapped in one function
// per target below; VQK_PICK_ISA picks the copy for the CPU capability, read as
// torch reads it (the widest the processor has, lowered by ATEN_CPU_CAPABILITY),
// so one build runs the widest vectors the machine has and still runs anywhere.
#include <cctype>
#include <cstdlib>
#include <string>

#if !defined(__GNUC__) && !defined(__clang__)
#error "the C++ CPU kernels need GCC or Clang vector extensions"
#endif
// Vector-typed arguments of the forced-inline helpers draw ABI notes; the
// helpers never exist out of line.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__)
#define VQK_X86_SIMD 1
#define VQK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define VQK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define VQK_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")))
#endif
#define VQK_TARGET_BASELINE
#define VQK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace vqkernels::common {

// "AVX512", "AVX2" or "DEFAULT", torch's names and rule (at::get_cpu_capability, which
// the stable ABI does not carry): AVX512 needs AVX-512 F, VL, BW and DQ, AVX2 needs AVX2
// and FMA, and ATEN_CPU_CAPABILITY=avx2 / default lowers the choice. Read once.
inline const std::string& cpu_capability() {
  static const std::string capability = [] {
    std::string widest = "DEFAULT";
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      widest = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
                   ? "AVX512"
                   : "AVX2";
    }
#endif
    const char* variable = std::getenv("ATEN_CPU_CAPABILITY");
    std::string asked = variable ? variable : "";
    for (char& c : asked) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (asked == "DEFAULT" || (asked == "AVX2" && widest == "AVX512")) return asked;
    return widest;
  }();
  return capability;
}

// The instruction sets a loop is compiled for, narrowest first.
enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest one torch's CPU capability allows.
inline Isa cpu_isa() {
  static const Isa isa = cpu_capability() == "AVX512" ? Isa::kAvx512
                         : cpu_capability() == "AVX2" ? Isa::kAvx2
                                                      : Isa::kBaseline;
  return isa;
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

// VQK_DEFINE_ISA_COPIES(DEFINE) expands DEFINE(NAME, TARGET, VB) once per ISA
// this build targets: NAME avx512 / avx2 / baseline, TARGET its function
// attribute, VB its vector bytes. VQK_PICK_ISA(ISA, COPY) is COPY(NAME) of the
// ISA `ISA` (an Isa, e.g. common::cpu_isa()); the x86 copies exist only on x86-64.
#ifdef VQK_X86_SIMD
#define VQK_DEFINE_ISA_COPIES(DEFINE)     \
  DEFINE(avx512, VQK_TARGET_AVX512, 64)   \
  DEFINE(avx2, VQK_TARGET_AVX2, 32)       \
  DEFINE(baseline, VQK_TARGET_BASELINE, 16)
#define VQK_PICK_ISA(ISA, COPY)                                 \
  ((ISA) == ::vqkernels::common::Isa::kAvx512 ? COPY(avx512)    \
   : (ISA) == ::vqkernels::common::Isa::kAvx2 ? COPY(avx2)      \
                                              : COPY(baseline))
#else
#define VQK_DEFINE_ISA_COPIES(DEFINE) DEFINE(baseline, VQK_TARGET_BASELINE, 16)
#define VQK_PICK_ISA(ISA, COPY) COPY(baseline)
#endif
