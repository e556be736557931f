"""ops.group_norm: every backend against the float64 reference (forward, and the gradients
of x, weight and bias), NCHW and channels-last, with and without SiLU, odd shapes, groups
of one channel and one pixel, a large mean, validation, torch.library and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from helpers import backend_cases, kernel_backends
from vqkernels import BackendUnavailableError, ops
from vqkernels.reference.group_norm import group_norm_statistics
from vqkernels.testing import assert_within_contract

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BACKENDS = kernel_backends(without=("cuda",))  # Triton is its GPU kernel
BACKEND_DTYPES = {"cpu": (F32, F64), "triton-interp": (F32,), "triton-cuda": (F32, F16, BF16)}
# (shape, groups): taming's 32 groups, odd sizes, one channel a group, one pixel, 2-D and 3-D
SHAPES = [((2, 6, 5, 7), 3), ((3, 64, 4, 4), 32), ((2, 32, 1, 1), 32), ((2, 8, 3), 4),
          ((3, 4), 2)]


def cases():
    return backend_cases({key: [(d, layout) for d in ds for layout in ("nchw", "nhwc")]
                          for key, ds in BACKEND_DTYPES.items()}, BACKENDS)


def draw(shape, dtype, generator, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=generator, dtype=F64) * scale + offset).to(dtype)


def laid_out(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


def outputs_and_grads(x, weight, bias, groups, silu, upstream, backend, device="cpu"):
    leaves = [v.detach().to(device).requires_grad_() for v in (x, weight, bias)]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last)
        leaves[0].requires_grad_()
    y = ops.group_norm(leaves[0], groups, leaves[1], leaves[2], eps=1e-6, silu=silu,
                       backend=backend)
    y.backward(upstream.to(device))
    return y.detach(), [v.grad for v in leaves]


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("backend,device,dtype,layout", cases())
def test_forward_and_gradients_within_the_contract(backend, device, dtype, layout, shape,
                                                   groups, silu, generator):
    if layout == "nhwc" and len(shape) != 4:
        pytest.skip("channels-last is 4-D")
    x = laid_out(draw(shape, dtype, generator, 2.0, 0.5), layout)
    weight, bias = draw(shape[1:2], dtype, generator), draw(shape[1:2], dtype, generator)
    upstream = draw(shape, dtype, generator)
    got = outputs_and_grads(x, weight, bias, groups, silu, upstream, backend, device)
    same = outputs_and_grads(x, weight, bias, groups, silu, upstream, "reference")
    truth = outputs_and_grads(x.double(), weight.double(), bias.double(), groups, silu,
                              upstream.double(), "reference")
    y = got[0]
    assert y.dtype == dtype and y.device.type == device
    if layout == "nhwc":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_within_contract("group_norm", dtype, y.cpu(), same[0], truth[0],
                           what=f"{backend} y")
    # dx's terms are rstd |dy w| (1 + |xhat|): large where a group's values nearly agree
    mean, rstd = group_norm_statistics(x.double(), groups, 1e-6)
    xhat = (x.double().reshape(shape[0], groups, -1) - mean[..., None]) * rstd[..., None]
    terms = (rstd.max() * upstream.abs().max() * weight.abs().max() * (1 + xhat.abs().max()))
    for name, g, s, t in zip(("x", "weight", "bias"), got[1], same[1], truth[1]):
        assert_within_contract("group_norm", dtype, g.cpu(), s, t, kind="gradient",
                               magnitude=terms.item() if name == "x" else None,
                               what=f"{backend} grad {name}")


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_matches_pytorch_and_keeps_accuracy_about_a_large_mean(backend, generator):
    x = draw((2, 64, 6, 6), F32, generator, 1.0, 1000.0)
    weight, bias = draw((64,), F32, generator), draw((64,), F32, generator)
    expected = F.silu(F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6))
    for layout in ("nchw", "nhwc"):
        got = ops.group_norm(laid_out(x, layout), 32, weight, bias, eps=1e-6, silu=True,
                             backend=backend)
        torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_defaults_and_strided_input(backend, generator):
    x = draw((2, 8, 5, 6), F32, generator).transpose(2, 3)  # neither layout: copied once
    expected = F.group_norm(x, 4)
    torch.testing.assert_close(ops.group_norm(x, 4, backend=backend), expected, atol=1e-5,
                               rtol=1e-5)


def test_half_precision_on_cpu_runs_the_reference(generator):
    x = draw((2, 8, 3, 3), BF16, generator)
    torch.testing.assert_close(ops.group_norm(x, 4, silu=True),
                               F.silu(F.group_norm(x.float(), 4)).to(BF16))
    with pytest.raises(BackendUnavailableError, match="dtype"):
        ops.group_norm(x, 4, backend="cpu")


def test_bad_arguments_name_themselves():
    x = torch.randn(2, 8, 3, 3)
    for kwargs, error, match in (
            (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
            (dict(x=torch.zeros(2, 8, 3, dtype=torch.int64)), TypeError, "x must be float16"),
            (dict(x=torch.randn(8)), ValueError, r"x must be \(B, C, \*spatial\)"),
            (dict(x=torch.randn(2, 8, 0, 3)), ValueError, "no empty spatial dim"),
            (dict(num_groups=3), ValueError, "num_groups must be a positive int dividing C"),
            (dict(num_groups=True), ValueError, "num_groups must be"),
            (dict(weight=torch.ones(4)), ValueError, r"weight must be None or a \(C,\)"),
            (dict(bias=torch.ones(8, dtype=F64)), TypeError, "bias must have x's dtype"),
            (dict(eps=-1.0), ValueError, "eps must be a finite number"),
            (dict(silu=1), TypeError, "silu must be a bool")):
        args = dict(x=x, num_groups=4) | kwargs
        with pytest.raises(error, match=match):
            ops.group_norm(args.pop("x"), args.pop("num_groups"), **args)


def test_opcheck(generator):
    for layout in ("nchw", "nhwc"):
        x = laid_out(draw((2, 8, 3, 5), F64, generator), layout)
        torch.library.opcheck(torch.ops.vqkernels.group_norm_forward.default,
                              (x, torch.ones(8, dtype=F64), torch.zeros(8, dtype=F64), 4, 1e-6,
                               True))


@pytest.mark.interpreter
def test_opcheck_triton(generator):
    x = draw((2, 8, 3, 5), F32, generator)
    torch.library.opcheck(torch.ops.vqkernels.group_norm_forward_triton.default,
                          (x, torch.ones(8), torch.zeros(8), 4, 1e-6, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compile_fullgraph(backend, generator):
    torch._dynamo.reset()
    leaves = [draw(s, F32, generator).requires_grad_() for s in ((2, 8, 4, 4), (8,), (8,))]

    def loss(x, w, b):
        return (ops.group_norm(x * 2.0, 4, w, b, silu=True, backend=backend) ** 2).sum()

    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, torch.autograd.grad(compiled(*leaves), leaves)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
