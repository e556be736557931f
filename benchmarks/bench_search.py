"""Nearest-code search and vector quantization: each usable backend vs the usual PyTorch,
on the same inputs.

``test_search``: ``nearest_code`` per backend and precision, and the EMA step's
``nearest_code_with_stats`` ("-with-stats"), against the matmul expansion + argmin
("reference") and ``torch.cdist`` + argmin; cases, bytes and FLOPs come from
``vqkernels/bench/search.py``.

``test_vector_quantize``: a training step of ``ops.vector_quantize`` (search, gather,
taming's losses, straight-through; forward + backward) per backend, against the same
step written in plain PyTorch on the matmul search ("reference"). Its cases are here.
"""
from __future__ import annotations

import functools

import pytest
import torch

from vqkernels.bench.cases import REFERENCE, Case, usable_backends
from vqkernels.bench.search import FLOP_CEILING, matmul_argmin
from vqkernels.ops import search

OP = "search"
# (N, K, D): DESIGN.md's N = 65536 on a GPU, N = 16384 on a CPU; a wide and a narrow codebook.
VQ_SHAPES = {"cuda": ((65536, 1024, 256), (65536, 16384, 8)),
             "cpu": ((16384, 1024, 256), (16384, 16384, 8))}
VQ_DTYPES = {"cuda": (torch.bfloat16, torch.float32), "cpu": (torch.float32,)}
BETA = 0.25


def test_search(bench_case, measure):
    case, backend = bench_case
    measure(case, backend)


def test_vector_quantize(vq_case, measure):
    case, backend = vq_case
    measure(case, backend)


def pytest_generate_tests(metafunc):
    """``vq_case``: (Case, backend) for every vector_quantize case, the reference first."""
    if "vq_case" not in metafunc.fixturenames:
        return
    device = torch.device(metafunc.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA GPU is available here")
    cases = vector_quantize_cases(device, metafunc.config.getoption("--bench-quick"))
    marks = [pytest.mark.cuda] if device.type == "cuda" else []
    metafunc.parametrize("vq_case", [
        pytest.param((case, backend), id=f"{case.label}-{backend}", marks=marks)
        for case in cases for backend in case.fns])


def vector_quantize_cases(device: torch.device, quick: bool) -> list[Case]:
    """Every shape x dtype of the device; quick: the first shape in the first dtype only."""
    shapes, dtypes = VQ_SHAPES[device.type], VQ_DTYPES[device.type]
    if quick:
        shapes, dtypes = shapes[:1], dtypes[:1]
    return [_vq_case(device, n, k, d, dtype) for n, k, d in shapes for dtype in dtypes]


def torch_vector_quantize(z: torch.Tensor, codebook: torch.Tensor):
    """taming's VectorQuantizer2 (legacy loss) on the usual matmul + argmin search."""
    indices = matmul_argmin(z, codebook)
    z_q = codebook[indices]
    loss = (torch.mean((z_q.detach().float() - z.float()) ** 2)
            + BETA * torch.mean((z_q.float() - z.detach().float()) ** 2))
    return z + (z_q - z).detach(), loss, indices


def training_step(quantize, z, codebook, grad_z_q):
    """Forward, then the gradients of z and the codebook for an upstream grad_z_q."""
    z_q, loss, _ = quantize(z, codebook)
    return torch.autograd.grad((z_q, loss), (z, codebook), (grad_z_q, torch.ones_like(loss)))


def _vq_case(device, n, k, d, dtype) -> Case:
    z = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    codebook = torch.randn(k, d, device=device, dtype=dtype, requires_grad=True)
    grad_z_q = torch.randn(n, d, device=device, dtype=dtype)
    fns = {REFERENCE: functools.partial(training_step, torch_vector_quantize, z, codebook,
                                        grad_z_q)}
    for name in usable_backends(search.DISPATCH, device, dtype, dim=d):
        if name != REFERENCE:  # the spec's exact N x K x D search is not a contender
            quantize = functools.partial(search.vector_quantize, beta=BETA, backend=name)
            fns[name] = functools.partial(training_step, quantize, z, codebook, grad_z_q)
    size = z.element_size()
    # Read z, the codebook and grad z_q; write z_q, grad z and grad codebook, and the indices.
    return Case(op="vector_quantize", shape=f"N{n}xK{k}xD{d}-{str(dtype)[6:]}-train", fns=fns,
                bytes=(4 * n + 2 * k) * d * size + n * 8, flops=2 * n * k * d,
                flop_dtype=FLOP_CEILING[search.default_precision(dtype)])
