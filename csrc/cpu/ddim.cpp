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
#include <ATen/ops/empty.h>

#include <algorithm>
#include <memory>

#include "common/checks.h"
#include "common/ddim.h"
#include "common/philox.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

constexpr int64_t kChunk = 4096;           // elements per tile
constexpr int64_t kMinTilesPerTask = 8;    // small steps stay on one thread

// Buffers of one task: its elements' noise, x0 and x_prev in float32.
struct TileBuffers {
  float noise[kChunk];
  float x0[kChunk];
  float prev[kChunk];
};
alignas(64) constexpr float kNoNoise[kChunk] = {};

// The step of n elements of one sample, all guided or none, into float
// buffers. Compile-time prediction type and guidance and no stores to
// optional outputs make the loop branch-free, so it vectorizes.
template <typename S, typename O, common::Prediction kPrediction, bool kGuided>
void step_elements(const S* x, const O* cond, const O* uncond, const float* z, float* x0,
                   float* prev, int64_t n, float threshold, const common::DdimCoefficients& c,
                   common::DdimParams p) {
  p.prediction = kPrediction;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float out = static_cast<float>(cond[j]);
    if constexpr (kGuided) out = common::cfg_guide(out, static_cast<float>(uncond[j]), p.guidance_scale);
    const auto e = common::ddim_element(static_cast<float>(x[j]), out, z[j], threshold, c, p);
    x0[j] = e.x0;
    prev[j] = e.prev;
  }
}

template <typename S>
void store(const float* from, S* to, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) to[j] = static_cast<S>(from[j]);
}

template <typename S, typename O, common::Prediction kPrediction>
void step_range(const common::DdimPointers& ptr, const common::DdimParams& p, int64_t b, int64_t m,
                int64_t begin, int64_t end, TileBuffers& buf) {
  const auto c = common::ddim_coefficients(ptr.alphas_cumprod, ptr.timesteps[b * ptr.timestep_stride], p);
  const float threshold = ptr.threshold ? ptr.threshold[b] : 0.0f;
  const int64_t n = end - begin;
  const S* x = static_cast<const S*>(ptr.sample) + b * m + begin;
  const O* cond = static_cast<const O*>(ptr.cond) + b * ptr.out_stride + begin;
  const O* uncond = ptr.uncond ? static_cast<const O*>(ptr.uncond) + b * ptr.out_stride + begin : nullptr;
  const float* z = kNoNoise;
  if (ptr.prev && p.eta > 0.0f && (ptr.noise || ptr.seed)) {
    const S* given = ptr.noise ? static_cast<const S*>(ptr.noise) + b * m + begin : nullptr;
    const uint64_t seed = ptr.seed ? static_cast<uint64_t>(*ptr.seed) : 0;
    for (int64_t j = 0; j < n; ++j) {
      buf.noise[j] = given ? static_cast<float>(given[j])
                           : common::philox_normal(seed, static_cast<uint32_t>(b * m + begin + j));
    }
    z = buf.noise;
  }
  const int64_t guided = uncond ? std::clamp(p.guided_elems - begin, int64_t{0}, n) : 0;
  step_elements<S, O, kPrediction, true>(x, cond, uncond, z, buf.x0, buf.prev, guided, threshold, c, p);
  step_elements<S, O, kPrediction, false>(x + guided, cond + guided, nullptr, z + guided,
                                          buf.x0 + guided, buf.prev + guided, n - guided,
                                          threshold, c, p);
  if (ptr.x0) store(buf.x0, static_cast<S*>(ptr.x0) + b * m + begin, n);
  if (ptr.prev) store(buf.prev, static_cast<S*>(ptr.prev) + b * m + begin, n);
}

template <typename S, typename O>
void step_tile(const common::DdimPointers& ptr, const common::DdimParams& p, int64_t b, int64_t m,
               int64_t begin, int64_t end, TileBuffers& buf) {
  switch (p.prediction) {
    case common::Prediction::Epsilon:
      return step_range<S, O, common::Prediction::Epsilon>(ptr, p, b, m, begin, end, buf);
    case common::Prediction::Sample:
      return step_range<S, O, common::Prediction::Sample>(ptr, p, b, m, begin, end, buf);
    default:
      return step_range<S, O, common::Prediction::VPrediction>(ptr, p, b, m, begin, end, buf);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(VQK_DDIM_STEP_ARGS) {
  VQK_CHECK_DEVICE(sample, at::kCPU);
  const auto p = check_ddim_args(sample, cond, uncond, timesteps, alphas_cumprod, variance_noise,
                                 noise_seed, threshold, step_ratio, final_alpha_cumprod, eta,
                                 prediction_type, clip_sample, clip_sample_range,
                                 use_clipped_model_output, guidance_scale, guided_elems);
  const int64_t b = sample.size(0), m = sample.size(1);
  at::Tensor prev = at::empty(write_prev ? sample.sizes() : at::IntArrayRef{0}, sample.options());
  at::Tensor x0 = at::empty(write_x0 ? sample.sizes() : at::IntArrayRef{0}, sample.options());
  const auto ptr = ddim_pointers(sample, cond, uncond, timesteps, alphas_cumprod, variance_noise,
                                 noise_seed, threshold, prev, x0);
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  if (b * m == 0 || (!write_prev && !write_x0)) return {prev, x0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "ddim_sample", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cond.scalar_type(), "ddim_output", [&] {
      using O = scalar_t;
      at::parallel_for(0, b * chunks, kMinTilesPerTask, [&](int64_t begin, int64_t end) {
        auto buf = std::make_unique<TileBuffers>();
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t row = tile / chunks, start = (tile % chunks) * kChunk;
          step_tile<S, O>(ptr, p, row, m, start, std::min(start + kChunk, m), *buf);
        }
      });
    });
  });
  return {prev, x0};
}

}  // namespace vqkernels
