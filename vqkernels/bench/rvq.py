"""Benchmark cases of residual VQ: the residual search and ``ResidualVQ``'s training step.

The search (``ops.residual_nearest_code``, "search-..." rows) runs each backend
against Q separate ``nearest_code`` calls with the residual updated between
them (``STAGE_LOOP``, on the device's fastest ``nearest_code`` backend) and
against the loop a user writes in PyTorch, a matmul + argmin a stage (the
reference row): FLOPs 2 N K D a stage, bytes z read and the output written
once, the codebooks read once, the (N, Q) indices written.

The EMA step of every stage ("ema-stages-..." rows): ``ops.ema_update_stages_`` on
each backend against ``ops.ema_update_`` of each stage in turn (the reference row, on
the device's ``auto`` backend), from given statistics: bytes Q (12 K + K D (12 + 4)),
the state, statistics and fp32 codebooks read and written once.

The training step is ``vqkernels.bench.quantizer.train_step`` (forward + backward of
``(quantized * upstream).sum() + losses.sum()``) on a fresh-random batch, both
modules in training mode with the same codebooks (``rotation_trick=False``:
the same estimator). The floor counts Q searches of 2 N K D FLOPs at fp32;
the bytes, z and the upstream gradient read, the Q codebooks read, and the
output and z's gradient written once. Left out when vector-quantize-pytorch is
not installed.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from vqkernels.bench.cases import REFERENCE, Case, usable_backends
from vqkernels.bench.quantizer import train_step
from vqkernels.bench.search import flop_dtype as search_flop_dtype
from vqkernels.bench.search import matmul_argmin
from vqkernels.nn import ResidualVQ
from vqkernels import ops
from vqkernels.ops import ema, residual, search

STAGE_LOOP = "nearest-code-loop"  # Q separate nearest_code calls, the baseline of the fused search

# (Q, K, D, B, T): an audio codec (64 clips of 750 frames) and an image RQ-VAE (64 latents
# of 32 x 32); a CPU gets the codec at 16384 frames.
GPU_SHAPES = ((8, 1024, 128, 64, 750), (32, 1024, 128, 64, 750), (4, 16384, 256, 64, 1024))
CPU_SHAPES = ((8, 1024, 128, 16, 1024),)


def cases(device: torch.device, quick: bool) -> list[Case]:
    """The search at every shape, then (with vector-quantize-pytorch) the training step."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    shapes = shapes[:1] if quick else shapes
    found = [_search_case(device, *shape) for shape in shapes]
    found += [_ema_case(device, q, k, d) for q, k, d, *_ in shapes]
    if importlib.util.find_spec("vector_quantize_pytorch") is not None:
        found += [_train_case(device, *shape) for shape in shapes]
    return found


def matmul_argmin_stages(z: torch.Tensor, codebooks: torch.Tensor):
    """The residual search as PyTorch code writes it: a matmul + argmin a stage (N x K each)."""
    left, quantized, indices = z, torch.zeros_like(z), []
    for codebook in codebooks:
        indices.append(matmul_argmin(left, codebook))
        codes = codebook[indices[-1]]
        left, quantized = left - codes, quantized + codes
    return torch.stack(indices, 1), quantized


def _search_case(device, q, k, d, b, t) -> Case:
    n = b * t
    z = torch.randn(n, d, device=device)
    stage_scale = torch.arange(1, q + 1, device=device)[:, None, None]  # later stages finer
    books = torch.randn(q, k, d, device=device) / stage_scale
    kernels = [name for name in usable_backends(residual.DISPATCH, device, z.dtype, dim=d)
               if name != REFERENCE]
    fastest = search.DISPATCH.select(None, device, z.dtype, dim=d).name
    fns = {REFERENCE: functools.partial(matmul_argmin_stages, z, books),
           STAGE_LOOP: functools.partial(residual.stage_by_stage(fastest), z, books.unbind(0),
                                         search.default_precision(z.dtype))}
    for name in kernels:
        fns[name] = functools.partial(residual.residual_nearest_code, z, books, backend=name)
    return Case(op="rvq", shape=f"search-Q{q}xN{n}xK{k}xD{d}", fns=fns,
                bytes=4 * (2 * n * d + q * k * d) + 8 * n * q, flops=2 * q * n * k * d,
                flop_dtype=search_flop_dtype(device, "ieee", d), baselines=(STAGE_LOOP,))


def _ema_case(device, q, k, d) -> Case:
    generator = torch.Generator(device=device).manual_seed(0)
    counts = torch.randint(0, 64, (q, k), device=device, generator=generator).float()
    states = [[torch.rand(k, device=device, generator=generator) + 0.5,
               torch.randn(k, d, device=device, generator=generator),
               torch.randn(k, d, device=device, generator=generator)] for _ in range(q)]
    stats = [(c, torch.randn(k, d, device=device, generator=generator)) for c in counts]
    columns = [list(column) for column in zip(*states)]

    def one_by_one():
        for state, stage_stats in zip(states, stats):
            ops.ema_update_(*state, stats=stage_stats, decay=0.99)

    fns = {REFERENCE: one_by_one}
    for name in usable_backends(ema.STAGES_DISPATCH, device, torch.float32,
                                codebook_dtype=torch.float32):
        if name != REFERENCE:
            fns[name] = functools.partial(ops.ema_update_stages_, *columns, stats, decay=0.99,
                                          backend=name)
    return Case(op="rvq", shape=f"ema-stages-Q{q}xK{k}xD{d}", fns=fns,
                bytes=q * (12 * k + k * d * 16))


def _train_case(device, q, k, d, b, t) -> Case:
    import vector_quantize_pytorch

    options = dict(dim=d, num_quantizers=q, codebook_size=k)
    baseline = vector_quantize_pytorch.ResidualVQ(rotation_trick=False, **options).to(device)
    fast = ResidualVQ(**options).to(device)
    fast.load_state_dict(baseline.state_dict())
    x = torch.randn(b, t, d, device=device, requires_grad=True)
    upstream = torch.randn(b, t, d, device=device)
    n = b * t
    fns = {name: functools.partial(train_step, module.train(), x, upstream, 2)
           for name, module in ((REFERENCE, baseline), ("vqkernels", fast))}
    return Case(op="rvq", shape=f"train-Q{q}xN{n}xK{k}xD{d}", fns=fns,
                bytes=4 * (4 * n * d + q * k * d), flops=2 * q * n * k * d,
                flop_dtype=search_flop_dtype(device, "ieee", d))
