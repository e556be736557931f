"""Benchmark cases of the adaLN ops (``vqkernels.ops.adaln``) and the DiT block, DiT-XL/2 shapes.

``lnmod`` is ``layer_norm_modulate``, ``residual`` ``gated_residual`` and
``fused`` ``gated_residual_layer_norm_modulate``, ``gelu`` ``gelu_tanh`` on the MLP's
hidden activations (B, T, 4D), out of place as eager ``F.gelu``; ``-fwd-`` times the forward,
``-fwdbwd-`` the forward and every input's gradient. Shift, scale and gate are
chunks of one (B, 6D) tensor, as a DiT block splits it. The "reference" row is
the block's eager PyTorch (``eager_*``), "compiled" ``torch.compile`` of that
same code (left out under --quick: compiling outlasts a quick run; skipped
where it cannot compile). The ops are memory-bound: ``OpKind`` counts the
bytes. ``block`` times ``nn.DiTBlock`` against its twin ``nn.ReferenceDiTBlock``
(the "reference" row), a compute-bound training step (``block_case``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vqkernels._dispatch import OpDispatch
from vqkernels.bench.cases import (COMPILED, REFERENCE, Case, eager_compiled_and_kernels,
                                   forward_only, sort_out)
from vqkernels.nn import DiTBlock, ReferenceDiTBlock
from vqkernels.ops import adaln, gelu

GPU_SHAPES = ((256, 256, 1152), (32, 1024, 1152))  # (B, T, D), bf16
CPU_SHAPES = ((64, 256, 1152),)  # fp32
QUICK_CPU_SHAPES = ((2, 64, 1152),)
BLOCK_SHAPES = {"cuda": (32, 256, 1152), "cpu": (8, 256, 1152)}  # bf16 / fp32
QUICK_CPU_BLOCK_SHAPE = (2, 32, 144)  # two heads
HEAD_DIM = 72  # DiT-XL/2: 1152 = 16 heads of 72
EPS = 1e-6


def eager_layer_norm_modulate(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def eager_gated_residual(x, gate, y):
    return x + gate[:, None] * y


def eager_gated_residual_layer_norm_modulate(x, gate, y, shift, scale):
    x = eager_gated_residual(x, gate, y)
    return x, eager_layer_norm_modulate(x, shift, scale)


def eager_gelu(h):
    return F.gelu(h, approximate="tanh")


@dataclass(frozen=True)
class OpKind:
    """One op, its eager twin, its arguments and the least it must move.

    ``tensors`` and ``params``: how many (B, T, width D) activations and (B, D)
    parameters it reads or writes once each, in the forward and then added by
    the backward. The LayerNorm statistics (B, T) are not counted.
    """

    label: str
    op: Callable
    eager: Callable
    dispatch: OpDispatch
    args: tuple[str, ...]
    outputs: int
    tensors: tuple[int, int]
    params: tuple[int, int]
    width: int = 1  # of its activations, in multiples of D

    def bytes_moved(self, shape: tuple[int, int, int], itemsize: int, backward: bool) -> int:
        b, t, d = shape
        tensors = self.tensors[0] + backward * self.tensors[1]
        params = self.params[0] + backward * self.params[1]
        return itemsize * (tensors * b * t * d * self.width + params * b * d)


OP_KINDS = (
    # x read, h written | grad_h and x read, dx written; shift, scale read | scale read,
    # dshift and dscale written
    OpKind("lnmod", adaln.layer_norm_modulate, eager_layer_norm_modulate, adaln.NORM_DISPATCH,
           ("x", "shift", "scale"), outputs=1, tensors=(2, 3), params=(2, 3)),
    # x and y read, out written | grad and y read, dy written (dx is grad itself); gate read
    # | gate read, dgate written
    OpKind("residual", adaln.gated_residual, eager_gated_residual, adaln.RESIDUAL_DISPATCH,
           ("x", "gate", "y"), outputs=1, tensors=(3, 3), params=(1, 2)),
    # x and y read, x_new and h written | grad_h, grad_x_new, x_new and y read, dx and dy
    # written; gate, shift, scale read | scale and gate read, their three gradients written
    OpKind("fused", adaln.gated_residual_layer_norm_modulate,
           eager_gated_residual_layer_norm_modulate, adaln.FUSED_DISPATCH,
           ("x", "gate", "y", "shift", "scale"), outputs=2, tensors=(4, 6), params=(3, 5)),
    # h read, gelu(h) written | grad and h read, dh written
    OpKind("gelu", gelu.gelu_tanh, eager_gelu, gelu.DISPATCH, ("h",), outputs=1,
           tensors=(2, 3), params=(0, 0), width=4),
)


def cases(device: torch.device, quick: bool) -> list[Case]:
    """Each op, forward then forward + backward, at every shape, then the block (quick: the
    first shape, on a CPU small ones; no torch.compile; the block's forward only, which
    spares a GPU the JIT of the attention backward)."""
    block_shape = BLOCK_SHAPES[device.type]
    if device.type == "cuda":
        shapes, dtype = GPU_SHAPES[:1] if quick else GPU_SHAPES, torch.bfloat16
    else:
        shapes, dtype = QUICK_CPU_SHAPES if quick else CPU_SHAPES, torch.float32
        block_shape = QUICK_CPU_BLOCK_SHAPE if quick else block_shape
    found = [op_case(kind, shape, dtype, device, backward=backward, compiled=not quick)
             for shape in shapes for backward in (False, True) for kind in OP_KINDS]
    return found + [block_case(block_shape, dtype, device, backward=backward)
                    for backward in ((False,) if quick else (False, True))]


def op_case(kind: OpKind, shape: tuple[int, int, int], dtype: torch.dtype,
            device: torch.device, *, backward: bool, compiled: bool) -> Case:
    """``kind`` at ``shape``: eager, compiled and each of our usable backends on one input."""
    args = _inputs(shape, dtype, device, backward, kind.args)
    grads = tuple(torch.randn_like(args[0]) for _ in range(kind.outputs))
    run = functools.partial(_forward_backward, grads=grads) if backward else forward_only
    fns, skipped = eager_compiled_and_kernels(
        lambda fn: functools.partial(run, fn, args), kind.eager,
        lambda name: functools.partial(kind.op, backend=name), kind.dispatch, device, dtype,
        compiled)
    b, t, d = shape
    return Case(op="adaln", shape=case_label(kind.label, backward, (b, t, kind.width * d), dtype),
                fns=fns, skipped=skipped, baselines=(COMPILED,),
                bytes=kind.bytes_moved(shape, args[0].element_size(), backward))


def block_case(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, *,
               backward: bool) -> Case:
    """``DiTBlock`` (the "vqkernels" row, ``auto`` backends) against ``ReferenceDiTBlock``
    with the same state dict, on x (B, T, D) and c (B, D); backward: a training step's
    gradients of x, c and every parameter.

    PyTorch's default init keeps the adaLN weights non-zero, so every modulation and
    gate is live (DiT's zero init would make the block the identity).
    """
    b, _, d = shape
    fast = DiTBlock(d, d // HEAD_DIM).to(device, dtype)
    twin = ReferenceDiTBlock(d, d // HEAD_DIM).to(device, dtype)
    twin.load_state_dict(fast.state_dict())
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=backward)
    c = torch.randn(b, d, dtype=dtype, device=device, requires_grad=backward)
    if backward:
        run = functools.partial(_block_step, x=x, c=c, upstream=torch.randn_like(x))
    else:
        run = functools.partial(forward_only, args=(x, c))
    fns, skipped = sort_out({REFERENCE: functools.partial(run, twin)}, {
        "vqkernels": (functools.partial(run, fast), (NotImplementedError,))}, {})
    flops, elements = _block_work(shape, sum(p.numel() for p in fast.parameters()), backward)
    return Case(op="adaln", shape=case_label("block", backward, shape, dtype), fns=fns,
                skipped=skipped, bytes=x.element_size() * elements, flops=flops,
                flop_dtype="bf16" if dtype == torch.bfloat16 else "fp32")


def block_flops(shape: tuple[int, int, int], mlp_hidden: int) -> int:
    """Forward FLOPs of a DiT block over x (B, T, D) with an MLP of ``mlp_hidden`` units M:
    2 B T (4 D^2 + 2 D M) for the linears, 4 B T^2 D for attention, 12 B D^2 for the
    modulation."""
    b, t, d = shape
    return 2 * b * t * (4 * d * d + 2 * d * mlp_hidden) + 4 * b * t * t * d + 12 * b * d * d


def _block_work(shape: tuple[int, int, int], params: int, backward: bool) -> tuple[int, int]:
    """FLOPs and elements moved by a DiT block (MLP of 4D units) over x (B, T, D).

    FLOPs: ``block_flops``; the backward twice the forward. Elements: the forward reads
    the parameters, x and c and writes out; the backward reads the parameters and
    grad_out and writes their gradients, dx and dc.
    """
    b, t, d = shape
    flops = block_flops(shape, 4 * d)
    forward = params + 2 * b * t * d + b * d
    if not backward:
        return flops, forward
    return 3 * flops, forward + 2 * params + 2 * b * t * d + b * d


def case_label(what: str, backward: bool, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """A row's shape cell, e.g. ``lnmod-fwdbwd-256x256x1152-bfloat16`` (``targets`` match it)."""
    dims = "x".join(map(str, shape))
    return f"{what}-{'fwdbwd' if backward else 'fwd'}-{dims}-{str(dtype).removeprefix('torch.')}"


def _inputs(shape, dtype, device, backward, names) -> tuple[torch.Tensor, ...]:
    """The tensors of ``names``: x and y (B, T, D), the MLP's hidden h (B, T, 4D); shift,
    scale and gate as the block passes them: views of one (B, 6D) tensor (row stride 6D),
    each a leaf of its own when gradients are timed."""
    b, t, d = shape
    conditioning = torch.randn(b, 6 * d, dtype=dtype, device=device) * 0.5
    chunks = dict(zip(("shift", "scale", "gate"), conditioning.chunk(6, dim=1)))
    draw = {"x": lambda: torch.randn(shape, dtype=dtype, device=device),
            "y": lambda: torch.randn(shape, dtype=dtype, device=device),
            "h": lambda: torch.randn(b, t, 4 * d, dtype=dtype, device=device),
            **{name: lambda name=name: chunks[name] for name in chunks}}
    return tuple(draw[name]().detach().requires_grad_(backward) for name in names)


def _block_step(module, x, c, upstream):
    return torch.autograd.grad(module(x, c), (x, c, *module.parameters()), upstream)


def _forward_backward(fn, args, grads):
    out = fn(*args)
    return torch.autograd.grad(out if isinstance(out, tuple) else (out,), args, grads)
