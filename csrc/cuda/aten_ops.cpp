// ATen-facing launchers of the CUDA kernels: tensors in, raw pointers out.
// Compiled by the host compiler; the kernels themselves live in the .cu files.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/checks.h"
#include "kernels.h"
#include "vqkernels.h"

namespace vqkernels {

at::Tensor timestep_embedding_cuda(const at::Tensor& t, int64_t dim, double max_period,
                                   bool flip_sin_to_cos, double downscale_freq_shift,
                                   double scale, at::ScalarType dtype) {
  const auto p = check_timestep_args(t, at::kCUDA, dim, max_period, flip_sin_to_cos,
                                     downscale_freq_shift, scale);
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor tc = t.contiguous();
  at::Tensor out = at::empty({tc.size(0), dim}, tc.options().dtype(dtype));
  C10_CUDA_CHECK(cuda::launch_timestep_embedding(tc.const_data_ptr(), to_dtype(tc.scalar_type()),
                                                 out.mutable_data_ptr(), to_dtype(dtype),
                                                 tc.size(0), p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                     const at::Tensor& codebook_sqnorm,
                                                     std::string_view precision) {
  VQK_CHECK_DEVICE(z, at::kCUDA);
  VQK_CHECK_DEVICE(codebook, at::kCUDA);
  TORCH_CHECK(z.device() == codebook.device(), "z and codebook must be on the same device, got ",
              z.device(), " and ", codebook.device());
  check_nearest_code_args(z, codebook, codebook_sqnorm, precision);
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf ||
                  z.scalar_type() == at::kBFloat16,
              "nearest_code on CUDA takes float32, float16 or bfloat16, got ", z.scalar_type());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), ec = codebook.contiguous();
  const int64_t n = zc.size(0);
  at::Tensor indices = at::empty({n}, zc.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, zc.options().dtype(at::kFloat));
  if (n == 0) return {indices, distances};
  // One packed (score, index) key per row: the search merges its code splits there.
  at::Tensor keys = at::empty({n}, zc.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::launch_nearest_code(
      zc.const_data_ptr(), ec.const_data_ptr(), to_dtype(zc.scalar_type()), n, ec.size(0),
      zc.size(1), reinterpret_cast<unsigned long long*>(keys.mutable_data_ptr<int64_t>()),
      indices.mutable_data_ptr<int64_t>(), distances.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream()));
  return {indices, distances};
}

std::tuple<at::Tensor, at::Tensor> residual_nearest_code_cuda(const at::Tensor& z,
                                                              at::TensorList codebooks,
                                                              at::TensorList codebook_sqnorms,
                                                              std::string_view precision) {
  VQK_CHECK_DEVICE(z, at::kCUDA);
  check_residual_nearest_code_args(z, codebooks, codebook_sqnorms, precision);
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf ||
                  z.scalar_type() == at::kBFloat16,
              "residual_nearest_code on CUDA takes float32, float16 or bfloat16, got ",
              z.scalar_type());
  TORCH_CHECK(z.size(1) <= cuda::kResidualMaxDim, "residual_nearest_code on CUDA takes D <= ",
              cuda::kResidualMaxDim, ", got ", z.size(1));
  TORCH_CHECK(static_cast<int64_t>(codebooks.size()) <= cuda::kMaxResidualStages,
              "residual_nearest_code on CUDA takes at most ", cuda::kMaxResidualStages,
              " codebooks, got ", codebooks.size());
  cuda::ResidualStages stages{static_cast<int>(codebooks.size()), {0}};
  for (size_t q = 0; q < codebooks.size(); ++q) {
    stages.start[q + 1] = stages.start[q] + codebooks[q].size(0);
  }
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), books = at::cat(codebooks).contiguous();
  at::Tensor indices = at::empty({zc.size(0), stages.count}, zc.options().dtype(at::kLong));
  at::Tensor out = at::empty_like(zc);
  C10_CUDA_CHECK(cuda::launch_residual_nearest_code(
      zc.const_data_ptr(), books.const_data_ptr(), stages, to_dtype(zc.scalar_type()),
      zc.size(0), zc.size(1), indices.mutable_data_ptr<int64_t>(), out.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream()));
  return {indices, out};
}

// --- EMA codebook update (kernels in ema.cu) ---------------------------------------------

namespace {

// What would crash the EMA kernels (the rest is validated in vqkernels/ops/ema.py).
void check_ema_batch_cuda(const at::Tensor& z, const at::Tensor& indices, int64_t num_codes) {
  VQK_CHECK_DEVICE(z, at::kCUDA);
  TORCH_CHECK(indices.device() == z.device(), "indices must be on z's device ", z.device());
  TORCH_CHECK(num_codes >= 1, "num_codes must be >= 1, got ", num_codes);
  TORCH_CHECK(z.dim() == 2 && z.size(1) >= 1, "z must be 2-D (N, D) with D >= 1");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf ||
                  z.scalar_type() == at::kBFloat16,
              "z must be float32, float16 or bfloat16 on CUDA, got ", z.scalar_type());
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == z.size(0),
              "indices must be 1-D of length N = ", z.size(0));
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "indices must be int64 or int32, got ", indices.scalar_type());
}

void check_ema_state_cuda(const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                          const at::Tensor& codebook) {
  VQK_CHECK_DEVICE(cluster_size, at::kCUDA);
  for (const at::Tensor* t : {&cluster_size, &embed_sum, &codebook}) {
    TORCH_CHECK(t->device() == cluster_size.device(), "the EMA state must be on one device");
    TORCH_CHECK(t->is_contiguous(), "the EMA state and codebook must be contiguous");
  }
  TORCH_CHECK(cluster_size.dim() == 1 && cluster_size.numel() >= 1,
              "cluster_size must be 1-D (K,) with K >= 1");
  TORCH_CHECK(embed_sum.dim() == 2 && embed_sum.size(0) == cluster_size.numel() &&
                  embed_sum.size(1) >= 1 && codebook.sizes() == embed_sum.sizes(),
              "embed_sum and codebook must be (K, D) with K = ", cluster_size.numel());
  TORCH_CHECK(cluster_size.scalar_type() == at::kFloat && embed_sum.scalar_type() == at::kFloat,
              "cluster_size and embed_sum must be float32");
}

void check_ema_stats_cuda(const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                          const at::Tensor& codebook, const at::Tensor& counts,
                          const at::Tensor& sums) {
  check_ema_state_cuda(cluster_size, embed_sum, codebook);
  TORCH_CHECK(counts.device() == cluster_size.device() && sums.device() == cluster_size.device(),
              "counts and sums must be on the state's device");
  TORCH_CHECK(counts.numel() == cluster_size.numel() && sums.sizes() == embed_sum.sizes(),
              "counts must be (K,) and sums (K, D) like cluster_size and embed_sum");
  TORCH_CHECK(counts.scalar_type() == at::kFloat && sums.scalar_type() == at::kFloat,
              "counts and sums must be float32");
}

// counts (k,) u64 (in an int64 tensor) and sums (k, dim) fp32 of a checked batch.
std::tuple<at::Tensor, at::Tensor> run_code_stats(const at::Tensor& z, const at::Tensor& indices,
                                                  int64_t k, bool deterministic) {
  at::Tensor counts = at::empty({k}, z.options().dtype(at::kLong));
  at::Tensor sums = at::empty({k, z.size(1)}, z.options().dtype(at::kFloat));
  at::Tensor sorted_codes, order;
  if (deterministic && z.size(0) > 0) {
    // A stable sort (deterministic in torch) groups each code's rows in row
    // order; out-of-range rows get key k and fall outside every segment.
    const at::Tensor codes = indices.to(at::kLong);
    const at::Tensor keys = codes.masked_fill(codes.lt(0).logical_or(codes.ge(k)), k);
    std::tie(sorted_codes, order) = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  }
  C10_CUDA_CHECK(cuda::launch_code_stats(
      z.const_data_ptr(), to_dtype(z.scalar_type()), indices.const_data_ptr(),
      to_dtype(indices.scalar_type()), z.size(0), k, z.size(1),
      sorted_codes.defined() ? sorted_codes.const_data_ptr<int64_t>() : nullptr,
      order.defined() ? order.const_data_ptr<int64_t>() : nullptr,
      reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()),
      sums.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {counts, sums};
}

void run_ema_finalize(const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                      const at::Tensor& codebook, const at::Tensor& counts, DType counts_dtype,
                      const at::Tensor& sums, double decay, double eps, bool bias_correction,
                      int64_t step) {
  TORCH_CHECK(codebook.scalar_type() == at::kFloat || codebook.scalar_type() == at::kHalf ||
                  codebook.scalar_type() == at::kBFloat16,
              "codebook must be float32, float16 or bfloat16 on CUDA, got ", codebook.scalar_type());
  const int64_t k = cluster_size.numel();
  at::Tensor total = at::empty({1}, cluster_size.options());
  C10_CUDA_CHECK(cuda::launch_ema_finalize(
      cluster_size.mutable_data_ptr<float>(), embed_sum.mutable_data_ptr<float>(),
      codebook.mutable_data_ptr(), to_dtype(codebook.scalar_type()), counts.const_data_ptr(),
      counts_dtype, sums.const_data_ptr<float>(), k, embed_sum.size(1),
      common::make_ema_params(decay, eps, bias_correction, step, k),
      total.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> code_counts_and_sums_cuda(const at::Tensor& z,
                                                             const at::Tensor& indices,
                                                             int64_t num_codes, bool deterministic) {
  check_ema_batch_cuda(z, indices, num_codes);
  const c10::cuda::CUDAGuard guard(z.device());
  auto [counts, sums] = run_code_stats(z.contiguous(), indices.contiguous(), num_codes,
                                       deterministic);
  at::Tensor counts_f = at::empty({num_codes}, z.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_counts_to_float(
      reinterpret_cast<const unsigned long long*>(counts.const_data_ptr<int64_t>()),
      counts_f.mutable_data_ptr<float>(), num_codes, c10::cuda::getCurrentCUDAStream()));
  return {counts_f, sums};
}

void ema_update_cuda(const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                     const at::Tensor& codebook, const at::Tensor& z, const at::Tensor& indices,
                     double decay, double eps, bool bias_correction, int64_t step,
                     bool deterministic) {
  check_ema_state_cuda(cluster_size, embed_sum, codebook);
  check_ema_batch_cuda(z, indices, cluster_size.numel());
  TORCH_CHECK(z.device() == cluster_size.device(), "z must be on the state's device");
  TORCH_CHECK(z.size(1) == embed_sum.size(1), "z must have D = ", embed_sum.size(1), " columns");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto [counts, sums] = run_code_stats(z.contiguous(), indices.contiguous(),
                                             cluster_size.numel(), deterministic);
  run_ema_finalize(cluster_size, embed_sum, codebook, counts, DType::Int64, sums, decay, eps,
                   bias_correction, step);
}

void ema_update_from_stats_cuda(const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                                const at::Tensor& codebook, const at::Tensor& counts,
                                const at::Tensor& sums, double decay, double eps,
                                bool bias_correction, int64_t step) {
  check_ema_stats_cuda(cluster_size, embed_sum, codebook, counts, sums);
  const c10::cuda::CUDAGuard guard(cluster_size.device());
  run_ema_finalize(cluster_size, embed_sum, codebook, counts.contiguous(), DType::Float32,
                   sums.contiguous(), decay, eps, bias_correction, step);
}

void ema_update_from_stats_stages_cuda(at::TensorList cluster_sizes, at::TensorList embed_sums,
                                       at::TensorList codebooks, at::TensorList counts,
                                       at::TensorList sums, double decay, double eps,
                                       bool bias_correction, int64_t step) {
  const int64_t count = static_cast<int64_t>(cluster_sizes.size());
  TORCH_CHECK(count >= 1 && count <= cuda::kMaxEmaStages, "the EMA of stages takes 1 to ",
              cuda::kMaxEmaStages, " stages, got ", count);
  for (const at::TensorList* list : {&embed_sums, &codebooks, &counts, &sums}) {
    TORCH_CHECK(static_cast<int64_t>(list->size()) == count, "cluster_sizes, embed_sums, "
                "codebooks, counts and sums must hold one tensor a stage");
  }
  cuda::EmaStages stages{static_cast<int>(count), embed_sums[0].size(-1), eps, {}};
  for (int64_t q = 0; q < count; ++q) {
    check_ema_stats_cuda(cluster_sizes[q], embed_sums[q], codebooks[q], counts[q], sums[q]);
    TORCH_CHECK(cluster_sizes[q].device() == cluster_sizes[0].device() &&
                    embed_sums[q].size(1) == stages.dim &&
                    codebooks[q].scalar_type() == codebooks[0].scalar_type(),
                "every stage must be on one device, with one D and one codebook dtype");
    stages.stage[q] = {cluster_sizes[q].mutable_data_ptr<float>(),
                       embed_sums[q].mutable_data_ptr<float>(), codebooks[q].mutable_data_ptr(),
                       counts[q].const_data_ptr<float>(), sums[q].const_data_ptr<float>(),
                       cluster_sizes[q].numel()};
  }
  const c10::cuda::CUDAGuard guard(cluster_sizes[0].device());
  at::Tensor totals = at::empty({count}, cluster_sizes[0].options());
  // The kernels set k_eps to K_q eps for each stage.
  const common::EmaParams params = common::make_ema_params(decay, eps, bias_correction, step, 1);
  C10_CUDA_CHECK(cuda::launch_ema_finalize_stages(stages, to_dtype(codebooks[0].scalar_type()),
                                                  params, totals.mutable_data_ptr<float>(),
                                                  c10::cuda::getCurrentCUDAStream()));
}

// --- DDIM step (kernel in ddim.cu) ------------------------------------------------------

void ddim_step_cuda(const common::DdimStep& step, const at::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(cuda::launch_ddim_step(step, c10::cuda::getCurrentCUDAStream()));
}

// --- attention forward (kernel in attention.cu; the backward is Triton's) ---------------

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale) {
  VQK_CHECK_DEVICE(q, at::kCUDA);
  check_attention_args(q, k, v);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention on CUDA takes float16 or bfloat16, got ", q.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t b = q.size(0), h = q.size(1), sq = q.size(2), sk = k.size(2), d = q.size(3);
  TORCH_CHECK(cuda::attention_head_dim_compiled(d), "attention on CUDA has no kernel for head dim ",
              d, " (q ", q.sizes(), ")");
  TORCH_CHECK(sq <= cuda::kMaxAttentionLength && sk <= cuda::kMaxAttentionLength,
              "attention on CUDA takes sequences of at most ", cuda::kMaxAttentionLength,
              " tokens, got q ", q.sizes(), ", k ", k.sizes());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "attention on CUDA needs sm_80 or newer, got sm_", props->major,
              props->minor);
  at::Tensor out = at::empty({b, h, sq, d}, q.options());
  at::Tensor lse = at::empty({b, h, sq}, q.options().dtype(at::kFloat));
  const cudaError_t status = cuda::launch_attention_forward(
      q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), to_dtype(q.scalar_type()), b, h,
      sq, sk, d, q.strides().data(), k.strides().data(), v.strides().data(),
      static_cast<float>(scale), out.mutable_data_ptr(), lse.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(status);  // every input the launcher refuses was checked above
  return {out, lse};
}

std::vector<int64_t> attention_head_dims_cuda() {
#define VQK_LIST_DIM(DIM) DIM,
  return {VQK_ATTENTION_HEAD_DIMS(VQK_LIST_DIM)};
#undef VQK_LIST_DIM
}

}  // namespace vqkernels
