"""One fused DDIM step (classifier-free guidance + update + noise), the public op.

Backends: C++ CPU, CUDA and Triton run the whole step in one launch (two with
dynamic thresholding, whose per-sample quantile needs x0 first) of an op that
takes one ``StepArgs`` record; the reference composes ``reference.ddim``'s
``cfg_combine`` and ``ddim_step``. ``auto`` takes the C++ kernel on CPU and the
order of ``vqkernels._dispatch`` on CUDA; inputs that require grad (the kernels
have no backward) and float64 samples run the reference.

Rounding: the C++ CPU step rounds each operation as diffusers' float32 step
does (no FMA contraction); CUDA (FMA) and Triton (FMA, approximate division)
differ from it at the ulp level, within the numerics contract.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, get_type_hints

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops._ddim_checks import validate_step
from vqkernels.ops._layout import dense_rows, unit_stride_rows
from vqkernels.reference import ddim as reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class StepConfig:
    """The scalars of one step, as every backend receives them."""

    num_inference_steps: int
    num_train_timesteps: int
    final_alpha_cumprod: float
    eta: float
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float
    thresholding: bool
    dynamic_thresholding_ratio: float
    sample_max_value: float
    use_clipped_model_output: bool
    guidance_scale: float
    guided_elems: int
    write_x0: bool


class StepArgs(NamedTuple):
    """The arguments of the fused step ops, in their schema's order (``STEP_SCHEMA``).

    ``torch.ops.vqkernels.ddim_step`` (C++ / CUDA, schema in
    csrc/op_registry.cpp) and ``ddim_step_triton`` take these positionally
    and return ``(prev_sample, pred_original_sample)``, each ``(B, M)`` like
    ``sample`` or empty ``(0,)`` when its ``write_*`` flag is off.
    """

    sample: torch.Tensor                 # (B, M) contiguous
    cond: torch.Tensor                   # (B, >= M) model output rows, unit inner stride
    uncond: torch.Tensor | None          # like cond; given: guide the first guided_elems
    timesteps: torch.Tensor              # (B,) int64
    alphas_cumprod: torch.Tensor         # (T,) float32 contiguous
    variance_noise: torch.Tensor | None  # (B, M) in the sample's dtype or float32
    noise_seed: torch.Tensor | None      # (1,) int64 Philox key of in-kernel noise
    threshold: torch.Tensor | None       # (B,) float32 dynamic-thresholding scale
    step_ratio: int                      # prev_t = t - step_ratio
    final_alpha_cumprod: float
    eta: float
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float
    use_clipped_model_output: bool
    guidance_scale: float
    guided_elems: int
    write_prev: bool
    write_x0: bool


_SCHEMA_TYPES = {torch.Tensor: "Tensor", torch.Tensor | None: "Tensor?", int: "int",
                 float: "float", str: "str", bool: "bool"}
STEP_SCHEMA = "({}) -> (Tensor prev_sample, Tensor pred_original_sample)".format(", ".join(
    f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in get_type_hints(StepArgs).items()))


# --- backends ---------------------------------------------------------------------------
# Each takes sample (B, M), cond and uncond (B, >= M) views of the model output
# (uncond None without guidance), int64 timesteps (B,), the alphas_cumprod
# table, noise (B, M) or a Philox seed (1,) or neither, and a StepConfig.

def _run_reference(sample, cond, uncond, timesteps, table, noise, seed, cfg: StepConfig):
    m, g = sample.shape[1], cfg.guided_elems
    out = cond[:, :m]
    if uncond is not None:
        guided = reference.cfg_combine(uncond[:, :g], cond[:, :g], cfg.guidance_scale)
        out = torch.cat([guided, cond[:, g:m]], dim=1)
    if seed is not None:
        offsets = torch.arange(sample.numel(), device=sample.device).view(sample.shape)
        noise = reference.philox_normal(int(seed.item()), offsets)
    prev, x0 = reference.ddim_step(
        out, timesteps, sample, table, cfg.final_alpha_cumprod,
        num_inference_steps=cfg.num_inference_steps, num_train_timesteps=cfg.num_train_timesteps,
        eta=cfg.eta, prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.clip_sample_range, thresholding=cfg.thresholding,
        dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
        sample_max_value=cfg.sample_max_value,
        use_clipped_model_output=cfg.use_clipped_model_output,
        variance_noise=noise if cfg.eta > 0 else None)
    return prev, (x0 if cfg.write_x0 else None)


def _run_compiled(*inputs):
    return _run_fused(torch.ops.vqkernels.ddim_step, *inputs)


def _run_triton(*inputs):
    return _run_fused(torch.ops.vqkernels.ddim_step_triton, *inputs)


def _run_fused(op, sample, cond, uncond, timesteps, table, noise, seed, cfg: StepConfig):
    """One launch of a fused step op, or two with dynamic thresholding."""
    table = table.to(device=sample.device, dtype=torch.float32).contiguous()
    threshold = None
    if cfg.thresholding:
        # Pass 1 writes only the unclipped x0; its per-sample quantile of
        # |x0| (as the reference computes it) scales pass 2.
        raw = replace(cfg, thresholding=False, clip_sample=False)
        _, raw_x0 = op(*_step_args(sample, cond, uncond, timesteps, table, None, None, None, raw,
                                   write_prev=False, write_x0=True))
        threshold = torch.quantile(raw_x0.float().abs(), cfg.dynamic_thresholding_ratio,
                                   dim=1).clamp_(min=1, max=cfg.sample_max_value)
    prev, x0 = op(*_step_args(sample, cond, uncond, timesteps, table, noise, seed, threshold, cfg,
                              write_prev=True, write_x0=cfg.write_x0))
    return prev, (x0 if cfg.write_x0 else None)


def _step_args(sample, cond, uncond, timesteps, table, noise, seed, threshold, cfg, *,
               write_prev, write_x0) -> StepArgs:
    return StepArgs(
        sample=sample, cond=cond, uncond=uncond, timesteps=timesteps, alphas_cumprod=table,
        variance_noise=noise, noise_seed=seed, threshold=threshold,
        step_ratio=cfg.num_train_timesteps // cfg.num_inference_steps,
        final_alpha_cumprod=cfg.final_alpha_cumprod, eta=cfg.eta,
        prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.clip_sample_range,
        use_clipped_model_output=cfg.use_clipped_model_output,
        guidance_scale=cfg.guidance_scale, guided_elems=cfg.guided_elems,
        write_prev=write_prev, write_x0=write_x0)


def _no_grad_limit(*, requires_grad=False, **_):
    return (["inputs require grad and the fused step has no backward (use backend='reference')"]
            if requires_grad else [])


DISPATCH = OpDispatch(
    op="ddim_step",
    backends={
        "reference": Backend("reference", _run_reference),
        "cpu": Backend("cpu", _run_compiled, KERNEL_DTYPES, _no_grad_limit),
        "cuda": Backend("cuda", _run_compiled, KERNEL_DTYPES, _no_grad_limit),
        "triton": Backend("triton", _run_triton, KERNEL_DTYPES, _no_grad_limit),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)


# --- the op -----------------------------------------------------------------------------

def ddim_step(
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_inference_steps: int,
    final_alpha_cumprod: float = 1.0,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    guidance_scale: float | None = None,
    uncond_output: torch.Tensor | None = None,
    guidance_channels: int | None = None,
    variance_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_seed: torch.Tensor | None = None,
    return_pred_original: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One DDIM step ``x_t -> x_{t - T // n}`` fused with guidance and noise.

    Returns ``(prev_sample, pred_original_sample)`` (the second ``None`` when
    ``return_pred_original=False``, which saves its write). The math is
    ``vqkernels.reference.ddim.ddim_step`` (diffusers' ``DDIMScheduler.step``,
    DDIM eq. 12) with ``T = len(alphas_cumprod)``, after the guidance combine:

    - ``guidance_scale=None``: the model output is used as is (batch B).
    - ``guidance_scale=s`` with ``uncond_output``: ``uncond + s * (cond -
      uncond)`` of the two tensors; without it, ``model_output`` has batch 2B
      ordered ``[cond; uncond]`` (DiT's ``forward_with_cfg``).
    - ``guidance_channels``: guide only the first C channels (dim 1); the rest
      come from the cond half (DiT guides 3 of 4). Default: all of them.

    The model output may have more channels than ``sample`` (DiT's learned
    sigma): the first ``sample.shape[1]`` are used. ``timestep`` is an int, a
    0-d tensor or a ``(B,)`` integer tensor (each sample at its own step; on
    the sample's device nothing syncs with the host). A device timestep
    outside ``[0, T)`` cannot be checked without a sync: its sample comes out
    NaN. ``final_alpha_cumprod`` is the ``a_prev`` past the start (1.0 for
    diffusers' ``set_alpha_to_one``).

    Noise (``eta > 0``): ``variance_noise`` when given, else drawn in the
    kernel from Philox keyed by ``noise_seed`` (one int64 on the sample's
    device, e.g. from a schedule of seeds that a CUDA graph replays), else by a
    seed drawn from ``generator`` (the device's default generator when None);
    the stream is ``reference.ddim.philox_normal(seed, b * M + j)``.

    Math in float32 for float16/bfloat16/float32 tensors (the reference: in
    float64 for float64); outputs in ``sample.dtype``. No autograd: inputs that
    require grad run the reference under ``backend="auto"``.
    """
    validate_step(model_output, timestep, sample, alphas_cumprod, num_inference_steps,
                  final_alpha_cumprod, eta, prediction_type, clip_sample_range,
                  dynamic_thresholding_ratio, sample_max_value, guidance_scale, uncond_output,
                  guidance_channels, variance_noise, noise_seed)
    b, m = sample.shape[0], math.prod(sample.shape[1:])
    channels = sample.shape[1] if sample.dim() >= 2 else 1
    if b == 0:
        return torch.empty_like(sample), (torch.empty_like(sample) if return_pred_original else None)
    cond, uncond = _model_outputs(model_output, uncond_output, guidance_scale, sample)
    timesteps = _per_sample_timesteps(timestep, b, sample.device)
    requires_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (model_output, uncond_output, sample))
    run = DISPATCH.select(backend, sample.device, sample.dtype, requires_grad=requires_grad).run

    noise, seed = None, None
    if eta > 0:
        if variance_noise is not None:
            # Kernels read noise in the sample's dtype or float32: never round
            # fp32 noise down to a bf16 sample's precision before the fp32 math.
            keep = variance_noise.dtype in (sample.dtype, torch.float32)
            noise = dense_rows(variance_noise, b, m,
                                variance_noise.dtype if keep else torch.float32)
        else:
            seed = noise_seed.reshape(1) if noise_seed is not None else draw_noise_seed(
                generator, sample.device)
    cfg = StepConfig(
        num_inference_steps=int(num_inference_steps),
        num_train_timesteps=int(alphas_cumprod.shape[0]),
        final_alpha_cumprod=float(final_alpha_cumprod), eta=float(eta),
        prediction_type=prediction_type, clip_sample=bool(clip_sample),
        clip_sample_range=float(clip_sample_range), thresholding=bool(thresholding),
        dynamic_thresholding_ratio=float(dynamic_thresholding_ratio),
        sample_max_value=float(sample_max_value),
        use_clipped_model_output=bool(use_clipped_model_output),
        guidance_scale=float(guidance_scale) if guidance_scale is not None else 1.0,
        guided_elems=(channels if guidance_channels is None else guidance_channels) * (m // max(channels, 1)),
        write_x0=bool(return_pred_original),
    )
    prev, x0 = run(sample.reshape(b, m).contiguous(), cond, uncond, timesteps, alphas_cumprod,
                   noise, seed, cfg)
    return prev.view(sample.shape), (x0.view(sample.shape) if x0 is not None else None)


def draw_noise_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A fresh Philox key (1,) int64 on ``device``, drawn from ``generator``.

    No host sync: the draw happens on the generator's device (a CPU
    generator's seed is then copied to the sample's device).
    """
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device,
                         dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def _model_outputs(model_output, uncond_output, guidance_scale, sample):
    """(cond, uncond) as (B, M) rows with unit inner stride; uncond None without guidance."""
    if guidance_scale is None:
        return unit_stride_rows(model_output, sample), None
    if uncond_output is not None:
        return unit_stride_rows(model_output, sample), unit_stride_rows(uncond_output, sample)
    rows = unit_stride_rows(model_output, sample)
    b = sample.shape[0]
    return rows[:b], rows[b:]


def _per_sample_timesteps(timestep, b, device):
    if isinstance(timestep, torch.Tensor):
        t = timestep.to(device=device, dtype=torch.int64)
        return t.expand(b) if t.dim() == 0 else t
    return torch.full((b,), int(timestep), dtype=torch.int64, device=device)


# --- torch.library registration ---------------------------------------------------------

def _fake(*args, **kwargs):
    step = StepArgs(*args, **kwargs)

    def out(write):
        return step.sample.new_empty(step.sample.shape if write else (0,))

    return out(step.write_prev), out(step.write_x0)


def _ddim_step_triton(*args, **kwargs):
    from vqkernels.triton import ddim as triton_ddim  # imports triton on first use

    return triton_ddim.ddim_step(StepArgs(*args, **kwargs))


torch.library.define("vqkernels::ddim_step_triton", STEP_SCHEMA)
torch.library.impl("vqkernels::ddim_step_triton", "default", _ddim_step_triton)
torch.library.register_fake("vqkernels::ddim_step_triton", _fake)
if _ext._C is not None:
    torch.library.register_fake("vqkernels::ddim_step", _fake)
