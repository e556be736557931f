"""Timestep embedding: every backend against the reference, the DiT and diffusers formulas,
validation, torch.library registration and the DiT embedder module."""
import math

import pytest
import torch

import vqkernels
from vqkernels import ops
from vqkernels.reference import timestep as reference
from helpers import kernel_backends
from vqkernels.testing import assert_within_contract

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP = "timestep_embedding"


def random_t(n, generator, dtype=torch.float32, high=1000.0):
    """Fractional timesteps in [0, high), with the large t = 999.5 always present."""
    t = torch.rand(n, generator=generator, dtype=torch.float64) * high
    if n:
        t[-1] = 999.5
    return t.to(dtype)


def check_parity(t, dim, dtype, backend, device, **kwargs):
    out = ops.timestep_embedding(t.to(device), dim, dtype=dtype, backend=backend, **kwargs)
    assert out.dtype == dtype and out.device.type == device
    ref = reference.timestep_embedding(t, dim, dtype=dtype, **kwargs)
    truth = reference.timestep_embedding(t, dim, dtype=torch.float64, math_dtype=torch.float64,
                                         **kwargs)
    assert_within_contract(OP, dtype, out, ref, truth, what=f"{backend} N={len(t)} dim={dim}")


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("dim", [1, 2, 3, 255, 256, 1153])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_parity(backend, device, dtype, dim, n, generator):
    check_parity(random_t(n, generator), dim, dtype, backend, device)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("t_dtype", [torch.int32, torch.int64, torch.float16, torch.bfloat16,
                                     torch.float64], ids=str)
def test_parity_t_dtypes(backend, device, t_dtype, generator):
    check_parity(random_t(33, generator, t_dtype), 64, torch.float32, backend, device)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("options", [
    dict(flip_sin_to_cos=False, downscale_freq_shift=1.0),  # diffusers defaults
    dict(max_period=100.0, scale=1000.0),                   # continuous-time models, t in [0, 1)
    dict(flip_sin_to_cos=True, downscale_freq_shift=0.5, max_period=5000.0, scale=2.0),
], ids=["diffusers", "scaled", "mixed"])
def test_parity_options(backend, device, options, generator):
    high = 1.0 if options.get("scale", 1.0) > 100 else 1000.0
    check_parity(random_t(17, generator, high=high), 131, torch.float32, backend, device, **options)


def dit_timestep_embedding(t, dim, max_period=10000):
    """DiT's formula, written out independently of vqkernels.reference."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def diffusers_timestep_embedding(t, dim, flip_sin_to_cos=False, shift=1.0, scale=1.0,
                                 max_period=10000):
    """diffusers' get_timestep_embedding formula, written out independently."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - shift)
    emb = scale * (t[:, None].float() * torch.exp(exponent)[None, :])
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


@pytest.mark.parametrize("dim", [5, 256, 257])
def test_reference_is_dit_and_diffusers(dim, generator):
    t = torch.randint(0, 1000, (9,), generator=generator)
    torch.testing.assert_close(reference.timestep_embedding(t, dim), dit_timestep_embedding(t, dim),
                               rtol=0, atol=0)
    torch.testing.assert_close(
        reference.timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0),
        diffusers_timestep_embedding(t, dim), rtol=0, atol=0)


def test_reference_hand_computed():
    # dim 5, max_period 100: half = 2, freqs = [1, 100**-0.5 = 0.1], zero last column.
    out = reference.timestep_embedding(torch.tensor([0.0, 10.0]), 5, max_period=100.0,
                                       math_dtype=torch.float64, dtype=torch.float64)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0],
                             [math.cos(10), math.cos(1), math.sin(10), math.sin(1), 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_gradient_wrt_t(backend, device, generator):
    t = random_t(13, generator).to(device).requires_grad_()
    weights = torch.randn(13, 64, generator=generator).to(device)
    (ops.timestep_embedding(t, 64, backend=backend) * weights).sum().backward()
    grads = {}
    for name, math_dtype in (("reference", torch.float32), ("truth", torch.float64)):
        t_ref = t.detach().cpu().to(math_dtype).requires_grad_()
        out = reference.timestep_embedding(t_ref, 64, math_dtype=math_dtype, dtype=math_dtype)
        (out * weights.cpu().to(math_dtype)).sum().backward()
        grads[name] = t_ref.grad
    assert_within_contract(OP, torch.float32, t.grad, grads["reference"], grads["truth"],
                           kind="gradient", what=backend)


def test_auto_picks_the_cpu_kernel_on_cpu():
    if vqkernels._ext._C is None:
        pytest.skip("extension not built")
    assert ops.timestep.DISPATCH.select("auto", torch.device("cpu"), torch.float32).name == "cpu"


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.timestep_embedding([1, 2], 8), TypeError, "t must be a torch.Tensor"),
    (lambda: ops.timestep_embedding(torch.zeros(2, 3), 8), ValueError, r"t must be 1-D"),
    (lambda: ops.timestep_embedding(torch.zeros(2, dtype=torch.bool), 8), TypeError, "t must"),
    (lambda: ops.timestep_embedding(torch.ones(2), 8.0), TypeError, "dim must be an int"),
    (lambda: ops.timestep_embedding(torch.ones(2), -4), ValueError, "dim must be positive"),
    (lambda: ops.timestep_embedding(torch.ones(2), 8, max_period=0.0), ValueError, "max_period"),
    (lambda: ops.timestep_embedding(torch.ones(2), 8, downscale_freq_shift=4), ValueError,
     "downscale_freq_shift"),
    (lambda: ops.timestep_embedding(torch.ones(2), 8, dtype=torch.int32), TypeError, "dtype"),
    (lambda: ops.timestep_embedding(torch.ones(2), 8, backend="gpu"), ValueError, "backend"),
    (lambda: ops.timestep_embedding(torch.ones(2), 8, backend="cuda"),
     vqkernels.BackendUnavailableError, "needs a CUDA tensor, got cpu"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("VQKERNELS_BACKEND", "reference")
    assert ops.timestep.DISPATCH.select(None, torch.device("cpu"), torch.float32).name == "reference"
    monkeypatch.setenv("VQKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VQKERNELS_BACKEND"):
        ops.timestep_embedding(torch.ones(2), 8)


def registered_ops():
    ops_ = [pytest.param("timestep_embedding_triton", marks=pytest.mark.interpreter)]
    if vqkernels._ext._C is not None:
        ops_.insert(0, pytest.param("timestep_embedding"))
    return ops_


@pytest.mark.parametrize("op_name", registered_ops())
@pytest.mark.parametrize("t_dtype", [torch.float32, torch.int64], ids=str)
def test_opcheck(op_name, t_dtype, generator):
    op = getattr(torch.ops.vqkernels, op_name)
    t = random_t(5, generator, t_dtype).requires_grad_(t_dtype.is_floating_point)
    torch.library.opcheck(op, (t, 7, 10000.0, True, 0.0, 1.0, torch.float32))


def test_compile_fullgraph():
    torch._dynamo.reset()
    embedder = vqkernels.nn.TimestepEmbedder(32, 256)
    compiled = torch.compile(embedder, fullgraph=True)
    t = torch.rand(6) * 1000
    torch.testing.assert_close(compiled(t), embedder(t))


def test_embedder_loads_dit_checkpoint(generator):
    # Checks names and wiring; the embedding's numerics are tested above.
    dit_state = {"mlp.0.weight": torch.randn(48, 256, generator=generator) / 16,
                 "mlp.0.bias": torch.randn(48, generator=generator),
                 "mlp.2.weight": torch.randn(48, 48, generator=generator) / 7,
                 "mlp.2.bias": torch.randn(48, generator=generator)}
    embedder = vqkernels.nn.TimestepEmbedder(48)
    embedder.load_state_dict(dit_state)
    t = torch.randint(0, 1000, (4,), generator=generator)
    h = torch.nn.functional.linear(dit_timestep_embedding(t, 256), dit_state["mlp.0.weight"],
                                   dit_state["mlp.0.bias"])
    expected = torch.nn.functional.linear(torch.nn.functional.silu(h), dit_state["mlp.2.weight"],
                                          dit_state["mlp.2.bias"])
    torch.testing.assert_close(embedder(t), expected, rtol=1e-3, atol=1e-3)


def test_embedder_follows_module_dtype():
    embedder = vqkernels.nn.TimestepEmbedder(16).to(torch.bfloat16)
    assert embedder(torch.arange(3)).dtype == torch.bfloat16
