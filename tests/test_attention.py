"""Fused attention (ops.attention, nn.Attention): every backend against the explicit-softmax
reference in float64 and against torch's SDPA, forward and q/k/v gradients, odd and
cross-attention shapes, extreme logits, strided inputs, bounded CPU memory, torch.library."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vqkernels import nn as vqnn
from vqkernels import ops
from vqkernels.reference import attention as reference
from helpers import kernel_backends, run_python
from vqkernels.testing import assert_within_contract, attention_magnitudes

OP = "attention"
HEAD_DIMS = (32, 40, 64, 72, 80, 96, 128)
SEQ_LENS = (1, 17, 255, 256, 257, 1024)
BACKEND_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "triton-interp": (torch.float32,),
    "cuda": (torch.float16, torch.bfloat16),
    "triton-cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def backend_cases(dtypes=None):
    """(backend, device, dtype) for every kernel backend and each dtype it claims."""
    cases = []
    for param in kernel_backends():
        for dtype in BACKEND_DTYPES[param.id]:
            if dtypes is None or dtype in dtypes:
                cases.append(pytest.param(*param.values, dtype, marks=param.marks,
                                          id=f"{param.id}-{str(dtype)[6:]}"))
    return cases


def is_interpreter(backend, device):
    return backend == "triton" and device == "cpu"


def randn(shape, generator, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def qkv(b, h, sq, sk, d, generator, dtype, scale=1.0):
    return [randn((b, h, s, d), generator, dtype, scale) for s in (sq, sk, sk)]


def outputs_and_grads(fn, q, k, v, grad_out):
    """fn(q, k, v) and d<fn, grad_out>/d(q, k, v)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def check_parity(backend, device, q, k, v, generator, *, scale=None, grads=True, what=""):
    """Output (and gradients) within the contract of the same-dtype reference, fp64 truth."""
    to = (lambda x: x.to(device))
    dtype = q.dtype
    grad_out = randn(q.shape, generator, dtype)
    ours = (lambda *x: ops.attention(*x, scale=scale, backend=backend))
    ref = (lambda *x: reference.attention(*x, scale))
    if not grads:
        with torch.no_grad():
            got, same = ours(*map(to, (q, k, v))), ref(q, k, v)
            truth = ref(q.double(), k.double(), v.double())
        assert_within_contract(OP, dtype, got, same, truth, what=f"{backend} {what} out",
                               magnitude=attention_magnitudes(q, k, v, scale=scale)["out"])
        return
    got = outputs_and_grads(ours, *map(to, (q, k, v, grad_out)))
    same = outputs_and_grads(ref, q, k, v, grad_out)
    truth = outputs_and_grads(ref, q.double(), k.double(), v.double(), grad_out.double())
    check_results(dtype, got, same, truth, attention_magnitudes(q, k, v, grad_out, scale),
                  what=f"{backend} {what}")
    assert all(o.dtype == dtype and o.device.type == device for o in got)


def check_results(dtype, got, same, truth, magnitudes, what):
    """(out, dq, dk, dv) within the contract of ``same``, given the size of their terms."""
    for name, o, r, t in zip(("out", "dq", "dk", "dv"), got, same, truth):
        assert_within_contract(OP, dtype, o, r, t, kind="forward" if name == "out" else "gradient",
                               magnitude=magnitudes[name], what=f"{what} {name}")


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("s", SEQ_LENS)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_parity_every_length_and_head_dim(backend, device, dtype, s, d, generator):
    if is_interpreter(backend, device) and (s > 17 or d not in (40, 72)):
        pytest.skip("the interpreter runs tiny shapes only (S <= 17, d = 40 and 72 here)")
    check_parity(backend, device, *qkv(1, 2, s, s, d, generator, dtype), generator,
                 what=f"S={s} d={d}", grads=s <= 257 or device == "cuda")


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("d", [16, 48])
def test_parity_small_head_dims(backend, device, dtype, d, generator):
    """The CUDA kernel's smallest widths: one and three k16-steps of QK^T."""
    if is_interpreter(backend, device) and d == 48:
        pytest.skip("the interpreter runs d = 16 only here")
    check_parity(backend, device, *qkv(2, 2, 37, 70, d, generator, dtype), generator, what=f"d={d}")


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_parity_unaligned_views(backend, device, dtype, generator):
    """q, k, v starting one element past a 16-byte boundary: the CUDA plain-load kernel."""
    b, h, s, d = 2, 3, 70, 72
    q, k, v = (randn((b, h, s, d + 1), generator, dtype)[..., 1:] for _ in range(3))
    assert q.storage_offset() == 1 and q.stride(-1) == 1
    check_parity(backend, device, q, k, v, generator, what="unaligned")


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("sq,sk", [(5, 33), (40, 3), (1, 70)])
def test_parity_cross_attention(backend, device, dtype, sq, sk, generator):
    check_parity(backend, device, *qkv(2, 2, sq, sk, 40, generator, dtype), generator,
                 what=f"Sq={sq} Sk={sk}")


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("b,h", [(1, 1), (16, 16)])
def test_parity_batch_heads(backend, device, dtype, b, h, generator):
    s = 5 if is_interpreter(backend, device) else 33
    check_parity(backend, device, *qkv(b, h, s, s, 72, generator, dtype), generator,
                 what=f"B={b} H={h}")


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_extreme_logits_stay_finite(backend, device, dtype, generator):
    """|logits| ~ 1e4: the forward stays in contract (the max subtraction keeps exp finite),
    and the gradients stay finite. They are not held to the contract there: the backward
    rebuilds P from the saved lse, whose float32 rounding at |lse| ~ 1e4 (~1e-3) is a
    relative error of P that the reference, which keeps P, does not have (FlashAttention's
    trade-off too)."""
    q, k, v = qkv(1, 2, 17, 19, 64, generator, dtype, scale=10.0)
    check_parity(backend, device, q, k, v, generator, scale=10.0, grads=False,
                 what="scale 10, |q| ~ 10")
    grad_out = randn(q.shape, generator, dtype).to(device)
    got = outputs_and_grads(lambda *x: ops.attention(*x, scale=10.0, backend=backend),
                            *(x.to(device) for x in (q, k, v)), grad_out)
    assert all(x.isfinite().all() for x in got)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_matches_sdpa(backend, device, dtype, generator):
    """Within the contract of torch's SDPA on the same inputs, outputs and gradients."""
    s = 17 if is_interpreter(backend, device) else 129
    q, k, v = (x.to(device) for x in qkv(2, 4, s, s, 72, generator, dtype))
    grad_out = randn(q.shape, generator, dtype).to(device)
    ours = outputs_and_grads(lambda *x: ops.attention(*x, backend=backend), q, k, v, grad_out)
    sdpa = outputs_and_grads(F.scaled_dot_product_attention, q, k, v, grad_out)
    truth = outputs_and_grads(reference.attention, *(x.double().cpu() for x in (q, k, v, grad_out)))
    check_results(dtype, ours, sdpa, truth, attention_magnitudes(q, k, v, grad_out),
                  what=f"{backend} vs SDPA")


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_strided_packed_qkv(backend, device, dtype, generator):
    """q, k, v as the permuted views of one (B, S, 3, H, d) projection, read in place."""
    b, s, h, d = 2, 13, 3, 72
    packed = randn((b, s, 3, h, d), generator, dtype).to(device)
    q, k, v = packed.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    got = ops.attention(q, k, v, backend=backend)
    want = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_empty_queries(backend, device, dtype, generator):
    q, k, v = (x.to(device) for x in qkv(2, 3, 0, 5, 72, generator, dtype))
    out = ops.attention(q.requires_grad_(), k, v, backend=backend)
    assert out.shape == (2, 3, 0, 72)
    out.sum().backward()
    assert q.grad.shape == q.shape


# ---------------------------------------------------------------- memory, errors, library

MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from vqkernels import ops
    torch.manual_seed(0)
    s = 8192
    q, k, v = (torch.randn(1, 1, s, 72, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, 1, s, 72)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ops.attention(q, k, v, backend="cpu").backward(grad_out)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)
""")


def test_cpu_memory_is_not_quadratic():
    """S = 8192, one head, d = 72, forward + backward: far below the 256 MiB of one S x S fp32."""
    result = run_python("-c", MEMORY_PROBE)
    assert result.returncode == 0, result.stderr
    grown_mib = float(result.stdout.split()[-1])
    assert grown_mib < 32, f"peak RSS grew by {grown_mib:.1f} MiB (an S x S fp32 buffer is 256 MiB)"


def test_validation_names_the_argument(generator):
    q, k, v = qkv(1, 2, 4, 5, 8, generator, torch.float32)
    cases = [
        ((q[0], k, v), {}, "q"),
        ((q, k.double(), v), {}, "k"),
        ((q, k, v[..., :4]), {}, "v"),
        ((q, k[:, :1], v[:, :1]), {}, "k"),
        ((q, k[:, :, :0], v[:, :, :0]), {}, "Sk"),
        ((q.long(), k, v), {}, "q"),
        ((q, k, v), dict(scale=float("nan")), "scale"),
        ((q, k, v), dict(scale="2"), "scale"),
    ]
    for args, kw, name in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            ops.attention(*args, **kw)


def test_explicit_backend_refusals_list_reasons(generator):
    q, k, v = qkv(1, 1, 3, 3, 8, generator, torch.float16)
    with pytest.raises(RuntimeError, match="float16"):
        ops.attention(q, k, v, backend="cpu")
    assert ops.attention(q, k, v).dtype == torch.float16  # auto: the reference on CPU


def test_cuda_head_dims_come_from_the_extension(monkeypatch):
    """The head dims compiled into the CUDA kernel reach Python, and the
    CUDA backend's refusal names them."""
    from vqkernels import _ext
    from vqkernels.ops import flash_attention as op

    dims = _ext.cuda_attention_head_dims()
    if _ext.build_info().get("cuda"):
        assert dims == tuple(_ext._C.cuda_attention_head_dims)
        assert 72 in dims and list(dims) == sorted(dims), dims  # DiT-XL/2's head dim
        assert all(d % 8 == 0 and d <= 128 for d in dims), dims
    else:
        assert dims == ()
        dims = (16, 64)
        monkeypatch.setattr(_ext, "cuda_attention_head_dims", lambda: dims)
    monkeypatch.setattr(op, "device_capability", lambda device: (9, 0))
    reasons = op._cuda_limits(device=torch.device("cuda", 0), dtype=torch.bfloat16, head_dim=24)
    assert reasons == [f"head_dim 24 is not one of {list(dims)}"]


def test_cuda_backend_limits(monkeypatch):
    """The CUDA forward needs sm_80, and for gradients the Triton backward."""
    from vqkernels.ops import flash_attention as op

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(op, "device_capability", lambda device: (7, 5))
    monkeypatch.setattr(op, "triton_reasons", lambda device: ["triton is not importable (test)"])
    reasons = op._cuda_limits(device=cuda, dtype=torch.bfloat16, head_dim=72, requires_grad=True)
    assert any("sm_80" in r for r in reasons), reasons
    assert any("backward is the Triton kernel" in r for r in reasons), reasons
    monkeypatch.setattr(op, "device_capability", lambda device: (9, 0))
    assert op._cuda_limits(device=cuda, dtype=torch.bfloat16, head_dim=72) == []
    assert "triton" in " ".join(op._cuda_limits(device=cuda, dtype=torch.bfloat16, head_dim=72,
                                                requires_grad=True))


def test_opcheck(generator):
    q, k, v = qkv(2, 2, 7, 9, 40, generator, torch.float64)
    torch.library.opcheck(torch.ops.vqkernels.attention_forward.default, (q, k, v, 0.3))
    out, lse = torch.ops.vqkernels.attention_forward(q, k, v, 0.3)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.vqkernels.attention_backward.default,
                          (grad_out, q, k, v, out, lse, 0.3))


@pytest.mark.interpreter
def test_opcheck_triton(generator):
    q, k, v = qkv(1, 2, 5, 6, 16, generator, torch.float32)
    torch.library.opcheck(torch.ops.vqkernels.attention_forward_triton.default, (q, k, v, 0.5),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compile_fullgraph(backend, generator):
    torch._dynamo.reset()
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 9, 9, 16, generator, torch.float32))

    def loss(q, k, v):
        return (ops.attention(q, k, v, backend=backend) ** 2).sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, torch.autograd.grad(compiled(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- nn.Attention

@pytest.mark.parametrize("backend,device,dtype", backend_cases((torch.float32, torch.bfloat16)))
def test_module_matches_its_reference_twin(backend, device, dtype, generator):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=generator)))
    dim, heads = 144, 2  # head_dim 72, as DiT-XL/2
    ours = vqnn.Attention(dim, num_heads=heads, backend=backend).to(device, dtype)
    twin = vqnn.ReferenceAttention(dim, num_heads=heads).to(device, dtype)
    twin.load_state_dict(ours.state_dict())
    assert sorted(ours.state_dict()) == ["proj.bias", "proj.weight", "qkv.bias", "qkv.weight"]
    x = randn((2, 11, dim), generator, dtype).to(device)
    got, want = ours(x), twin(x)
    truth = vqnn.ReferenceAttention(dim, num_heads=heads).double().to(device)
    truth.load_state_dict(ours.state_dict())
    assert_within_contract(OP, dtype, got, want, truth(x.double()), what=f"{backend} module")
    got.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in ours.parameters())


def test_module_validates():
    with pytest.raises(ValueError, match="num_heads"):
        vqnn.Attention(100, num_heads=3)
    with pytest.raises(ValueError, match="x must be"):
        vqnn.Attention(16, num_heads=2)(torch.randn(2, 16))
