// One fused DDIM step, C++ CPU kernel (math in csrc/common/ddim.h, spec in
// vqkernels/reference/ddim.py::ddim_step).
//
// Per element of sample b, index j < M:
//   out   = j < guided_elems ? uncond + s * (cond - uncond) : cond      (CFG)
//   x0    = predicted clean sample (epsilon / sample / v), clipped or thresholded
//   prev  = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps + std * noise
// with noise given or drawn from csrc/common/philox.h at counter b * M + j.
// One read of each input, one write of each requested output: (2 or 3 + 1)
// x B x M elements; the coefficients are computed once per sample. Parallel
// over (sample, chunk) tiles.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/ddim.h"
#include "common/philox.h"
#include "vqkernels.h"

// No fused multiply-adds: every element rounds as the float32 reference does,
// so the fp32 step is bitwise the diffusers step (FMA made it more accurate
// but different, and it is bandwidth-bound either way).
#pragma GCC optimize("fp-contract=off")

namespace vqkernels {
namespace {

constexpr int64_t kChunk = 2048;           // elements per tile: its float buffers stay in L1/L2
constexpr int64_t kMinTilesPerTask = 16;   // small steps stay on one thread

// Float32 copies of one tile's inputs and outputs, for the types that are not
// float32 themselves (and scratch for an output that is not written).
struct TileBuffers {
  float x[kChunk], cond[kChunk], uncond[kChunk], noise[kChunk], x0[kChunk], prev[kChunk];
};
alignas(64) constexpr float kNoNoise[kChunk] = {};

// Elements [begin, end) of one tile, guided when uncond is given: lanes of V
// (a float SIMD vector), then the tail one float at a time.
template <typename V>
VQK_ALWAYS_INLINE void step_segment(const float* x, const float* cond, const float* uncond,
                                    const float* z, float* x0, float* prev, int64_t begin,
                                    int64_t end, float threshold, const common::DdimCoefficients& c,
                                    const common::DdimParams& p) {
  constexpr int64_t kWidth = sizeof(V) / sizeof(float);
  int64_t j = begin;
  for (; j + kWidth <= end; j += kWidth) {
    V out = common::load_vec<V>(cond + j);
    if (uncond) out = common::cfg_guide(out, common::load_vec<V>(uncond + j), p.guidance_scale);
    const auto e = common::ddim_element(common::load_vec<V>(x + j), out, common::load_vec<V>(z + j), threshold, c, p);
    common::store_vec(x0 + j, e.x0);
    common::store_vec(prev + j, e.prev);
  }
  for (; j < end; ++j) {
    const float out = uncond ? common::cfg_guide(cond[j], uncond[j], p.guidance_scale) : cond[j];
    const auto e = common::ddim_element(x[j], out, z[j], threshold, c, p);
    x0[j] = e.x0;
    prev[j] = e.prev;
  }
}

// The step of a tile's n float32 elements, the first `guided` of them guided.
template <int kVectorBytes>
VQK_ALWAYS_INLINE void step_floats(const float* x, const float* cond, const float* uncond,
                                   int64_t guided, const float* z, float* x0, float* prev, int64_t n,
                                   float threshold, const common::DdimCoefficients& c,
                                   const common::DdimParams& p) {
  using Vec = typename common::Simd<float, kVectorBytes>::Vec;
  step_segment<Vec>(x, cond, uncond, z, x0, prev, 0, guided, threshold, c, p);
  step_segment<Vec>(x, cond, nullptr, z, x0, prev, guided, n, threshold, c, p);
}

using StepFloats = void (*)(const float*, const float*, const float*, int64_t, const float*,
                            float*, float*, int64_t, float, const common::DdimCoefficients&,
                            const common::DdimParams&);

#define VQK_DEFINE_STEP_FLOATS(NAME, TARGET, VECTOR_BYTES)                                       \
  TARGET void NAME(const float* x, const float* cond, const float* uncond, int64_t guided,      \
                   const float* z, float* x0, float* prev, int64_t n, float threshold,          \
                   const common::DdimCoefficients& c, const common::DdimParams& p) {            \
    step_floats<VECTOR_BYTES>(x, cond, uncond, guided, z, x0, prev, n, threshold, c, p);        \
  }
#ifdef VQK_X86_SIMD
VQK_DEFINE_STEP_FLOATS(step_floats_avx512, VQK_TARGET_AVX512, 64)
VQK_DEFINE_STEP_FLOATS(step_floats_avx2, VQK_TARGET_AVX2, 32)
#endif
VQK_DEFINE_STEP_FLOATS(step_floats_baseline, VQK_TARGET_BASELINE, 16)

StepFloats select_step_floats() {
#ifdef VQK_X86_SIMD
  const std::string& capability = common::cpu_capability();
  if (capability == "AVX512") return &step_floats_avx512;
  if (capability == "AVX2") return &step_floats_avx2;
#endif
  return &step_floats_baseline;
}

// p[0, n) as float32: p itself when it is float32, else converted into buf.
template <typename T>
const float* as_floats(const T* p, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(p[j]);
    return buf;
  }
}

// Where a float32 output of n elements goes: straight into `to` when the
// output is written and float32, else into buf (copied out by store_floats).
template <typename S>
float* float_output(void* to, float* buf) {
  if constexpr (std::is_same_v<S, float>) return to ? static_cast<float*>(to) : buf;
  return buf;
}
template <typename S>
void store_floats(const float* from, void* to, int64_t n) {
  if constexpr (!std::is_same_v<S, float>) {
    if (!to) return;
    S* out = static_cast<S*>(to);
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<S>(from[j]);
  }
}

// The tile's noise as float32: given (in the sample's dtype or float32),
// drawn from Philox at counter b * M + j, or zeros.
template <typename S>
const float* tile_noise(const common::DdimPointers& ptr, const common::DdimParams& p, int64_t first,
                        int64_t n, float* buf) {
  if (!ptr.prev || p.eta <= 0.0f) return kNoNoise;
  if (ptr.noise && ptr.noise_float32) return static_cast<const float*>(ptr.noise) + first;
  if (ptr.noise) return as_floats(static_cast<const S*>(ptr.noise) + first, n, buf);
  if (!ptr.seed) return kNoNoise;
  const uint64_t seed = static_cast<uint64_t>(*ptr.seed);
  for (int64_t j = 0; j < n; ++j) buf[j] = common::philox_normal(seed, static_cast<uint32_t>(first + j));
  return buf;
}

// Elements [begin, end) of sample b (M elements).
template <typename S, typename O>
void step_tile(const common::DdimPointers& ptr, const common::DdimParams& p, StepFloats step,
               int64_t b, int64_t m, int64_t begin, int64_t end, TileBuffers& buf) {
  const auto c = common::ddim_coefficients(ptr.alphas_cumprod, ptr.timesteps[b * ptr.timestep_stride], p);
  const float threshold = ptr.threshold ? ptr.threshold[b] : 0.0f;
  const int64_t n = end - begin, first = b * m + begin;
  const O* cond = static_cast<const O*>(ptr.cond) + b * ptr.cond_stride + begin;
  const int64_t guided = ptr.uncond ? std::clamp(p.guided_elems - begin, int64_t{0}, n) : 0;
  const float* uncond = guided ? as_floats(static_cast<const O*>(ptr.uncond) + b * ptr.uncond_stride + begin,
                                           guided, buf.uncond)
                               : nullptr;
  float* x0 = float_output<S>(ptr.x0 ? static_cast<S*>(ptr.x0) + first : nullptr, buf.x0);
  float* prev = float_output<S>(ptr.prev ? static_cast<S*>(ptr.prev) + first : nullptr, buf.prev);
  step(as_floats(static_cast<const S*>(ptr.sample) + first, n, buf.x), as_floats(cond, n, buf.cond),
       uncond, guided, tile_noise<S>(ptr, p, first, n, buf.noise), x0, prev, n, threshold, c, p);
  store_floats<S>(x0, ptr.x0 ? static_cast<S*>(ptr.x0) + first : nullptr, n);
  store_floats<S>(prev, ptr.prev ? static_cast<S*>(ptr.prev) + first : nullptr, n);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(VQK_DDIM_STEP_ARGS) {
  VQK_CHECK_DEVICE(sample, at::kCPU);
  const auto p = check_ddim_args(sample, cond, uncond, timesteps, alphas_cumprod, variance_noise,
                                 noise_seed, threshold, step_ratio, final_alpha_cumprod, eta,
                                 prediction_type, clip_sample, clip_sample_range,
                                 use_clipped_model_output, guidance_scale, guided_elems);
  const int64_t b = sample.size(0), m = sample.size(1);
  auto [prev, x0] = ddim_outputs(sample, write_prev, write_x0);
  const auto ptr = ddim_pointers(sample, cond, uncond, timesteps, alphas_cumprod, variance_noise,
                                 noise_seed, threshold, prev, x0);
  if (b * m == 0 || (!write_prev && !write_x0)) return {prev, x0};
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  const StepFloats step = select_step_floats();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "ddim_sample", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cond.scalar_type(), "ddim_output", [&] {
      using O = scalar_t;
      at::parallel_for(0, b * chunks, kMinTilesPerTask, [&](int64_t begin, int64_t end) {
        auto buf = std::make_unique<TileBuffers>();
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t row = tile / chunks, start = (tile % chunks) * kChunk;
          step_tile<S, O>(ptr, p, step, row, m, start, std::min(start + kChunk, m), *buf);
        }
      });
    });
  });
  return {prev, x0};
}

}  // namespace vqkernels
