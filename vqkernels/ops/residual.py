"""Residual nearest-code search: Q codebooks, each searching what the stages before it left.

Every kernel backend is one fused pass: a thread (a Triton program, a CUDA
thread) takes its rows through every stage, their residual kept in its buffer
(in registers), so z is read once, the quantized sum written once, and no
stage goes back to memory. Triton does so for D <= 256, CUDA for D <= 64 (the
residual row in registers); wider rows run ``ops.nearest_code`` stage by stage
on that backend, the residual and the running sum in float32 (float64 for
float64 z). No backend builds an N x K buffer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops.search import (DTYPES, GPU_DTYPES, MAX_KERNEL_DIM, PRECISIONS, _dim_limit,
                                  _sqnorm, default_precision, nearest_code)
from vqkernels.reference import search as reference

# What the fused CUDA kernel takes (csrc/cuda/kernels.h; a test holds them equal): the
# residual row in a thread's registers, the stage table in its launch arguments.
CUDA_MAX_DIM, CUDA_MAX_STAGES = 64, 64


def _norms(z, books):
    """|e|^2 of the codes as the stages search them (float64 for float64 z, else float32)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return [_sqnorm(book.to(dtype)) for book in books]


def _run_compiled(z, books, precision):
    return torch.ops.vqkernels.residual_nearest_code(z.contiguous(), books, _norms(z, books),
                                                     precision)


def _run_cuda(z, books, precision):
    if z.shape[1] > CUDA_MAX_DIM or len(books) > CUDA_MAX_STAGES:
        return stage_by_stage("cuda")(z, books, precision)
    return _run_compiled(z, books, precision)  # the launcher concatenates the codebooks


def _run_triton(z, books, precision):
    from vqkernels.triton.residual import MAX_DIM  # imports triton on first use

    if z.shape[1] > MAX_DIM:
        return stage_by_stage("triton")(z, books, precision)
    return torch.ops.vqkernels.residual_nearest_code_triton(z.contiguous(), books,
                                                            _norms(z, books), precision)


def stage_by_stage(backend):
    """The search as Q ``nearest_code`` calls on ``backend``: the reference's stage loop (the
    residual and the running sum in the stage dtype) with that backend's search."""
    def run(z, books, precision, metric="l2"):
        def search(residual, book, metric):
            return nearest_code(residual, book.to(residual.dtype), metric=metric,
                                precision=precision, backend=backend)[0]
        return reference.residual_nearest_code(z, books, metric, search=search)
    return run


DISPATCH = OpDispatch(
    op="residual_nearest_code",
    backends={
        "reference": Backend("reference", stage_by_stage("reference")),
        "cpu": Backend("cpu", _run_compiled, DTYPES, _dim_limit(MAX_KERNEL_DIM)),
        "cuda": Backend("cuda", _run_cuda, GPU_DTYPES, _dim_limit(MAX_KERNEL_DIM)),
        "triton": Backend("triton", _run_triton, GPU_DTYPES, _dim_limit(MAX_KERNEL_DIM)),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)


def residual_nearest_code(
    z: torch.Tensor,
    codebooks: torch.Tensor | Sequence[torch.Tensor],
    *,
    metric: str = "l2",
    precision: str | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the residual codes of every row of ``z``, and their sum::

        r_0 = z,   i_q = nearest_code(r_q, e^q),   r_(q+1) = r_q - e^q[i_q],
        quantized = sum_q e^q[i_q]

    ``z`` (N, D); ``codebooks`` (Q, K, D) or a sequence of Q (K_q, D) tensors,
    all of z's dtype and device. Returns ``indices`` (N, Q) int64 and
    ``quantized`` (N, D) in z's dtype. ``metric``, ``precision`` and
    ``backend`` as ``nearest_code`` (the default precision follows z's dtype,
    the stages search the float32 residual at that precision). ``cosine``
    normalizes each stage's residual, so it runs stage by stage on any backend.
    """
    books = _validate(z, codebooks, metric, precision)
    precision = default_precision(z.dtype) if precision is None else precision
    chosen = DISPATCH.select(backend, z.device, z.dtype, dim=z.shape[1])
    if metric == "cosine":
        return stage_by_stage(chosen.name)(z, books, precision, metric)
    return chosen.run(z, books, precision)


def _validate(z, codebooks, metric, precision) -> list[torch.Tensor]:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D (N, D) tensor, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if z.dtype not in DTYPES or z.shape[1] < 1:
        raise ValueError(f"z must be float32, float16, bfloat16 or float64 with D >= 1, got "
                         f"{z.dtype} {tuple(z.shape)}")
    if isinstance(codebooks, torch.Tensor):
        if codebooks.dim() != 3:
            raise ValueError(f"codebooks must be (Q, K, D) or a sequence of (K, D), got shape "
                             f"{tuple(codebooks.shape)}")
        books = list(codebooks.unbind(0))
    else:
        books = list(codebooks)
    if not books:
        raise ValueError("codebooks must hold at least one codebook (Q >= 1)")
    for q, book in enumerate(books):
        if not isinstance(book, torch.Tensor) or book.dim() != 2 or book.shape[1] != z.shape[1]:
            shape = tuple(book.shape) if isinstance(book, torch.Tensor) else type(book).__name__
            raise ValueError(f"codebooks[{q}] must be a (K, D={z.shape[1]}) tensor, got {shape}")
        if book.shape[0] < 1:
            raise ValueError(f"codebooks[{q}] must have at least one code (K >= 1)")
        if book.dtype != z.dtype or book.device != z.device:
            raise ValueError(f"codebooks[{q}] must have z's dtype and device ({z.dtype}, "
                             f"{z.device}), got {book.dtype}, {book.device}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return books


# --- torch.library registration ------------------------------------------------------------

def _fake_residual_nearest_code(z, codebooks, codebook_sqnorms, precision):
    return z.new_empty((z.shape[0], len(codebooks)), dtype=torch.int64), z.new_empty(z.shape)


@torch.library.custom_op("vqkernels::residual_nearest_code_triton", mutates_args=())
def _residual_nearest_code_triton(z: torch.Tensor, codebooks: list[torch.Tensor],
                                  codebook_sqnorms: list[torch.Tensor], precision: str
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    from vqkernels.triton import residual as triton_residual

    return triton_residual.residual_nearest_code(z, codebooks, codebook_sqnorms, precision)


torch.library.register_fake("vqkernels::residual_nearest_code_triton", _fake_residual_nearest_code)
if _ext._C is not None and hasattr(torch.ops.vqkernels, "residual_nearest_code"):
    torch.library.register_fake("vqkernels::residual_nearest_code", _fake_residual_nearest_code)
