// The torch op schemas of vqkernels and their CPU / CUDA implementations.
// Registered with the dispatcher, so the ops work from Python (torch.ops.vqkernels.*),
// under torch.compile (fake kernels are registered in vqkernels/ops/), and from
// LibTorch programs that link the CMake library. On torch's stable ABI: the kernels are
// boxed by TORCH_BOX, and the registration goes through the C shim.

#include "vqkernels.h"

STABLE_TORCH_LIBRARY(vqkernels, m) {
  m.def(
      "code_counts_and_sums(Tensor z, Tensor indices, int num_codes, bool deterministic) -> "
      "(Tensor counts, Tensor sums)");
  m.def(
      "ema_update(Tensor(a!) cluster_size, Tensor(b!) embed_sum, Tensor(c!) codebook, Tensor z, "
      "Tensor indices, float decay, float eps, bool bias_correction, int step, "
      "bool deterministic) -> ()");
  m.def(
      "ema_update_from_stats(Tensor(a!) cluster_size, Tensor(b!) embed_sum, Tensor(c!) codebook, "
      "Tensor counts, Tensor sums, float decay, float eps, bool bias_correction, int step) -> ()");
  m.def(
      "ema_update_from_stats_stages(Tensor(a!)[] cluster_sizes, Tensor(b!)[] embed_sums, "
      "Tensor(c!)[] codebooks, Tensor[] counts, Tensor[] sums, float decay, float eps, "
      "bool bias_correction, int step) -> ()");
  // The arguments of vqkernels/ops/ddim.py's StepArgs (tests/test_ddim.py holds them equal).
  m.def(
      "ddim_step(Tensor sample, Tensor cond, Tensor? uncond, Tensor timesteps, "
      "Tensor alphas_cumprod, Tensor? variance_noise, Tensor? noise_seed, Tensor? threshold, "
      "int step_ratio, float final_alpha_cumprod, float eta, str prediction_type, "
      "bool clip_sample, float clip_sample_range, bool use_clipped_model_output, "
      "float guidance_scale, int guided_elems, bool write_prev, bool write_x0) -> "
      "(Tensor prev_sample, Tensor pred_original_sample)");
  m.def(
      "timestep_embedding(Tensor t, int dim, float max_period, bool flip_sin_to_cos, "
      "float downscale_freq_shift, float scale, ScalarType dtype) -> Tensor");
  m.def(
      "nearest_code(Tensor z, Tensor codebook, Tensor codebook_sqnorm, str precision) -> "
      "(Tensor indices, Tensor distances)");
  m.def(
      "residual_nearest_code(Tensor z, Tensor[] codebooks, Tensor[] codebook_sqnorms, "
      "str precision) -> (Tensor indices, Tensor quantized)");
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "adaln_forward(Tensor x, Tensor shift, Tensor scale, Tensor? gate, Tensor? y, float eps) -> "
      "(Tensor h, Tensor x_new, Tensor mean, Tensor rstd)");
  m.def(
      "adaln_backward(Tensor grad_h, Tensor? grad_x_new, Tensor x, Tensor scale, Tensor mean, "
      "Tensor rstd) -> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale)");
  m.def("gated_residual_forward(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def(
      "gated_residual_backward(Tensor grad, Tensor gate, Tensor y) -> "
      "(Tensor grad_gate, Tensor grad_y)");
  m.def("gelu_tanh_forward(Tensor x) -> Tensor");
  m.def("gelu_tanh_forward_(Tensor(a!) x) -> ()");
  m.def("gelu_tanh_backward(Tensor grad, Tensor x) -> Tensor");
  m.def(
      "group_norm_forward(Tensor x, Tensor weight, Tensor bias, int num_groups, float eps, "
      "bool silu) -> (Tensor y, Tensor mean, Tensor rstd)");
}

STABLE_TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("code_counts_and_sums", TORCH_BOX(&vqkernels::code_counts_and_sums_cpu));
  m.impl("ddim_step", TORCH_BOX(&vqkernels::ddim_step));
  m.impl("ema_update", TORCH_BOX(&vqkernels::ema_update_cpu));
  m.impl("ema_update_from_stats", TORCH_BOX(&vqkernels::ema_update_from_stats_cpu));
  m.impl("timestep_embedding", TORCH_BOX(&vqkernels::timestep_embedding_cpu));
  m.impl("nearest_code", TORCH_BOX(&vqkernels::nearest_code_cpu));
  m.impl("residual_nearest_code", TORCH_BOX(&vqkernels::residual_nearest_code_cpu));
  m.impl("attention_forward", TORCH_BOX(&vqkernels::attention_forward_cpu));
  m.impl("attention_backward", TORCH_BOX(&vqkernels::attention_backward_cpu));
  m.impl("adaln_forward", TORCH_BOX(&vqkernels::adaln_forward_cpu));
  m.impl("adaln_backward", TORCH_BOX(&vqkernels::adaln_backward_cpu));
  m.impl("gated_residual_forward", TORCH_BOX(&vqkernels::gated_residual_forward_cpu));
  m.impl("gated_residual_backward", TORCH_BOX(&vqkernels::gated_residual_backward_cpu));
  m.impl("gelu_tanh_forward", TORCH_BOX(&vqkernels::gelu_tanh_forward_cpu));
  m.impl("gelu_tanh_forward_", TORCH_BOX(&vqkernels::gelu_tanh_forward_inplace_cpu));
  m.impl("gelu_tanh_backward", TORCH_BOX(&vqkernels::gelu_tanh_backward_cpu));
  m.impl("group_norm_forward", TORCH_BOX(&vqkernels::group_norm_forward_cpu));
}

#ifdef VQKERNELS_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(vqkernels, CUDA, m) {
  m.impl("code_counts_and_sums", TORCH_BOX(&vqkernels::code_counts_and_sums_cuda));
  m.impl("ddim_step", TORCH_BOX(&vqkernels::ddim_step));
  m.impl("ema_update", TORCH_BOX(&vqkernels::ema_update_cuda));
  m.impl("ema_update_from_stats", TORCH_BOX(&vqkernels::ema_update_from_stats_cuda));
  m.impl("ema_update_from_stats_stages", TORCH_BOX(&vqkernels::ema_update_from_stats_stages_cuda));
  m.impl("timestep_embedding", TORCH_BOX(&vqkernels::timestep_embedding_cuda));
  m.impl("nearest_code", TORCH_BOX(&vqkernels::nearest_code_cuda));
  m.impl("residual_nearest_code", TORCH_BOX(&vqkernels::residual_nearest_code_cuda));
  m.impl("attention_forward", TORCH_BOX(&vqkernels::attention_forward_cuda));
  m.impl("adaln_forward", TORCH_BOX(&vqkernels::adaln_forward_cuda));
  m.impl("adaln_backward", TORCH_BOX(&vqkernels::adaln_backward_cuda));
  m.impl("gated_residual_forward", TORCH_BOX(&vqkernels::gated_residual_forward_cuda));
  m.impl("gated_residual_backward", TORCH_BOX(&vqkernels::gated_residual_backward_cuda));
}
#endif
