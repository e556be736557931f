"""GELU with the tanh approximation (DiT's MLP activation), the public op ``gelu_tanh``.

One pass, in place where the caller allows it: a fresh activation costs a CPU
its page faults (a DiT-S/2 forward spends ~10% of its time in them), and
PyTorch's CPU GELU runs the tanh through a scalar-accurate vector routine
~4x slower than the C++ kernel's exponential. Backends: C++ CPU, Triton, and
the reference. ``auto``: on CPU the C++ kernel; on CUDA Triton.
"""
from __future__ import annotations

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops._tensors import GPU_DTYPES, check_float_tensor
from vqkernels.reference import gelu as reference


# --- backends: validated tensors; inplace -> overwrite x (contiguous) and return it --------

def _run_reference(x, inplace):
    y = reference.gelu_tanh(x)
    return x.copy_(y) if inplace else y


def _run_compiled(x, inplace):
    if inplace:
        torch.ops.vqkernels.gelu_tanh_forward_(x)
        return x
    return torch.ops.vqkernels.gelu_tanh_forward(x)


def _run_triton(x, inplace):
    if inplace:
        torch.ops.vqkernels.gelu_tanh_forward_triton_(x)
        return x
    return torch.ops.vqkernels.gelu_tanh_forward_triton(x)


DISPATCH = OpDispatch(
    op="gelu_tanh",
    backends={
        "reference": Backend("reference", _run_reference),
        "cpu": Backend("cpu", _run_compiled),
        "triton": Backend("triton", _run_triton, dtypes=GPU_DTYPES),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("triton",)},
)


def gelu_tanh(x: torch.Tensor, *, inplace: bool = False,
              backend: str | None = None) -> torch.Tensor:
    """GELU with the tanh approximation, element-wise: ``F.gelu(x, approximate="tanh")``.

        gelu(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u),  u = sqrt(2 / pi) (x + 0.044715 x^3)

    x of any shape and float dtype; math in float32 (float64 for float64), the
    result in x's dtype. Computed as ``x sigmoid(2u)``, so it keeps its
    relative accuracy for x < -3, where PyTorch's ``1 + tanh(u)`` cancels.
    Differentiable in x. ``inplace``: write the result over x and return x,
    for a forward without gradients (the backward reads x, so x must not need
    one). ``backend``: "auto" (default, or $VQKERNELS_BACKEND), "reference",
    "cpu" or "triton".
    """
    check_float_tensor("x", x)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace and x.requires_grad and torch.is_grad_enabled():
        raise ValueError("inplace=True needs an x that does not require grad (the backward "
                         "reads x): call it under torch.no_grad() or with inplace=False")
    run = DISPATCH.select(backend, x.device, x.dtype).run
    if x.is_contiguous():
        return run(x, inplace)
    y = run(x.contiguous(), False)
    return x.copy_(y) if inplace else y


# --- torch.library registration: Triton ops, fake kernels, autograd -----------------------

@torch.library.custom_op("vqkernels::gelu_tanh_forward_triton", mutates_args=())
def _gelu_tanh_forward_triton(x: torch.Tensor) -> torch.Tensor:
    from vqkernels.triton import gelu as triton_gelu  # imports triton on first use

    y = torch.empty_like(x)
    triton_gelu.gelu_forward(x, y)
    return y


@torch.library.custom_op("vqkernels::gelu_tanh_forward_triton_", mutates_args=("x",))
def _gelu_tanh_forward_triton_(x: torch.Tensor) -> None:
    from vqkernels.triton import gelu as triton_gelu

    triton_gelu.gelu_forward(x, x)


@torch.library.custom_op("vqkernels::gelu_tanh_backward_triton", mutates_args=())
def _gelu_tanh_backward_triton(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from vqkernels.triton import gelu as triton_gelu

    return triton_gelu.gelu_backward(grad, x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _register(suffix):
    backward_op = getattr(torch.ops.vqkernels, "gelu_tanh_backward" + suffix)

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return backward_op(grad.contiguous(), x)

    torch.library.register_fake(f"vqkernels::gelu_tanh_forward{suffix}",
                                lambda x: torch.empty_like(x))
    torch.library.register_fake(f"vqkernels::gelu_tanh_forward{suffix}_", lambda x: None)
    torch.library.register_fake(f"vqkernels::gelu_tanh_backward{suffix}",
                                lambda grad, x: torch.empty_like(x))
    torch.library.register_autograd(f"vqkernels::gelu_tanh_forward{suffix}", backward,
                                    setup_context=_setup)


_register("_triton")
if _ext._C is not None:
    _register("")
