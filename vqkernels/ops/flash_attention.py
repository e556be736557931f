"""Scaled dot-product attention for diffusion transformers: ``vqkernels.ops.attention``.

Non-causal (DiT is bidirectional), no mask, q (B, H, Sq, d), k and v (B, H, Sk, d).
Every kernel is FlashAttention-2 style: a blocked online softmax that never holds
an Sq x Sk matrix, saving lse = log sum_j exp(s_ij) per query row so that the
backward recomputes the probabilities. Backends: Triton (forward and backward,
fp16 / bf16 / fp32, fp32 in IEEE, not tf32), CUDA (forward on tensor cores,
fp16 / bf16, sm_80+; its backward is Triton's, which reads the same lse, so
without Triton it refuses inputs that require grad), C++ CPU (forward and
backward, fp32 / fp64) and the reference. ``auto`` on CUDA tries Triton first,
the one with a backward, until GPU results order them (``vqkernels._verified``).
"""
from __future__ import annotations

import math

import torch

from vqkernels import _ext
from vqkernels._dispatch import (Backend, OpDispatch, device_capability,
                                 triton_reasons)
from vqkernels.ops._layout import unit_inner_stride
from vqkernels.ops._tensors import FLOAT_DTYPES
from vqkernels.reference import attention as reference

TRITON_MAX_HEAD_DIM = 256


# --- backends: each takes validated q, k, v (last-dim stride 1) and a float scale ----------

def _run_reference(q, k, v, scale):
    return reference.attention(q, k, v, scale)


def _run_compiled(q, k, v, scale):
    return torch.ops.vqkernels.attention_forward(q, k, v, scale)[0]


def _run_triton(q, k, v, scale):
    return torch.ops.vqkernels.attention_forward_triton(q, k, v, scale)[0]


def _cuda_limits(*, device, dtype, head_dim, requires_grad=False):
    reasons = []
    head_dims = _ext.cuda_attention_head_dims()  # none: cuda_kernels_reasons says why
    if head_dims and head_dim not in head_dims:
        reasons.append(f"head_dim {head_dim} is not one of {list(head_dims)}")
    if device.type == "cuda" and device_capability(device) < (8, 0):
        reasons.append("the CUDA kernel needs sm_80 or newer (mma.sync on bf16)")
    if requires_grad:
        reasons += [f"its backward is the Triton kernel, and {reason}"
                    for reason in triton_reasons(device)]
    return reasons


def _triton_limits(*, device, dtype, head_dim, requires_grad=False):
    if head_dim > TRITON_MAX_HEAD_DIM:
        return [f"head_dim {head_dim} exceeds {TRITON_MAX_HEAD_DIM}"]
    return []


DISPATCH = OpDispatch(
    op="attention",
    backends={
        "reference": Backend("reference", _run_reference),
        "cpu": Backend("cpu", _run_compiled, dtypes=(torch.float32, torch.float64)),
        "cuda": Backend("cuda", _run_compiled, dtypes=(torch.float16, torch.bfloat16),
                        limits=_cuda_limits),
        "triton": Backend("triton", _run_triton,
                          dtypes=(torch.float16, torch.bfloat16, torch.float32),
                          limits=_triton_limits),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("triton", "cuda")},
)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """softmax(scale * q @ k^T) @ v for q (B, H, Sq, d), k and v (B, H, Sk, d).

    Non-causal, no mask; ``scale`` defaults to ``d ** -0.5``; Sq may differ
    from Sk (cross-attention), Sk >= 1. Returns (B, H, Sq, d) contiguous in
    q's dtype. Math: float32 accumulation (float64 for float64 inputs), on
    the GPU fp16 / bf16 tensor-core products and IEEE fp32 for float32.
    Differentiable in q, k and v (fused FlashAttention-2 backward). Inputs
    may be strided views (e.g. of a packed qkv projection) as long as the
    last dimension is contiguous; others are copied once. ``backend``:
    "auto" (default, or $VQKERNELS_BACKEND), "reference", "cpu", "cuda" or
    "triton".
    """
    _validate(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (unit_inner_stride(x) for x in (q, k, v))
    requires_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    run = DISPATCH.select(backend, q.device, q.dtype, head_dim=q.shape[-1],
                          requires_grad=requires_grad).run
    return run(q, k, v, scale)


def _validate(q, k, v, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, d), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {x.dtype}, {x.device}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k must be (B, H, Sk, d) = ({b}, {h}, Sk, {d}) for q of shape "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)} (value dim = head dim), "
                         f"got {tuple(v.shape)}")
    if d < 1:
        raise ValueError(f"the head dim d must be >= 1, got shape {tuple(q.shape)}")
    if k.shape[2] < 1:
        raise ValueError(f"k and v need at least one key (Sk >= 1), got shape {tuple(k.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


# --- torch.library registration: Triton ops, fake kernels, autograd -----------------------

def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, scale):
    b, h, sq, d = q.shape
    return q.new_empty((b, h, sq, d)), q.new_empty((b, h, sq), dtype=_lse_dtype(q))


def _fake_backward(grad_out, q, k, v, out, lse, scale):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


@torch.library.custom_op("vqkernels::attention_forward_triton", mutates_args=())
def _attention_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from vqkernels.triton import attention as triton_attention  # imports triton on first use

    return triton_attention.attention_forward(q, k, v, scale)


@torch.library.custom_op("vqkernels::attention_backward_triton", mutates_args=())
def _attention_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vqkernels.triton import attention as triton_attention

    return triton_attention.attention_backward(grad_out, q, k, v, out, lse, scale)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward_with(cpu_backward: str):
    """The autograd formula of a forward op whose backward on CPU tensors is
    torch.ops.vqkernels.<cpu_backward>; on CUDA it is always the Triton one,
    which reads the lse that both GPU forwards save."""
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if q.shape[2] == 0:  # no queries (autograd's empty grad_out may even be expanded)
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        name = cpu_backward if q.device.type == "cpu" else "attention_backward_triton"
        op = getattr(torch.ops.vqkernels, name)
        return (*op(grad_out, q, k, v, out, lse, ctx.scale), None)

    return backward


torch.library.register_fake("vqkernels::attention_forward_triton", _fake_forward)
torch.library.register_fake("vqkernels::attention_backward_triton", _fake_backward)
torch.library.register_autograd("vqkernels::attention_forward_triton",
                                _backward_with("attention_backward_triton"),
                                setup_context=_setup_context)
if _ext._C is not None:
    torch.library.register_fake("vqkernels::attention_forward", _fake_forward)
    torch.library.register_fake("vqkernels::attention_backward", _fake_backward)
    torch.library.register_autograd("vqkernels::attention_forward",
                                    _backward_with("attention_backward"),
                                    setup_context=_setup_context)
