"""Layout helpers shared by the ops: what a kernel can read in place, and one copy otherwise."""
from __future__ import annotations

import math

import torch


def has_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` may share memory (e.g. an expanded, stride-0 view).

    Sufficient test for distinctness: ordered by stride, each dimension steps
    past the whole extent of the dimensions before it.
    """
    if x.numel() <= 1:
        return False
    extent = 0  # the largest offset reachable through the dimensions seen so far
    for stride, size in sorted((abs(st), sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def unit_inner_stride(x: torch.Tensor) -> torch.Tensor:
    """``x``, or one contiguous copy when its last dimension is strided.

    ``clone`` rather than ``contiguous``: an empty tensor counts as contiguous
    whatever its strides, and the kernels check the last one.
    """
    if x.shape[-1] == 1 or x.stride(-1) == 1:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def unit_stride_rows(output, sample):
    """The sample's C channels of ``output`` as (rows, M), copied at most once.

    The kernels index a row by its outer stride alone, so a row whose elements
    are not adjacent (a permuted or step-sliced output) is copied; the channels
    past C (DiT's learned sigma) are dropped first, so they are never copied.
    """
    if sample.dim() >= 2:
        output = output[:, :sample.shape[1]]
    m = math.prod(sample.shape[1:])
    rows = output.reshape(output.shape[0], m)
    return rows if m <= 1 or rows.stride(1) == 1 else rows.contiguous()


def dense_rows(x, b, m, dtype):
    """``x`` as contiguous (b, m) rows of ``dtype``, copied at most once."""
    if x.dtype == dtype:  # .to() would return x itself, whatever its layout
        return x.reshape(b, m).contiguous()
    return x.to(dtype, memory_format=torch.contiguous_format).view(b, m)
