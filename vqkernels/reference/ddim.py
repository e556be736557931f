"""Pure-PyTorch reference for DDIM sampling (the specification).

Reproduces the numerics of diffusers' ``DDIMScheduler`` (``step``,
``add_noise``; the noise tables and ``set_timesteps`` are in
``ddim_schedule`` and re-exported here) as plain functions, plus the
classifier-free-guidance combine that a DiT sampler applies before each step
and the Philox noise the fused kernels draw. Kernels are tested against these.

Notation (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12):
``a_t = alphas_cumprod[t]`` (written alpha-bar elsewhere), ``x_t`` the noisy
sample, ``eps`` the noise, ``x0`` the clean sample, with
``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps``.
"""

from __future__ import annotations

import math

import torch

from vqkernels.reference.ddim_schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    alphas_cumprod,
    betas_for_schedule,
    ddim_timesteps,
    final_alpha_cumprod,
    prev_timesteps,
)

__all__ = [
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "PREDICTION_TYPES",
    "betas_for_schedule",
    "alphas_cumprod",
    "final_alpha_cumprod",
    "ddim_timesteps",
    "prev_timesteps",
    "cfg_combine",
    "cfg_combine_batched",
    "ddim_step",
    "add_noise",
    "philox_normal",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


# --------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------

def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (the truth); anything narrower is computed in float32.
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + s * (cond - uncond)``.

    Computed in float64 for float64 inputs, else float32; returned in
    ``cond.dtype``.
    """
    ct = _compute_dtype(uncond, cond)
    u, c = uncond.to(ct), cond.to(ct)
    return (u + guidance_scale * (c - u)).to(cond.dtype)


def cfg_combine_batched(
    model_output: torch.Tensor, guidance_scale: float, channels: int | None = None
) -> torch.Tensor:
    """Guidance on a doubled batch, DiT style.

    ``model_output`` has batch ``2B`` ordered ``[cond; uncond]``: rows
    ``0..B-1`` are the conditional predictions and rows ``B..2B-1`` the
    unconditional ones (the order of DiT's ``forward_with_cfg``). Channel
    dim is 1. The first ``channels`` channels (all when ``None``) are the
    noise prediction and get ``cfg_combine(uncond, cond, s)``; the remaining
    channels (e.g. DiT's learned variance) are passed through from the cond
    half. Returns the ``(B, ...)`` guided output.
    """
    if model_output.shape[0] % 2:
        raise ValueError(
            f"model_output batch must be even ([cond; uncond]), got shape {tuple(model_output.shape)}"
        )
    cond, uncond = model_output.chunk(2, dim=0)
    if channels is None:
        return cfg_combine(uncond, cond, guidance_scale)
    eps = cfg_combine(uncond[:, :channels], cond[:, :channels], guidance_scale)
    return torch.cat([eps, cond[:, channels:]], dim=1)


# --------------------------------------------------------------------------
# Step and forward noising
# --------------------------------------------------------------------------

def _alpha_at(alphas_cumprod, timestep, final, sample: torch.Tensor, dtype: torch.dtype):
    """``alphas_cumprod[timestep]`` shaped to broadcast against ``sample``.

    Negative timesteps select ``final`` (when given). Python ints are looked
    up on the host; tensors are gathered on the table's device with no host
    sync. A ``(B,)`` tensor gives one value per sample, shaped
    ``(B, 1, ..., 1)``.
    """
    if isinstance(timestep, torch.Tensor):
        t = timestep.to(alphas_cumprod.device)
        a = alphas_cumprod[t.clamp(min=0)]
        if final is not None:
            f = torch.as_tensor(final, dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
            a = torch.where(t >= 0, a, f)
        a = a.to(device=sample.device, dtype=dtype)
        if a.dim() == 1:
            a = a.reshape(-1, *([1] * (sample.dim() - 1)))
        return a
    if timestep < 0 and final is not None:
        a = torch.as_tensor(final, dtype=alphas_cumprod.dtype)
    else:
        a = alphas_cumprod[timestep]
    return a.to(device=sample.device, dtype=dtype)


def _threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    # Imagen dynamic thresholding (Saharia et al. 2022), as diffusers'
    # _threshold_sample: s = quantile(|x0|, ratio) per sample over all
    # non-batch dims, s clamped to [1, max_value], x0 -> clamp(x0, -s, s) / s.
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def ddim_step(
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod,
    *,
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    variance_noise: torch.Tensor | None = None,
):
    """One DDIM step ``x_t -> x_{prev_t}``; returns ``(prev_sample, pred_original_sample)``.

    The math of diffusers' ``DDIMScheduler.step`` (DDIM paper, eq. 12), with
    ``prev_t = t - T // n`` (see ``prev_timesteps``), ``a_t =
    alphas_cumprod[t]``, ``a_prev = alphas_cumprod[prev_t]`` or
    ``final_alpha_cumprod`` when ``prev_t < 0``, ``b_t = 1 - a_t``:

    1. From the model output, per ``prediction_type``:
       ``"epsilon"``: ``x0 = (x_t - sqrt(b_t) * out) / sqrt(a_t)``, ``eps = out``;
       ``"sample"``: ``x0 = out``, ``eps = (x_t - sqrt(a_t) * x0) / sqrt(b_t)``;
       ``"v_prediction"``: ``x0 = sqrt(a_t) * x_t - sqrt(b_t) * out``,
       ``eps = sqrt(a_t) * out + sqrt(b_t) * x_t``.
    2. ``thresholding``: Imagen dynamic thresholding of ``x0`` (per sample,
       ``s = quantile(|x0|, dynamic_thresholding_ratio)`` over all non-batch
       dims clamped to ``[1, sample_max_value]``, ``x0 = clamp(x0, -s, s) / s``);
       otherwise ``clip_sample``: ``x0 = clamp(x0, -r, r)``.
    3. ``var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)``,
       ``std = eta * sqrt(var)``.
    4. ``use_clipped_model_output``: ``eps = (x_t - sqrt(a_t) * x0) / sqrt(b_t)``
       from the (clipped) ``x0``.
    5. ``prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps``
       (the radicand clamped at 0, which only differs from diffusers where
       rounding would make it negative and diffusers returns NaN), plus
       ``std * variance_noise`` when ``eta > 0``.

    ``timestep`` is a Python int, a 0-d integer tensor, or a ``(B,)`` int64
    tensor of per-sample timesteps (each sample uses its own ``a_t`` and
    ``a_prev``, so a batched call equals stepping each sample alone; the
    thresholding quantile is per sample too). Tensor timesteps are resolved
    on device with no host sync; keep ``alphas_cumprod`` on the sample's
    device for that. Math runs in float64 when ``sample`` or
    ``model_output`` is float64, else in float32; outputs have
    ``sample.dtype``.

    Raises ``ValueError`` naming ``prediction_type`` when unknown and naming
    ``variance_noise`` when ``eta > 0`` and it is missing.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    if eta > 0 and variance_noise is None:
        raise ValueError("variance_noise is required when eta > 0 (the reference draws no noise)")
    ct = _compute_dtype(sample, model_output)
    x_t, out = sample.to(ct), model_output.to(ct)
    prev_t = prev_timesteps(timestep, num_inference_steps, num_train_timesteps)
    a_t = _alpha_at(alphas_cumprod, timestep, None, sample, ct)
    a_prev = _alpha_at(alphas_cumprod, prev_t, final_alpha_cumprod, sample, ct)
    b_t = 1 - a_t

    if prediction_type == "epsilon":
        x0 = (x_t - b_t.sqrt() * out) / a_t.sqrt()
        eps = out
    elif prediction_type == "sample":
        x0 = out
        eps = (x_t - a_t.sqrt() * x0) / b_t.sqrt()
    else:
        x0 = a_t.sqrt() * x_t - b_t.sqrt() * out
        eps = a_t.sqrt() * out + b_t.sqrt() * x_t

    if thresholding:
        x0 = _threshold_sample(x0, dynamic_thresholding_ratio, sample_max_value)
    elif clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)

    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance.sqrt()

    if use_clipped_model_output:
        eps = (x_t - a_t.sqrt() * x0) / b_t.sqrt()

    direction = (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
    prev = a_prev.sqrt() * x0 + direction
    if eta > 0:
        prev = prev + std * variance_noise.to(ct)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def add_noise(
    original: torch.Tensor, noise: torch.Tensor, timesteps, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion ``q(x_t | x0)``: ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``.

    ``timesteps`` is a Python int, a 0-d tensor, or a ``(B,)`` tensor of
    per-sample timesteps (broadcast over the non-batch dims). Math in
    float64 for float64 inputs, else float32; output in ``original.dtype``.
    """
    ct = _compute_dtype(original, noise)
    a = _alpha_at(alphas_cumprod, timesteps, None, original, ct)
    return (a.sqrt() * original.to(ct) + (1 - a).sqrt() * noise.to(ct)).to(original.dtype)


# --------------------------------------------------------------------------
# In-kernel noise
# --------------------------------------------------------------------------

_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: torch.Tensor, b: int):
    # The 64-bit product of uint32 values held in int64, as (high, low) words,
    # without overflowing int64: split b into 16-bit halves.
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_part = a * b_lo                       # < 2^48
    high = (a * b_hi + (low_part >> 16)) >> 16
    low = (low_part + ((a * b_hi) << 16)) & _MASK32
    return high, low


def philox_normal(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The standard normal noise the fused DDIM kernels draw, in float64.

    For each int ``offset``: Philox4x32-10 (Salmon et al. 2011) with counter
    ``(offset, 0, 0, 0)`` and key ``(seed mod 2^32, seed >> 32 mod 2^32)``
    gives words ``w0, w1``; each becomes a float32 uniform ``u = float32(v) *
    4.6566127342e-10`` with ``v`` the word read as int32 and folded to ``v >=
    0`` by ``v -> ~v``; then Box-Muller: ``n = sqrt(-2 log max(u0, 1e-7)) *
    cos(2 pi u1)``. This is ``triton.language.randn(seed, offset)``, and the
    C++ / CUDA kernels use the same words and uniforms, so all backends draw
    the same noise up to the rounding of log, sqrt and cos.
    """
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & _MASK32, seed >> 32
    c0 = offsets.to(torch.int64) & _MASK32
    c1 = c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_ROUND[0])
        hi2, lo2 = _mul_hi_lo(c2, _PHILOX_ROUND[1])
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_KEY_STEP[0]) & _MASK32
        k1 = (k1 + _PHILOX_KEY_STEP[1]) & _MASK32

    def uniform(word):
        signed = torch.where(word >= 2 ** 31, word - 2 ** 32, word)
        folded = torch.where(signed < 0, -signed - 1, signed)
        return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    u0, u1 = uniform(c0).double().clamp(min=1e-7), uniform(c1).double()
    return (-2.0 * u0.log()).sqrt() * torch.cos(2 * math.pi * u1)
