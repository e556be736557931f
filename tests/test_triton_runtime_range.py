"""_interpreter.runtime_range, the loop of every Triton kernel over a runtime bound, visits the
starts Python's range does: under the interpreter (where Triton 3.6 cannot range() over a
runtime bound) on a CPU, compiled on a GPU.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from vqkernels.triton import _interpreter  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _tile_sums_kernel(x_ptr, out_ptr, start, stop, BLOCK: tl.constexpr):
    """out[j] = sum of x[i + j] over i in range(start, stop, BLOCK), masked at stop."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in _interpreter.runtime_range(start, stop, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < stop, other=0.0)
    tl.store(out_ptr + tl.arange(0, BLOCK), acc)


@pytest.mark.parametrize("start, stop", [(0, 0), (5, 4), (0, 1), (0, 16), (3, 17), (2, 40)])
def test_runtime_range_visits_the_starts_of_range(start, stop):
    block = 8
    x = torch.arange(1.0, 49.0, device=DEVICE)
    out = torch.empty(block, device=DEVICE)
    _tile_sums_kernel[(1,)](x, out, start, stop, BLOCK=block)
    expected = torch.zeros(block)
    for i in range(start, stop, block):
        tile = x.cpu()[i:min(i + block, stop)]
        expected[:len(tile)] += tile
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
