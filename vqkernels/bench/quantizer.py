"""Benchmark cases of the quantizer modules' training step (forward + backward).

Each step runs a module in training mode on a fresh-random batch and
backpropagates ``(quantize * upstream).sum() + loss`` to the input and the
parameters. The "reference" row is the module a user would otherwise train:
for ``taming``, taming-transformers' ``VectorQuantizer2`` as written in PyTorch
(``TamingVectorQuantizer2``) against ``vqkernels.VectorQuantizer``; for
``vqp``, vector-quantize-pytorch's ``VectorQuantize`` with the same estimator
(``rotation_trick=False``; left out when it is not installed) against
``vqkernels.VectorQuantize``. The floor counts the search's 2 N K D FLOPs at
fp32 (the modules' default precision, "ieee"); ``_case`` counts the bytes.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from vqkernels.bench.cases import REFERENCE, Case
from vqkernels.bench.search import flop_dtype as search_flop_dtype
from vqkernels.nn import VectorQuantize, VectorQuantizer
from vqkernels.nn.quantizer import _TamingQuantizerBase

# (N, K, D): docs/ARCHITECTURE.md's shapes whose baselines fit an 80 GB GPU at N = 65536 (the
# N x K fp32 distances are 4 GiB at K = 16384); N = 16384 on a CPU.
GPU_SHAPES = ((65536, 1024, 256), (65536, 16384, 256), (65536, 16384, 8))
CPU_SHAPES = ((16384, 1024, 256), (16384, 16384, 8))
TOKENS_PER_IMAGE = 1024  # a 32 x 32 latent


class TamingVectorQuantizer2(_TamingQuantizerBase):
    """taming-transformers' ``VectorQuantizer2`` forward, the plain-PyTorch baseline: the
    matmul-expansion distances, argmin, the embedding gather, both loss terms and the
    straight-through output."""

    def _quantize(self, z):
        return self.matmul_search(z, self.embedding.weight)

    def matmul_search(self, z, e):
        """z (N, D) against codes e (K, D) as taming writes it."""
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        indices = d.argmin(1)
        z_q = F.embedding(indices, e)
        commit, codebook = (z_q.detach() - z).pow(2).mean(), (z_q - z.detach()).pow(2).mean()
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        return z + (z_q - z).detach(), loss, indices


def cases(device: torch.device, quick: bool) -> list[Case]:
    """Both module pairs at every shape (quick: the first shape only)."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if quick:
        shapes = shapes[:1]
    found = [_taming_case(device, *shape) for shape in shapes]
    if importlib.util.find_spec("vector_quantize_pytorch") is not None:
        found += [_vqp_case(device, *shape) for shape in shapes]
    return found


def train_step(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor,
               loss_at: int) -> None:
    """One forward + backward; ``loss_at``: where the module's output tuple holds the loss
    (or one loss per stage, summed)."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    out = module(x)
    ((out[0] * upstream).sum() + out[loss_at].sum()).backward()


def _batch(shape, device):
    x = torch.randn(*shape, device=device, requires_grad=True)
    return x, torch.randn(*shape, device=device)


def _taming_case(device, n, k, d) -> Case:
    x, upstream = _batch((n // TOKENS_PER_IMAGE, d, 32, 32), device)
    fast = VectorQuantizer(k, d).to(device)
    baseline = TamingVectorQuantizer2(k, d).to(device)
    baseline.load_state_dict(fast.state_dict())
    return _case("taming", n, k, d, {REFERENCE: baseline, "vqkernels": fast}, x, upstream, 1)


def _vqp_case(device, n, k, d) -> Case:
    import vector_quantize_pytorch

    x, upstream = _batch((n // TOKENS_PER_IMAGE, TOKENS_PER_IMAGE, d), device)
    baseline = vector_quantize_pytorch.VectorQuantize(d, k, rotation_trick=False).to(device)
    fast = VectorQuantize(d, k).to(device)
    fast.load_state_dict(baseline.state_dict())
    return _case("vqp", n, k, d, {REFERENCE: baseline, "vqkernels": fast}, x, upstream, 2)


def _case(kind, n, k, d, modules, x, upstream, loss_at) -> Case:
    """Bytes (fp32): z, the upstream gradient and the codebook read, z_q and z's
    gradient written once."""
    fns = {name: functools.partial(train_step, module.train(), x, upstream, loss_at)
           for name, module in modules.items()}
    return Case(op="quantizer", shape=f"{kind}-train-N{n}xK{k}xD{d}", fns=fns,
                bytes=4 * (4 * n * d + k * d), flops=2 * n * k * d,
                flop_dtype=search_flop_dtype(x.device, "ieee", d))
