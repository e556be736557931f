"""adaLN ops (layer_norm_modulate, gated_residual and their fusion): every backend against the
float64 reference, forward and every gradient, per-sample and per-token conditioning, odd D,
empty and strided inputs, validation, torch.library and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from helpers import backend_cases, kernel_backends
from vqkernels import ops
from vqkernels.testing import ADALN_OPS, adaln_magnitudes, assert_within_contract

OP = "adaln"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BACKEND_DTYPES = {"cpu": (F32, F64, F16, BF16), "triton-interp": (F32,),
                  "cuda": (F32, F16, BF16), "triton-cuda": (F32, F16, BF16)}
SHAPES = [(2, 5, 7), (3, 1, 1), (1, 4, 3), (2, 3, 255), (2, 2, 1152), (1, 3, 1153)]
def dtype_cases(dtypes=None):
    return backend_cases({key: [(d,) for d in ds if dtypes is None or d in dtypes]
                          for key, ds in BACKEND_DTYPES.items()})


def make_inputs(op, b, t, d, per_token, dtype, generator):
    """The op's inputs by name: fp64 draws rounded to ``dtype``."""
    def draw(shape, scale=1.0, offset=0.0):
        return (torch.randn(shape, generator=generator, dtype=F64) * scale + offset).to(dtype)
    param_shape = (b, t, d) if per_token else (b, d)
    made = {"x": draw((b, t, d), 2.0, 0.5), "y": draw((b, t, d)), "gate": draw(param_shape, 0.5),
            "shift": draw(param_shape, 0.5), "scale": draw(param_shape, 0.5)}
    return {name: made[name] for name in ADALN_OPS[op][0]}


def call(op, inputs, backend):
    out = getattr(ops, op)(*inputs.values(), backend=backend)
    return out if isinstance(out, tuple) else (out,)


def outputs_and_grads(op, inputs, grads_out, backend, device="cpu"):
    """(outputs, {input name: gradient}) of ``op`` on copies of ``inputs`` moved to ``device``."""
    leaves = {name: v.detach().to(device).requires_grad_() for name, v in inputs.items()}
    outs = call(op, leaves, backend)
    torch.autograd.backward(outs, [g.to(device) for g in grads_out])
    return [o.detach() for o in outs], {name: v.grad for name, v in leaves.items()}


def check_parity(op, backend, device, inputs, generator, what=""):
    """Outputs and every input's gradient within the contract of the same-dtype reference."""
    dtype = inputs["x"].dtype
    out_names = ADALN_OPS[op][1]
    shape = inputs["x"].shape
    grads_out = [(torch.randn(shape, generator=generator, dtype=F64)).to(dtype) for _ in out_names]
    got = outputs_and_grads(op, inputs, grads_out, backend, device)
    same = outputs_and_grads(op, inputs, grads_out, "reference")
    truth = outputs_and_grads(op, {n: v.double() for n, v in inputs.items()},
                              [g.double() for g in grads_out], "reference")
    sizes = adaln_magnitudes(**inputs, **dict(zip(
        ("grad_" + name for name in out_names), grads_out)))
    for name, o, r, t in zip(out_names, got[0], same[0], truth[0]):
        assert o.dtype == dtype and o.device.type == device and o.is_contiguous()
        assert_within_contract(OP, dtype, o, r, t, magnitude=sizes[name],
                               what=f"{op} {backend} {what} {name}")
    for name in inputs:
        assert got[1][name].shape == inputs[name].shape and got[1][name].dtype == dtype
        assert_within_contract(OP, dtype, got[1][name], same[1][name], truth[1][name],
                               kind="gradient", magnitude=sizes[name],
                               what=f"{op} {backend} {what} d{name}")


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("backend,device,dtype", dtype_cases())
@pytest.mark.parametrize("op", ADALN_OPS)
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(backend, device, dtype, op, per_token, shape, generator):
    check_parity(op, backend, device, make_inputs(op, *shape, per_token, dtype, generator),
                 generator, what=f"{shape}")


@pytest.mark.parametrize("backend,device,dtype", dtype_cases((F32,)))
@pytest.mark.parametrize("op", ADALN_OPS)
def test_parity_dit_shape(backend, device, dtype, op, generator):
    """DiT-XL's width with enough tokens that per-sample gradients sum over many rows."""
    t = 40 if backend == "triton" and device == "cpu" else 300
    check_parity(op, backend, device, make_inputs(op, 2, t, 1152, False, dtype, generator),
                 generator, what=f"T={t}")


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ADALN_OPS)
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_triton_wide_rows_loop_over_tiles(op, per_token, monkeypatch, generator):
    """Rows wider than MAX_TILE take the looped path (here forced with a 16-column tile)."""
    from vqkernels.triton import adaln as triton_adaln

    monkeypatch.setattr(triton_adaln, "MAX_TILE", 16)
    check_parity(op, "triton", "cpu", make_inputs(op, 2, 3, 37, per_token, F32, generator),
                 generator, what="looped tiles")


@pytest.mark.interpreter
@pytest.mark.parametrize("rows", [2, 4])
def test_triton_rows_per_program_with_a_partial_last_chunk(rows, generator):
    """Per-sample gradients summed over chunks of ``rows`` tokens, T not a multiple of it."""
    from vqkernels.reference import adaln as reference
    from vqkernels.triton import adaln as triton_adaln

    x, gate, y, shift, scale = (make_inputs("gated_residual_layer_norm_modulate", 2, 7, 9, False,
                                            F32, generator)[n]
                                for n in ("x", "gate", "y", "shift", "scale"))
    grad = torch.randn(x.shape, generator=generator)
    _, x_new, mean, rstd = triton_adaln.adaln_forward(x, shift, scale, gate, y, 1e-6)
    got = triton_adaln.adaln_backward(grad, None, x_new, scale, mean, rstd, rows_per_program=rows)
    got += triton_adaln.gated_residual_backward(grad, gate, y, rows_per_program=rows)
    leaves = [v.clone().requires_grad_() for v in (x_new, shift, scale, gate, y)]
    torch.autograd.backward([reference.layer_norm_modulate(*leaves[:3]),
                             reference.gated_residual(x, *leaves[3:])], [grad, grad])
    for name, a, b in zip(("dx", "dshift", "dscale", "dgate", "dy"), got,
                          [leaf.grad for leaf in leaves]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend,device,dtype", dtype_cases((F32,)))
@pytest.mark.parametrize("op", ADALN_OPS)
def test_strided_views_are_read_in_place(backend, device, dtype, op, generator):
    """Parameters as chunks of one (B, 6D) modulation (as DiT makes them), x and y as
    token-major views of (T, B, D) tensors: no copies, same results."""
    b, t, d = 3, 4, 24
    inputs = make_inputs(op, b, t, d, False, dtype, generator)
    modulation = torch.randn(b, 6 * d, generator=generator).to(dtype)
    chunks = dict(zip(("shift", "scale", "gate"), modulation.chunk(6, dim=1)))
    for name in inputs:
        if name in chunks:
            inputs[name] = chunks[name]
        else:
            inputs[name] = inputs[name].transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(v.is_contiguous() for v in inputs.values())
    check_parity(op, backend, device, inputs, generator, what="strided")


@pytest.mark.parametrize("backend,device,dtype", dtype_cases((F32,)))
@pytest.mark.parametrize("op", ADALN_OPS)
@pytest.mark.parametrize("b,t", [(0, 3), (2, 0)])
def test_empty_batch_or_tokens(backend, device, dtype, op, b, t, generator):
    """Empty outputs; per-sample parameter gradients are zeros (a sum over no tokens)."""
    inputs = make_inputs(op, b, t, 5, False, dtype, generator)
    outs, grads = outputs_and_grads(op, inputs, [torch.zeros(b, t, 5)] * len(ADALN_OPS[op][1]),
                                    backend, device)
    assert all(o.shape == (b, t, 5) for o in outs)
    for name, v in inputs.items():
        assert grads[name].shape == v.shape and not grads[name].any()


def test_matches_the_eager_dit_formula(generator):
    """The DiT release's modulate(norm(x), shift, scale) and its gated residual add."""
    x, gate, y, shift, scale = make_inputs("gated_residual_layer_norm_modulate", 2, 9, 48, False,
                                           F64, generator).values()
    x_new, h = ops.gated_residual_layer_norm_modulate(x, gate, y, shift, scale)
    eager_x = x + gate.unsqueeze(1) * y
    eager_h = F.layer_norm(eager_x, (48,), eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    torch.testing.assert_close(x_new, eager_x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h, eager_h, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- validation

def _good():
    x = torch.randn(2, 3, 4)
    return dict(x=x, gate=torch.randn(2, 4), y=torch.randn(2, 3, 4), shift=torch.randn(2, 4),
                scale=torch.randn(2, 4))


@pytest.mark.parametrize("name,bad,error,match", [
    ("x", torch.randn(2, 4), ValueError, "x must be"),
    ("x", torch.randn(2, 3, 0), ValueError, "D >= 1"),
    ("y", torch.randn(2, 4, 4), ValueError, "y must be"),
    ("shift", torch.randn(3, 4), ValueError, "shift must be"),
    ("scale", torch.randn(2, 5), ValueError, "scale must be"),
    ("gate", torch.randn(2, 3, 5), ValueError, "gate must be"),
    ("gate", torch.randn(2, 3, 4), ValueError, "all be per sample"),
    ("y", torch.randn(2, 3, 4, dtype=F64), TypeError, "y must have x's dtype"),
    ("shift", torch.randn(2, 4).half(), TypeError, "shift must have x's dtype"),
    ("x", torch.zeros(2, 3, 4, dtype=torch.int64), TypeError, "x must be float"),
    ("scale", [[1.0]], TypeError, "scale must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(name, bad, error, match):
    args = _good()
    args[name] = bad
    with pytest.raises(error, match=match):
        ops.gated_residual_layer_norm_modulate(**args)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), True, "1e-6"])
def test_bad_eps(eps):
    args = _good()
    with pytest.raises(ValueError, match="eps must be"):
        ops.layer_norm_modulate(args["x"], args["shift"], args["scale"], eps=eps)


def test_gated_residual_checks_its_arguments():
    args = _good()
    with pytest.raises(ValueError, match="gate must be"):
        ops.gated_residual(args["x"], torch.randn(2, 5), args["y"])
    with pytest.raises(ValueError, match="y must be"):
        ops.gated_residual(args["x"], args["gate"], torch.randn(2, 3, 5))


# ---------------------------------------------------------------- torch.library, compile

def _op_args(generator, dtype=F64, per_token=False):
    x, gate, y, shift, scale = make_inputs("gated_residual_layer_norm_modulate", 2, 3, 6,
                                           per_token, dtype, generator).values()
    return x, gate, y, shift, scale


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual, per_token, generator):
    x, gate, y, shift, scale = _op_args(generator, per_token=per_token)
    forward = torch.ops.vqkernels.adaln_forward
    args = (x, shift, scale, gate, y, 1e-6) if residual else (x, shift, scale, None, None, 1e-6)
    torch.library.opcheck(forward.default, args)
    _, x_new, mean, rstd = forward(*args)
    grad = torch.randn_like(x)
    torch.library.opcheck(torch.ops.vqkernels.adaln_backward.default,
                          (grad, grad if residual else None, x_new if residual else x, scale,
                           mean, rstd))
    torch.library.opcheck(torch.ops.vqkernels.gated_residual_forward.default, (x, gate, y))
    torch.library.opcheck(torch.ops.vqkernels.gated_residual_backward.default, (grad, gate, y))


@pytest.mark.interpreter
def test_opcheck_triton(generator):
    x, gate, y, shift, scale = _op_args(generator, F32)
    only = dict(test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.vqkernels.adaln_forward_triton.default,
                          (x, shift, scale, gate, y, 1e-6), **only)
    torch.library.opcheck(torch.ops.vqkernels.gated_residual_forward_triton.default,
                          (x, gate, y), **only)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compile_fullgraph(backend, generator):
    torch._dynamo.reset()
    leaves = [v.requires_grad_() for v in _op_args(generator, F32)]

    def loss(x, gate, y, shift, scale):
        h = ops.layer_norm_modulate(x, shift, scale, backend=backend)
        x_new, h2 = ops.gated_residual_layer_norm_modulate(h, gate, y, shift, scale,
                                                           backend=backend)
        return (ops.gated_residual(x_new, gate, h2, backend=backend) ** 2).sum()

    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, torch.autograd.grad(compiled(*leaves), leaves)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_every_kernel_backend_is_declared():
    from vqkernels.ops import adaln

    ids = {param.id for param in kernel_backends()}
    assert ids == set(BACKEND_DTYPES)
    for dispatch in (adaln.NORM_DISPATCH, adaln.FUSED_DISPATCH, adaln.RESIDUAL_DISPATCH):
        assert set(dispatch.backends) == {"reference", "cpu", "cuda", "triton"}
