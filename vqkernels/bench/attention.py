"""Benchmark cases of fused attention (``vqkernels.ops.attention``), DiT shapes.

- ``fwd-*``: the forward; ``fwdbwd-*``: forward and the q/k/v gradients.
  Rows: our backends, the explicit-softmax reference (the speed-up baseline)
  and every backend of torch's ``scaled_dot_product_attention`` that takes
  the input (on CUDA: cuDNN, flash, efficient, math; on CPU: its default
  path, torch's flash CPU kernel, and math), all on the same inputs.
- FLOPs count the useful head dim d, never a padded one: 4 B H Sq Sk d for
  the forward (two matmuls), 2.5 times that more for the backward (five).
  Bytes: q, k, v read and out written once (plus dO read and dq, dk, dv
  written for the backward).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vqkernels.bench.cases import REFERENCE, Case, usable_backends
from vqkernels.ops.flash_attention import DISPATCH, attention

GPU_SHAPES = ((64, 16, 256, 72), (16, 16, 1024, 72), (4, 16, 4096, 72),
              (16, 16, 1024, 64), (16, 16, 1024, 128))
CPU_SHAPES = ((1, 16, 1024, 72),)
SDPA_BACKENDS = {
    "cuda": {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
             "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH},
    "cpu": {"sdpa-default": None, "sdpa-math": SDPBackend.MATH},
}


def cases(device: torch.device, quick: bool) -> list[Case]:
    """Forward, then forward + backward, at every shape (quick: the first shape, forward)."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        shapes = ((2, 4, 128, 72),) if device.type == "cpu" else shapes[:1]
    modes = (False,) if quick else (False, True)
    return [_case(device, shape, dtype, backward) for backward in modes for shape in shapes]


def _sdpa(backend, q, k, v):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def _sdpa_runs(backend, q, k, v) -> bool:
    try:
        _sdpa(backend, q, k, v)
    except RuntimeError:  # this SDPA backend does not take the input (dtype, d, device)
        return False
    return True


def _forward(fn, q, k, v):
    with torch.no_grad():
        return fn(q, k, v)


def _forward_backward(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), grad_out)


def _case(device, shape, dtype, backward) -> Case:
    b, h, s, d = shape
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    fns_of = {REFERENCE: functools.partial(attention, backend=REFERENCE)}
    for name in usable_backends(DISPATCH, device, dtype, head_dim=d):
        fns_of[name] = functools.partial(attention, backend=name)
    for name, sdpa in SDPA_BACKENDS[device.type].items():
        if _sdpa_runs(sdpa, q.detach(), k.detach(), v.detach()):
            fns_of[name] = functools.partial(_sdpa, sdpa)
    if backward:
        grad_out = torch.randn(shape, device=device, dtype=dtype)
        fns = {name: functools.partial(_forward_backward, fn, q, k, v, grad_out)
               for name, fn in fns_of.items()}
    else:
        fns = {name: functools.partial(_forward, fn, q, k, v) for name, fn in fns_of.items()}
    forward_flops = 4 * b * h * s * s * d
    tensors = 8 if backward else 4
    return Case(op="attention", shape=f"{'fwdbwd' if backward else 'fwd'}-{_label(shape, dtype)}",
                fns=fns, bytes=tensors * q.numel() * q.element_size(),
                flops=int(forward_flops * (3.5 if backward else 1)),
                flop_dtype="bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32")


def _label(shape, dtype) -> str:
    return f"{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"
