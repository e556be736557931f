"""Drawn memory layouts and a watch on what the kernels receive, for tests/test_layouts.py."""
import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode


# --- layouts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    order: tuple      # dimensions from outermost to innermost in memory
    steps: tuple      # per dimension: every step-th element of a larger buffer
    expanded: tuple   # per dimension: stride 0 (the first slice repeated)
    offset: int       # storage offset, in elements


@st.composite
def layouts(draw, ndim, expand=True):
    flags = st.sampled_from((False, False, False, True)) if expand else st.just(False)
    return Layout(tuple(draw(st.permutations(range(ndim)))),
                  tuple(draw(st.sampled_from((1, 1, 2, 3))) for _ in range(ndim)),
                  tuple(draw(flags) for _ in range(ndim)),
                  draw(st.sampled_from((0, 0, 1, 5))))


def laid_out(values, layout):
    """``values`` in ``layout``; its expanded dimensions repeat their first slice."""
    base = values
    for dim, flag in enumerate(layout.expanded):
        if flag and values.shape[dim] > 0:
            base = base.narrow(dim, 0, 1)
    sizes = [base.shape[d] * layout.steps[d] for d in layout.order]
    strides, dense = [0] * values.dim(), 1
    for d, size in reversed(list(zip(layout.order, sizes))):
        strides[d], dense = dense * layout.steps[d], dense * max(size, 1)
    fill = float("nan") if values.is_floating_point() else -1
    storage = torch.full((layout.offset + math.prod(sizes),), fill, dtype=values.dtype)
    out = storage.as_strided(base.shape, strides, layout.offset)
    out.copy_(base)
    return out.expand(values.shape)


def draw_tensor(data, name, shape, dtype, *, scale=1.0, expand=True, values=None):
    """A random (or the given) tensor of ``shape`` in a drawn layout (labelled ``name``)."""
    layout = data.draw(layouts(len(shape), expand), label=f"{name} layout")
    if values is None:
        seed = data.draw(st.integers(0, 2 ** 32 - 1), label=f"{name} seed")
        gen = torch.Generator().manual_seed(seed)
        values = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return laid_out(values, layout)


def sizes(data, **ranges):
    return {k: data.draw(st.integers(*r), label=k) for k, r in ranges.items()}


# --- what the kernels receive ------------------------------------------------------------

_COPIES = {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default,
           torch.ops.aten.copy_.default}


class Watch(TorchDispatchMode):
    """Counts the copies made of each watched input and records every vqkernels kernel call."""

    def __init__(self, inputs):
        super().__init__()
        self.names = {x.untyped_storage().data_ptr(): name for name, x in inputs.items()
                      if isinstance(x, torch.Tensor) and x.numel()}
        self.copies = dict.fromkeys(self.names.values(), 0)
        self.kernel_args = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "vqkernels":
            self.kernel_args += [(func, x) for x in args if isinstance(x, torch.Tensor)]
        elif func in _COPIES:
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            name = self.names.get(source.untyped_storage().data_ptr())
            if name is not None:
                self.copies[name] += 1
        return func(*args, **kwargs)


def contiguous(x):
    return x.is_contiguous()


def unit_inner_stride(x):
    return not x.is_floating_point() or x.dim() == 0 or x.shape[-1] <= 1 or x.stride(-1) == 1


def watched(backend, fn, inputs, ready=contiguous):
    """fn(); on a kernel backend every input copied at most once, every kernel input ready."""
    if backend == "reference":
        return fn()
    with Watch(inputs) as watch:
        out = fn()
    assert all(n <= 1 for n in watch.copies.values()), f"copies made: {watch.copies}"
    for func, x in watch.kernel_args:
        assert ready(x), f"{func} got shape {tuple(x.shape)} strides {x.stride()}"
    return out
