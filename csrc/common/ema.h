#pragma once
// EMA codebook update (VQ-VAE-EMA, Sonnet): the per-code math shared by the
// C++ CPU kernel (csrc/cpu/ema.cpp) and the CUDA kernels (csrc/cuda/ema.cu).
// Spec: vqkernels/reference/ema.py. With counts[k] and sums[k, :] the
// statistics of a batch:
//   cluster_size[k] = decay * cluster_size[k] + (1 - decay) * counts[k]   (stored)
//   embed_sum[k, d] = decay * embed_sum[k, d] + (1 - decay) * sums[k, d]  (stored)
//   n[k] = cluster_size[k] / debias, e = embed_sum / debias   (debias = 1 - decay^step, or 1)
//   total = sum_k n[k];  smoothed[k] = (n[k] + eps) / (total + K eps) * total
//   codebook[k, d] = e[k, d] / smoothed[k]    only where smoothed[k] > 0
// All in float32; the total is accumulated in float64 by the kernels.
#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace vqkernels::common {

struct EmaParams {
  float decay;   // weight of the stored state
  float keep;    // 1 - decay, rounded once from double (as torch rounds `alpha`)
  float debias;  // 1 - decay^step with bias correction, else 1
  float eps;     // Laplace smoothing
  float k_eps;   // K * eps, rounded once from double
};

// Host only: the scalars rounded from double once, as the float32 reference rounds them.
inline EmaParams make_ema_params(double decay, double eps, bool bias_correction, int64_t step,
                                 int64_t num_codes) {
  const double debias = bias_correction ? 1.0 - pow(decay, static_cast<double>(step)) : 1.0;
  return {static_cast<float>(decay), static_cast<float>(1.0 - decay), static_cast<float>(debias),
          static_cast<float>(eps), static_cast<float>(static_cast<double>(num_codes) * eps)};
}

// Rows whose index is outside [0, K) belong to no code (GPU kernels skip them;
// the CPU kernel rejects them before writing anything).
template <typename I>
VQK_HOST_DEVICE bool is_valid_code(I code, int64_t num_codes) {
  return code >= 0 && static_cast<int64_t>(code) < num_codes;
}

// The moving average of one state element given the batch statistic.
VQK_HOST_DEVICE float ema_mix(float state, float stat, const EmaParams& p) {
  return p.decay * state + p.keep * stat;
}

VQK_HOST_DEVICE float ema_debiased(float x, const EmaParams& p) { return x / p.debias; }

// Laplace-smoothed cluster size of a code whose debiased size is n.
VQK_HOST_DEVICE float ema_smoothed_size(float n, float total, const EmaParams& p) {
  return (n + p.eps) / (total + p.k_eps) * total;
}

// Whether a code's codebook row is rewritten: smoothed > 0 (false for 0 and
// NaN); otherwise the row keeps its value, as in the reference.
VQK_HOST_DEVICE bool ema_code_is_updated(float smoothed) { return smoothed > 0.0f; }

// One codebook element from its updated embed_sum element.
VQK_HOST_DEVICE float ema_code_value(float embed, float smoothed, const EmaParams& p) {
  return ema_debiased(embed, p) / smoothed;
}

}  // namespace vqkernels::common
