"""Pure-PyTorch reference for DDIM's noise tables and timestep schedule.

diffusers' ``DDIMScheduler`` tables (``betas``, ``alphas_cumprod``,
``final_alpha_cumprod``) and ``set_timesteps``, value for value; re-exported
by ``vqkernels.reference.ddim``, next to the step that reads them.
Tables default to float64 (the truth); ``dtype=torch.float32`` reproduces
diffusers' float32 tables bit for bit.
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------
# Noise tables
# --------------------------------------------------------------------------

def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    # Flawed", Algorithm 1: shift sqrt(alpha_bar) so its last value is 0 and
    # scale it so its first value is unchanged.
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def betas_for_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Per-step noise variances ``betas`` of shape ``(num_train_timesteps,)``.

    - ``"linear"``: ``linspace(beta_start, beta_end, T)``.
    - ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``
      (Stable Diffusion / latent diffusion).
    - ``"squaredcos_cap_v2"``: Nichol & Dhariwal 2021 cosine schedule,
      ``alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2`` and
      ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), 0.999)``
      (computed in Python double, like diffusers' ``betas_for_alpha_bar``).
    - ``trained_betas`` (array-like), when given, overrides the schedule.

    ``rescale_betas_zero_snr`` then applies Lin et al. 2023, Algorithm 1, so
    that ``alphas_cumprod[-1] == 0`` (zero terminal SNR) while
    ``alphas_cumprod[0]`` is kept.

    The table is computed in ``dtype``: float64 (default) is the truth,
    float32 reproduces diffusers' ``DDIMScheduler.betas`` exactly.

    Raises ``ValueError`` naming ``beta_schedule`` for an unknown schedule.
    """
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=dtype).clone()
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(
            beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=dtype
        ) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        T = num_train_timesteps
        betas = torch.tensor(
            [
                min(1 - _cosine_alpha_bar((i + 1) / T) / _cosine_alpha_bar(i / T), 0.999)
                for i in range(T)
            ],
            dtype=dtype,
        )
    else:
        raise ValueError(
            f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}"
        )
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """``a_t = prod_{s <= t} (1 - beta_s)``, same shape and dtype as ``betas``."""
    return torch.cumprod(1.0 - betas, dim=0)


def final_alpha_cumprod(alphas_cumprod: torch.Tensor, set_alpha_to_one: bool) -> torch.Tensor:
    """The ``a_prev`` used by the last DDIM step (where ``prev_t < 0``).

    ``1.0`` when ``set_alpha_to_one`` (the last step lands on the clean
    sample), else ``alphas_cumprod[0]``. Returned as a 0-d tensor with the
    table's dtype and device.
    """
    if set_alpha_to_one:
        return torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    return alphas_cumprod[0].clone()


# --------------------------------------------------------------------------
# Timestep schedule
# --------------------------------------------------------------------------

def ddim_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    *,
    device=None,
) -> torch.Tensor:
    """The descending int64 timesteps of diffusers' ``DDIMScheduler.set_timesteps``.

    With ``T = num_train_timesteps`` and ``n = num_inference_steps``:

    - ``"leading"``: ``arange(n)[::-1] * (T // n) + steps_offset``.
    - ``"trailing"``: ``round(arange(T, 0, -T / n)) - 1`` (``steps_offset``
      is ignored, as in diffusers).
    - ``"linspace"``: ``round(linspace(0, T - 1, n))[::-1]`` (``steps_offset``
      is ignored, as in diffusers).

    Rounding is numpy's (half to even, e.g. 832.5 -> 832), and the float
    arithmetic follows numpy's ``arange``/``linspace`` step by step, so every
    value equals diffusers'. One deliberate difference: for some ``n``
    (T = 1000: n = 61, 103, 121, ...) numpy's ``arange`` for ``"trailing"``
    yields an extra element ~0 through float rounding and diffusers returns
    ``n + 1`` timesteps ending in ``-1``; here the result always has exactly
    ``n`` entries (diffusers' first ``n``).

    Raises ``ValueError`` naming ``num_inference_steps`` when it is not in
    ``[1, T]`` and naming ``timestep_spacing`` when it is unknown.
    """
    T, n = int(num_train_timesteps), int(num_inference_steps)
    if n > T:
        raise ValueError(
            f"num_inference_steps ({n}) cannot be larger than num_train_timesteps ({T})"
        )
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    if timestep_spacing == "leading":
        ratio = T // n
        values = [i * ratio + steps_offset for i in reversed(range(n))]
    elif timestep_spacing == "trailing":
        # numpy arange(start, stop, step) fills start + i * ((start + step) - start).
        step = -(T / n)
        delta = (T + step) - T
        raw = [float(T), T + step] + [T + i * delta for i in range(2, n)]
        values = [round(v) - 1 for v in raw[:n]]
    elif timestep_spacing == "linspace":
        # numpy linspace(0, stop, n) is i * (stop / (n - 1)) with the last set to stop.
        stop = float(T - 1)
        raw = [i * (stop / (n - 1)) for i in range(n)] if n > 1 else [0.0]
        if n > 1:
            raw[-1] = stop
        values = [round(v) for v in reversed(raw)]
    else:
        raise ValueError(
            f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}"
        )
    return torch.tensor(values, dtype=torch.int64, device=device)


def prev_timesteps(timesteps, num_inference_steps: int, num_train_timesteps: int = 1000):
    """The timestep each DDIM step moves to: ``t - T // n``.

    This is exactly what diffusers' ``DDIMScheduler.step`` does for every
    ``timestep_spacing``, so for "trailing"/"linspace" the previous timestep
    is not always the next entry of the schedule (T = 1000, n = 3 trailing:
    timesteps 999, 666, 332 step to 666, 333, -333). A negative result means
    "past the start": the step then uses ``final_alpha_cumprod``.

    Works on a Python int (returns an int) or an integer tensor of any shape.
    """
    return timesteps - num_train_timesteps // num_inference_steps
