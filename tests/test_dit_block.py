"""DiTBlock and FinalLayer: the DiT release's state dict, parity of output and every gradient
with their pure-PyTorch twins per backend and dtype, what reaches the ops, torch.compile,
argument validation."""
import pytest
import torch

from vqkernels import nn as vqnn
from vqkernels import ops
from vqkernels.testing import assert_within_contract

F32, F64 = torch.float32, torch.float64


BACKENDS = [  # (id, backend, dtypes it takes, marks): every one runs on CPU tensors
    ("reference", "reference", (F32, F64), ()),
    ("cpu", "cpu", (F32, F64), ()),
    ("triton-interp", "triton", (F32,), pytest.mark.interpreter),
]


def backend_cases(shapes):
    return [pytest.param(backend, dtype, *shape, marks=marks,
                         id=f"{name}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}")
            for name, backend, dtypes, marks in BACKENDS for dtype in dtypes for shape in shapes]


def randn(shape, generator, dtype, std=1.0):
    return (torch.randn(shape, generator=generator, dtype=F64) * std).to(dtype)


def randomize_(module, generator):
    """Every parameter random, the adaLN projection included: its modulation is material."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(randn(p.shape, generator, p.dtype, 0.1 if name.endswith("bias") else 0.2))
    return module


def outputs_and_grads(module, x, c, grad_out):
    """{"out", "x", "c", each parameter's name}: the output, then d<out, grad_out>/d(each)."""
    x, c = (v.detach().requires_grad_() for v in (x, c))
    out = module(x, c)
    out.backward(grad_out)
    return {"out": out.detach(), "x": x.grad, "c": c.grad,
            **{name: p.grad for name, p in module.named_parameters()}}


def check_twin_parity(ours, make_twin, x_shape, out_features, generator, *, op, what):
    """ours (random weights, in its dtype) against the float64 twin as truth, on the same
    weights and data; the same-dtype twin's own error is the yardstick (testing.py)."""
    dtype = next(ours.parameters()).dtype
    same, truth = make_twin().to(dtype), make_twin().double()
    for module in (same, truth):
        module.load_state_dict(ours.state_dict())
    b, t, d = x_shape
    x, c = randn((b, t, d), generator, dtype), randn((b, d), generator, dtype)
    grad_out = randn((b, t, out_features), generator, dtype)
    got = outputs_and_grads(ours, x, c, grad_out)
    want = outputs_and_grads(same, x, c, grad_out)
    exact = outputs_and_grads(truth, x.double(), c.double(), grad_out.double())
    assert got.keys() == exact.keys()
    for name, result in got.items():
        assert result.dtype == dtype, f"{what} {name}: {result.dtype}"
        assert_within_contract(op, dtype, result, want[name], exact[name],
                               kind="forward" if name == "out" else "gradient",
                               what=f"{what} {name}")


# --------------------------------------------------------------------------- state dict

def test_block_state_dict_is_dits():
    hidden, mlp = 1152, 4608
    expected = {
        "attn.qkv.weight": (3 * hidden, hidden), "attn.qkv.bias": (3 * hidden,),
        "attn.proj.weight": (hidden, hidden), "attn.proj.bias": (hidden,),
        "mlp.fc1.weight": (mlp, hidden), "mlp.fc1.bias": (mlp,),
        "mlp.fc2.weight": (hidden, mlp), "mlp.fc2.bias": (hidden,),
        "adaLN_modulation.1.weight": (6 * hidden, hidden), "adaLN_modulation.1.bias": (6 * hidden,),
    }
    with torch.device("meta"):
        modules = vqnn.DiTBlock(hidden, 16), vqnn.ReferenceDiTBlock(hidden, 16)
    for module in modules:
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
        assert (module.norm1.eps, module.norm2.eps) == (1e-6, 1e-6)


def test_final_layer_state_dict_is_dits():
    hidden = 1152
    expected = {"linear.weight": (2 * 2 * 8, hidden), "linear.bias": (2 * 2 * 8,),
                "adaLN_modulation.1.weight": (2 * hidden, hidden),
                "adaLN_modulation.1.bias": (2 * hidden,)}
    with torch.device("meta"):
        modules = vqnn.FinalLayer(hidden, 2, 8), vqnn.ReferenceFinalLayer(hidden, 2, 8)
    for module in modules:
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
        assert module.norm_final.eps == 1e-6


# --------------------------------------------------------------------------- parity

BLOCK_SHAPES = [(2, 1, 24, 2, 4.0), (3, 5, 36, 3, 2.5)]  # B, T, hidden, heads, mlp_ratio
FINAL_SHAPES = [(2, 1, 24, 2, 3), (3, 5, 36, 1, 4)]  # B, T, hidden, patch, out_channels


@pytest.mark.parametrize("backend,dtype,b,t,hidden,heads,mlp_ratio", backend_cases(BLOCK_SHAPES))
def test_block_matches_its_twin(backend, dtype, b, t, hidden, heads, mlp_ratio, generator):
    args = dict(hidden_size=hidden, num_heads=heads, mlp_ratio=mlp_ratio)
    ours = randomize_(vqnn.DiTBlock(**args, backend=backend).to(dtype), generator)
    check_twin_parity(ours, lambda: vqnn.ReferenceDiTBlock(**args), (b, t, hidden), hidden,
                      generator, op="attention", what=f"DiTBlock {backend}")


@pytest.mark.parametrize("backend,dtype,b,t,hidden,patch,channels", backend_cases(FINAL_SHAPES))
def test_final_layer_matches_its_twin(backend, dtype, b, t, hidden, patch, channels, generator):
    args = dict(hidden_size=hidden, patch_size=patch, out_channels=channels)
    ours = randomize_(vqnn.FinalLayer(**args, backend=backend).to(dtype), generator)
    check_twin_parity(ours, lambda: vqnn.ReferenceFinalLayer(**args), (b, t, hidden),
                      patch * patch * channels, generator, op="adaln",
                      what=f"FinalLayer {backend}")


# --------------------------------------------------------------------------- what reaches the ops

def spy_on_ops(monkeypatch, names):
    """[(op name, args, kwargs)] of every call to the named ops, which still run."""
    calls = []

    def spy(name, real):
        def recorded(*args, **kwargs):
            calls.append((name, args, kwargs))
            return real(*args, **kwargs)
        return recorded

    for name in names:
        monkeypatch.setattr(ops, name, spy(name, getattr(ops, name)))
    return calls


def assert_views_of(chunks, modulation):
    """chunks are modulation's (B, D) column blocks in order, read in place (no copies)."""
    d = chunks[0].shape[1]
    for i, chunk in enumerate(chunks):
        assert chunk.stride() == modulation.stride(), f"chunk {i} was copied"
        assert chunk.data_ptr() == modulation.data_ptr() + i * d * chunk.element_size()
        assert torch.equal(chunk, modulation[:, i * d:(i + 1) * d]), f"chunk {i} out of order"


def test_block_gives_every_op_its_backend_eps_and_modulation_views(monkeypatch, generator):
    calls = spy_on_ops(monkeypatch, ["layer_norm_modulate", "attention",
                                     "gated_residual_layer_norm_modulate", "gated_residual"])
    block = randomize_(vqnn.DiTBlock(24, 2, backend="reference").double(), generator)
    twin = vqnn.ReferenceDiTBlock(24, 2).double()
    twin.load_state_dict(block.state_dict())
    for module in (block, twin):
        module.norm1.eps, module.norm2.eps = 0.5, 0.25
    x, c = randn((2, 3, 24), generator, F64), randn((2, 24), generator, F64)
    out = block(x, c)
    assert [name for name, _, _ in calls] == ["layer_norm_modulate", "attention",
                                              "gated_residual_layer_norm_modulate",
                                              "gated_residual"]
    assert all(kwargs["backend"] == "reference" for _, _, kwargs in calls)
    assert (calls[0][2]["eps"], calls[2][2]["eps"]) == (0.5, 0.25)
    (_, first, _), _, (_, fused, _), (_, last, _) = calls
    chunks = (first[1], first[2], fused[1], fused[3], fused[4], last[1])
    assert_views_of(chunks, chunks[0]._base)
    torch.testing.assert_close(out, twin(x, c), rtol=1e-12, atol=1e-12)


def test_final_layer_gives_its_op_the_backend_eps_and_modulation_views(monkeypatch, generator):
    calls = spy_on_ops(monkeypatch, ["layer_norm_modulate"])
    final = randomize_(vqnn.FinalLayer(24, 2, 3, backend="reference").double(), generator)
    twin = vqnn.ReferenceFinalLayer(24, 2, 3).double()
    twin.load_state_dict(final.state_dict())
    final.norm_final.eps = twin.norm_final.eps = 0.5
    x, c = randn((2, 3, 24), generator, F64), randn((2, 24), generator, F64)
    out = final(x, c)
    (_, (_, shift, scale), kwargs), = calls
    assert kwargs == {"eps": 0.5, "backend": "reference"}
    assert_views_of((shift, scale), shift._base)
    torch.testing.assert_close(out, twin(x, c), rtol=1e-12, atol=1e-12)


def test_backend_is_the_attentions():
    block = vqnn.DiTBlock(24, 2, backend="triton")
    assert block.backend == block.attn.backend == "triton"
    block.backend = "reference"
    assert block.attn.backend == "reference"


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("backend,compiler", [
    ("reference", "aot_eager"),
    pytest.param("reference", "inductor", marks=pytest.mark.slow),  # cold cache: ~1 min of C++
    pytest.param("triton", "aot_eager", marks=pytest.mark.interpreter),
    pytest.param("cpu", "aot_eager"),
])
def test_block_compiles_fullgraph_forward_and_backward(backend, compiler, generator):
    torch._dynamo.reset()
    block = randomize_(vqnn.DiTBlock(24, 2, backend=backend), generator)
    x, c = randn((2, 5, 24), generator, F32), randn((2, 24), generator, F32)
    inputs = (x.requires_grad_(), c.requires_grad_(), *block.parameters())

    def loss(x, c):
        return block(x, c).square().sum()

    eager = torch.autograd.grad(loss(x, c), inputs)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend=compiler)(x, c),
                                   inputs)
    for want, got in zip(eager, compiled):
        # Inductor reorders the fp32 sums: a small gradient element can be off by a few ulps
        # of the largest ones it sums (up to ~250 here), so the slack scales with the tensor.
        torch.testing.assert_close(got, want, rtol=1e-4,
                                   atol=1e-5 + 4e-6 * want.abs().max().item())


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs,name", [
    (dict(hidden_size=0, num_heads=1), "hidden_size"),
    (dict(hidden_size=24.0, num_heads=2), "hidden_size"),
    (dict(hidden_size=24, num_heads=0), "num_heads"),
    (dict(hidden_size=24, num_heads=True), "num_heads"),
    (dict(hidden_size=24, num_heads=5), "num_heads"),
    (dict(hidden_size=24, num_heads=2, mlp_ratio=0.0), "mlp_ratio"),
    (dict(hidden_size=24, num_heads=2, mlp_ratio=-1.0), "mlp_ratio"),
    (dict(hidden_size=24, num_heads=2, mlp_ratio=float("nan")), "mlp_ratio"),
    (dict(hidden_size=24, num_heads=2, mlp_ratio="4"), "mlp_ratio"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
@pytest.mark.parametrize("cls", [vqnn.DiTBlock, vqnn.ReferenceDiTBlock], ids=lambda c: c.__name__)
def test_block_rejects_bad_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


@pytest.mark.parametrize("args,name", [
    ((0, 2, 8), "hidden_size"), ((24, 0, 8), "patch_size"), ((24, 2.0, 8), "patch_size"),
    ((24, 2, -1), "out_channels"), ((24, 2, True), "out_channels"),
])
@pytest.mark.parametrize("cls", [vqnn.FinalLayer, vqnn.ReferenceFinalLayer],
                         ids=lambda c: c.__name__)
def test_final_layer_rejects_bad_arguments(cls, args, name):
    with pytest.raises(ValueError, match=name):
        cls(*args)


@pytest.mark.parametrize("x_shape,c_shape,name", [
    ((2, 24), (2, 24), "x must"), ((2, 3, 25), (2, 24), "x must"),
    ((2, 3, 4, 24), (2, 24), "x must"), ((2, 3, 24), (3, 24), "c must"),
    ((2, 3, 24), (2, 25), "c must"), ((2, 3, 24), (2, 1, 24), "c must"),
])
@pytest.mark.parametrize("make", [
    pytest.param(lambda: vqnn.DiTBlock(24, 2), id="DiTBlock"),
    pytest.param(lambda: vqnn.ReferenceDiTBlock(24, 2), id="ReferenceDiTBlock"),
    pytest.param(lambda: vqnn.FinalLayer(24, 2, 3), id="FinalLayer"),
    pytest.param(lambda: vqnn.ReferenceFinalLayer(24, 2, 3), id="ReferenceFinalLayer"),
])
def test_forward_rejects_bad_shapes(make, x_shape, c_shape, name):
    with pytest.raises(ValueError, match=name):
        make()(torch.zeros(x_shape), torch.zeros(c_shape))
