"""Residual nearest-code search: Q codebooks, each searching what the stages before it left.

``ops.nearest_code`` per stage, on the chosen backend, with the residual and
the running sum in float32 (float64 for float64 z): no N x K buffer, but Q
launches that each read the residual. One kernel that keeps the residual on
chip across stages is the next step (issue 17); this op is its contract.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vqkernels.ops.search import default_precision, nearest_code


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
    the stages search the float32 residual at that precision).
    """
    books = _validate(z, codebooks)
    precision = default_precision(z.dtype) if precision is None else precision
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    residual = z.to(dtype)
    quantized = torch.zeros_like(residual)
    indices = torch.empty((z.shape[0], len(books)), dtype=torch.int64, device=z.device)
    for q, codebook in enumerate(books):
        codebook = codebook.to(dtype)
        ind, _ = nearest_code(residual, codebook, metric=metric, precision=precision,
                              backend=backend)
        codes = codebook.index_select(0, ind)
        residual = residual - codes
        quantized += codes
        indices[:, q] = ind
    return indices, quantized.to(z.dtype)


def _validate(z, codebooks) -> list[torch.Tensor]:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D (N, D) tensor, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
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
        if book.dtype != z.dtype or book.device != z.device:
            raise ValueError(f"codebooks[{q}] must have z's dtype and device ({z.dtype}, "
                             f"{z.device}), got {book.dtype}, {book.device}")
    return books
