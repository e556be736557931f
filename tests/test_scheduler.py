"""Tests for vqkernels.sampling.DDIMScheduler against diffusers 0.42.1 and the float64 reference.

In float32 the C++ step matched diffusers' ``step`` bit for bit on every
configuration below on an Intel Xeon, but not on an AMD EPYC (torch's own ops
round differently there), so no test asks for bits: ours must be as close to
the float64 truth as the worse of the float32 reference and diffusers
(computed in the same process), and within that of diffusers.
Against the float64 truth the bound is a multiple of the float32 reference's
own error (vqkernels.testing style): a fixed ulp count cannot work, since at
t = 999 of the cosine schedule ``1 - a_prev - std^2`` cancels to ~1e-7 and its
sqrt carries ~1e-4 of float32 rounding in any float32 implementation.
"""
import copy
import itertools
import pickle

import pytest
import torch

from vqkernels import ops
from vqkernels.reference import ddim as reference
from vqkernels.sampling import DDIMScheduler, DDIMSchedulerOutput

SHAPE = (2, 4, 8, 8)
N_STEPS = 10
ETAS = (0.0, 0.5, 1.0)
X0_MODES = {  # how the predicted x0 is bounded
    "off": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
}
CONFIGS = [
    dict(beta_schedule=b, timestep_spacing=s, prediction_type=p, set_alpha_to_one=a,
         steps_offset=o, **X0_MODES[m])
    for b, s, p, m, a, o in itertools.product(
        reference.BETA_SCHEDULES, reference.TIMESTEP_SPACINGS, reference.PREDICTION_TYPES,
        X0_MODES, (True, False), (0, 1))
]
F32_EPS = torch.finfo(torch.float32).eps


def _diffusers():
    return pytest.importorskip("diffusers")


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def _float64_step(scheduler, model_output, t, sample, eta, noise, bounded=True):
    """The truth on float32 inputs and table: the reference in float64 (x0 unclipped if not bounded)."""
    c = scheduler.config
    return reference.ddim_step(
        model_output.double(), t, sample.double(), scheduler.alphas_cumprod.double(),
        float(scheduler.final_alpha_cumprod), num_inference_steps=scheduler.num_inference_steps,
        num_train_timesteps=c.num_train_timesteps, eta=eta, prediction_type=c.prediction_type,
        clip_sample=c.clip_sample and bounded, clip_sample_range=c.clip_sample_range,
        thresholding=c.thresholding and bounded, dynamic_thresholding_ratio=c.dynamic_thresholding_ratio,
        sample_max_value=c.sample_max_value, variance_noise=noise.double())


def _reference_scheduler(config):
    scheduler = DDIMScheduler(**config, backend="reference")
    scheduler.set_timesteps(N_STEPS)
    return scheduler


def _max_err(x, truth):
    return (x.double() - truth).abs().max().item()


def _check_against_diffusers(configs, backend, generator, etas=ETAS):
    diffusers = _diffusers()
    for config in configs:
        ours, theirs = DDIMScheduler(**config, backend=backend), diffusers.DDIMScheduler(**config)
        ref32 = _reference_scheduler(config)
        ours.set_timesteps(N_STEPS)
        theirs.set_timesteps(N_STEPS)
        for t, eta in itertools.product(ours.timesteps[[0, N_STEPS // 2, -1]].tolist(), etas):
            x, eps, noise = (_randn(generator, *SHAPE) for _ in range(3))
            got = ours.step(eps, t, x, eta=eta, variance_noise=noise)
            want = theirs.step(eps, t, x, eta=eta, variance_noise=noise)
            truth = _float64_step(ours, eps, t, x, eta, noise)
            unbounded = _float64_step(ours, eps, t, x, eta, noise, bounded=False)
            ref = ref32.step(eps, t, x, eta=eta, variance_noise=noise)
            for i, name in enumerate(("prev_sample", "pred_original_sample")):
                what = f"{name} at t={t} eta={eta} {config}"
                # Bounds follow the worse of the two float32 steps computed here (ours may
                # round like diffusers on one processor and unlike it on another), plus
                # 8 ulps of the magnitude before clipping, where the cancellation happens.
                own_err = max(_max_err(ref[i], truth[i]), _max_err(want[i], truth[i]))
                scale = max(1.0, truth[i].abs().max().item(), unbounded[i].abs().max().item())
                bound = 2 * own_err + 8 * F32_EPS * scale
                err, gap = _max_err(got[i], truth[i]), _max_err(got[i], want[i].double())
                assert err <= bound, f"{what}: error {err:.3e} vs float64 exceeds {bound:.3e}"
                assert gap <= bound + own_err, f"{what}: {gap:.3e} from diffusers"


@pytest.mark.parametrize("beta_schedule", reference.BETA_SCHEDULES)
def test_step_matches_diffusers_cpu(beta_schedule, generator):
    configs = [c for c in CONFIGS if c["beta_schedule"] == beta_schedule]
    _check_against_diffusers(configs, "cpu", generator)


def test_step_matches_diffusers_reference(generator):
    _check_against_diffusers(CONFIGS[::3], "reference", generator)


@pytest.mark.interpreter
def test_step_matches_diffusers_triton(generator):
    _check_against_diffusers(CONFIGS[::11], "triton", generator, etas=(0.0, 1.0))


def test_tables_match_diffusers():
    diffusers = _diffusers()
    cases = [dict(beta_schedule=b) for b in reference.BETA_SCHEDULES] + [
        dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, set_alpha_to_one=False),
        dict(trained_betas=torch.linspace(1e-3, 0.05, 200).tolist(), num_train_timesteps=200)]
    for config in cases:
        ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
        for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod", "timesteps"):
            a, b = getattr(ours, name), getattr(theirs, name)
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs for {config}"
        assert (ours.init_noise_sigma, ours.order, ours.num_inference_steps) == (1.0, 1, None)


@pytest.mark.parametrize("spacing", reference.TIMESTEP_SPACINGS)
def test_timesteps_match_diffusers(spacing):
    diffusers = _diffusers()
    for offset, n in itertools.product((0, 1), (10, 50, 250, 1000, 61)):
        ours = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        theirs = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        got, want = ours.timesteps.tolist(), theirs.timesteps.tolist()
        assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == n
        assert len(got) == n and got == want[:n], f"{spacing} n={n} offset={offset}"
        # diffusers' one extra "trailing" element (numpy arange rounding), see the reference.
        assert want[n:] == ([-1] if (spacing, n) == ("trailing", 61) else []), (spacing, n)


@pytest.mark.parametrize("backend", [
    "cpu", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_per_sample_timesteps_equal_single_steps(backend, generator):
    ours = DDIMScheduler(prediction_type="v_prediction", set_alpha_to_one=False, backend=backend,
                         **X0_MODES["threshold"])
    ours.set_timesteps(N_STEPS)
    steps = ours.timesteps[[0, 3, -1, 3]]  # the last step lands past t = 0
    x, out, noise = (_randn(generator, 4, 3, 5, 7) for _ in range(3))
    batched = ours.step(out, steps, x, eta=0.7, variance_noise=noise)
    for b, t in enumerate(steps.tolist()):
        alone = ours.step(out[b:b + 1], t, x[b:b + 1], eta=0.7, variance_noise=noise[b:b + 1])
        for i in range(2):
            torch.testing.assert_close(batched[i][b:b + 1], alone[i], atol=0, rtol=0,
                                       msg=f"output {i} of sample {b} (t={t})")


def test_from_config_round_trip():
    diffusers = _diffusers()
    config = dict(CONFIGS[-1], num_train_timesteps=500, beta_start=2e-4, beta_end=0.03)
    theirs = diffusers.DDIMScheduler(**config)
    ours = DDIMScheduler.from_config(theirs.config)
    assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    back = diffusers.DDIMScheduler.from_config(ours.config).config
    assert all(back[k] == v for k, v in ours.config.items())
    changed = DDIMScheduler.from_config(theirs.config, timestep_spacing="trailing", backend="cpu")
    assert changed.config.timestep_spacing == "trailing" and changed.backend == "cpu"
    assert changed.config.num_train_timesteps == 500 and len(changed) == 500
    other = DDIMScheduler.from_config(diffusers.DPMSolverMultistepScheduler(beta_end=0.03).config)
    assert other.config.beta_end == 0.03 and "solver_order" not in other.config
    with pytest.raises(TypeError, match="unknown"):
        DDIMScheduler.from_config(ours.config, timestep_spaceing="trailing")


def test_config_is_a_read_only_dict_with_attributes():
    ours = DDIMScheduler(steps_offset=1)
    assert isinstance(ours.config, dict)
    assert ours.config.steps_offset == ours.config["steps_offset"] == 1
    with pytest.raises(AttributeError, match="no 'nope'"):
        ours.config.nope
    for mutate in (lambda c: c.__setitem__("steps_offset", 2), lambda c: c.update(steps_offset=2),
                   lambda c: setattr(c, "steps_offset", 2)):
        with pytest.raises(TypeError, match="read-only"):
            mutate(ours.config)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert clone.config == ours.config
        assert torch.equal(clone.alphas_cumprod, ours.alphas_cumprod)


def test_step_outputs_and_identities(generator):
    ours = DDIMScheduler()
    x, eps = _randn(generator, *SHAPE), _randn(generator, *SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(eps, 999, x)
    ours.set_timesteps(N_STEPS)
    out = ours.step(eps, 900, x)
    assert isinstance(out, DDIMSchedulerOutput)
    assert out[0] is out.prev_sample is out["prev_sample"] and out[1] is out.pred_original_sample
    assert len(out.to_tuple()) == 2 and out.to_tuple()[1] is out.pred_original_sample
    as_tuple = ours.step(eps, 900, x, return_dict=False)
    assert isinstance(as_tuple, tuple) and all(map(torch.equal, as_tuple, out.to_tuple()))
    for t in (900.0, torch.tensor(900.0), torch.tensor(900, dtype=torch.int32)):
        assert torch.equal(ours.step(eps, t, x).prev_sample, out.prev_sample), repr(t)
    assert ours.scale_model_input(x, 900) is x and len(ours) == 1000


def test_bad_inputs_raise_value_errors(generator):
    ours = DDIMScheduler()
    ours.set_timesteps(N_STEPS)
    x = _randn(generator, *SHAPE)
    with pytest.raises(ValueError, match="model_output"):
        ours.step(x[:1], 900, x)
    with pytest.raises(ValueError, match="timestep"):
        ours.step(x, 1000, x)
    with pytest.raises(ValueError, match="integral"):
        ours.step(x, 900.5, x)
    with pytest.raises(ValueError, match="variance_noise"):
        ours.step(x, 900, x, eta=1.0, variance_noise=x[0])
    with pytest.raises(ValueError, match="generator"):
        ours.step(x, 900, x, eta=1.0, variance_noise=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.set_timesteps(1001)


def test_step_passes_config_and_cached_table(monkeypatch, generator):
    calls = []
    real = ops.ddim_step
    monkeypatch.setattr(ops, "ddim_step", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    ours = DDIMScheduler(set_alpha_to_one=False, prediction_type="sample", backend="reference",
                         **X0_MODES["threshold"])
    ours.set_timesteps(7, device="cpu")
    x = _randn(generator, *SHAPE)
    for t in ours.timesteps[:2]:
        ours.step(x, t, x, eta=0.3, variance_noise=x)
    (args0, kw), (args1, _) = calls
    assert args0[3] is args1[3] and torch.equal(args0[3], ours.alphas_cumprod)
    expected = dict(num_inference_steps=7, final_alpha_cumprod=float(ours.alphas_cumprod[0]),
                    eta=0.3, backend="reference", prediction_type="sample", thresholding=True,
                    dynamic_thresholding_ratio=0.9, sample_max_value=2.5, clip_sample=True)
    assert {k: kw[k] for k in expected} == expected
    ours.alphas_cumprod.mul_(0.5)  # an edited or replaced table is uploaded again
    ours.step(x, 0, x)
    assert torch.equal(calls[-1][0][3], ours.alphas_cumprod)
    ours.alphas_cumprod = ours.alphas_cumprod.double() * 0.5
    ours.step(x, 0, x)
    assert calls[-1][0][3].dtype == torch.float32
    assert torch.equal(calls[-1][0][3], ours.alphas_cumprod.float())


def test_add_noise_and_velocity_match_diffusers(generator):
    diffusers = _diffusers()
    for schedule in reference.BETA_SCHEDULES:
        ours = DDIMScheduler(beta_schedule=schedule)
        theirs = diffusers.DDIMScheduler(beta_schedule=schedule)
        x, noise = _randn(generator, 5, 3, 4, 4), _randn(generator, 5, 3, 4, 4)
        steps = torch.randint(0, 1000, (5,), generator=generator)
        for t in (steps, steps[:, None], torch.tensor(999)):
            for name in ("add_noise", "get_velocity"):
                got, want = getattr(ours, name)(x, noise, t), getattr(theirs, name)(x, noise, t)
                torch.testing.assert_close(got, want, atol=0, rtol=0,
                                           msg=f"{name} {schedule} t={t.tolist()}")


def test_noise_drawn_from_generator_is_reproducible(generator):
    ours = DDIMScheduler(clip_sample=False)
    ours.set_timesteps(N_STEPS)
    x, eps = (_randn(generator, 4, 4, 32, 32) for _ in range(2))
    seed1, seed2 = torch.randint(2 ** 62, (2,), generator=generator).tolist()

    def step(seed, eta=1.0, **kw):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return ours.step(eps, 500, x, eta=eta, generator=gen, **kw).prev_sample

    assert torch.equal(step(seed1), step(seed1)) and not torch.allclose(step(seed1), step(seed2))
    # (prev - its noiseless part) / std must be N(0, 1).
    a_t, a_prev = ours.alphas_cumprod[500].double(), ours.alphas_cumprod[400].double()
    std = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt().item()
    z = (step(seed2) - step(None, variance_noise=torch.zeros_like(x))).double() / std
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05, (z.mean(), z.std())


def test_half_precision_computes_in_float32(generator):
    ours = DDIMScheduler(backend="cpu")
    ours.set_timesteps(N_STEPS)
    x, eps = (_randn(generator, *SHAPE).half() for _ in range(2))
    for t in ours.timesteps[[0, -1]].tolist():
        got = ours.step(eps, t, x)
        want = _reference_scheduler({}).step(eps.float(), t, x.float())
        for i in range(2):
            assert got[i].dtype == torch.float16
            # ~1 float16 ulp: float32 math rounded once (float16 math is off by several).
            torch.testing.assert_close(got[i].float(), want[i].half().float(), atol=1e-5,
                                       rtol=1e-3, msg=f"output {i} at t={t}")


@pytest.mark.parametrize("config", [
    dict(clip_sample=False),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
], ids=["default", "zero-snr"])
def test_sampling_loop_matches_diffusers(config, generator):
    diffusers = _diffusers()

    def sample(scheduler):  # a pipeline's loop with a fixed toy denoiser
        latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(25)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            model_output = torch.tanh(model_input) * (1 + t / 1000)
            latents = scheduler.step(model_output, t, latents, eta=0.0).prev_sample
        return latents

    got, want = sample(DDIMScheduler(**config)), sample(diffusers.DDIMScheduler(**config))
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_runs_in_diffusers_dit_pipeline(generator):
    diffusers = _diffusers()
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()
    for p in transformer.parameters():  # adaLN-zero starts as the identity: make it do something
        torch.nn.init.normal_(p, std=0.2, generator=generator)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()
    images = {}
    for scheduler in (DDIMScheduler(clip_sample=False), diffusers.DDIMScheduler(clip_sample=False)):
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.scheduler is scheduler
        with torch.no_grad():
            images[type(scheduler).__module__] = pipe(
                class_labels=[1, 2], guidance_scale=4.0, num_inference_steps=5, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
    got, want = images.values()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _permuted_like_diffusers_tests(x):
    """x (B, C, H, W) stored as diffusers' scheduler tests store their sample:
    (C, H, W, B) memory, ``.permute(3, 0, 1, 2)``."""
    return x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


@pytest.mark.parametrize("backend", [
    "cpu", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_permuted_inputs_match_diffusers_step_for_step(backend, generator):
    diffusers = _diffusers()
    config = dict(prediction_type="v_prediction", **X0_MODES["clip"])
    ours, theirs = DDIMScheduler(**config, backend=backend), diffusers.DDIMScheduler(**config)
    ref32 = _reference_scheduler(config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(N_STEPS)
    n = 4 * 3 * 8 * 8  # diffusers' dummy_sample_deter: arange / n, permuted
    sample = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
    for t in ours.timesteps.tolist():
        model_output = _permuted_like_diffusers_tests(sample * t / (t + 1) - 0.3)
        strided = torch.stack([model_output, -model_output], dim=-1)[..., 0]  # inner stride 2
        noise = _permuted_like_diffusers_tests(_randn(generator, *sample.shape))
        truth = _float64_step(ours, model_output, t, sample, 0.5, noise)
        ref = ref32.step(model_output.contiguous(), t, sample.contiguous(), eta=0.5,
                         variance_noise=noise.contiguous())
        want = theirs.step(model_output, t, sample, eta=0.5, variance_noise=noise)
        for output in (model_output, strided):
            assert not output.is_contiguous()
            got = ours.step(output, t, sample, eta=0.5, variance_noise=noise)
            for i, name in enumerate(("prev_sample", "pred_original_sample")):
                own_err = max(_max_err(ref[i], truth[i]), _max_err(want[i], truth[i]))
                bound = 2 * own_err + 8 * F32_EPS * max(1.0, truth[i].abs().max().item())
                err, gap = _max_err(got[i], truth[i]), _max_err(got[i], want[i].double())
                assert err <= bound, f"{name} at t={t}: error {err:.3e} exceeds {bound:.3e}"
                assert gap <= bound + own_err, f"{name} at t={t}: {gap:.3e} from diffusers"
        sample = _permuted_like_diffusers_tests(want.prev_sample)
