"""Tests for the pure-PyTorch DDIM reference (vqkernels.reference.ddim).

Every literal below marked "diffusers" was checked by hand against diffusers
0.42.1 ``DDIMScheduler`` (float32 tables) in a throwaway environment; diffusers
is not a dependency. The reference reproduced those float32 tables, all
timestep schedules (T in {7, 50, 999, 1000, 1001}, every n, every spacing,
steps_offset 0/1) and ``step``/``add_noise`` outputs bit for bit.
"""

import math

import pytest
import torch

from vqkernels.reference import ddim

T = 1000


def _close(actual, expected, atol, rtol=0.0, what=""):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{what}: max abs error {err:.3e} (atol {atol:g}, rtol {rtol:g})"
    )


def _table(dtype=torch.float64, **kw):
    return ddim.alphas_cumprod(ddim.betas_for_schedule(dtype=dtype, **kw))


# ---------------------------------------------------------------- timesteps

# diffusers set_timesteps outputs (T = 1000).
TIMESTEP_CASES = [
    ("leading", 0, 10, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("leading", 1, 10, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ("trailing", 0, 10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("trailing", 1, 10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", 0, 10, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ("linspace", 1, 10, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ("leading", 0, 7, [852, 710, 568, 426, 284, 142, 0]),
    ("trailing", 0, 3, [999, 666, 332]),
    ("trailing", 0, 7, [999, 856, 713, 570, 428, 285, 142]),
    # 832.5 -> 832 and 499.5 -> 500: numpy rounds half to even.
    ("linspace", 0, 7, [999, 832, 666, 500, 333, 166, 0]),
    ("linspace", 0, 1, [0]),
    ("trailing", 0, 1, [999]),
]


@pytest.mark.parametrize("spacing,offset,n,expected", TIMESTEP_CASES)
def test_timesteps_literal(spacing, offset, n, expected):
    ts = ddim.ddim_timesteps(n, T, spacing, offset)
    assert ts.dtype == torch.int64
    assert ts.tolist() == expected, f"{spacing} n={n} offset={offset}: {ts.tolist()}"


def test_trailing_has_exactly_n_steps():
    # diffusers returns 62 steps ending [..., 65, 48, 32, 15, -1] here (float
    # rounding in numpy.arange); the reference keeps the first n.
    ts = ddim.ddim_timesteps(61, T, "trailing")
    assert len(ts) == 61 and ts[-4:].tolist() == [65, 48, 32, 15]


@pytest.mark.parametrize("num_train", [1000, 999, 50])
def test_timesteps_follow_numpy_formulas(num_train):
    np = pytest.importorskip("numpy")
    for n in range(1, num_train + 1):
        for offset in (0, 3):
            ratio = num_train // n
            want = {
                "leading": (np.arange(0, n) * ratio).round()[::-1] + offset,
                "trailing": np.round(np.arange(num_train, 0, -num_train / n)) - 1,
                "linspace": np.linspace(0, num_train - 1, n).round()[::-1],
            }
            for spacing, values in want.items():
                got = ddim.ddim_timesteps(n, num_train, spacing, offset).tolist()
                assert got == values.astype(np.int64)[:n].tolist(), (spacing, n, offset)


def test_timesteps_errors():
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim.ddim_timesteps(1001, T)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim.ddim_timesteps(0, T)
    with pytest.raises(ValueError, match="timestep_spacing"):
        ddim.ddim_timesteps(10, T, "karras")


def test_prev_timesteps_is_t_minus_ratio_for_every_spacing():
    ts = ddim.ddim_timesteps(3, T, "trailing")
    assert ddim.prev_timesteps(ts, 3, T).tolist() == [666, 333, -1]
    assert ddim.prev_timesteps(500, 10, T) == 400
    ts = ddim.ddim_timesteps(7, T, "linspace")
    assert ddim.prev_timesteps(ts, 7, T).tolist() == [857, 690, 524, 358, 191, 24, -142]


# ---------------------------------------------------------------- tables

def test_linear_betas_and_alphas_cumprod():
    b = ddim.betas_for_schedule()
    assert b.dtype == torch.float64 and b.shape == (T,)
    _close(b[[0, -1]], [1e-4, 0.02], atol=1e-15, what="linear endpoints")
    ac = ddim.alphas_cumprod(b)
    # prod_{i<1000} (1 - beta_i), float64; diffusers float32 gives 4.035830352e-05.
    _close(ac[999:], [4.0358297653756754e-05], atol=0, rtol=1e-12, what="ac[999] f64")
    _close(ac[999:], [math.prod(1 - b_i for b_i in b.tolist())], atol=0, rtol=1e-12, what="prod")
    ac32 = _table(torch.float32)
    assert ac32.dtype == torch.float32
    assert ac32[999].item() == 4.035830352222547e-05  # diffusers, bit exact
    assert ac32[0].item() == 0.9998999834060669  # diffusers


def test_scaled_linear_matches_diffusers():
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    b = ddim.betas_for_schedule(**kw)
    _close(b[[0, -1]], [0.00085, 0.012], atol=1e-15, what="scaled_linear endpoints")
    _close(b[1:2], [(0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) / 999) ** 2], atol=1e-15)
    assert _table(torch.float32, **kw)[500].item() == 0.27633246779441833  # diffusers


def test_squaredcos_cap_v2():
    b = ddim.betas_for_schedule(beta_schedule="squaredcos_cap_v2")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    _close(b[:1], [1 - f(1 / T) / f(0.0)], atol=1e-16, what="beta[0]")
    _close(b[:1], [4.128422482196914e-05], atol=1e-16, what="beta[0] literal")
    assert b[-1].item() == 0.999  # 1 - 0 / f(0.999) capped at max_beta
    assert (b <= 0.999).all() and (b > 0).all()
    _close(ddim.alphas_cumprod(b)[-1:], [2.4287669070348567e-09], atol=0, rtol=1e-10)
    b32 = ddim.betas_for_schedule(beta_schedule="squaredcos_cap_v2", dtype=torch.float32)
    assert b32[0].item() == 4.128422369831242e-05  # diffusers
    assert ddim.alphas_cumprod(b32)[500].item() == 0.4922850430011749  # diffusers


def test_trained_betas_override_and_unknown_schedule():
    trained = [0.1, 0.2, 0.3]
    b = ddim.betas_for_schedule(3, beta_schedule="no-such", trained_betas=trained)
    _close(b, trained, atol=0, what="trained_betas")
    _close(ddim.alphas_cumprod(b), [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7], atol=1e-15)
    with pytest.raises(ValueError, match="beta_schedule"):
        ddim.betas_for_schedule(beta_schedule="no-such")


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_snr_rescale(schedule):
    kw = dict(beta_schedule=schedule)
    if schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    plain = _table(**kw)
    zsnr = _table(rescale_betas_zero_snr=True, **kw)
    assert abs(zsnr[-1].item()) < 1e-15, f"terminal alpha_bar {zsnr[-1].item()}"
    _close(zsnr[:1], plain[:1], atol=1e-15, what="alpha_bar[0] kept")
    assert (zsnr[1:] < zsnr[:-1]).all(), "alpha_bar must stay decreasing"
    # sqrt(alpha_bar) is an affine map of the original one.
    s0, sT = plain[0].sqrt(), plain[-1].sqrt()
    _close(zsnr.sqrt(), (plain.sqrt() - sT) * s0 / (s0 - sT), atol=1e-14, what="affine")


def test_zero_snr_float32_matches_diffusers():
    ac = _table(torch.float32, beta_schedule="scaled_linear", beta_start=0.00085,
                beta_end=0.012, rescale_betas_zero_snr=True)
    # diffusers on one machine; libm's rounding of the float32 sqrt chain moves it by a few
    # ulps elsewhere. test_scheduler compares the tables with diffusers in-process, bitwise.
    assert ac[-1].item() == 0.0 and ac[500].item() == pytest.approx(0.24101854860782623, rel=1e-6)


def test_final_alpha_cumprod():
    ac = _table()
    one = ddim.final_alpha_cumprod(ac, True)
    assert one.shape == () and one.item() == 1.0 and one.dtype == ac.dtype
    first = ddim.final_alpha_cumprod(ac, False)
    assert first.shape == () and first.item() == ac[0].item()


# ---------------------------------------------------------------- step

def _model_output(kind, x0, eps, a):
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    return a.sqrt() * eps - (1 - a).sqrt() * x0  # v target


def _broadcast(a, x):
    return a.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_exact_model_output_recovers_x0_and_next_marginal(prediction_type, spacing):
    n = 10
    ac = _table()
    final = ddim.final_alpha_cumprod(ac, False)
    x0, eps = torch.randn(3, 4, 5, 7, dtype=torch.float64), torch.randn(3, 4, 5, 7, dtype=torch.float64)
    for t in ddim.ddim_timesteps(n, T, spacing).tolist():
        x_t = ddim.add_noise(x0, eps, t, ac)
        out = _model_output(prediction_type, x0, eps, ac[t])
        prev, pred_x0 = ddim.ddim_step(out, t, x_t, ac, final, num_inference_steps=n,
                                       prediction_type=prediction_type)
        what = f"{prediction_type} {spacing} t={t}"
        _close(pred_x0, x0, atol=1e-10, what=what + " x0")
        prev_t = ddim.prev_timesteps(t, n, T)
        _close(prev, ddim.add_noise(x0, eps, max(prev_t, 0), ac), atol=1e-10, what=what + " prev")


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_final_step_uses_final_alpha_cumprod(set_alpha_to_one, eta):
    n = 10
    ac = _table()
    final = ddim.final_alpha_cumprod(ac, set_alpha_to_one)
    x0, eps, z = (torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(3))
    t = ddim.ddim_timesteps(n, T, "leading", steps_offset=1)[-1].item()  # t = 1, prev = -99
    x_t = ddim.add_noise(x0, eps, t, ac)
    prev, pred_x0 = ddim.ddim_step(eps, t, x_t, ac, final, num_inference_steps=n, eta=eta,
                                   variance_noise=z if eta else None)
    a_p = final.item()
    var = (1 - a_p) / (1 - ac[t].item()) * (1 - ac[t].item() / a_p)
    want = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - eta ** 2 * var) * eps + eta * math.sqrt(var) * z
    _close(prev, want, atol=1e-12, what=f"final step set_alpha_to_one={set_alpha_to_one}")
    if set_alpha_to_one:
        _close(prev, pred_x0, atol=1e-12, what="final step lands on x0")


def test_eta_one_variance_hand_check():
    ac = _table()
    a_t, a_p = ac[500].item(), ac[400].item()
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    assert abs(var - 0.5230129361152649) < 2e-7  # diffusers float32 _get_variance(500, 400)
    x, e, z = 0.7, -0.3, 1.5
    prev, x0 = ddim.ddim_step(torch.tensor([e], dtype=torch.float64), 500,
                              torch.tensor([x], dtype=torch.float64), ac,
                              ddim.final_alpha_cumprod(ac, True), num_inference_steps=10,
                              eta=1.0, variance_noise=torch.tensor([z], dtype=torch.float64))
    x0_want = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
    want = math.sqrt(a_p) * x0_want + math.sqrt(1 - a_p - var) * e + math.sqrt(var) * z
    _close(x0, [x0_want], atol=1e-13, what="x0")
    _close(prev, [want], atol=1e-13, what="eta=1 prev")


# diffusers DDIMScheduler(prediction_type=p, clip_sample=False), set_timesteps(10),
# step(mo, 500, x, eta=0.5, variance_noise=z): (prev_sample, pred_original_sample).
DIFFUSERS_STEP = {
    "epsilon": ([1.0810161, -1.8967557, 3.4530325], [1.4483287, -4.2738447, 8.203392]),
    "sample": ([0.8097024, -0.99651867, 1.7419609], [0.1, 0.2, -0.3]),
    "v_prediction": ([0.79831904, -1.1315355, 1.9725487], [0.043428831, -0.47098333, 0.84593529]),
}


@pytest.mark.parametrize("prediction_type", list(DIFFUSERS_STEP))
def test_step_matches_diffusers_literals(prediction_type):
    ac = _table(torch.float32)
    x = torch.tensor([[0.5, -1.0, 2.0]])
    mo = torch.tensor([[0.1, 0.2, -0.3]])
    z = torch.tensor([[1.0, -0.5, 0.25]])
    prev, x0 = ddim.ddim_step(mo, 500, x, ac, ddim.final_alpha_cumprod(ac, True),
                              num_inference_steps=10, eta=0.5, prediction_type=prediction_type,
                              variance_noise=z)
    want_prev, want_x0 = DIFFUSERS_STEP[prediction_type]
    assert prev.dtype == torch.float32
    _close(prev[0], want_prev, atol=0, rtol=1e-6, what="prev_sample")
    _close(x0[0], want_x0, atol=0, rtol=1e-6, what="pred_original_sample")


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_per_sample_timesteps_equal_per_sample_loop(dtype, atol, prediction_type, set_alpha_to_one):
    n = 20
    ac = _table()
    final = ddim.final_alpha_cumprod(ac, set_alpha_to_one)
    ts = torch.tensor([999, 500, 37, 0, 250])  # 37 and 0 step past the start
    out, x, z = (torch.randn(5, 3, 6, 5, dtype=dtype) * 2 for _ in range(3))
    kw = dict(num_inference_steps=n, eta=0.7, prediction_type=prediction_type,
              thresholding=True, sample_max_value=1.7)
    prev, x0 = ddim.ddim_step(out, ts, x, ac, final, variance_noise=z, **kw)
    assert prev.dtype == dtype and x0.dtype == dtype
    for i, t in enumerate(ts.tolist()):
        p_i, x0_i = ddim.ddim_step(out[i:i + 1], t, x[i:i + 1], ac, final,
                                   variance_noise=z[i:i + 1], **kw)
        _close(prev[i:i + 1], p_i, atol=atol, what=f"prev sample {i} t={t}")
        _close(x0[i:i + 1], x0_i, atol=atol, what=f"x0 sample {i} t={t}")
        p_0d, _ = ddim.ddim_step(out[i:i + 1], torch.tensor(t), x[i:i + 1], ac, final,
                                 variance_noise=z[i:i + 1], **kw)
        _close(p_0d, p_i, atol=0, what=f"0-d timestep {t}")


def test_add_noise_per_sample():
    ac = _table()
    x0, eps = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
    ts = torch.tensor([0, 500, 999])
    got = ddim.add_noise(x0, eps, ts, ac)
    for i, t in enumerate(ts.tolist()):
        want = math.sqrt(ac[t].item()) * x0[i] + math.sqrt(1 - ac[t].item()) * eps[i]
        _close(got[i], want, atol=1e-15, what=f"add_noise t={t}")


def test_clip_sample_and_clipped_model_output():
    ac = _table()
    final = ddim.final_alpha_cumprod(ac, True)
    t, n = 600, 10
    a_t, a_p = ac[t], ac[t - 100]
    x0 = torch.tensor([[2.0, -3.0, 0.5, -0.25]], dtype=torch.float64)
    eps = torch.tensor([[0.3, -1.2, 0.8, 0.1]], dtype=torch.float64)
    x_t = ddim.add_noise(x0, eps, t, ac)
    kw = dict(num_inference_steps=n, clip_sample=True, clip_sample_range=1.5)
    clipped = torch.tensor([[1.5, -1.5, 0.5, -0.25]], dtype=torch.float64)
    prev, got_x0 = ddim.ddim_step(eps, t, x_t, ac, final, **kw)
    _close(got_x0, clipped, atol=1e-12, what="clipped x0")
    _close(prev, a_p.sqrt() * clipped + (1 - a_p).sqrt() * eps, atol=1e-12, what="prev, raw eps")
    prev, _ = ddim.ddim_step(eps, t, x_t, ac, final, use_clipped_model_output=True, **kw)
    eps_c = (x_t - a_t.sqrt() * clipped) / (1 - a_t).sqrt()
    _close(prev, a_p.sqrt() * clipped + (1 - a_p).sqrt() * eps_c, atol=1e-12, what="prev, eps from clipped x0")


def test_dynamic_thresholding_hand_case():
    ac = _table()
    x0 = torch.tensor([
        [[0.5, 3.0], [-2.0, 1.0]],      # |x| quantile(0.5) = 1.5 -> s = 1.5
        [[0.1, -0.2], [0.3, 0.4]],      # quantile 0.25 -> s clamped up to 1
        [[10.0, -10.0], [10.0, -10.0]],  # quantile 10 -> s clamped down to 2.5
    ], dtype=torch.float64)
    want = torch.tensor([
        [[1 / 3, 1.0], [-1.0, 2 / 3]],
        [[0.1, -0.2], [0.3, 0.4]],
        [[1.0, -1.0], [1.0, -1.0]],
    ], dtype=torch.float64)
    x_t = torch.randn(3, 2, 2, dtype=torch.float64)
    _, got = ddim.ddim_step(x0, 400, x_t, ac, ddim.final_alpha_cumprod(ac, True),
                            num_inference_steps=10, prediction_type="sample", thresholding=True,
                            dynamic_thresholding_ratio=0.5, sample_max_value=2.5,
                            clip_sample=True, clip_sample_range=0.01)  # thresholding wins
    _close(got, want, atol=1e-15, what="thresholded x0")


def test_step_errors_and_low_precision():
    ac = _table()
    final = ddim.final_alpha_cumprod(ac, True)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="variance_noise"):
        ddim.ddim_step(x, 500, x, ac, final, num_inference_steps=10, eta=0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim.ddim_step(x, 500, x, ac, final, num_inference_steps=10, prediction_type="flow")
    x16, e16 = torch.randn(2, 3, dtype=torch.float16), torch.randn(2, 3, dtype=torch.float16)
    prev, x0 = ddim.ddim_step(e16, 500, x16, ac, final, num_inference_steps=10)
    assert prev.dtype == torch.float16 and x0.dtype == torch.float16
    want, _ = ddim.ddim_step(e16.float(), 500, x16.float(), ac, final, num_inference_steps=10)
    _close(prev.float(), want.half().float(), atol=0, what="fp16 = rounded fp32 math")


# ---------------------------------------------------------------- guidance

def test_cfg_combine_hand_case():
    got = ddim.cfg_combine(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), 4.0)
    _close(got, [9.0, -6.0], atol=0, what="cfg_combine")


def test_cfg_combine_batched_channel_split():
    cond = torch.tensor([[[1.0], [2.0], [7.0]], [[0.0], [-1.0], [8.0]]])    # (B=2, C=3, 1)
    uncond = torch.tensor([[[0.0], [1.0], [5.0]], [[1.0], [1.0], [9.0]]])
    out = torch.cat([cond, uncond])  # DiT order: [cond; uncond]
    got = ddim.cfg_combine_batched(out, 3.0, channels=2)
    want = torch.tensor([[[3.0], [4.0], [7.0]], [[-2.0], [-5.0], [8.0]]])
    _close(got, want, atol=0, what="guided eps + cond passthrough")
    all_ch = ddim.cfg_combine_batched(out, 3.0)
    _close(all_ch[:, 2], [[11.0], [6.0]], atol=0, what="channels=None guides all")
    with pytest.raises(ValueError, match="model_output"):
        ddim.cfg_combine_batched(out[:3], 3.0)
