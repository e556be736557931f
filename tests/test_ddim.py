"""The fused DDIM step (ops.ddim_step): every backend against the unfused reference step,
guidance modes, per-sample timesteps, in-kernel Philox noise, validation, torch.library."""
import math

import pytest
import torch

from vqkernels import _ext, ops
from vqkernels.reference import ddim as reference
from helpers import kernel_backends
from vqkernels.testing import assert_within_contract, max_abs

OP = "ddim_step"
TABLE = reference.alphas_cumprod(reference.betas_for_schedule())  # float64, T = 1000
N_STEPS = 20
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNCLIPPED = dict(clip_sample=False, thresholding=False)


def randn(shape, generator, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def reference_step(model_output, timestep, sample, *, guidance_scale=None, uncond_output=None,
                   guidance_channels=None, table=TABLE, **kw):
    """The unfused composition: guidance combine, channel slice, reference.ddim_step."""
    c = sample.shape[1]
    if guidance_scale is not None:
        if uncond_output is None:
            cond, uncond = model_output.chunk(2)
        else:
            cond, uncond = model_output, uncond_output
        g = c if guidance_channels is None else guidance_channels
        guided = reference.cfg_combine(uncond[:, :g], cond[:, :g], guidance_scale)
        model_output = torch.cat([guided, cond[:, g:]], dim=1)
    final = kw.pop("final_alpha_cumprod", 1.0)
    return reference.ddim_step(model_output[:, :c], timestep, sample, table, final,
                               num_inference_steps=N_STEPS, **kw)


def check_step(backend, device, sample, model_output, timestep, *, uncond_output=None,
               variance_noise=None, what="", **kw):
    """ops.ddim_step on `device` is within the contract of the reference (same dtype, fp64 truth)."""
    to = (lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)
    got = ops.ddim_step(to(model_output), to(timestep), to(sample), TABLE.to(device),
                        num_inference_steps=N_STEPS, uncond_output=to(uncond_output),
                        variance_noise=to(variance_noise), backend=backend, **kw)
    same = reference_step(model_output, timestep, sample, uncond_output=uncond_output,
                          variance_noise=variance_noise, **kw)
    f64 = (lambda x: None if x is None else x.double())
    truths = [reference_step(f64(model_output), timestep, f64(sample),
                             uncond_output=f64(uncond_output), variance_noise=f64(variance_noise),
                             **{**kw, **unclipped}) for unclipped in ({}, UNCLIPPED)]
    magnitude = max_abs(*truths[0], *truths[1])  # x0 at t ~ T: ~100x x_t, before any clipping
    for name, out, ref, true in zip(("prev_sample", "pred_original_sample"), got, same, truths[0]):
        assert out.dtype == sample.dtype and out.device.type == device
        assert_within_contract(OP, sample.dtype, out, ref, true, magnitude=magnitude,
                               what=f"{backend} {what} {name}")


def timesteps_for(b, generator):
    """Per-sample timesteps from the 20-step schedule, always with the first and last."""
    schedule = reference.ddim_timesteps(N_STEPS)
    picks = torch.randint(0, N_STEPS, (b,), generator=generator)
    picks[:2] = torch.tensor([0, N_STEPS - 1])[: min(b, 2)]
    return schedule[picks]


STEP_OPTIONS = [
    dict(),
    dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.7),
    dict(prediction_type="v_prediction", use_clipped_model_output=True, clip_sample=True),
    dict(prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.9,
         sample_max_value=3.0),
    dict(prediction_type="sample", thresholding=True, use_clipped_model_output=True,
         final_alpha_cumprod=float(TABLE[0])),
]
OPTION_IDS = ["eps", "sample-clip", "v-clipped-eps", "eps-threshold", "sample-threshold-a0"]


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("options", STEP_OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_given_noise(backend, device, options, eta, dtype, generator):
    shape = (5, 3, 7, 11)
    sample, out = randn(shape, generator, dtype), randn(shape, generator, dtype)
    noise = randn(shape, generator, dtype) if eta else None
    check_step(backend, device, sample, out, timesteps_for(5, generator), eta=eta,
               variance_noise=noise, what=f"eta={eta}", **options)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_step_is_the_float32_step_rounded(backend, device, dtype, generator):
    """Math in fp32 for half tensors, with fp32 noise used unrounded: the half step
    is bitwise the fp32 step on the same (exactly widened) values, rounded once."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter rounds float32 -> bfloat16 toward zero, not to nearest")
    shape = (3, 4, 9, 13)
    sample, out = randn(shape, generator, dtype), randn(shape, generator, dtype)
    noise = randn(shape, generator)
    t = timesteps_for(3, generator).to(device)

    def step(x, o):
        return ops.ddim_step(o.to(device), t, x.to(device), TABLE.to(device), num_inference_steps=N_STEPS,
                             eta=0.7, variance_noise=noise.to(device), clip_sample=True,
                             backend=backend)

    for half, full in zip(step(sample, out), step(sample.float(), out.float())):
        assert torch.equal(half, full.to(dtype))


GUIDANCE = [
    dict(guidance_scale=4.0),                          # batched [cond; uncond]
    dict(guidance_scale=1.5, two_tensors=True),
    dict(guidance_scale=4.0, guidance_channels=3),     # DiT: 3 of 4 channels, learned sigma
    dict(guidance_scale=0.0, guidance_channels=0),
]


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("guidance", GUIDANCE, ids=["batched", "two", "dit-3of4", "none-guided"])
@pytest.mark.parametrize("out_channels", [4, 8], ids=["eps", "learned-sigma"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_guidance(backend, device, guidance, out_channels, out_dtype, generator):
    guidance = dict(guidance)
    b, shape = 3, (3, 4, 5, 9)
    sample = randn(shape, generator)
    two = guidance.pop("two_tensors", False)
    out = randn((b if two else 2 * b, out_channels, 5, 9), generator, out_dtype)
    uncond = randn(out.shape, generator, out_dtype) if two else None
    check_step(backend, device, sample, out, timesteps_for(b, generator), uncond_output=uncond,
               eta=0.3, variance_noise=randn(shape, generator), what=str(guidance), **guidance)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_parity_uncond_with_its_own_row_stride(backend, device, generator):
    # uncond is a channel slice of a wider tensor: its rows are farther apart than cond's.
    shape = (3, 4, 5, 9)
    sample, cond = randn(shape, generator), randn(shape, generator)
    uncond = randn((3, 7, 5, 9), generator)[:, 2:6]
    check_step(backend, device, sample, cond, timesteps_for(3, generator), uncond_output=uncond,
               guidance_scale=4.0, what="strided uncond")


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", [(1, 1), (2, 1031), (3, 5), (4, 1, 1, 1), (2, 2, 33, 31)])
def test_parity_odd_shapes(backend, device, shape, generator):
    sample, out = randn(shape, generator), randn(shape, generator)
    check_step(backend, device, sample, out, timesteps_for(shape[0], generator), eta=1.0,
               variance_noise=randn(shape, generator), clip_sample=True)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_scalar_timesteps_and_empty_batch(backend, device, generator):
    sample, out = randn((3, 4, 6), generator), randn((3, 4, 6), generator)
    for t in (500, torch.tensor(500), torch.tensor([500, 500, 500], dtype=torch.int32)):
        check_step(backend, device, sample, out, t, what=f"timestep {t!r}")
    empty = torch.empty(0, 4, 6, device=device)
    prev, x0 = ops.ddim_step(empty, 500, empty, TABLE, num_inference_steps=N_STEPS, backend=backend)
    assert prev.shape == x0.shape == (0, 4, 6)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_per_sample_timesteps_equal_stepping_alone(backend, device, generator):
    shape = (4, 3, 5, 5)
    sample, out, noise = (randn(shape, generator) for _ in range(3))
    ts = torch.tensor([999, 37, 0, 500])  # 37 and 0 step past the start
    kw = dict(num_inference_steps=N_STEPS, eta=0.8, thresholding=True, sample_max_value=2.0,
              backend=backend)
    dev = [x.to(device) for x in (out, sample, noise)]
    prev, x0 = ops.ddim_step(dev[0], ts.to(device), dev[1], TABLE, variance_noise=dev[2], **kw)
    for i, t in enumerate(ts.tolist()):
        alone = ops.ddim_step(dev[0][i:i + 1], t, dev[1][i:i + 1], TABLE,
                              variance_noise=dev[2][i:i + 1], **kw)
        torch.testing.assert_close(prev[i:i + 1], alone[0], rtol=0, atol=0)
        torch.testing.assert_close(x0[i:i + 1], alone[1], rtol=0, atol=0)


def test_return_pred_original_false_skips_it(generator):
    sample, out = randn((2, 3, 4), generator), randn((2, 3, 4), generator)
    for backend in ("reference", "cpu"):
        prev, x0 = ops.ddim_step(out, 300, sample, TABLE, num_inference_steps=N_STEPS,
                                 return_pred_original=False, backend=backend)
        assert x0 is None
        want, _ = ops.ddim_step(out, 300, sample, TABLE, num_inference_steps=N_STEPS,
                                backend=backend)
        torch.testing.assert_close(prev, want, rtol=0, atol=0)


# ---------------------------------------------------------------- in-kernel noise

def test_philox_normal_is_standard_normal():
    n = 1 << 18
    z = reference.philox_normal(0x1234_5678_9ABC, torch.arange(n))
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert abs(((z > 1.96).double().mean() - 0.025).item()) < 5 * math.sqrt(0.025 / n)
    other = reference.philox_normal(0x1234_5678_9ABD, torch.arange(n))
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 5 / math.sqrt(n)


def test_philox_normal_known_values():
    # Philox4x32-10 known-answer test (Random123 kat_vectors): counter 0, key 0
    # -> words 0x6627e8d5, 0xe169c58d; as uniforms and Box-Muller:
    u0 = 0x6627E8D5 * 4.6566127342e-10
    v1 = 0xE169C58D - 2 ** 32
    u1 = (-v1 - 1) * 4.6566127342e-10
    want = math.sqrt(-2 * math.log(u0)) * math.cos(2 * math.pi * u1)
    got = reference.philox_normal(0, torch.tensor([0])).item()
    assert abs(got - want) < 1e-6, (got, want)


@pytest.mark.interpreter
def test_philox_normal_is_triton_randn():
    import triton
    import triton.language as tl

    @triton.jit
    def randn_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, tl.randn(seed, offsets), mask=offsets < n)

    n = 3000
    for seed in (0, 7, 2 ** 40 + 3, 2 ** 62 - 1):
        out = torch.empty(n)
        randn_kernel[(triton.cdiv(n, 1024),)](out, seed, n, BLOCK=1024)
        err = (out.double() - reference.philox_normal(seed, torch.arange(n))).abs().max().item()
        assert err < 1e-5, f"seed {seed}: {err}"


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_kernel_noise_is_the_reference_stream(backend, device, dtype, generator):
    shape = (3, 4, 9, 7)
    sample, out = randn(shape, generator, dtype), randn(shape, generator, dtype)
    seed = torch.randint(0, 2 ** 62, (1,), generator=generator)
    noise = reference.philox_normal(int(seed), torch.arange(sample.numel())).view(shape)
    ts = timesteps_for(3, generator)
    got = ops.ddim_step(out.to(device), ts.to(device), sample.to(device), TABLE,
                        num_inference_steps=N_STEPS, eta=1.0, noise_seed=seed.to(device),
                        backend=backend)
    same = reference_step(out, ts, sample, eta=1.0, variance_noise=noise.to(dtype))
    truth = reference_step(out.double(), ts, sample.double(), eta=1.0, variance_noise=noise)
    for o, r, t in zip(got, same, truth):
        s = t.abs().max().item()
        assert_within_contract(OP, dtype, o / s, r / s, t / s, what=f"{backend} philox noise")


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_generator_noise_reproducible_and_standard(backend, device, generator):
    shape = (4, 4, 32, 32)
    sample, out = randn(shape, generator).to(device), randn(shape, generator).to(device)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=generator))
    t, kw = 500, dict(num_inference_steps=N_STEPS, return_pred_original=False, backend=backend)

    def noisy(s):
        g = torch.Generator(device).manual_seed(s)
        return ops.ddim_step(out, t, sample, TABLE, eta=1.0, generator=g, **kw)[0]

    first, again, other = noisy(seed), noisy(seed), noisy(seed + 1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    zero_noise = ops.ddim_step(out, t, sample, TABLE, eta=1.0,
                               variance_noise=torch.zeros_like(sample), **kw)[0]
    a_t, a_p = TABLE[t].item(), TABLE[t - 1000 // N_STEPS].item()
    std = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    z = ((first - zero_noise) / std).double().cpu().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n), z.mean()
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n) + 1e-4, z.std()


# ---------------------------------------------------------------- errors, dispatch, library

def test_validation_names_the_argument():
    x = torch.randn(2, 4, 3, 3)
    kw = dict(num_inference_steps=N_STEPS)
    cases = [
        (dict(model_output=x[:1]), "model_output"),
        (dict(guidance_scale=3.0), "model_output"),          # batched CFG needs 2B rows
        (dict(uncond_output=x), "uncond_output"),            # without guidance_scale
        (dict(model_output=x[:, :3]), "model_output"),       # fewer channels than sample
        (dict(timestep=1000), "timestep"),
        (dict(timestep=torch.tensor([1, 2, 3])), "timestep"),
        (dict(timestep=torch.tensor([5, -1])), "timestep"),
        (dict(timestep=500.0), "timestep"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=1001), "num_inference_steps"),
        (dict(prediction_type="flow"), "prediction_type"),
        (dict(eta=-0.1), "eta"),
        (dict(variance_noise=x[:, :2]), "variance_noise"),
        (dict(noise_seed=torch.tensor([1.0])), "noise_seed"),
        (dict(guidance_scale=2.0, model_output=torch.cat([x, x]), guidance_channels=5),
         "guidance_channels"),
        (dict(sample_max_value=0.5), "sample_max_value"),
        (dict(final_alpha_cumprod=1.5), "final_alpha_cumprod"),
    ]
    for override, name in cases:
        args = dict(model_output=x, timestep=500, sample=x, alphas_cumprod=TABLE, **kw)
        args.update(override)
        with pytest.raises((ValueError, TypeError), match=name):
            ops.ddim_step(**args)
    with pytest.raises(TypeError, match="sample"):
        ops.ddim_step(x, 500, x.long(), TABLE, **kw)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_out_of_range_device_timestep_gives_nan(backend, device, generator):
    # Device timesteps are not checked (that would sync); the kernels write NaN and read
    # nothing outside the table, even for t far past it (t - step ratio is out of range too).
    # The ops layer checks CPU timesteps, so this calls the kernels' own ops.
    kernel = getattr(torch.ops.vqkernels, "ddim_step_triton" if backend == "triton" else "ddim_step")
    x = randn((5, 8), generator).to(device)
    t = torch.tensor([1000, 500, 2**40, -1, -2**40], device=device)
    prev, x0 = kernel(x, x, None, t, TABLE.float().to(device), None, None, None, 50, 1.0, 0.0,
                      "epsilon", True, 1.0, False, 1.0, 0, True, True)
    for bad in (0, 2, 3, 4):
        assert prev[bad].isnan().all() and x0[bad].isnan().all(), f"t = {t[bad].item()}"
    assert prev[1].isfinite().all()


def test_step_ops_share_one_schema():
    # The Triton op is defined from StepArgs; the C++ op's schema (csrc/op_registry.cpp)
    # must list the same arguments, in the same order, with the same types.
    ops_with_schema = ["ddim_step_triton"] + (["ddim_step"] if _ext._C is not None else [])
    for name in ops_with_schema:
        schema = getattr(torch.ops.vqkernels, name).default._schema
        assert str(schema) == f"vqkernels::{name}{ops.ddim.STEP_SCHEMA}"


def test_triton_ddim_grid_takes_any_batch(monkeypatch):
    # CUDA caps grid axes 1 and 2 at 65535 (the interpreter does not): the launch must not
    # put the batch there.
    pytest.importorskip("triton")
    from vqkernels.triton import ddim as triton_ddim

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(triton_ddim, "_ddim_step_kernel", Recorder())
    x, t = torch.zeros(70_000, 3), torch.full((70_000,), 500)
    triton_ddim.ddim_step(ops.ddim.StepArgs(x, x, x, t, TABLE.float(), None, None, None, 50, 1.0,
                                            0.0, "epsilon", False, 1.0, False, 2.0, 3, True, False))
    assert grids and all(axis <= 65535 for grid in grids for axis in grid[1:]), grids


def test_grad_inputs_go_to_the_reference(generator):
    x = randn((2, 3, 4), generator).requires_grad_()
    out = randn((2, 3, 4), generator)
    prev, _ = ops.ddim_step(out, 300, x, TABLE, num_inference_steps=N_STEPS)
    prev.sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
    with pytest.raises(Exception, match="require grad"):
        ops.ddim_step(out, 300, x, TABLE, num_inference_steps=N_STEPS, backend="cpu")
    assert ops.ddim.DISPATCH.select("auto", x.device, torch.float64).name == "reference"


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compile_fullgraph(backend, generator):
    torch._dynamo.reset()
    sample, out = randn((2, 4, 4, 4), generator), randn((4, 4, 4, 4), generator)
    seed = torch.tensor([12345])

    def step(out, t, sample):
        return ops.ddim_step(out, t, sample, TABLE.float(), num_inference_steps=N_STEPS,
                             guidance_scale=3.0, eta=0.5, noise_seed=seed, backend=backend)

    t = torch.tensor([400, 20])
    got = torch.compile(step, fullgraph=True)(out, t, sample)
    want = step(out, t, sample)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
