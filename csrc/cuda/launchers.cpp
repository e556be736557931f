// Tensor-facing launchers of the CUDA kernels (torch's stable ABI): tensors in, raw pointers
// out. Compiled by the host compiler; the kernels themselves live in the .cu files.
#include <utility>

#include "common/checks.h"
#include "cuda_check.h"
#include "kernels.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

// A 0-dim int64 CPU tensor: the scalar operand of an op on CUDA tensors (the stable stack
// of torch 2.10 carries no Scalar, so lt.Tensor and not lt.Scalar).
Tensor cpu_scalar(int64_t value) {
  Tensor t = torch::stable::empty({}, ScalarType::Long, std::nullopt, Device(DeviceType::CPU));
  *data<int64_t>(t) = value;
  return t;
}

// A device's compute capability (major, minor), from the CUDA runtime.
std::pair<int, int> compute_capability(DeviceIndex device) {
  int major = 0, minor = 0;
  VQK_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  VQK_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return {major, minor};
}

}  // namespace

Tensor timestep_embedding_cuda(const Tensor& t, int64_t dim, double max_period,
                               bool flip_sin_to_cos, double downscale_freq_shift, double scale,
                               ScalarType dtype) {
  const auto p = check_timestep_args(t, DeviceType::CUDA, dim, max_period, flip_sin_to_cos,
                                     downscale_freq_shift, scale);
  const DeviceGuard guard(t.get_device_index());
  const Tensor tc = contiguous(t);
  Tensor out = new_empty(tc, {tc.size(0), dim}, dtype);
  VQK_CUDA_CHECK(cuda::launch_timestep_embedding(tc.const_data_ptr(), to_dtype(tc.scalar_type()),
                                                 out.mutable_data_ptr(), to_dtype(dtype),
                                                 tc.size(0), p, current_stream(tc)));
  return out;
}

std::tuple<Tensor, Tensor> nearest_code_cuda(const Tensor& z, const Tensor& codebook,
                                             const Tensor& codebook_sqnorm,
                                             std::string_view precision) {
  VQK_CHECK_DEVICE(z, DeviceType::CUDA);
  VQK_CHECK_DEVICE(codebook, DeviceType::CUDA);
  VQK_CHECK(z.device() == codebook.device(), "z and codebook must be on the same device, got ",
            z.device(), " and ", codebook.device());
  check_nearest_code_args(z, codebook, codebook_sqnorm, precision);
  VQK_CHECK(z.scalar_type() == ScalarType::Float || z.scalar_type() == ScalarType::Half ||
                z.scalar_type() == ScalarType::BFloat16,
            "nearest_code on CUDA takes float32, float16 or bfloat16, got ", z.scalar_type());
  const DeviceGuard guard(z.get_device_index());
  const Tensor zc = contiguous(z), ec = contiguous(codebook);
  const int64_t n = zc.size(0);
  Tensor indices = new_empty(zc, {n}, ScalarType::Long);
  Tensor distances = new_empty(zc, {n}, ScalarType::Float);
  if (n == 0) return {indices, distances};
  // One packed (score, index) key per row: the search merges its code splits there.
  Tensor keys = new_empty(zc, {n}, ScalarType::Long);
  VQK_CUDA_CHECK(cuda::launch_nearest_code(
      zc.const_data_ptr(), ec.const_data_ptr(), to_dtype(zc.scalar_type()), n, ec.size(0),
      zc.size(1), reinterpret_cast<unsigned long long*>(data<int64_t>(keys)),
      data<int64_t>(indices), data<float>(distances), current_stream(zc)));
  return {indices, distances};
}

std::tuple<Tensor, Tensor> residual_nearest_code_cuda(const Tensor& z,
                                                      const std::vector<Tensor>& codebooks,
                                                      const std::vector<Tensor>& codebook_sqnorms,
                                                      std::string_view precision) {
  VQK_CHECK_DEVICE(z, DeviceType::CUDA);
  check_residual_nearest_code_args(z, codebooks, codebook_sqnorms, precision);
  VQK_CHECK(z.scalar_type() == ScalarType::Float || z.scalar_type() == ScalarType::Half ||
                z.scalar_type() == ScalarType::BFloat16,
            "residual_nearest_code on CUDA takes float32, float16 or bfloat16, got ",
            z.scalar_type());
  VQK_CHECK(z.size(1) <= cuda::kResidualMaxDim, "residual_nearest_code on CUDA takes D <= ",
            cuda::kResidualMaxDim, ", got ", z.size(1));
  VQK_CHECK(static_cast<int64_t>(codebooks.size()) <= cuda::kMaxResidualStages,
            "residual_nearest_code on CUDA takes at most ", cuda::kMaxResidualStages,
            " codebooks, got ", codebooks.size());
  cuda::ResidualStages stages{static_cast<int>(codebooks.size()), {0}};
  for (size_t q = 0; q < codebooks.size(); ++q) {
    stages.start[q + 1] = stages.start[q] + codebooks[q].size(0);
  }
  const DeviceGuard guard(z.get_device_index());
  const Tensor zc = contiguous(z);
  const Tensor books = contiguous(call_aten_tensor("aten::cat", "", codebooks, int64_t{0}));
  Tensor indices = new_empty(zc, {zc.size(0), stages.count}, ScalarType::Long);
  Tensor out = empty_like(zc);
  VQK_CUDA_CHECK(cuda::launch_residual_nearest_code(
      zc.const_data_ptr(), books.const_data_ptr(), stages, to_dtype(zc.scalar_type()),
      zc.size(0), zc.size(1), data<int64_t>(indices), out.mutable_data_ptr(),
      current_stream(zc)));
  return {indices, out};
}

// --- EMA codebook update (kernels in ema.cu) ---------------------------------------------

namespace {

// What would crash the EMA kernels (the rest is validated in vqkernels/ops/ema.py).
void check_ema_batch_cuda(const Tensor& z, const Tensor& indices, int64_t num_codes) {
  VQK_CHECK_DEVICE(z, DeviceType::CUDA);
  VQK_CHECK(indices.device() == z.device(), "indices must be on z's device ", z.device());
  VQK_CHECK(num_codes >= 1, "num_codes must be >= 1, got ", num_codes);
  VQK_CHECK(z.dim() == 2 && z.size(1) >= 1, "z must be 2-D (N, D) with D >= 1");
  VQK_CHECK(z.scalar_type() == ScalarType::Float || z.scalar_type() == ScalarType::Half ||
                z.scalar_type() == ScalarType::BFloat16,
            "z must be float32, float16 or bfloat16 on CUDA, got ", z.scalar_type());
  VQK_CHECK(indices.dim() == 1 && indices.size(0) == z.size(0),
            "indices must be 1-D of length N = ", z.size(0));
  VQK_CHECK(indices.scalar_type() == ScalarType::Long || indices.scalar_type() == ScalarType::Int,
            "indices must be int64 or int32, got ", indices.scalar_type());
}

void check_ema_state_cuda(const Tensor& cluster_size, const Tensor& embed_sum,
                          const Tensor& codebook) {
  VQK_CHECK_DEVICE(cluster_size, DeviceType::CUDA);
  for (const Tensor* t : {&cluster_size, &embed_sum, &codebook}) {
    VQK_CHECK(t->device() == cluster_size.device(), "the EMA state must be on one device");
    VQK_CHECK(t->is_contiguous(), "the EMA state and codebook must be contiguous");
  }
  VQK_CHECK(cluster_size.dim() == 1 && cluster_size.numel() >= 1,
            "cluster_size must be 1-D (K,) with K >= 1");
  VQK_CHECK(embed_sum.dim() == 2 && embed_sum.size(0) == cluster_size.numel() &&
                embed_sum.size(1) >= 1 && same_sizes(codebook, embed_sum),
            "embed_sum and codebook must be (K, D) with K = ", cluster_size.numel());
  VQK_CHECK(cluster_size.scalar_type() == ScalarType::Float &&
                embed_sum.scalar_type() == ScalarType::Float,
            "cluster_size and embed_sum must be float32");
  VQK_CHECK(codebook.scalar_type() == ScalarType::Float ||
                codebook.scalar_type() == ScalarType::Half ||
                codebook.scalar_type() == ScalarType::BFloat16,
            "codebook must be float32, float16 or bfloat16 on CUDA, got ", codebook.scalar_type());
}

void check_ema_stats_cuda(const Tensor& cluster_size, const Tensor& embed_sum,
                          const Tensor& codebook, const Tensor& counts, const Tensor& sums) {
  check_ema_state_cuda(cluster_size, embed_sum, codebook);
  VQK_CHECK(counts.device() == cluster_size.device() && sums.device() == cluster_size.device(),
            "counts and sums must be on the state's device");
  VQK_CHECK(counts.numel() == cluster_size.numel() && same_sizes(sums, embed_sum),
            "counts must be (K,) and sums (K, D) like cluster_size and embed_sum");
  VQK_CHECK(counts.scalar_type() == ScalarType::Float && sums.scalar_type() == ScalarType::Float,
            "counts and sums must be float32");
}

// counts (k,) u64 (in an int64 tensor) and sums (k, dim) fp32 of a checked batch.
std::tuple<Tensor, Tensor> run_code_stats(const Tensor& z, const Tensor& indices, int64_t k,
                                          bool deterministic) {
  Tensor counts = new_empty(z, {k}, ScalarType::Long);
  Tensor sums = new_empty(z, {k, z.size(1)}, ScalarType::Float);
  Tensor sorted_codes, order;
  if (deterministic && z.size(0) > 0) {
    // A stable sort (deterministic in torch) groups each code's rows in row
    // order; out-of-range rows get key k and fall outside every segment.
    const Tensor codes = torch::stable::to(indices, ScalarType::Long);
    const Tensor zero = cpu_scalar(0), key_k = cpu_scalar(k);
    const Tensor out_of_range = call_aten_tensor(
        "aten::logical_or", "", call_aten_tensor("aten::lt", "Tensor", codes, zero),
        call_aten_tensor("aten::ge", "Tensor", codes, key_k));
    const Tensor keys = call_aten_tensor("aten::masked_fill", "Tensor", codes, out_of_range, key_k);
    auto sorted = call_aten("aten::sort", "stable", keys, std::optional<bool>(true),
                            /*dim=*/int64_t{0}, /*descending=*/false);
    sorted_codes = torch::stable::detail::to<Tensor>(sorted[0]);
    order = torch::stable::detail::to<Tensor>(sorted[1]);
  }
  VQK_CUDA_CHECK(cuda::launch_code_stats(
      z.const_data_ptr(), to_dtype(z.scalar_type()), indices.const_data_ptr(),
      to_dtype(indices.scalar_type()), z.size(0), k, z.size(1),
      sorted_codes.defined() ? cdata<int64_t>(sorted_codes) : nullptr,
      order.defined() ? cdata<int64_t>(order) : nullptr,
      reinterpret_cast<unsigned long long*>(data<int64_t>(counts)), data<float>(sums),
      current_stream(z)));
  return {counts, sums};
}

void run_ema_finalize(const Tensor& cluster_size, const Tensor& embed_sum,
                      const Tensor& codebook, const Tensor& counts, DType counts_dtype,
                      const Tensor& sums, double decay, double eps, bool bias_correction,
                      int64_t step) {
  const int64_t k = cluster_size.numel();
  Tensor total = new_empty(cluster_size, {1});
  VQK_CUDA_CHECK(cuda::launch_ema_finalize(
      data<float>(cluster_size), data<float>(embed_sum), codebook.mutable_data_ptr(),
      to_dtype(codebook.scalar_type()), counts.const_data_ptr(), counts_dtype, cdata<float>(sums),
      k, embed_sum.size(1), common::make_ema_params(decay, eps, bias_correction, step, k),
      data<float>(total), current_stream(cluster_size)));
}

}  // namespace

std::tuple<Tensor, Tensor> code_counts_and_sums_cuda(const Tensor& z, const Tensor& indices,
                                                     int64_t num_codes, bool deterministic) {
  check_ema_batch_cuda(z, indices, num_codes);
  const DeviceGuard guard(z.get_device_index());
  auto [counts, sums] = run_code_stats(contiguous(z), contiguous(indices), num_codes,
                                       deterministic);
  Tensor counts_f = new_empty(z, {num_codes}, ScalarType::Float);
  VQK_CUDA_CHECK(cuda::launch_counts_to_float(
      reinterpret_cast<const unsigned long long*>(cdata<int64_t>(counts)), data<float>(counts_f),
      num_codes, current_stream(z)));
  return {counts_f, sums};
}

void ema_update_cuda(const Tensor& cluster_size, const Tensor& embed_sum, const Tensor& codebook,
                     const Tensor& z, const Tensor& indices, double decay, double eps,
                     bool bias_correction, int64_t step, bool deterministic) {
  check_ema_state_cuda(cluster_size, embed_sum, codebook);
  check_ema_batch_cuda(z, indices, cluster_size.numel());
  VQK_CHECK(z.device() == cluster_size.device(), "z must be on the state's device");
  VQK_CHECK(z.size(1) == embed_sum.size(1), "z must have D = ", embed_sum.size(1), " columns");
  const DeviceGuard guard(z.get_device_index());
  const auto [counts, sums] = run_code_stats(contiguous(z), contiguous(indices),
                                             cluster_size.numel(), deterministic);
  run_ema_finalize(cluster_size, embed_sum, codebook, counts, DType::Int64, sums, decay, eps,
                   bias_correction, step);
}

void ema_update_from_stats_cuda(const Tensor& cluster_size, const Tensor& embed_sum,
                                const Tensor& codebook, const Tensor& counts, const Tensor& sums,
                                double decay, double eps, bool bias_correction, int64_t step) {
  check_ema_stats_cuda(cluster_size, embed_sum, codebook, counts, sums);
  const DeviceGuard guard(cluster_size.get_device_index());
  run_ema_finalize(cluster_size, embed_sum, codebook, contiguous(counts), DType::Float32,
                   contiguous(sums), decay, eps, bias_correction, step);
}

void ema_update_from_stats_stages_cuda(const std::vector<Tensor>& cluster_sizes,
                                       const std::vector<Tensor>& embed_sums,
                                       const std::vector<Tensor>& codebooks,
                                       const std::vector<Tensor>& counts,
                                       const std::vector<Tensor>& sums, double decay, double eps,
                                       bool bias_correction, int64_t step) {
  const int64_t count = static_cast<int64_t>(cluster_sizes.size());
  VQK_CHECK(count >= 1 && count <= cuda::kMaxEmaStages, "the EMA of stages takes 1 to ",
            cuda::kMaxEmaStages, " stages, got ", count);
  for (const std::vector<Tensor>* list : {&embed_sums, &codebooks, &counts, &sums}) {
    VQK_CHECK(static_cast<int64_t>(list->size()) == count, "cluster_sizes, embed_sums, "
              "codebooks, counts and sums must hold one tensor a stage");
  }
  cuda::EmaStages stages{static_cast<int>(count), dim_size(embed_sums[0], -1), eps, {}};
  for (int64_t q = 0; q < count; ++q) {
    check_ema_stats_cuda(cluster_sizes[q], embed_sums[q], codebooks[q], counts[q], sums[q]);
    VQK_CHECK(counts[q].is_contiguous() && sums[q].is_contiguous(),
              "counts and sums must be contiguous");  // read in place, unlike the single update
    VQK_CHECK(cluster_sizes[q].device() == cluster_sizes[0].device() &&
                  embed_sums[q].size(1) == stages.dim &&
                  codebooks[q].scalar_type() == codebooks[0].scalar_type(),
              "every stage must be on one device, with one D and one codebook dtype");
    stages.stage[q] = {data<float>(cluster_sizes[q]), data<float>(embed_sums[q]),
                       codebooks[q].mutable_data_ptr(), cdata<float>(counts[q]),
                       cdata<float>(sums[q]), cluster_sizes[q].numel()};
  }
  const DeviceGuard guard(cluster_sizes[0].get_device_index());
  Tensor totals = new_empty(cluster_sizes[0], {count});
  // The kernels set k_eps to K_q eps for each stage.
  const common::EmaParams params = common::make_ema_params(decay, eps, bias_correction, step, 1);
  VQK_CUDA_CHECK(cuda::launch_ema_finalize_stages(stages, to_dtype(codebooks[0].scalar_type()),
                                                  params, data<float>(totals),
                                                  current_stream(totals)));
}

// --- DDIM step (kernel in ddim.cu) ------------------------------------------------------

void ddim_step_cuda(const common::DdimStep& step, const Device& device) {
  const DeviceGuard guard(device.index());
  VQK_CUDA_CHECK(cuda::launch_ddim_step(step, current_stream(device.index())));
}

// --- attention forward (kernel in attention.cu; the backward is Triton's) ---------------

std::tuple<Tensor, Tensor> attention_forward_cuda(const Tensor& q, const Tensor& k,
                                                  const Tensor& v, double scale) {
  VQK_CHECK_DEVICE(q, DeviceType::CUDA);
  check_attention_args(q, k, v);
  VQK_CHECK(q.scalar_type() == ScalarType::Half || q.scalar_type() == ScalarType::BFloat16,
            "attention on CUDA takes float16 or bfloat16, got ", q.scalar_type());
  const DeviceGuard guard(q.get_device_index());
  const int64_t b = q.size(0), h = q.size(1), sq = q.size(2), sk = k.size(2), d = q.size(3);
  VQK_CHECK(cuda::attention_head_dim_compiled(d), "attention on CUDA has no kernel for head dim ",
            d, " (q ", sizes(q), ")");
  VQK_CHECK(sq <= cuda::kMaxAttentionLength && sk <= cuda::kMaxAttentionLength,
            "attention on CUDA takes sequences of at most ", cuda::kMaxAttentionLength,
            " tokens, got q ", sizes(q), ", k ", sizes(k));
  const auto [major, minor] = compute_capability(q.get_device_index());
  VQK_CHECK(major >= 8, "attention on CUDA needs sm_80 or newer, got sm_", major, minor);
  Tensor out = new_empty(q, {b, h, sq, d});
  Tensor lse = new_empty(q, {b, h, sq}, ScalarType::Float);
  const cudaError_t status = cuda::launch_attention_forward(
      q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), to_dtype(q.scalar_type()), b, h,
      sq, sk, d, q.strides().data(), k.strides().data(), v.strides().data(),
      static_cast<float>(scale), out.mutable_data_ptr(), data<float>(lse), current_stream(q));
  VQK_CUDA_CHECK(status);  // every input the launcher refuses was checked above
  return {out, lse};
}

std::vector<int64_t> attention_head_dims_cuda() {
#define VQK_LIST_DIM(DIM) DIM,
  return {VQK_ATTENTION_HEAD_DIMS(VQK_LIST_DIM)};
#undef VQK_LIST_DIM
}

}  // namespace vqkernels
