// One fused DDIM step, CUDA kernel (math in csrc/common/ddim.h, spec in
// vqkernels/reference/ddim.py::ddim_step).
//
// Each block owns a tile of kTile consecutive elements of one sample; thread
// i handles elements i, i + kThreads, ... of the tile, so every load is
// coalesced and each thread has kPerThread independent loads in flight. The
// per-sample coefficients (two table gathers, a few sqrt) are recomputed by
// every thread rather than broadcast through shared memory. Bandwidth-bound:
// one read of each input and one write of each output per element.
#include "common/ddim.h"
#include "common/philox.h"
#include "dispatch.cuh"
#include "kernels.h"

namespace vqkernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kTile = kThreads * kPerThread;

template <typename S, typename O>
__global__ void __launch_bounds__(kThreads)
    ddim_step_kernel(common::DdimPointers ptr, int64_t b, int64_t m, common::DdimParams p) {
  const int64_t tiles_per_row = (m + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < b * tiles_per_row; tile += gridDim.x) {
    const int64_t row = tile / tiles_per_row;
    const int64_t start = (tile - row * tiles_per_row) * kTile;
    const auto c = common::ddim_coefficients(ptr.alphas_cumprod,
                                             ptr.timesteps[row * ptr.timestep_stride], p);
    const float threshold = ptr.threshold ? ptr.threshold[row] : 0.0f;
    const bool add_noise = ptr.prev && p.eta > 0.0f && (ptr.noise || ptr.seed);
    const uint64_t seed = ptr.seed ? static_cast<uint64_t>(*ptr.seed) : 0;
    const S* x = static_cast<const S*>(ptr.sample) + row * m;
    const O* cond = static_cast<const O*>(ptr.cond) + row * ptr.cond_stride;
    const O* uncond = ptr.uncond ? static_cast<const O*>(ptr.uncond) + row * ptr.uncond_stride : nullptr;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = start + k * kThreads + threadIdx.x;
      if (j >= m) break;
      float out = to_float(cond[j]);
      if (uncond && j < p.guided_elems) out = common::cfg_guide(out, to_float(uncond[j]), p.guidance_scale);
      float noise = 0.0f;
      if (add_noise) {
        const int64_t i = row * m + j;
        if (!ptr.noise) noise = common::philox_normal(seed, static_cast<uint32_t>(i));
        else if (ptr.noise_float32) noise = static_cast<const float*>(ptr.noise)[i];
        else noise = to_float(static_cast<const S*>(ptr.noise)[i]);
      }
      const auto e = common::ddim_element(to_float(x[j]), out, noise, threshold, c, p);
      if (ptr.x0) static_cast<S*>(ptr.x0)[row * m + j] = from_float<S>(e.x0);
      if (ptr.prev) static_cast<S*>(ptr.prev)[row * m + j] = from_float<S>(e.prev);
    }
  }
}

}  // namespace

cudaError_t launch_ddim_step(const common::DdimStep& step, cudaStream_t stream) {
  const int64_t b = step.batch, m = step.elems;
  if (b * m == 0) return cudaSuccess;
  const int64_t tiles = b * ((m + kTile - 1) / kTile);
  return dispatch_float(step.sample_dtype, [&](auto s_tag) {
    using S = decltype(s_tag);
    return dispatch_float(step.output_dtype, [&](auto o_tag) {
      using O = decltype(o_tag);
      ddim_step_kernel<S, O><<<blocks_for(tiles, 1), kThreads, 0, stream>>>(step.ptr, b, m,
                                                                            step.params);
      return cudaGetLastError();
    });
  });
}

}  // namespace vqkernels::cuda
