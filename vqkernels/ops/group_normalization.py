"""GroupNorm with an optional SiLU after it, the public op ``group_norm`` (a VQGAN block's
``swish(norm(x))`` in one pass).

x contiguous (NCHW) or channels-last stays in its layout: PyTorch's CUDA GroupNorm
makes a channels-last input contiguous first, so a channels-last VQGAN would pay a
copy there and another for the next convolution, at every norm.
Backends: C++ CPU (float32 / float64), Triton, and the reference; gradients by
the reference formula (``reference.group_norm.group_norm_backward``) in PyTorch
ops. ``auto``: on CPU the C++ kernel, on CUDA Triton.
"""
from __future__ import annotations

import math

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops._tensors import GPU_DTYPES, check_float_tensor
from vqkernels.reference import group_norm as reference


# --- backends: validated x (contiguous or channels-last), weight and bias (C,) -------------

def _run_reference(x, weight, bias, num_groups, eps, silu):
    return reference.group_norm(x, num_groups, weight, bias, eps, silu)


def _run_compiled(x, weight, bias, num_groups, eps, silu):
    return torch.ops.vqkernels.group_norm_forward(x, weight, bias, num_groups, eps, silu)[0]


def _run_triton(x, weight, bias, num_groups, eps, silu):
    return torch.ops.vqkernels.group_norm_forward_triton(x, weight, bias, num_groups, eps,
                                                         silu)[0]


DISPATCH = OpDispatch(
    op="group_norm",
    backends={
        "reference": Backend("reference", _run_reference),
        "cpu": Backend("cpu", _run_compiled, dtypes=(torch.float32, torch.float64)),
        "triton": Backend("triton", _run_triton, dtypes=GPU_DTYPES),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("triton",)},
)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, eps: float = 1e-5, silu: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``, then ``F.silu`` when ``silu``.

    x (B, C, *spatial) with C channels in ``num_groups`` groups; per (b, g)::

        y = act((x - mean) / sqrt(var + eps) * weight[c] + bias[c])

    mean and the biased var over the group's C / num_groups channels and every
    position; weight and bias (C,) of x's dtype (None: 1 and 0). Math in
    float32 (float64 for float64); y in x's dtype and, for a channels-last x,
    channels-last. Differentiable in x, weight and bias. ``backend``: "auto"
    (default, or $VQKERNELS_BACKEND), "reference", "cpu" or "triton".
    """
    _check(x, num_groups, weight, bias, eps, silu)
    if not (x.is_contiguous() or _channels_last(x)):
        x = x.contiguous()
    c = x.shape[1]
    weight = x.new_ones(c) if weight is None else weight.contiguous()
    bias = x.new_zeros(c) if bias is None else bias.contiguous()
    run = DISPATCH.select(backend, x.device, x.dtype).run
    return run(x, weight, bias, num_groups, float(eps), silu)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _check(x, num_groups, weight, bias, eps, silu):
    check_float_tensor("x", x)
    if x.dim() < 2 or 0 in x.shape[2:]:
        raise ValueError(f"x must be (B, C, *spatial) with no empty spatial dim, got shape "
                         f"{tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or (
            x.shape[1] % num_groups):
        raise ValueError(f"num_groups must be a positive int dividing C = {x.shape[1]}, got "
                         f"{num_groups!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (x.shape[1],):
            raise ValueError(f"{name} must be None or a (C,) = ({x.shape[1]},) tensor, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else p!r}")
        if p.dtype != x.dtype or p.device != x.device:
            raise TypeError(f"{name} must have x's dtype {x.dtype} and device {x.device}, got "
                            f"{p.dtype} on {p.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool, got {type(silu).__name__}")


# --- torch.library registration: the Triton op, fake kernels, autograd --------------------

@torch.library.custom_op("vqkernels::group_norm_forward_triton", mutates_args=())
def _group_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               num_groups: int, eps: float, silu: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vqkernels.triton import group_norm as triton_group_norm  # imports triton on first use

    return triton_group_norm.group_norm_forward(x, weight, bias, num_groups, eps, silu)


def _fake_forward(x, weight, bias, num_groups, eps, silu):
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = x.new_empty((x.shape[0], num_groups), dtype=stats_dtype)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _setup(ctx, inputs, output):
    x, weight, bias, _, _, silu = inputs
    _, mean, rstd = output
    ctx.silu = silu
    ctx.channels_last = _channels_last(x) and not x.is_contiguous()
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = reference.group_norm_backward(grad, x, mean, rstd, weight, bias,
                                                       ctx.silu)
    if ctx.channels_last:
        dx = dx.contiguous(memory_format=torch.channels_last)
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype), None, None, None


for _name in ("group_norm_forward_triton",) + (("group_norm_forward",) if _ext._C is not None
                                                else ()):
    torch.library.register_fake(f"vqkernels::{_name}", _fake_forward)
    torch.library.register_autograd(f"vqkernels::{_name}", _backward, setup_context=_setup)
