// Tensor-facing launchers (torch's stable ABI) of the adaLN-family CUDA kernels
// (csrc/cuda/adaln.cu): tensors in, raw pointers out. x, y, the grads and the conditioning
// are read in place (any strides with unit stride along D); outputs are contiguous.
#include "common/checks.h"
#include "cuda_check.h"
#include "kernels.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

// check_adaln_*_args (common/checks.h), and what the CUDA kernels add: float32, float16 or
// bfloat16, 1 <= D <= 2^30.
cuda::AdalnShape cuda_shape(const Tensor& x, const AdalnSizes& s) {
  VQK_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Half ||
                x.scalar_type() == ScalarType::BFloat16,
            "adaLN on CUDA takes float32, float16 or bfloat16, got ", x.scalar_type());
  VQK_CHECK(s.dim >= 1 && s.dim <= (int64_t{1} << 30),
            "adaLN on CUDA needs 1 <= D <= 2^30, got ", sizes(x));
  return {s.batch, s.tokens, s.dim, to_dtype(x.scalar_type())};
}

// Rows of a (B, T, D) tensor or a per-sample (B, D) one. A dim of size 1 gets stride 0: it is
// never stepped, and its stride then cannot rule out 16-byte loads.
cuda::StridedRows strided_rows(const Tensor* t) {
  if (t == nullptr) return {};
  const auto stride = [&](int64_t d) { return t->size(d) == 1 ? 0 : t->stride(d); };
  return {t->const_data_ptr(), stride(0), t->dim() == 3 ? stride(1) : 0};
}

Tensor empty_contiguous(const Tensor& like) { return new_empty(like, like.sizes()); }

void run_forward(const cuda::AdalnForwardArgs& args, const Tensor& like) {
  VQK_CUDA_CHECK(cuda::launch_adaln_forward(args, current_stream(like)));
}

void run_backward(const cuda::AdalnBackwardArgs& args, const Tensor& like) {
  int64_t floats = 0;
  VQK_CUDA_CHECK(cuda::adaln_backward_workspace_floats(args, &floats));
  Tensor workspace = new_empty(like, {floats}, ScalarType::Float);
  VQK_CUDA_CHECK(cuda::launch_adaln_backward(args, floats ? data<float>(workspace) : nullptr,
                                             current_stream(like)));
}

}  // namespace

AdalnForward adaln_forward_cuda(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                const std::optional<Tensor>& gate,
                                const std::optional<Tensor>& y, double eps) {
  const AdalnSizes s = check_adaln_forward_args(x, shift, scale, gate, y, DeviceType::CUDA);
  const cuda::AdalnShape shape = cuda_shape(x, s);
  const DeviceGuard guard(x.get_device_index());
  Tensor h = empty_contiguous(x);
  Tensor x_new = gate ? empty_contiguous(x) : new_empty(x, {0});
  Tensor mean = new_empty(x, {x.size(0), x.size(1)}, ScalarType::Float);
  Tensor rstd = new_empty(x, {x.size(0), x.size(1)}, ScalarType::Float);
  cuda::AdalnForwardArgs args;
  args.shape = shape;
  args.x = strided_rows(&x);
  args.shift = strided_rows(&shift);
  args.scale = strided_rows(&scale);
  args.gate = strided_rows(given(gate));
  args.y = strided_rows(given(y));
  args.eps = static_cast<float>(eps);
  args.h = h.mutable_data_ptr();
  args.x_new = gate ? x_new.mutable_data_ptr() : nullptr;
  args.mean = data<float>(mean);
  args.rstd = data<float>(rstd);
  run_forward(args, x);
  return {h, x_new, mean, rstd};
}

Tensor gated_residual_forward_cuda(const Tensor& x, const Tensor& gate, const Tensor& y) {
  const AdalnSizes s = check_gated_residual_args({&x, "x"}, gate, y, DeviceType::CUDA);
  const cuda::AdalnShape shape = cuda_shape(x, s);
  const DeviceGuard guard(x.get_device_index());
  Tensor out = empty_contiguous(x);
  cuda::AdalnForwardArgs args;
  args.shape = shape;
  args.x = strided_rows(&x);
  args.gate = strided_rows(&gate);
  args.y = strided_rows(&y);
  args.x_new = out.mutable_data_ptr();
  run_forward(args, x);
  return out;
}

AdalnBackward adaln_backward_cuda(const Tensor& grad_h, const std::optional<Tensor>& grad_x_new,
                                  const Tensor& x, const Tensor& scale, const Tensor& mean,
                                  const Tensor& rstd) {
  const AdalnSizes s =
      check_adaln_backward_args(grad_h, grad_x_new, x, scale, mean, rstd, DeviceType::CUDA);
  const cuda::AdalnShape shape = cuda_shape(x, s);
  const DeviceGuard guard(x.get_device_index());
  const Tensor mean_c = contiguous(mean), rstd_c = contiguous(rstd);
  Tensor grad_x = empty_contiguous(x);
  Tensor grad_shift = empty_contiguous(scale), grad_scale = empty_contiguous(scale);
  cuda::AdalnBackwardArgs args;
  args.shape = shape;
  args.per_sample = !s.per_token;
  args.grad = strided_rows(&grad_h);
  args.input = strided_rows(&x);
  args.param = strided_rows(&scale);
  args.grad_x_new = strided_rows(given(grad_x_new));
  args.mean = cdata<float>(mean_c);
  args.rstd = cdata<float>(rstd_c);
  args.grad_input = grad_x.mutable_data_ptr();
  args.param_grad = grad_shift.mutable_data_ptr();
  args.scale_grad = grad_scale.mutable_data_ptr();
  run_backward(args, x);
  return {grad_x, grad_shift, grad_scale};
}

std::tuple<Tensor, Tensor> gated_residual_backward_cuda(const Tensor& grad, const Tensor& gate,
                                                        const Tensor& y) {
  const AdalnSizes s = check_gated_residual_args({&grad, "grad"}, gate, y, DeviceType::CUDA);
  const cuda::AdalnShape shape = cuda_shape(grad, s);
  const DeviceGuard guard(grad.get_device_index());
  Tensor grad_gate = empty_contiguous(gate), grad_y = empty_contiguous(grad);
  cuda::AdalnBackwardArgs args;
  args.shape = shape;
  args.gated = true;
  args.per_sample = !s.per_token;
  args.grad = strided_rows(&grad);
  args.input = strided_rows(&y);
  args.param = strided_rows(&gate);
  args.grad_input = grad_y.mutable_data_ptr();
  args.param_grad = grad_gate.mutable_data_ptr();
  run_backward(args, grad);
  return {grad_gate, grad_y};
}

}  // namespace vqkernels
