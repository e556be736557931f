"""Benchmark cases of ``vqkernels.ops.nearest_code``.

Baselines are the PyTorch a user would write, at the same precision: the
matmul expansion ``|z|^2 - 2 z e^T + |e|^2`` then ``argmin`` (the "reference"
row, every speed-up is against it) and ``torch.cdist`` then ``argmin``. Both
build the N x K distance matrix; the kernels never do. On a CPU, where it is
installed, faiss's exact ``IndexFlatL2`` search ("faiss-flat") is one more, at
fp32 (an optional comparison, not a dependency). FLOPs: 2 N K D (the
z e^T products); bytes: z and the codebook read once, indices and distances
written once (and, with statistics, the (K,) counts and (K, D) sums).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from vqkernels import _ext
from vqkernels.bench.cases import REFERENCE, Case, usable_backends
from vqkernels.ops import ema, search

# DESIGN.md's shapes at N = 65536 on a GPU; N = 16384 and the CPU targets on a CPU.
GPU_SHAPES = ((65536, 1024, 256), (65536, 16384, 256), (65536, 16384, 8), (65536, 65536, 32))
CPU_SHAPES = ((16384, 1024, 256), (16384, 16384, 8))
GPU_PRECISIONS = ((torch.bfloat16, "bf16"), (torch.float32, "tf32"), (torch.float32, "ieee"))
FLOP_CEILING = {"ieee": "fp32", "tf32": "tf32", "bf16": "bf16"}
FAISS = "faiss-flat"
CPU_DIRECT_MAX_DIM = 16  # csrc/cpu/search.cpp kDirectMaxDim: above it, the GEMM path


def flop_dtype(device: torch.device, precision: str, dim: int) -> str:
    """The FLOP/s ceiling a search is held to: its precision's, except on a CPU whose C++
    search screens with bf16 products (D > 16; csrc/cpu/search_screen.h), where they run
    at the bf16 rate."""
    if (device.type == "cpu" and dim > CPU_DIRECT_MAX_DIM
            and _ext.build_info().get("cpu_search_screen")):
        return "bf16"
    return FLOP_CEILING[precision]


def cases(device: torch.device, quick: bool) -> list[Case]:
    """GPU: every shape x precision; CPU: fp32 exact. quick: the first shape only.

    Then, at the default precision of fp32 (GPU: and bf16) input, the EMA training
    step's search with statistics ("-with-stats"): ``nearest_code_with_stats``
    per backend ("<backend>") against ``nearest_code`` + ``code_counts_and_sums``
    ("<backend>-two-pass") and the usual torch matmul + argmin + bincount + index_add_.
    """
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    precisions = GPU_PRECISIONS if device.type == "cuda" else ((torch.float32, "ieee"),)
    stats_dtypes = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
    if quick:
        shapes, precisions, stats_dtypes = shapes[:1], precisions[:1], ()
    return ([_case(device, n, k, d, dtype, precision)
             for n, k, d in shapes for dtype, precision in precisions]
            + [_stats_case(device, n, k, d, dtype) for n, k, d in shapes for dtype in stats_dtypes])


def matmul_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The usual PyTorch search: full N x K distances by the matmul expansion, then argmin."""
    d = z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)
    return d.argmin(1)


def cdist_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, codebook).argmin(1)


def _case(device, n, k, d, dtype, precision) -> Case:
    z = torch.randn(n, d, device=device, dtype=dtype)
    codebook = torch.randn(k, d, device=device, dtype=dtype)
    fns = {REFERENCE: _at_precision(matmul_argmin, precision, z, codebook),
           "torch-cdist": _at_precision(cdist_argmin, precision, z, codebook)}
    for name in usable_backends(search.DISPATCH, device, dtype, dim=d):
        if name != REFERENCE:  # the spec's exact N x K x D search is not a contender
            fns[name] = functools.partial(search.nearest_code, z, codebook, precision=precision,
                                          backend=name)
    baselines = ()
    if device.type == "cpu" and dtype == torch.float32 and importlib.util.find_spec("faiss"):
        fns[FAISS], baselines = faiss_flat_search(z, codebook), (FAISS,)
    size = z.element_size()
    return Case(op="search", shape=f"N{n}xK{k}xD{d}-{precision}", fns=fns,
                bytes=(n + k) * d * size + n * (8 + 4), flops=2 * n * k * d,
                flop_dtype=flop_dtype(device, precision, d), baselines=baselines)


def faiss_flat_search(z: torch.Tensor, codebook: torch.Tensor):
    """faiss's exact L2 search of z's rows in an ``IndexFlatL2`` of the codebook (built here,
    outside the timed call); the call returns the nearest code's index and squared distance."""
    import faiss

    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.numpy())
    queries = z.numpy()
    return functools.partial(index.search, queries, 1)


def matmul_argmin_stats(z: torch.Tensor, codebook: torch.Tensor):
    """The usual PyTorch EMA step's search and statistics (N x K distances, then bincount)."""
    indices = matmul_argmin(z, codebook)
    k = codebook.shape[0]
    sums = torch.zeros(k, z.shape[1], device=z.device).index_add_(0, indices, z.float())
    return indices, torch.bincount(indices, minlength=k).float(), sums


def two_pass_stats(z, codebook, backend):
    indices, _ = search.nearest_code(z, codebook, backend=backend)
    return indices, ema.code_counts_and_sums(z, indices, codebook.shape[0], backend=backend)


def _stats_case(device, n, k, d, dtype) -> Case:
    z = torch.randn(n, d, device=device, dtype=dtype)
    codebook = torch.randn(k, d, device=device, dtype=dtype)
    precision = search.default_precision(dtype)
    fns = {REFERENCE: _at_precision(matmul_argmin_stats, precision, z, codebook)}
    for name in usable_backends(search.DISPATCH, device, dtype, dim=d):
        if name == REFERENCE:
            continue
        fns[name] = functools.partial(search.nearest_code_with_stats, z, codebook, backend=name)
        if name == "triton":  # the only backend that fuses them; the others are two passes
            fns[f"{name}-two-pass"] = functools.partial(two_pass_stats, z, codebook, name)
    size = z.element_size()
    return Case(op="search", shape=f"N{n}xK{k}xD{d}-{precision}-with-stats", fns=fns,
                bytes=(n + k) * d * size + n * (8 + 4) + k * (d + 1) * 4, flops=2 * n * k * d,
                flop_dtype=flop_dtype(device, precision, d))


def _at_precision(fn, precision, *args):
    """Run a torch baseline with TF32 matmuls allowed exactly when the precision is tf32."""
    def run():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            return fn(*args)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return run
