"""Sinusoidal timestep embedding (DiT / diffusers), the public op.

Backends (one launch each): C++ CPU, CUDA, Triton, and the PyTorch reference.
``auto`` order: on CUDA the CUDA kernel, then Triton (both are one store-bound
launch, but the CUDA one has the smaller launch overhead) once both are
verified on the GPU, until then Triton first (``vqkernels._dispatch``); on CPU the C++
kernel (one pass instead of the reference's ~8 elementwise ops).
"""
from __future__ import annotations

import math

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.reference import timestep as reference

T_DTYPES = (torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _run_triton(*args):
    return torch.ops.vqkernels.timestep_embedding_triton(*args)


def _run_compiled(*args):
    return torch.ops.vqkernels.timestep_embedding(*args)


def _run_reference(t, dim, max_period, flip_sin_to_cos, downscale_freq_shift, scale, dtype):
    return reference.timestep_embedding(t, dim, max_period, flip_sin_to_cos,
                                        downscale_freq_shift, scale, dtype)


DISPATCH = OpDispatch(
    op="timestep_embedding",
    backends={
        "reference": Backend("reference", _run_reference),
        "cpu": Backend("cpu", _run_compiled),
        "cuda": Backend("cuda", _run_compiled),
        "triton": Backend("triton", _run_triton),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps ``t`` (N,), int or float.

        freq_i = exp(-log(max_period) * i / (dim // 2 - downscale_freq_shift))
        out    = [cos(scale * t * freq), sin(scale * t * freq)]   ([sin, cos] unless flip_sin_to_cos)

    with a zero column appended when ``dim`` is odd. Defaults reproduce DiT's
    ``TimestepEmbedder.timestep_embedding``; ``flip_sin_to_cos=False,
    downscale_freq_shift=1`` reproduces diffusers' ``get_timestep_embedding``.
    Math in float32; the result has dtype ``dtype`` (default float32).
    Differentiable in a floating ``t``. ``backend``: "auto" (default, or
    $VQKERNELS_BACKEND), "reference", "cpu", "cuda" or "triton".
    """
    dtype = torch.float32 if dtype is None else dtype
    _validate(t, dim, max_period, downscale_freq_shift, scale, dtype)
    run = DISPATCH.select(backend, t.device, t.dtype).run
    return run(t.contiguous(), dim, float(max_period), bool(flip_sin_to_cos), float(downscale_freq_shift),
               float(scale), dtype)


def _validate(t, dim, max_period, downscale_freq_shift, scale, dtype):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.dtype not in T_DTYPES:
        raise TypeError(f"t must have an integer or floating dtype, got {t.dtype}")
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    if not (isinstance(max_period, (int, float)) and math.isfinite(max_period) and max_period > 0):
        raise ValueError(f"max_period must be a positive finite number, got {max_period!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if dim // 2 > 0 and dim // 2 == downscale_freq_shift:
        raise ValueError(f"downscale_freq_shift must differ from dim // 2 = {dim // 2}: "
                         "the frequency exponent would divide by zero")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of {list(OUT_DTYPES)}, got {dtype}")


# --- torch.library registration: fake kernels, Triton op, autograd -------------------------

def _fake(t, dim, max_period, flip_sin_to_cos, downscale_freq_shift, scale, dtype):
    return t.new_empty((t.shape[0], dim), dtype=dtype)


@torch.library.custom_op("vqkernels::timestep_embedding_triton", mutates_args=())
def _timestep_embedding_triton(t: torch.Tensor, dim: int, max_period: float,
                               flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float,
                               dtype: torch.dtype) -> torch.Tensor:
    from vqkernels.triton import timestep as triton_timestep  # imports triton on first use

    return triton_timestep.timestep_embedding(t, dim, max_period, flip_sin_to_cos,
                                              downscale_freq_shift, scale, dtype)


def _setup_context(ctx, inputs, output):
    t, dim, max_period, flip_sin_to_cos, downscale_freq_shift, scale, _ = inputs
    ctx.save_for_backward(t)
    ctx.params = (dim, max_period, flip_sin_to_cos, downscale_freq_shift, scale)


def _backward(ctx, grad):
    """d out / d t: d cos(s t f) = -s f sin(s t f) dt, d sin(s t f) = s f cos(s t f) dt."""
    (t,) = ctx.saved_tensors
    if not t.dtype.is_floating_point:
        return (None,) * 7
    dim, max_period, flip_sin_to_cos, downscale_freq_shift, scale = ctx.params
    half = dim // 2
    freqs = reference.timestep_frequencies(dim, max_period, downscale_freq_shift, torch.float32,
                                           t.device)
    args = scale * (t.float()[:, None] * freqs[None, :])
    grad = grad.float()
    grad_cos, grad_sin = grad[:, :half], grad[:, half:2 * half]
    if not flip_sin_to_cos:
        grad_cos, grad_sin = grad_sin, grad_cos
    grad_t = (scale * freqs * (grad_sin * torch.cos(args) - grad_cos * torch.sin(args))).sum(-1)
    return (grad_t.to(t.dtype),) + (None,) * 6


def _register(op_name):
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)


torch.library.register_fake("vqkernels::timestep_embedding_triton", _fake)
_register("vqkernels::timestep_embedding_triton")
if _ext._C is not None:
    torch.library.register_fake("vqkernels::timestep_embedding", _fake)
    _register("vqkernels::timestep_embedding")
