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

#include "common/checks.h"
#include "common/ddim.h"
#include "common/philox.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

constexpr int64_t kChunk = 4096;  // elements per task

template <typename S, typename O>
void step_range(const common::DdimPointers& ptr, const common::DdimParams& p, int64_t b, int64_t m,
                int64_t begin, int64_t end) {
  const auto c = common::ddim_coefficients(ptr.alphas_cumprod, ptr.timesteps[b * ptr.timestep_stride], p);
  const float threshold = ptr.threshold ? ptr.threshold[b] : 0.0f;
  const bool add_noise = ptr.prev && p.eta > 0.0f && (ptr.noise || ptr.seed);
  const uint64_t seed = ptr.seed ? static_cast<uint64_t>(*ptr.seed) : 0;
  const S* x = static_cast<const S*>(ptr.sample) + b * m;
  const O* cond = static_cast<const O*>(ptr.cond) + b * ptr.out_stride;
  const O* uncond = ptr.uncond ? static_cast<const O*>(ptr.uncond) + b * ptr.out_stride : nullptr;
  const S* noise = ptr.noise ? static_cast<const S*>(ptr.noise) + b * m : nullptr;
  S* prev = ptr.prev ? static_cast<S*>(ptr.prev) + b * m : nullptr;
  S* x0_out = ptr.x0 ? static_cast<S*>(ptr.x0) + b * m : nullptr;
  for (int64_t j = begin; j < end; ++j) {
    float out = static_cast<float>(cond[j]);
    if (uncond && j < p.guided_elems) out = common::cfg_guide(out, static_cast<float>(uncond[j]), p.guidance_scale);
    float z = 0.0f;
    if (add_noise) z = noise ? static_cast<float>(noise[j]) : common::philox_normal(seed, static_cast<uint32_t>(b * m + j));
    const auto e = common::ddim_element(static_cast<float>(x[j]), out, z, threshold, c, p);
    if (x0_out) x0_out[j] = static_cast<S>(e.x0);
    if (prev) prev[j] = static_cast<S>(e.prev);
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
      at::parallel_for(0, b * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t row = tile / chunks, start = (tile % chunks) * kChunk;
          step_range<S, O>(ptr, p, row, m, start, std::min(start + kChunk, m));
        }
      });
    });
  });
  return {prev, x0};
}

}  // namespace vqkernels
