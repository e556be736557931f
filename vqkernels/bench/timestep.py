"""Benchmark cases of ``vqkernels.ops.timestep_embedding``.

DiT embeds a batch of N timesteps into dim = 256 frequencies; float32 output.
The op is store-bound: it reads N timesteps and writes N * dim outputs. Its
FLOPs (``scale * t * freq``, 2 per sin/cos pair; exp/sin/cos are not counted)
are far below any ceiling, so the floor is the memory traffic.
"""
from __future__ import annotations

import functools

import torch

from vqkernels.bench.cases import Case, usable_backends
from vqkernels.ops import timestep

SHAPES = ((256, 256), (4096, 256), (65536, 256))  # (N, dim)
OUT_DTYPE = torch.float32
T_DTYPE = torch.float32


def cases(device: torch.device, quick: bool) -> list[Case]:
    """One case per (N, dim); quick: the smallest only."""
    backends = usable_backends(timestep.DISPATCH, device, T_DTYPE)
    shapes = SHAPES[:1] if quick else SHAPES
    return [_case(device, n, dim, backends) for n, dim in shapes]


def _case(device: torch.device, n: int, dim: int, backends: list[str]) -> Case:
    t = torch.rand(n, dtype=T_DTYPE, device=device) * 1000  # timesteps in [0, 1000)
    out_itemsize = torch.empty((), dtype=OUT_DTYPE).element_size()
    fns = {name: functools.partial(timestep.timestep_embedding, t, dim, dtype=OUT_DTYPE,
                                   backend=name)
           for name in backends}
    return Case(op="timestep", shape=f"N{n}xD{dim}", fns=fns,
                bytes=n * t.element_size() + n * dim * out_itemsize,
                flops=2 * n * (dim // 2))
