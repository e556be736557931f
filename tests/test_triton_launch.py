"""Every Triton launch runs inside the device guard of its tensors (vqkernels.triton._device).

A Triton launch goes to the *current* CUDA device; tensors on another one would
be read on the wrong device. One GPU cannot show that, so this checks, under the
interpreter, that each launcher enters the guard around every launch.
"""
import contextlib

import pytest
import torch

from vqkernels import ops

pytestmark = pytest.mark.interpreter


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, inside the guard) of every launch while the fixture is active."""
    from triton.runtime.interpreter import InterpretedFunction

    from vqkernels.triton import _device

    record, depth = [], [0]
    original_run = InterpretedFunction.run

    @contextlib.contextmanager
    def guard(t):
        assert isinstance(t, torch.Tensor)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def run(self, *args, **kwargs):
        record.append((self.fn.__name__, depth[0] > 0))
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(_device, "on_device", guard)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return record


def _search():
    z, codebook = torch.randn(9, 4), torch.randn(5, 4)
    ops.nearest_code(z, codebook, backend="triton")
    ops.nearest_code_with_stats(z, codebook, backend="triton")


def _ema():
    z, codebook = torch.randn(9, 4), torch.randn(5, 4)
    indices = torch.randint(0, 5, (9,))
    ops.code_counts_and_sums(z, indices, 5, backend="triton")
    ops.ema_update_(torch.ones(5), codebook.clone(), codebook, z, indices, decay=0.9,
                    backend="triton")


def _attention():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    ops.attention(q, q, q, backend="triton").sum().backward()


def _ddim():
    x = torch.randn(2, 6)
    ops.ddim_step(x, torch.tensor([500, 300]), x, torch.linspace(0.99, 0.01, 1000),
                  num_inference_steps=10, eta=1.0, thresholding=True, backend="triton")


def _adaln():
    x, p = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    x_new, h = ops.gated_residual_layer_norm_modulate(x, p, x, p, p, backend="triton")
    h = ops.layer_norm_modulate(h, p, p, backend="triton")
    ops.gated_residual(x_new, p, h, backend="triton").sum().backward()


def _gelu():
    x = torch.randn(2, 5, requires_grad=True)
    ops.gelu_tanh(x, backend="triton").sum().backward()
    with torch.no_grad():
        ops.gelu_tanh(x.detach().clone(), inplace=True, backend="triton")


def _group_norm():
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    ops.group_norm(x, 4, silu=True, backend="triton").sum().backward()
    ops.group_norm(x.detach().contiguous(memory_format=torch.channels_last), 4, backend="triton")


LAUNCHERS = {
    "timestep": lambda: ops.timestep_embedding(torch.arange(3.0), 8, backend="triton"),
    "search": _search,
    "ema": _ema,
    "attention": _attention,
    "ddim": _ddim,
    "adaln": _adaln,
    "gelu": _gelu,
    "group_norm": _group_norm,
}


@pytest.mark.parametrize("family", LAUNCHERS)
def test_every_launch_enters_the_tensors_device(family, launches):
    LAUNCHERS[family]()
    assert launches, f"{family}: no Triton launch recorded"
    outside = [name for name, guarded in launches if not guarded]
    assert not outside, f"{family}: launched outside the device guard: {outside}"
