// ATen-facing launchers of the adaLN-family CUDA kernels (csrc/cuda/adaln.cu): tensors in,
// raw pointers out. x, y, the grads and the conditioning are read in place (any strides with
// unit stride along D); outputs are contiguous.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/checks.h"
#include "kernels.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

// check_adaln_*_args (common/checks.h), and what the CUDA kernels add: float32, float16 or
// bfloat16, 1 <= D <= 2^30.
cuda::AdalnShape cuda_shape(const at::Tensor& x, const AdalnSizes& s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "adaLN on CUDA takes float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(s.dim >= 1 && s.dim <= (int64_t{1} << 30),
              "adaLN on CUDA needs 1 <= D <= 2^30, got ", x.sizes());
  return {s.batch, s.tokens, s.dim, to_dtype(x.scalar_type())};
}

// Rows of a (B, T, D) tensor or a per-sample (B, D) one. A dim of size 1 gets stride 0: it is
// never stepped, and its stride then cannot rule out 16-byte loads.
cuda::StridedRows strided_rows(const at::Tensor* t) {
  if (t == nullptr) return {};
  const auto stride = [&](int64_t d) { return t->size(d) == 1 ? 0 : t->stride(d); };
  return {t->const_data_ptr(), stride(0), t->dim() == 3 ? stride(1) : 0};
}

at::Tensor empty_contiguous(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options());
}

void run_forward(const cuda::AdalnForwardArgs& args) {
  C10_CUDA_CHECK(cuda::launch_adaln_forward(args, c10::cuda::getCurrentCUDAStream()));
}

void run_backward(const cuda::AdalnBackwardArgs& args, const at::Tensor& like) {
  int64_t floats = 0;
  C10_CUDA_CHECK(cuda::adaln_backward_workspace_floats(args, &floats));
  at::Tensor workspace = at::empty({floats}, like.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_adaln_backward(args, floats ? workspace.mutable_data_ptr<float>()
                                                          : nullptr,
                                             c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

AdalnForward adaln_forward_cuda(const at::Tensor& x, const at::Tensor& shift,
                                const at::Tensor& scale, const std::optional<at::Tensor>& gate,
                                const std::optional<at::Tensor>& y, double eps) {
  const AdalnSizes s = check_adaln_forward_args(x, shift, scale, gate, y, at::kCUDA);
  const cuda::AdalnShape shape = cuda_shape(x, s);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = empty_contiguous(x);
  at::Tensor x_new = gate ? empty_contiguous(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
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
  args.mean = mean.mutable_data_ptr<float>();
  args.rstd = rstd.mutable_data_ptr<float>();
  run_forward(args);
  return {h, x_new, mean, rstd};
}

at::Tensor gated_residual_forward_cuda(const at::Tensor& x, const at::Tensor& gate,
                                       const at::Tensor& y) {
  const AdalnSizes s = check_gated_residual_args({&x, "x"}, gate, y, at::kCUDA);
  const cuda::AdalnShape shape = cuda_shape(x, s);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = empty_contiguous(x);
  cuda::AdalnForwardArgs args;
  args.shape = shape;
  args.x = strided_rows(&x);
  args.gate = strided_rows(&gate);
  args.y = strided_rows(&y);
  args.x_new = out.mutable_data_ptr();
  run_forward(args);
  return out;
}

AdalnBackward adaln_backward_cuda(const at::Tensor& grad_h,
                                  const std::optional<at::Tensor>& grad_x_new,
                                  const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& mean, const at::Tensor& rstd) {
  const AdalnSizes s =
      check_adaln_backward_args(grad_h, grad_x_new, x, scale, mean, rstd, at::kCUDA);
  const cuda::AdalnShape shape = cuda_shape(x, s);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor grad_x = empty_contiguous(x);
  at::Tensor grad_shift = empty_contiguous(scale), grad_scale = empty_contiguous(scale);
  cuda::AdalnBackwardArgs args;
  args.shape = shape;
  args.per_sample = !s.per_token;
  args.grad = strided_rows(&grad_h);
  args.input = strided_rows(&x);
  args.param = strided_rows(&scale);
  args.grad_x_new = strided_rows(given(grad_x_new));
  args.mean = mean_c.const_data_ptr<float>();
  args.rstd = rstd_c.const_data_ptr<float>();
  args.grad_input = grad_x.mutable_data_ptr();
  args.param_grad = grad_shift.mutable_data_ptr();
  args.scale_grad = grad_scale.mutable_data_ptr();
  run_backward(args, x);
  return {grad_x, grad_shift, grad_scale};
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cuda(const at::Tensor& grad,
                                                                const at::Tensor& gate,
                                                                const at::Tensor& y) {
  const AdalnSizes s = check_gated_residual_args({&grad, "grad"}, gate, y, at::kCUDA);
  const cuda::AdalnShape shape = cuda_shape(grad, s);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_gate = empty_contiguous(gate), grad_y = empty_contiguous(grad);
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
