"""Residual nearest-code search: Q codebooks, each searching what the stages before it left.

Every kernel backend is one fused pass: a thread (a Triton program, a CUDA
thread) takes its rows through every stage, their residual kept in its buffer
(in registers), so z is read once, the quantized sum written once, and no
stage goes back to memory. Triton does so for D <= 256, CUDA for D <= 64 (the
residual row in registers); wider rows run ``ops.nearest_code`` stage by stage
on that backend, the residual and the running sum in float32 (float64 for
float64 z). No backend builds an N x K buffer.
``residual_nearest_code_with_stats`` adds each stage's EMA statistics: the
Triton kernel in its pass, other backends one ``code_counts_and_sums`` a stage.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops.ema import code_counts_and_sums
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
    if z.shape[1] > _triton_max_dim():
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


def residual_nearest_code_with_stats(
    z: torch.Tensor,
    codebooks: torch.Tensor | Sequence[torch.Tensor],
    *,
    precision: str | None = None,
    deterministic: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The l2 ``residual_nearest_code`` and every stage's EMA statistics, for a training step::

        counts[q][k]  = #{n : i_q[n] = k}                      float32 (K_q,)
        sums[q][k, :] = sum_{n : i_q[n] = k} r_q[n, :]         float32 (K_q, D)

    where r_q is the residual stage q searched (float32; float64 z: summed in
    float64, returned as float32). ``ema_update_(..., stats=(counts[q],
    sums[q]))`` finishes stage q's step. The Triton kernel (D <= 256, not
    ``deterministic``) adds each residual into its code while it holds it, so
    the statistics cost no pass of their own; elsewhere they are one
    ``code_counts_and_sums`` a stage over the residuals rebuilt from the
    indices. Arguments as ``residual_nearest_code``; ``deterministic`` as
    ``code_counts_and_sums``.
    """
    books = _validate(z, codebooks, "l2", precision)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    precision = default_precision(z.dtype) if precision is None else precision
    chosen = DISPATCH.select(backend, z.device, z.dtype, dim=z.shape[1])
    if _stats_in_search(chosen.name, z, deterministic):
        fused = torch.ops.vqkernels.residual_nearest_code_with_stats_triton
        indices, quantized, counts, sums = fused(z.contiguous(), books, _norms(z, books),
                                                 precision)
        sizes = [book.shape[0] for book in books]
        return indices, quantized, list(counts.split(sizes)), list(sums.split(sizes))
    indices, quantized = chosen.run(z, books, precision)
    return indices, quantized, *_stage_statistics(z, books, indices, deterministic, chosen.name)


def fuses_stats(z: torch.Tensor, *, deterministic: bool = False,
                backend: str | None = None) -> bool:
    """Does ``residual_nearest_code_with_stats`` add up the statistics of z's rows in its
    search pass (Triton, D <= 256, not deterministic), rather than in a pass a stage after
    it? A caller that can gather them more cheaply itself asks first."""
    chosen = DISPATCH.select(backend, z.device, z.dtype, dim=z.shape[1])
    return _stats_in_search(chosen.name, z, deterministic)


def _stats_in_search(backend, z, deterministic):
    return backend == "triton" and not deterministic and z.shape[1] <= _triton_max_dim()


def _stage_statistics(z, books, indices, deterministic, backend):
    """Each stage's counts and sums over r_q, rebuilt as the search made it: r_(q+1) = r_q -
    e^q[i_q] in the compute dtype (float64 for float64 z, else float32)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    residual, counts, sums = z.to(dtype), [], []
    for book, ind in zip(books, indices.unbind(1)):
        stage_counts, stage_sums = code_counts_and_sums(residual, ind, book.shape[0],
                                                        deterministic=deterministic,
                                                        backend=backend)
        counts.append(stage_counts)
        sums.append(stage_sums)
        residual = residual - book.to(dtype).index_select(0, ind)
    return counts, sums


def _triton_max_dim():
    from vqkernels.triton.residual import MAX_DIM  # imports triton on first use

    return MAX_DIM


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


@torch.library.custom_op("vqkernels::residual_nearest_code_with_stats_triton", mutates_args=())
def _residual_nearest_code_with_stats_triton(
        z: torch.Tensor, codebooks: list[torch.Tensor], codebook_sqnorms: list[torch.Tensor],
        precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vqkernels.triton import residual as triton_residual

    return triton_residual.residual_nearest_code_with_stats(z, codebooks, codebook_sqnorms,
                                                            precision)


@_residual_nearest_code_with_stats_triton.register_fake
def _(z, codebooks, codebook_sqnorms, precision):
    rows = sum(book.shape[0] for book in codebooks)
    return (*_fake_residual_nearest_code(z, codebooks, codebook_sqnorms, precision),
            z.new_empty(rows, dtype=torch.float32),
            z.new_empty((rows, z.shape[1]), dtype=torch.float32))


torch.library.register_fake("vqkernels::residual_nearest_code_triton", _fake_residual_nearest_code)
if _ext._C is not None and hasattr(torch.ops.vqkernels, "residual_nearest_code"):
    torch.library.register_fake("vqkernels::residual_nearest_code", _fake_residual_nearest_code)
