"""ops.gelu_tanh: every backend against the float64 reference (forward and gradient), in
place and not, the tails, strided inputs, validation, torch.library
and torch.compile, and the DiT MLP that runs it in place."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import backend_cases, kernel_backends
from vqkernels import ops
from vqkernels.reference import gelu as reference

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BACKENDS = kernel_backends(without=("cuda",))  # Triton is its GPU kernel
BACKEND_DTYPES = {"cpu": (F32, F64, F16, BF16), "triton-interp": (F32,),
                  "triton-cuda": (F32, F16, BF16)}
# |got - exact| <= atol + rtol |exact|: float32 math a few ulp off, plus the tail, where an
# ulp of u moves e^{-2|u|} by 2|u| ulp; half types: their rounding of a float32 result
TOLERANCE = {F64: (1e-15, 1e-13), F32: (1e-6, 4e-6), F16: (1e-4, 2 ** -10), BF16: (1e-3, 2 ** -7)}


def dtype_cases():
    return backend_cases({key: [(d,) for d in ds] for key, ds in BACKEND_DTYPES.items()},
                         BACKENDS)


def draw(shape, dtype, generator, scale=4.0):
    return (torch.randn(shape, generator=generator, dtype=F64) * scale).to(dtype)


def assert_near_exact(got, x, what, grad=None):
    """got within TOLERANCE of the float64 value (of gelu, or of grad * gelu')."""
    exact = (reference.gelu_tanh(x.double()) if grad is None
             else reference.gelu_tanh_backward(grad.double(), x.double()))
    atol, rtol = TOLERANCE[x.dtype]
    if grad is not None and grad.numel():
        atol *= max(1.0, grad.abs().max().item())
    err = (got.double() - exact).abs()
    bound = atol + rtol * exact.abs()
    assert got.dtype == x.dtype and got.shape == x.shape
    assert bool((err <= bound).all()), (
        f"{what}: worst excess {(err - bound).max().item():.3g} at x = "
        f"{x.reshape(-1)[(err - bound).argmax()].item()!r}")


@pytest.mark.parametrize("shape", [(0,), (1,), (37,), (3, 5, 1031)])
@pytest.mark.parametrize("backend,device,dtype", dtype_cases())
def test_forward_and_gradient_match_float64(backend, device, dtype, shape, generator):
    x = draw(shape, dtype, generator)
    grad = draw(shape, dtype, generator, scale=1.0)
    leaf = x.to(device).requires_grad_()
    y = ops.gelu_tanh(leaf, backend=backend)
    y.backward(grad.to(device))
    assert_near_exact(y.detach().cpu(), x, f"{backend} {dtype} forward")
    assert_near_exact(leaf.grad.cpu(), x, f"{backend} {dtype} gradient", grad=grad)


@pytest.mark.parametrize("backend,device,dtype", dtype_cases())
def test_in_place_gives_the_same_values(backend, device, dtype, generator):
    x = draw((4, 333), dtype, generator).to(device)
    expected = ops.gelu_tanh(x, backend=backend)
    same = x.clone()
    with torch.no_grad():
        out = ops.gelu_tanh(same, inplace=True, backend=backend)
    assert out is same
    torch.testing.assert_close(same, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interp", marks=pytest.mark.interpreter)])
def test_strided_input_in_and_out_of_place(backend, device, generator):
    base = draw((40, 30), F32, generator)
    x = base.t()[::2]  # strided both ways
    assert_near_exact(ops.gelu_tanh(x, backend=backend), x, "strided")
    kept = base.clone()
    with torch.no_grad():
        out = ops.gelu_tanh(x, inplace=True, backend=backend)
    assert out is x
    assert_near_exact(x, kept.t()[::2], "strided in place")
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched.t()[::2] = False
    assert torch.equal(base[untouched], kept[untouched])


def test_the_tails_keep_their_relative_accuracy():
    """For x < -3, x sigmoid(2u) keeps relative accuracy where 0.5 x (1 + tanh u) cancels."""
    x = -torch.linspace(3.0, 9.0, 601, dtype=F32)
    got = ops.gelu_tanh(x, backend="cpu").double()
    exact = reference.gelu_tanh(x.double())
    assert bool((exact < 0).all())
    rel = ((got - exact) / exact).abs().max().item()
    assert rel < 2e-5, rel  # PyTorch's tanh form is off by up to 100% here
    assert ((F.gelu(x, approximate="tanh").double() - exact) / exact).abs().max().item() > 1e-3


def test_matches_pytorch_within_its_own_error(generator):
    x = draw((1000,), F32, generator, scale=2.0)
    torch.testing.assert_close(ops.gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=2e-6,
                               rtol=2e-6)


# ---------------------------------------------------------------- validation

def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.gelu_tanh([1.0])
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        ops.gelu_tanh(torch.arange(3))
    with pytest.raises(TypeError, match="inplace must be a bool"):
        ops.gelu_tanh(torch.randn(3), inplace=1)
    with pytest.raises(ValueError, match="backend must be"):
        ops.gelu_tanh(torch.randn(3), backend="fast")


def test_in_place_refuses_an_input_that_needs_its_gradient():
    x = torch.randn(5, requires_grad=True)
    with pytest.raises(ValueError, match="inplace=True needs an x that does not require grad"):
        ops.gelu_tanh(x * 1, inplace=True)
    with torch.no_grad():
        h = x * 1
        assert ops.gelu_tanh(h, inplace=True) is h


# ---------------------------------------------------------------- torch.library, compile

def test_opcheck(generator):
    x = draw((3, 7), F64, generator)
    torch.library.opcheck(torch.ops.vqkernels.gelu_tanh_forward.default, (x,))
    torch.library.opcheck(torch.ops.vqkernels.gelu_tanh_forward_.default, (x.clone(),))
    torch.library.opcheck(torch.ops.vqkernels.gelu_tanh_backward.default, (torch.ones_like(x), x))


@pytest.mark.interpreter
def test_opcheck_triton(generator):
    x = draw((3, 7), F32, generator)
    only = dict(test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.vqkernels.gelu_tanh_forward_triton.default, (x,), **only)
    torch.library.opcheck(torch.ops.vqkernels.gelu_tanh_forward_triton_.default, (x.clone(),),
                          **only)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compile_fullgraph(backend, generator):
    torch._dynamo.reset()
    x = draw((4, 9), F32, generator).requires_grad_()

    def loss(x):
        return (ops.gelu_tanh(x * 2.0, backend=backend) ** 2).sum()

    def in_place(x):
        return ops.gelu_tanh(x * 2.0, inplace=True, backend=backend) + 1.0

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0],
                               torch.autograd.grad(loss(x), x)[0])
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(in_place, fullgraph=True,
                                                 backend="aot_eager")(x), in_place(x))


def test_dit_mlp_runs_in_place_only_without_gradients(generator, monkeypatch):
    from vqkernels.nn import DiTBlock, ReferenceDiTBlock

    block = DiTBlock(48, 2)
    twin = ReferenceDiTBlock(48, 2)
    twin.load_state_dict(block.state_dict())
    calls = []
    gelu = ops.gelu_tanh
    monkeypatch.setattr(ops, "gelu_tanh", lambda h, **kw: calls.append(kw["inplace"])
                        or gelu(h, **kw))
    x, c = draw((2, 5, 48), F32, generator, 1.0), draw((2, 48), F32, generator, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(block(x, c), twin(x, c), atol=2e-5, rtol=2e-5)
    block(x, c).sum().backward()
    assert calls == [True, False]
