#pragma once
// The launchers of vqkernels, on torch's stable ABI (torch::stable::Tensor): what
// csrc/op_registry.cpp registers as the torch ops vqkernels::*, which Python
// (torch.ops.vqkernels) and LibTorch programs (c10::Dispatcher, with at::Tensor)
// call. Inputs are validated in Python (vqkernels/ops/); these entry points only
// check what would otherwise crash (device, dtype, contiguity).
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/stable.h"

namespace vqkernels {

// Sinusoidal timestep embedding (see vqkernels/reference/timestep.py).
Tensor timestep_embedding_cpu(const Tensor& t, int64_t dim, double max_period, bool flip_sin_to_cos,
                              double downscale_freq_shift, double scale, ScalarType dtype);
#ifdef VQKERNELS_WITH_CUDA
Tensor timestep_embedding_cuda(const Tensor& t, int64_t dim, double max_period,
                               bool flip_sin_to_cos, double downscale_freq_shift, double scale,
                               ScalarType dtype);
#endif

// Nearest-codebook search (see vqkernels/reference/search.py, metric "l2"):
// (indices int64 (N,), exact squared distances (N,) fp32, fp64 for fp64 input)
// of z (N, D) against codebook (K, D) with codebook_sqnorm = ||e_k||^2 (K,)
// fp32. Ties go to the lowest index; csrc/common/search.h defines NaN / Inf
// rows. precision ("ieee", "tf32", "bf16") is a floor: these kernels compute
// in fp32 (fp64 on CPU for fp64 input) for every mode.
std::tuple<Tensor, Tensor> nearest_code_cpu(const Tensor& z, const Tensor& codebook,
                                            const Tensor& codebook_sqnorm,
                                            std::string_view precision);
// Residual search over Q codebooks (vqkernels/ops/residual.py): indices (N, Q)
// int64 and the sum of the chosen codes (N, D) in z's dtype; codebook_sqnorms
// one (K_q,) fp32 tensor a codebook.
std::tuple<Tensor, Tensor> residual_nearest_code_cpu(const Tensor& z,
                                                     const std::vector<Tensor>& codebooks,
                                                     const std::vector<Tensor>& codebook_sqnorms,
                                                     std::string_view precision);
#ifdef VQKERNELS_WITH_CUDA
std::tuple<Tensor, Tensor> nearest_code_cuda(const Tensor& z, const Tensor& codebook,
                                             const Tensor& codebook_sqnorm,
                                             std::string_view precision);
std::tuple<Tensor, Tensor> residual_nearest_code_cuda(const Tensor& z,
                                                      const std::vector<Tensor>& codebooks,
                                                      const std::vector<Tensor>& codebook_sqnorms,
                                                      std::string_view precision);
#endif

// EMA codebook update (see vqkernels/reference/ema.py, math in csrc/common/ema.h).
// code_counts_and_sums: counts (K,) and sums (K, D) fp32 of z (N, D) grouped by
// indices (N,) int64 / int32. An index outside [0, K) throws on CPU (before any
// write) and is skipped on CUDA (no host sync). `deterministic`: the CPU kernels
// always are (each sum in row order); on CUDA it sorts the rows by code first.
// ema_update: one EMA step in place on cluster_size (K,) fp32, embed_sum (K, D)
// fp32 and codebook (K, D); ema_update_from_stats: the same from given counts
// (K,) and sums (K, D) fp32 (e.g. all-reduced across processes).
#define VQK_CODE_COUNTS_AND_SUMS_ARGS \
  const Tensor &z, const Tensor &indices, int64_t num_codes, bool deterministic
#define VQK_EMA_UPDATE_ARGS                                                                     \
  const Tensor &cluster_size, const Tensor &embed_sum, const Tensor &codebook, const Tensor &z, \
      const Tensor &indices, double decay, double eps, bool bias_correction, int64_t step,      \
      bool deterministic
#define VQK_EMA_UPDATE_FROM_STATS_ARGS                                                          \
  const Tensor &cluster_size, const Tensor &embed_sum, const Tensor &codebook,                  \
      const Tensor &counts, const Tensor &sums, double decay, double eps, bool bias_correction, \
      int64_t step
std::tuple<Tensor, Tensor> code_counts_and_sums_cpu(VQK_CODE_COUNTS_AND_SUMS_ARGS);
void ema_update_cpu(VQK_EMA_UPDATE_ARGS);
void ema_update_from_stats_cpu(VQK_EMA_UPDATE_FROM_STATS_ARGS);
#ifdef VQKERNELS_WITH_CUDA
std::tuple<Tensor, Tensor> code_counts_and_sums_cuda(VQK_CODE_COUNTS_AND_SUMS_ARGS);
void ema_update_cuda(VQK_EMA_UPDATE_ARGS);
void ema_update_from_stats_cuda(VQK_EMA_UPDATE_FROM_STATS_ARGS);
// ema_update_from_stats of every stage of a residual quantizer (one tensor of each a
// stage; stages may differ in K, not in D or the codebook dtype), in two launches.
void ema_update_from_stats_stages_cuda(const std::vector<Tensor>& cluster_sizes,
                                       const std::vector<Tensor>& embed_sums,
                                       const std::vector<Tensor>& codebooks,
                                       const std::vector<Tensor>& counts,
                                       const std::vector<Tensor>& sums, double decay, double eps,
                                       bool bias_correction, int64_t step);
#endif

// One fused DDIM step (see vqkernels/reference/ddim.py, math in csrc/common/ddim.h),
// on CPU or CUDA tensors; the arguments are the op's schema (csrc/op_registry.cpp),
// each described by vqkernels/ops/ddim.py's StepArgs: sample (B, M), cond / uncond
// (B, >= M) model outputs (uncond: classifier-free guidance of the first
// guided_elems), int64 timesteps, a float32 alphas_cumprod table, noise given
// or drawn from Philox keyed by noise_seed, a per-sample dynamic-thresholding
// scale. Returns (prev_sample, pred_original_sample), each (B, M) in the
// sample's dtype, or empty (0,) when not asked for (write_prev / write_x0).
#define VQK_DDIM_STEP_ARGS                                                                         \
  const Tensor &sample, const Tensor &cond, const std::optional<Tensor>&uncond,                    \
      const Tensor &timesteps, const Tensor &alphas_cumprod,                                       \
      const std::optional<Tensor>&variance_noise, const std::optional<Tensor>&noise_seed,          \
      const std::optional<Tensor>&threshold, int64_t step_ratio, double final_alpha_cumprod,       \
      double eta, std::string_view prediction_type, bool clip_sample, double clip_sample_range,    \
      bool use_clipped_model_output, double guidance_scale, int64_t guided_elems, bool write_prev, \
      bool write_x0
std::tuple<Tensor, Tensor> ddim_step(VQK_DDIM_STEP_ARGS);
#ifdef VQKERNELS_WITH_CUDA
namespace common {
struct DdimStep;
}
// The CUDA launch of a step that ddim_step has checked (csrc/cuda/launchers.cpp).
void ddim_step_cuda(const common::DdimStep& step, const Device& device);
#endif

// Scaled dot-product attention, non-causal, no mask (see
// vqkernels/reference/attention.py, attention_lse), FlashAttention-2 style:
// q (B, H, Sq, d), k and v (B, H, Sk, d), any strides with unit stride along d
// (check_attention_args in csrc/common/checks.h), Sk >= 1 when Sq > 0.
// attention_forward: (out (B, H, Sq, d) in q's dtype, lse (B, H, Sq) with
// lse_i = log sum_j exp(scale q_i.k_j), fp32, fp64 for fp64 input), both
// contiguous. attention_backward: (grad_q, grad_k, grad_v), contiguous, like
// q, k, v, from grad_out (like q) and the forward's out and lse; P is
// recomputed from lse. CPU: float32 / float64, math in that dtype,
// deterministic; Sq = 0 gives empty grad_q and zero grad_k, grad_v.
std::tuple<Tensor, Tensor> attention_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 double scale);
std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(const Tensor& grad_out, const Tensor& q,
                                                          const Tensor& k, const Tensor& v,
                                                          const Tensor& out, const Tensor& lse,
                                                          double scale);
#ifdef VQKERNELS_WITH_CUDA
std::tuple<Tensor, Tensor> attention_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  double scale);
// The head dims attention_forward_cuda has a kernel for, ascending.
std::vector<int64_t> attention_head_dims_cuda();
#endif

// adaLN-Zero glue of a DiT block (see vqkernels/reference/adaln.py, per-element
// math in csrc/common/adaln.h). x, y (B, T, D) and grads of that shape: any
// strides with unit stride along D. shift, scale, gate: (B, D) per sample or
// (B, T, D) per token (one form per call), unit stride along D. Float32 /
// float16 / bfloat16 (and float64 on CPU), all of x's dtype; statistics and
// sums in float32 (float64 for float64). Outputs are contiguous.
// adaln_forward: x_new = x + gate * y rounded to x's dtype (gate, y given;
// else x_new is an empty (0,) tensor and x is normalized),
// h = (x_new - mean) * rstd * (1 + scale) + shift, with mean and rstd
// = 1 / sqrt(var + eps) (B, T) over D (biased variance).
// adaln_backward: from grad_h, the normalized tensor x (x_new of the fused
// op), scale, mean and rstd: grad_x (+ grad_x_new when given), and
// grad_shift, grad_scale of scale's shape (summed over T when per sample).
// gated_residual_forward: x + gate * y. gated_residual_backward: from grad
// (B, T, D): grad_gate = grad * y (summed over T when per sample) of gate's
// shape, grad_y = gate * grad (B, T, D); grad_x is grad itself.
#define VQK_ADALN_FORWARD_ARGS                                                                 \
  const Tensor &x, const Tensor &shift, const Tensor &scale, const std::optional<Tensor>&gate, \
      const std::optional<Tensor>&y, double eps
#define VQK_ADALN_BACKWARD_ARGS                                                  \
  const Tensor &grad_h, const std::optional<Tensor>&grad_x_new, const Tensor &x, \
      const Tensor &scale, const Tensor &mean, const Tensor &rstd
using AdalnForward = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using AdalnBackward = std::tuple<Tensor, Tensor, Tensor>;
AdalnForward adaln_forward_cpu(VQK_ADALN_FORWARD_ARGS);
AdalnBackward adaln_backward_cpu(VQK_ADALN_BACKWARD_ARGS);
Tensor gated_residual_forward_cpu(const Tensor& x, const Tensor& gate, const Tensor& y);
std::tuple<Tensor, Tensor> gated_residual_backward_cpu(const Tensor& grad, const Tensor& gate,
                                                       const Tensor& y);
#ifdef VQKERNELS_WITH_CUDA
AdalnForward adaln_forward_cuda(VQK_ADALN_FORWARD_ARGS);
AdalnBackward adaln_backward_cuda(VQK_ADALN_BACKWARD_ARGS);
Tensor gated_residual_forward_cuda(const Tensor& x, const Tensor& gate, const Tensor& y);
std::tuple<Tensor, Tensor> gated_residual_backward_cuda(const Tensor& grad, const Tensor& gate,
                                                        const Tensor& y);
#endif

// GELU with the tanh approximation, on contiguous CPU tensors of any float dtype (math in
// float32, float64 for float64): gelu_tanh_forward returns gelu(x), gelu_tanh_forward_
// overwrites x with it, gelu_tanh_backward returns grad * gelu'(x).
Tensor gelu_tanh_forward_cpu(const Tensor& x);
void gelu_tanh_forward_inplace_cpu(const Tensor& x);
Tensor gelu_tanh_backward_cpu(const Tensor& grad, const Tensor& x);

// GroupNorm of x (B, C, *spatial), contiguous or channels-last, over num_groups groups,
// then SiLU when silu; weight and bias (C,) of x's dtype (float or double). Returns
// (y in x's layout, mean, rstd), the statistics (B, num_groups) in x's dtype.
std::tuple<Tensor, Tensor, Tensor> group_norm_forward_cpu(const Tensor& x, const Tensor& weight,
                                                          const Tensor& bias, int64_t num_groups,
                                                          double eps, bool silu);

// Build facts, for vqkernels.info().
bool built_with_cuda();
bool built_with_openmp();
// Whether this processor's fp32 CPU searches take the bf16 screen (cpu/search_screen.h).
bool cpu_search_screens();

}  // namespace vqkernels
