"""adaLN-Zero glue of a DiT block, the public ops: ``layer_norm_modulate``, ``gated_residual``
and their fusion ``gated_residual_layer_norm_modulate``.

Each is one pass over the (B, T, D) activations where eager PyTorch makes three
to five. Backends: C++ CPU, CUDA, Triton, and the reference. The two LayerNorm
ops are one kernel (``adaln_forward``, the residual optional) with one backward
(``adaln_backward``); the fused op's backward then runs the gated residual's.
``auto``: on CPU the C++ kernel; on CUDA as ``vqkernels._dispatch`` says.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops._layout import unit_inner_stride
from vqkernels.ops._tensors import GPU_DTYPES, check_float_tensor
from vqkernels.reference import adaln as reference


# --- backends: validated tensors (unit stride along D), gate and y None without residual -----

def _run_norm_reference(x, shift, scale, gate, y, eps):
    if gate is None:
        return reference.layer_norm_modulate(x, shift, scale, eps), None
    x_new, h = reference.gated_residual_layer_norm_modulate(x, gate, y, shift, scale, eps)
    return h, x_new


def _run_norm_compiled(x, shift, scale, gate, y, eps):
    return torch.ops.vqkernels.adaln_forward(x, shift, scale, gate, y, eps)[:2]


def _run_norm_triton(x, shift, scale, gate, y, eps):
    return torch.ops.vqkernels.adaln_forward_triton(x, shift, scale, gate, y, eps)[:2]


def _run_residual_compiled(x, gate, y):
    return torch.ops.vqkernels.gated_residual_forward(x, gate, y)


def _run_residual_triton(x, gate, y):
    return torch.ops.vqkernels.gated_residual_forward_triton(x, gate, y)


def _dispatch(op, reference_run, compiled_run, triton_run):
    return OpDispatch(
        op=op,
        backends={
            "reference": Backend("reference", reference_run),
            "cpu": Backend("cpu", compiled_run),
            "cuda": Backend("cuda", compiled_run, dtypes=GPU_DTYPES),
            "triton": Backend("triton", triton_run, dtypes=GPU_DTYPES),
        },
        auto_order={"cpu": ("cpu",), "cuda": ("triton", "cuda")},
    )


NORM_DISPATCH = _dispatch("layer_norm_modulate", _run_norm_reference, _run_norm_compiled,
                          _run_norm_triton)
FUSED_DISPATCH = _dispatch("gated_residual_layer_norm_modulate", _run_norm_reference,
                           _run_norm_compiled, _run_norm_triton)
RESIDUAL_DISPATCH = _dispatch("gated_residual", reference.gated_residual, _run_residual_compiled,
                              _run_residual_triton)


# --- the public ops -------------------------------------------------------------------------

def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *,
                        eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift``, the LayerNorm without affine over the last dim.

        h[b, t, d] = (x[b, t, d] - mean[b, t]) / sqrt(var[b, t] + eps) * (1 + scale) + shift

    x (B, T, D); shift and scale (B, D) per sample (DiT) or (B, T, D) per
    token. Statistics and sums in float32 (float64 for float64 inputs); h in
    x's dtype. Differentiable in x, shift and scale. ``backend``: "auto"
    (default, or $VQKERNELS_BACKEND), "reference", "cpu", "cuda" or "triton".
    """
    x, shift, scale = _validated(("x", x), ("shift", shift), ("scale", scale))
    run = NORM_DISPATCH.select(backend, x.device, x.dtype).run
    return run(x, shift, scale, None, None, _validated_eps(eps))[0]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *,
                   backend: str | None = None) -> torch.Tensor:
    """``x + gate * y`` with gate broadcast over tokens: adaLN-Zero's gated residual add.

    x and y (B, T, D); gate (B, D) per sample or (B, T, D) per token. Math in
    float32 (float64 for float64 inputs); the sum in x's dtype.
    Differentiable in x, gate and y (dgate summed over T in float32).
    """
    x, gate, y = _validated(("x", x), ("gate", gate), ("y", y))
    return RESIDUAL_DISPATCH.select(backend, x.device, x.dtype).run(x, gate, y)


def gated_residual_layer_norm_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
    scale: torch.Tensor, *, eps: float = 1e-6, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_new, h)``: ``x_new = x + gate * y``, ``h = layer_norm_modulate(x_new, shift, scale)``.

    The step between a DiT block's attention and its MLP, in one pass that
    reads x and y once and writes x_new and h. h normalizes x_new as stored in
    x's dtype, exactly as the unfused ops do. Shapes, dtypes and gradients as
    :func:`gated_residual` and :func:`layer_norm_modulate`.
    """
    x, gate, y, shift, scale = _validated(("x", x), ("gate", gate), ("y", y), ("shift", shift),
                                          ("scale", scale))
    run = FUSED_DISPATCH.select(backend, x.device, x.dtype).run
    h, x_new = run(x, shift, scale, gate, y, _validated_eps(eps))
    return x_new, h


# --- validation ----------------------------------------------------------------------------

def _validated(*named):
    """The tensors of ``named`` (("x", x), then y / shift / scale / gate) after checking
    shapes, dtypes and devices; each with unit stride along D (copied at most once)."""
    (_, x), rest = named[0], named[1:]
    check_float_tensor("x", x)
    if x.dim() != 3 or x.shape[-1] < 1:
        raise ValueError(f"x must be (B, T, D) with D >= 1, got shape {tuple(x.shape)}")
    b, t, d = x.shape
    for name, v in rest:
        check_float_tensor(name, v)
        if v.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {v.dtype}")
        if v.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {v.device}")
        allowed = [(b, t, d)] if name == "y" else [(b, d), (b, t, d)]
        if tuple(v.shape) not in allowed:
            forms = "(B, T, D)" if name == "y" else "(B, D) or (B, T, D)"
            raise ValueError(f"{name} must be {forms} = {' or '.join(map(str, allowed))} for x of "
                             f"shape {tuple(x.shape)}, got {tuple(v.shape)}")
    params = [(name, v) for name, v in rest if name != "y"]
    if len({v.dim() for _, v in params}) > 1:
        forms = ", ".join(f"{name} {tuple(v.shape)}" for name, v in params)
        raise ValueError(f"{' and '.join(n for n, _ in params)} must all be per sample (B, D) or "
                         f"all per token (B, T, D), got {forms}")
    return tuple(unit_inner_stride(v) for _, v in named)


def _validated_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


# --- torch.library registration: Triton ops, fake kernels, autograd -----------------------

def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_norm_forward(x, shift, scale, gate, y, eps):
    stats = x.new_empty(x.shape[:2], dtype=_stats_dtype(x))
    x_new = x.new_empty(x.shape) if gate is not None else x.new_empty((0,))
    return x.new_empty(x.shape), x_new, stats, torch.empty_like(stats)


def _fake_norm_backward(grad_h, grad_x_new, x, scale, mean, rstd):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _fake_residual_forward(x, gate, y):
    return x.new_empty(x.shape)


def _fake_residual_backward(grad, gate, y):
    return gate.new_empty(gate.shape), y.new_empty(y.shape)


@torch.library.custom_op("vqkernels::adaln_forward_triton", mutates_args=())
def _adaln_forward_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                          gate: Optional[torch.Tensor], y: Optional[torch.Tensor], eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vqkernels.triton import adaln as triton_adaln  # imports triton on first use

    return triton_adaln.adaln_forward(x, shift, scale, gate, y, eps)


@torch.library.custom_op("vqkernels::adaln_backward_triton", mutates_args=())
def _adaln_backward_triton(grad_h: torch.Tensor, grad_x_new: Optional[torch.Tensor],
                           x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                           rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vqkernels.triton import adaln as triton_adaln

    return triton_adaln.adaln_backward(grad_h, grad_x_new, x, scale, mean, rstd)


@torch.library.custom_op("vqkernels::gated_residual_forward_triton", mutates_args=())
def _gated_residual_forward_triton(x: torch.Tensor, gate: torch.Tensor,
                                   y: torch.Tensor) -> torch.Tensor:
    from vqkernels.triton import adaln as triton_adaln

    return triton_adaln.gated_residual_forward(x, gate, y)


@torch.library.custom_op("vqkernels::gated_residual_backward_triton", mutates_args=())
def _gated_residual_backward_triton(grad: torch.Tensor, gate: torch.Tensor,
                                    y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from vqkernels.triton import adaln as triton_adaln

    return triton_adaln.gated_residual_backward(grad, gate, y)


def _setup_norm(ctx, inputs, output):
    x, shift, scale, gate, y, _ = inputs
    _, x_new, mean, rstd = output
    ctx.has_residual = gate is not None
    # The tensor that was normalized: x_new when the residual is fused in.
    ctx.save_for_backward(x_new if ctx.has_residual else x, scale, mean, rstd, gate, y)
    ctx.mark_non_differentiable(mean, rstd)


def _setup_residual(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _backward_ops(suffix):
    """The autograd formulas of the forward ops whose backward ops end in ``suffix``."""
    def norm_backward(ctx, grad_h, grad_x_new, _grad_mean, _grad_rstd):
        normed, scale, mean, rstd, gate, y = ctx.saved_tensors
        grad_x_new = unit_inner_stride(grad_x_new) if ctx.has_residual else None
        grad_x, grad_shift, grad_scale = getattr(torch.ops.vqkernels, "adaln_backward" + suffix)(
            unit_inner_stride(grad_h), grad_x_new, normed, scale, mean, rstd)
        if not ctx.has_residual:
            return grad_x, grad_shift, grad_scale, None, None, None
        grad_gate, grad_y = residual_grads(gate, y, grad_x)
        return grad_x, grad_shift, grad_scale, grad_gate, grad_y, None

    def residual_grads(gate, y, grad):
        return getattr(torch.ops.vqkernels, "gated_residual_backward" + suffix)(grad, gate, y)

    def residual_backward(ctx, grad):
        grad = unit_inner_stride(grad)
        return (grad, *residual_grads(*ctx.saved_tensors, grad))

    return norm_backward, residual_backward


def _register(suffix):
    norm_backward, residual_backward = _backward_ops(suffix)
    for name, fake in (("adaln_forward", _fake_norm_forward),
                       ("adaln_backward", _fake_norm_backward),
                       ("gated_residual_forward", _fake_residual_forward),
                       ("gated_residual_backward", _fake_residual_backward)):
        torch.library.register_fake(f"vqkernels::{name}{suffix}", fake)
    torch.library.register_autograd(f"vqkernels::adaln_forward{suffix}", norm_backward,
                                    setup_context=_setup_norm)
    torch.library.register_autograd(f"vqkernels::gated_residual_forward{suffix}",
                                    residual_backward, setup_context=_setup_residual)


_register("_triton")
if _ext._C is not None:
    _register("")
