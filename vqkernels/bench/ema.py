"""Benchmark cases of ``vqkernels.ops.ema_update_`` (one EMA codebook step).

Baselines are the PyTorch a user would write: the "reference" row (every
speed-up is against it) counts with ``bincount``, sums with ``index_add_`` and
then runs the elementwise update of vqkernels/reference/ema.py; the "one-hot"
row sums with ``F.one_hot(indices, K).float().T @ z``, only where that N x K
matrix has at most ``ONE_HOT_MAX_ELEMENTS`` entries. Every callable updates its
own copy of the state in place on the same z and indices. The op is
memory-bound (``_case`` counts its bytes and FLOPs). On a GPU each kernel
backend's deterministic mode is timed too (``<backend>-deterministic``); on a
CPU every path already is deterministic.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vqkernels.bench.cases import REFERENCE, Case, usable_backends
from vqkernels.ops import ema
from vqkernels.reference import ema as reference_ema

# docs/ARCHITECTURE.md's shapes at N = 65536 on a GPU; two of them on a CPU.
GPU_SHAPES = ((65536, 1024, 256), (65536, 16384, 256), (65536, 16384, 8), (65536, 65536, 32))
CPU_SHAPES = ((65536, 1024, 256), (65536, 16384, 8))
GPU_DTYPES = (torch.bfloat16, torch.float32)
ONE_HOT_MAX_ELEMENTS = 2**26
DECAY, EPS = 0.99, 1e-5


def cases(device: torch.device, quick: bool) -> list[Case]:
    """GPU: every shape x (bf16, fp32) z; CPU: fp32. quick: the first shape only."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtypes = GPU_DTYPES if device.type == "cuda" else (torch.float32,)
    if quick:
        shapes, dtypes = shapes[:1], dtypes[:1]
    return [_case(device, n, k, d, dtype) for n, k, d in shapes for dtype in dtypes]


def torch_ema_update(cluster_size, embed_sum, codebook, z, indices, sums_fn):
    """The usual PyTorch EMA step: counts by bincount, sums by ``sums_fn``, then the update."""
    k = cluster_size.shape[0]
    counts = torch.bincount(indices, minlength=k).float()
    reference_ema.ema_update_from_stats_(cluster_size, embed_sum, codebook, counts,
                                         sums_fn(z, indices, k), DECAY, EPS)


def index_add_sums(z, indices, k):
    return torch.zeros(k, z.shape[1], device=z.device).index_add_(0, indices, z.float())


def one_hot_sums(z, indices, k):
    return F.one_hot(indices, k).float().t() @ z.float()


def _state(k, d, device, dtype):
    cluster_size = torch.rand(k, device=device) + 0.5
    return [cluster_size, torch.randn(k, d, device=device) * cluster_size[:, None],
            torch.randn(k, d, device=device, dtype=dtype)]


def _case(device, n, k, d, dtype) -> Case:
    """Bytes (s: z's item size): z read once (N D s) + indices (8 N) + cluster_size
    read and written (8 K) + embed_sum read and written (8 K D) + codebook written
    (K D s). FLOPs: N D (the sums) + ~6 K D (the update), far below any ceiling."""
    z = torch.randn(n, d, device=device, dtype=dtype)
    indices = torch.randint(0, k, (n,), device=device)
    fns = {REFERENCE: functools.partial(torch_ema_update, *_state(k, d, device, dtype), z,
                                        indices, index_add_sums)}
    if n * k <= ONE_HOT_MAX_ELEMENTS:
        fns["one-hot"] = functools.partial(torch_ema_update, *_state(k, d, device, dtype), z,
                                           indices, one_hot_sums)
    for name in usable_backends(ema.DISPATCH, device, dtype, codebook_dtype=dtype):
        if name == REFERENCE:
            continue
        modes = (False, True) if device.type == "cuda" else (False,)
        for deterministic in modes:
            label = f"{name}-deterministic" if deterministic else name
            fns[label] = functools.partial(ema.ema_update_, *_state(k, d, device, dtype), z,
                                           indices, decay=DECAY, eps=EPS,
                                           deterministic=deterministic, backend=name)
    size = z.element_size()
    return Case(op="ema", shape=f"N{n}xK{k}xD{d}-{str(dtype).removeprefix('torch.')}", fns=fns,
                bytes=n * d * size + 8 * n + 8 * k + 8 * k * d + k * d * size,
                flops=n * d + 6 * k * d)
