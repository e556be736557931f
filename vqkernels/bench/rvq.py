"""Benchmark cases of residual VQ: ``ResidualVQ``'s training step against vector-quantize-pytorch's.

The step is ``vqkernels.bench.quantizer.train_step`` (forward + backward of
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

from vqkernels.bench.cases import REFERENCE, Case
from vqkernels.bench.quantizer import train_step
from vqkernels.nn import ResidualVQ

# (Q, K, D, B, T): an audio codec (64 clips of 750 frames) and an image RQ-VAE (64 latents
# of 32 x 32); a CPU gets the codec at 16384 frames.
GPU_SHAPES = ((8, 1024, 128, 64, 750), (32, 1024, 128, 64, 750), (4, 16384, 256, 64, 1024))
CPU_SHAPES = ((8, 1024, 128, 16, 1024),)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if importlib.util.find_spec("vector_quantize_pytorch") is None:
        return []
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    return [_train_case(device, *shape) for shape in (shapes[:1] if quick else shapes)]


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
                bytes=4 * (4 * n * d + q * k * d), flops=2 * q * n * k * d, flop_dtype="fp32")
